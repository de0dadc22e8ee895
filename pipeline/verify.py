"""Verify an exported model against the convolution arithmetic, three ways.

For every layer (conv1, pool1, ..., flatten, fc1, logits) we compare
  1. the shape predicted by pipeline.shapes from the model params,
  2. the shape ``onnx.shape_inference`` gives the node's output in model.onnx,
  3. the shape onnxruntime really produces for a real batch, read from a copy of the graph
     whose intermediate tensors are exposed as outputs,
and the parameter count predicted against the sizes of the node's initializers. The batch
axis must be symbolic everywhere in the graph, the file must pass ``onnx.checker``, and
onnxruntime must run the whole model. Every problem names our layer, not only the ONNX node.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx.utils

from pipeline import contract, runtime, shapes
from pipeline.errors import PipelineError

# ONNX ops that implement each kind of layer, in the order layers appear
_LAYER_OPS = {"Conv": "Conv", "MaxPool": "MaxPool", "Flatten": "Flatten", "Reshape": "Flatten",
              "Gemm": "Gemm", "MatMul": "Gemm"}


class VerifyError(PipelineError, RuntimeError):
    """The exported model disagrees with the arithmetic; the message is the diff."""


@dataclass
class Row:
    layer: str
    op: str
    node: str  # the ONNX node whose output is the layer's output
    predicted: list  # ['N', C, H, W]
    inferred: list | None  # from onnx.shape_inference; the batch axis as its symbol name
    runtime: list | None  # from onnxruntime on a real batch; the batch axis as 'N'
    params_predicted: int
    params_onnx: int
    formula: str
    ok: bool = True
    problem: str = ""


def layer_nodes(proto: onnx.ModelProto, plan: list[shapes.Layer]) -> dict[str, onnx.NodeProto]:
    """Match each planned layer to its node: the k-th Conv is conv k, and so on by op."""
    by_kind: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.op_type in _LAYER_OPS:
            by_kind.setdefault(_LAYER_OPS[node.op_type], []).append(node)
    found: dict[str, onnx.NodeProto] = {}
    seen: dict[str, int] = {}
    for layer in plan:
        i = seen.get(layer.op, 0)
        nodes = by_kind.get(layer.op, [])
        if i < len(nodes):
            found[layer.name] = nodes[i]
        seen[layer.op] = i + 1
    return found


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value if (d.dim_param or d.HasField("dim_value")) else "?"
            for d in value_info.type.tensor_type.shape.dim]


def _initializer_sizes(proto: onnx.ModelProto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}


def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes inferred from the ops alone: the exporter's own shape annotations are dropped
    first, so a graph edited after export can't vouch for itself."""
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.graph.value_info[:]
    for out in bare.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(bare, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        raise VerifyError(f"onnx.shape_inference rejects the graph: {e}") from None


def exposing_copy(proto: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of the graph that also returns ``tensors`` (intermediate outputs) as outputs."""
    inferred = infer(proto)
    infos = {v.name: v for v in inferred.graph.value_info}
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    existing = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in existing:
            copy.graph.output.append(infos.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return copy


def run_intermediates(proto: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The values of ``tensors`` for input ``x``. If the whole graph can't run (a broken
    model), each tensor is computed by the part of the graph that leads to it, so the
    layers before the break are still measured; a tensor that can't be computed is left out.
    That the whole model runs is checked on its own (``whole_model_error``)."""
    try:
        return _run(exposing_copy(proto, tensors), x)
    except Exception:  # noqa: BLE001 - onnxruntime's errors share no useful base class
        pass
    inferred = infer(proto)
    values = {}
    for name in tensors:
        try:
            part = onnx.utils.Extractor(inferred).extract_model([proto.graph.input[0].name], [name])
            values.update(_run(part, x))
        except Exception:  # noqa: BLE001
            break  # the graph broke here; later layers depend on this one
    return values


def whole_model_error(proto: onnx.ModelProto, x: np.ndarray) -> str:
    """Empty if onnxruntime runs the model as it is, outputs and all; else why not."""
    try:
        _run(proto, x)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no useful base class
        return f"{type(e).__name__}: {str(e).strip()}"
    return ""


def name_layers(message: str, nodes: dict[str, onnx.NodeProto]) -> str:
    """``message`` with each layer's ONNX node name (``node_conv2d_1``) followed by our layer."""
    by_name = {node.name: layer for layer, node in nodes.items() if node.name}
    if not by_name:
        return message
    pattern = "|".join(re.escape(n) for n in sorted(by_name, key=len, reverse=True))
    return re.sub(rf"(?<![\w.])({pattern})(?![\w])",
                  lambda m: f"{m.group(1)} (layer {by_name[m.group(1)]})", message)


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = runtime.open_session(model, "cpu")
    names = [o.name for o in session.session.get_outputs()]
    return dict(zip(names, session.session.run(None, {session.session.get_inputs()[0].name: x})))


def verify(proto: onnx.ModelProto, plan: list[shapes.Layer], x: np.ndarray) -> list[Row]:
    """Compare predicted, inferred and runtime shapes and parameter counts for every layer;
    problems of the model as a whole (checker, shape inference, running it) come last, as
    rows named ``model``."""
    nodes = layer_nodes(proto, plan)
    whole: list[str] = []
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        whole.append(f"fails onnx.checker: {str(e).strip()}")
    try:
        inferred = infer(proto)
    except VerifyError as e:
        whole.append(str(e))
        inferred = None
    error = whole_model_error(proto, x)
    if error:
        whole.append(f"onnxruntime cannot run the whole model: {error}")
    infos = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]} \
        if inferred is not None else {}
    sizes = _initializer_sizes(proto)
    outs = [nodes[layer.name].output[0] for layer in plan if layer.name in nodes]
    ran = run_intermediates(proto, outs, x) if inferred is not None else {}
    rows = []
    for layer in plan:
        node = nodes.get(layer.name)
        predicted = ["N", *layer.shape]
        if node is None:
            rows.append(Row(layer.name, layer.op, "", predicted, None, None, layer.params, 0, layer.detail,
                            False, f"no {layer.op} node for {layer.name} in the graph"))
            continue
        out = node.output[0]
        inf = _dims(infos[out]) if out in infos else None
        got = ran.get(out)
        rt = ["N", *got.shape[1:]] if got is not None else None
        # weights and bias; a Reshape's second input is its target shape, not a parameter
        params = sum(sizes.get(i, 0) for i in node.input[1:]) if layer.op in ("Conv", "Gemm") else 0
        row = Row(layer.name, layer.op, node.name or out, predicted, inf, rt, layer.params, params, layer.detail)
        problems = []
        if inf is None:
            problems.append("shape inference gave no shape")
        else:
            if not isinstance(inf[0], str):
                problems.append(f"batch axis is fixed to {inf[0]} in the graph, not symbolic")
            if inf[1:] != predicted[1:]:
                problems.append(f"ONNX-inferred {_fmt(inf)} != predicted {_fmt(predicted)}")
        if got is None or rt is None or got.shape[0] != len(x):
            problems.append("onnxruntime produced no output of the batch's size")
        elif rt[1:] != predicted[1:]:
            problems.append(f"onnxruntime {_fmt(rt)} != predicted {_fmt(predicted)}")
        if params != layer.params:
            problems.append(f"{params:,} parameters in the graph != {layer.params:,} predicted")
        row.ok, row.problem = not problems, "; ".join(problems)
        rows.append(row)
    if inferred is not None:
        graph_in = _dims(inferred.graph.input[0])
        if not isinstance(graph_in[0], str):
            expected: list[int | str] = ["N", 1, contract.SIDE, contract.SIDE]
            rows.append(Row("input", "input", "", expected, graph_in, None, 0, 0, "", False,
                            f"the graph input's batch axis is fixed to {graph_in[0]}, not symbolic"))
    for problem in whole:
        rows.append(Row("model", "graph", "", [], None, None, 0, 0, "", False, name_layers(problem, nodes)))
    return rows


def _fmt(shape: list | None) -> str:
    return "-" if shape is None else " x ".join(str(d) for d in shape)


def check(rows: list[Row], name: str = "model.onnx") -> None:
    bad = [r for r in rows if not r.ok]
    if bad:
        raise VerifyError(f"{name} does not match the convolution arithmetic:\n"
                          + "\n".join(f"  {r.layer}{f' ({r.node})' if r.node else ''}: {r.problem}"
                                       for r in bad))


def markdown(rows: list[Row]) -> str:
    lines = ["| layer | op | predicted | ONNX-inferred | onnxruntime | arithmetic "
             "| parameters (predicted / ONNX) | ok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.op} | {_fmt(r.predicted)} | {_fmt(r.inferred)} | {_fmt(r.runtime)} | "
                     f"`{r.formula}` | {r.params_predicted:,} / {r.params_onnx:,} | "
                     f"{'yes' if r.ok else 'NO: ' + r.problem} |")
    total_p = sum(r.params_predicted for r in rows)
    total_o = sum(r.params_onnx for r in rows)
    lines.append(f"| **total** | | | | | | {total_p:,} / {total_o:,} | {'yes' if total_p == total_o else 'NO'} |")
    return "\n".join(lines) + "\n"


def report(rows: list[Row]) -> dict:
    return {
        "verify_ok": all(r.ok for r in rows),
        "verify_layers": len(rows),
        "verify_mismatches": sum(not r.ok for r in rows),
        "params_predicted": sum(r.params_predicted for r in rows),
        "params_onnx": sum(r.params_onnx for r in rows),
        "layers": [asdict(r) for r in rows],
    }
