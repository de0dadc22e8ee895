import numpy as np
import pytest
import torch

from pipeline import bench, contract, runtime


def test_latency_stats_of_known_timings():
    times = [0.001] * 98 + [0.010, 0.020]  # 100 calls of batch 8
    s = bench.latency_stats(times, batch=8)
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
