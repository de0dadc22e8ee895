"""The static INT8 model: integers end to end under onnxruntime, accuracy kept."""
import onnx
import pytest

from pipeline import contract, data, evaluate, quantize, runtime

pytestmark = pytest.mark.integration  # starts processes or servers, trains or exports


def test_int8_model_keeps_accuracy(small_onnx, tmp_path, raw_dir, test_split):
    _, path = small_onnx
    train_x, _ = data.load_split(raw_dir, "train")
    quantize.quantize_int8(path, tmp_path / "int8.onnx", contract.to_input(train_x[:128]))
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


def test_bad_quantize_params_are_refused():
    from pipeline.params import ParamError, parse
    with pytest.raises(ParamError, match="quantize.calibration_images"):
        parse(quantize.QuantizeConfig, {"calibration_images": 0}, "quantize")
