import numpy as np
import onnx
import pytest
import torch

from pipeline import bench, contract, evaluate, export, runtime
from pipeline.model import ModelConfig, Net


def test_summarize_known_timings():
    times = [0.001] * 98 + [0.010, 0.020]  # 100 calls of batch 8
    s = bench.summarize(times, batch=8)
    assert s["p50_ms"] == pytest.approx(1.0)
    assert s["p90_ms"] == pytest.approx(1.0)
    assert s["p99_ms"] == pytest.approx(10.1)  # linear between the 99th and 100th values
    assert s["mean_ms"] == pytest.approx((98 * 1 + 10 + 20) / 100)
    assert s["images_per_s"] == pytest.approx(800 / 0.128)
    assert s["runs"] == 100


def test_time_calls_obeys_warmup_min_runs_and_budget():
    calls = []
    clock = iter(np.arange(0, 1000, 0.5)).__next__  # every clock read advances 0.5 s
    times = bench.time_calls(lambda: calls.append(1), warmup=3, min_runs=2, min_seconds=0.0, max_runs=50,
                             clock=clock)
    assert len(times) == 2 and len(calls) == 5 and all(t == 0.5 for t in times)
    clock = iter(np.arange(0, 1e4, 0.5)).__next__
    times = bench.time_calls(lambda: None, 0, 1, min_seconds=10.0, max_runs=1000, clock=clock)
    assert 5 <= len(times) <= 12  # stopped by the 10 s budget, not max_runs
    assert len(bench.time_calls(lambda: None, 0, 1, 1e9, 7)) == 7  # max_runs caps it


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = Net(ModelConfig(channels=(8, 16), fc_units=64)).eval()
    path = tmp_path_factory.mktemp("b") / "m.onnx"
    export.export_onnx(model, path, export.ExportConfig())
    return model, path


FAST = bench.BenchConfig(batch_sizes=(1, 4), warmup=1, min_runs=3, min_seconds=0.0)


def test_cuda_request_is_never_labelled_cuda_without_cuda(small_onnx, test_split):
    _, path = small_onnx
    x = contract.to_input(test_split[0][:4])
    row = bench.ort_case(runtime.load_checked(path), "cuda", 4, x, FAST)
    if "CUDAExecutionProvider" in row["providers_used"].split(",")[0]:
        pytest.skip("this machine really runs CUDA")
    assert row["provider"] == "cpu" and row["path"] == "onnxruntime-cpu"
    assert "CUDAExecutionProvider" not in row["providers_used"]
    assert "running on CPUExecutionProvider" in row["note"]


def test_cases_measure_what_they_say(small_onnx, test_split):
    model, path = small_onnx
    x = contract.to_input(test_split[0][:4])
    ort_row = bench.ort_case(runtime.load_checked(path), "cpu", 4, x, FAST)
    torch_row = bench.torch_case(model, torch.device("cpu"), 4, x, FAST)
    for row in (ort_row, torch_row):
        assert row["batch"] == 4 and row["runs"] >= 3 and row["p50_ms"] <= row["p99_ms"]
        assert row["images_per_s"] > 0
    assert torch_row["path"] == "pytorch-cpu"


def test_int8_model_keeps_accuracy(small_onnx, tmp_path, raw_dir, test_split):
    from pipeline import data
    _, path = small_onnx
    train_x, _ = data.load_split(raw_dir, "train")
    bench.quantize_int8(path, tmp_path / "int8.onnx", contract.to_input(train_x[:128]))
    q = runtime.load_checked(tmp_path / "int8.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    # As onnxruntime runs it, the network stays in integers from the input's quantisation to
    # the logits' dequantisation: no float pooling between the layers (see Net's two orders).
    import onnxruntime as ort
    options = runtime.session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2 and "MaxPool" not in ops, ops
    x = test_split[0][:500]
    fp = evaluate.predict_logits(runtime.open_session(runtime.load_checked(path)), x, 500).argmax(1)
    i8 = evaluate.predict_logits(runtime.open_session(q), x, 500).argmax(1)
    assert (fp == i8).mean() > 0.95  # an untrained net's predictions, mostly kept by INT8


def test_bad_bench_params_are_refused():
    from pipeline.params import ParamError, parse
    with pytest.raises(ParamError, match="benchmark.providers=\\['cuda'\\] is not allowed"):
        parse(bench.BenchConfig, {"providers": ["cuda"]}, "benchmark")
    with pytest.raises(ParamError, match="benchmark.batch_sizes"):
        parse(bench.BenchConfig, {"batch_sizes": [0]}, "benchmark")


def test_sweep_runs_each_batch_size_side_by_side(small_onnx, test_split):
    model, path = small_onnx
    x = contract.to_input(test_split[0][:4])
    models = {"fp32": runtime.load_checked(path)}
    cases = [("ort", "cpu", "fp32"), ("torch", "cpu", "fp32")]
    order = []
    rows = bench.sweep(cases, models, model, x, FAST, order.append)
    # measured batch by batch, so the compared cases are seconds apart ...
    assert order == ["ort cpu fp32 batch 1", "torch cpu fp32 batch 1", "ort cpu fp32 batch 4", "torch cpu fp32 batch 4"]
    # ... and reported case by case
    assert [(r["path"], r["batch"]) for r in rows] == [("onnxruntime-cpu", 1), ("onnxruntime-cpu", 4),
                                                       ("pytorch-cpu", 1), ("pytorch-cpu", 4)]
