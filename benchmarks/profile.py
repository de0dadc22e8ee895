"""Where the time goes: per-layer profiles of a training step and of batch inference, beside
this machine's measured matrix-multiply peaks. The README's speed section cites these
for the targets that are not met; rerun them on your machine to see its own limits.

    python -m benchmarks.profile train      [--batch 256] [--runs 10] [--out docs/profile-train.md]
    python -m benchmarks.profile inference  [--batch 256] [--runs 20] [--out docs/profile-inference.md]
                                            [--model models/model.onnx] [--int8 models/model.int8.onnx]

Each layer's FLOPs come from the network table (pipeline.shapes): a convolution or dense
layer costs 2 * weights * output positions per image forward; backward costs the same again
for the weight gradient and, except for the first layer, for the input gradient.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from pipeline import contract, runtime, train
from pipeline.model import ModelConfig, Net

# ------------------------------------------------------------------------------ FLOPs


def forward_flops(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per image of each weighted layer: 2 * weights * output positions."""
    out = {}
    for layer in cfg.layers():
        if layer.op in ("Conv", "Gemm"):
            units = layer.shape[0]
            positions = int(np.prod(layer.shape[1:])) if layer.op == "Conv" else 1
            out[layer.name] = 2.0 * (layer.params - units) * positions  # params less the biases
    return out


def train_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs per image of each weighted layer's forward and backward in a training step."""
    out = {}
    for i, (name, f) in enumerate(forward_flops(cfg).items()):
        out[f"{name} forward"] = f
        out[f"{name} backward"] = f * (1 if i == 0 else 2)  # the input needs no gradient
    return out


# ------------------------------------------------------------------------------ peaks


def median_seconds(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _ort_matmul(a_type: int, b_type: int, n: int, integer: bool) -> runtime.Session:
    node = helper.make_node("MatMulInteger" if integer else "MatMul", ["a", "b"], ["c"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [n, n]),
                                                helper.make_tensor_value_info("b", b_type, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32 if integer else
                                                             TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return runtime.open_session(model, "cpu")


def gemm_peaks(sizes: tuple[int, ...] = (512, 1024, 2048), runs: int = 5) -> dict[str, float]:
    """The best rate of dense n x n x n multiplies over ``sizes``: PyTorch's FP32 (MKL), and
    onnxruntime's FP32 and INT8 (MLAS U8S8, what the quantised model's convolutions and Gemms
    run on), in G(FL)OP/s."""
    rates = [_gemm_rates(n, runs) for n in sizes]
    return {k: max(r[k] for r in rates) for k in rates[0]}


def _gemm_rates(n: int, runs: int) -> dict[str, float]:
    flops = 2.0 * n ** 3
    a, b = torch.rand(n, n), torch.rand(n, n)
    peaks = {"torch_fp32_gflops": flops / median_seconds(lambda: torch.mm(a, b), runs) / 1e9}
    rng = np.random.default_rng(0)
    fa, fb = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    s = _ort_matmul(TensorProto.FLOAT, TensorProto.FLOAT, n, integer=False).session
    peaks["ort_fp32_gflops"] = flops / median_seconds(lambda: s.run(None, {"a": fa, "b": fb}), runs) / 1e9
    qa = rng.integers(0, 256, (n, n), dtype=np.uint8)
    qb = rng.integers(-64, 64, (n, n), dtype=np.int8)
    s8 = _ort_matmul(TensorProto.UINT8, TensorProto.INT8, n, integer=True).session
    peaks["ort_u8s8_gops"] = flops / median_seconds(lambda: s8.run(None, {"a": qa, "b": qb}), runs) / 1e9
    return peaks


# ------------------------------------------------------------------------------ PyTorch profiles


def _descendants(event):
    """The event and every op below it."""
    stack = [event]
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


def _layer_of(event, weights: dict[tuple, str]) -> str | None:
    """The weighted layer an op belongs to, found by a parameter-shaped input in it or below it."""
    for e in _descendants(event):
        for shape in e.input_shapes or []:
            if tuple(shape) in weights:
                return weights[tuple(shape)]
    return None


_KINDS = {  # top-level op or autograd node without weights (lower case, contains) -> row name
    "max_pool": "max pool", "maxpool": "max pool", "relu": "ReLU", "threshold": "ReLU", "dropout": "dropout",
    "cross_entropy": "loss", "nll": "loss", "log_softmax": "loss", "index": "batch gather",
}


def _row_of(event, weights: dict[tuple, str]) -> str:
    name = event.name.lower()
    phase = "backward" if "backward" in name or "evaluate_function" in name else "forward"
    if "optimizer" in name:  # Optimizer.step#Adam.step, Optimizer.zero_grad#Adam.zero_grad
        return "optimizer (Adam)"
    layer = _layer_of(event, weights)
    if layer is not None and any(k in name for k in ("conv", "addmm", "mm", "linear", "accumulategrad")):
        return f"{layer} {phase}" if "accumulategrad" not in name else "gradient accumulation"
    for key, row in _KINDS.items():
        if key in name:
            return f"{row} {phase}" if row in ("max pool", "ReLU", "dropout", "loss") else row
    return "other"


def _weights(model: Net) -> dict[tuple, str]:
    names = [layer.name for layer in model.cfg.layers() if layer.op in ("Conv", "Gemm")]
    params = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    out = {}
    for name, w in zip(names, params):
        out[tuple(w.shape)] = name
        if w.dim() == 2:
            out[tuple(reversed(w.shape))] = name  # the transposed weight inside addmm
    return out


def torch_profile(step, model: Net, runs: int) -> dict[str, float]:
    """Milliseconds per call of each row, from the top-level ops (and autograd nodes) of
    ``runs`` calls of ``step`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(runs):
            step()
    weights = _weights(model)
    top = [e for e in prof.events() if e.cpu_parent is None and not e.name.startswith("ProfilerStep")]
    named = {e: _row_of(e, weights) for e in top}
    # A backward node carries its forward op's sequence number: the gradients of a layer made of
    # several ops (the frequency-domain conv2: matmuls, copies, an FFT of the filters) go to that layer.
    layers = set(weights.values())
    layer_of_seq = {}
    for e, row in named.items():
        layer = row.removesuffix(" forward")
        if layer in layers:
            layer_of_seq.update({d.sequence_nr: layer for d in _descendants(e) if d.sequence_nr >= 0})
    rows: dict[str, float] = defaultdict(float)
    for e, row in named.items():
        if row == "other" and "evaluate_function" in e.name and e.sequence_nr in layer_of_seq:
            row = f"{layer_of_seq[e.sequence_nr]} backward"
        rows[row] += e.cpu_time_total / 1e3 / runs
    return dict(rows)


# ------------------------------------------------------------------------------ onnxruntime profile


_ORT_CONVS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcConv", "NhwcFusedConv"}
_ORT_DENSE = {"Gemm", "FusedGemm", "QGemm", "MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul",
              "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def ort_layer_names(optimized: onnx.ModelProto, cfg: ModelConfig) -> dict[str, str]:
    """{node name: layer} for the graph onnxruntime really runs. Its optimisers rename and
    replace nodes, differently on each CPU (NCHWc convolutions, fused activations, quantised
    kernels), but keep the order of the work: the k-th convolution node is conv k and the
    k-th dense node the k-th dense layer, whatever they are called."""
    layers = {"conv": [x.name for x in cfg.layers() if x.op == "Conv"],
              "dense": [x.name for x in cfg.layers() if x.op == "Gemm"]}
    names: dict[str, str] = {}
    for node in optimized.graph.node:  # saved in topological order
        kind = "conv" if node.op_type in _ORT_CONVS else "dense" if node.op_type in _ORT_DENSE else None
        if kind and layers[kind]:
            names[node.name] = layers[kind].pop(0)
    return names


def ort_profile(model_path: Path, cfg: ModelConfig, x: np.ndarray, runs: int,
                graph_opt: str = "all") -> dict[str, float]:
    """Milliseconds per call of each node kind, from onnxruntime's own profiler (the first
    call of every node is warm-up and left out). Convolutions and dense layers, FP32 or
    quantised, are named by their layer (``ort_layer_names``); other nodes by their op."""
    import onnxruntime as ort
    so = runtime.session_options(graph_opt=graph_opt)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")  # the graph as it runs here
        s = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        layer_of = ort_layer_names(onnx.load(so.optimized_model_filepath), cfg)
        feed = {s.get_inputs()[0].name: x}
        for _ in range(runs + 1):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    rows: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        seen[e["name"]] += 1
        if seen[e["name"]] == 1:
            continue
        op = e["args"]["op_name"]
        layer = layer_of.get(e["name"].removesuffix("_kernel_time"))
        rows[f"{layer} ({op})" if layer else op] += e["dur"] / 1e3 / runs
    return dict(rows)


# ------------------------------------------------------------------------------ report


def table(rows: dict[str, float], flops: dict[str, float], batch: int, title: str) -> list[str]:
    """Markdown rows: each part's milliseconds per batch, share, and GFLOP/s where known."""
    total = sum(rows.values())
    out = [f"| {title} | ms per batch | share | GFLOP/s |", "|---|---:|---:|---:|"]
    for name, ms in sorted(rows.items(), key=lambda kv: -kv[1]):
        f = next((v for k, v in flops.items() if name.startswith(k)), None)
        rate = f"{f * batch / (ms / 1e3) / 1e9:.0f}" if f and ms > 0 else ""
        out.append(f"| {name} | {ms:.2f} | {ms / total:.0%} | {rate} |")
    out.append(f"| **total** | **{total:.2f}** | | |")
    return out


def machine() -> str:
    from pipeline.machine import hardware
    hw = hardware()
    return (f"{hw['cpu']}, {hw['cores']} cores, {torch.get_num_threads()} threads; torch {torch.__version__}, "
            f"onnxruntime {hw['onnxruntime']}, Python {platform.python_version()}")


def profile_train(args: argparse.Namespace) -> list[str]:
    """The real training loop (train.train_epoch) over ``runs`` batches, profiled, then timed bare."""
    cfg, tcfg = ModelConfig(), train.TrainConfig(batch_size=args.batch, device="cpu")
    dev, _ = train.set_up_process(tcfg)  # as the train stage sets its process up; the data is synthetic
    side = contract.SIDE
    images = np.random.default_rng(0).integers(0, 256, (args.batch * args.runs, side, side), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, contract.CLASSES, len(images))
    x, y = train.to_tensors(images, labels, dev)
    model = train.prepare(Net(cfg), dev)
    opt, sched = train.make_optimizer(model, tcfg, 10 * args.runs)
    bare = []

    def epoch():
        bare.append(train.train_epoch(model, opt, sched, x, y, tcfg, 0)["seconds"] / args.runs * 1e3)
    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    say(f"warm-up, then {args.runs} profiled steps, 3 x {args.runs} bare steps and the matrix-multiply peaks ...")
    epoch()  # warm-up
    f0 = faults()
    rows = torch_profile(lambda: train.train_epoch(model, opt, sched, x, y, tcfg, 0), model, 1)
    rows = {k: v / args.runs for k, v in rows.items()}  # per step
    f1 = faults()
    for _ in range(3):
        epoch()
    f2 = faults()
    flops = train_flops(cfg)
    peaks = gemm_peaks()
    step_ms = float(np.median(bare[1:]))
    weighted = {k: v for k, v in rows.items() if any(k.startswith(n) for n in flops)}
    at_peak = {k: flops[k] * args.batch / (peaks["torch_fp32_gflops"] * 1e9) * 1e3 for k in weighted}
    ceiling_ms = sum(rows.values()) - sum(weighted.values()) + sum(min(v, at_peak[k]) for k, v in weighted.items())
    total_flops = sum(flops.values())
    return [
        f"## Training step, batch {args.batch}, CPU", "",
        f"Machine: {machine()}.", "",
        f"Measured without the profiler: **{step_ms:.1f} ms per step = {args.batch / step_ms * 1e3:.0f} images/s**, "
        f"{total_flops / 1e6:.1f} MFLOP per image = {total_flops * args.batch / step_ms / 1e6:.0f} GFLOP/s. "
        "Best dense matrix multiply (n = 512, 1024, 2048) on the same threads: "
        f"PyTorch {peaks['torch_fp32_gflops']:.0f} GFLOP/s.", "",
        *table(rows, flops, args.batch, "part of the step"), "",
        f"The profiled parts sum to {sum(rows.values()):.0f} ms per step = "
        f"{args.batch / sum(rows.values()) * 1e3:.0f} images/s (the profiled and the bare runs are minutes apart "
        f"on a machine whose speed drifts). Page faults per step: {(f1 - f0) / (2 * args.runs):.0f} profiled, "
        f"{(f2 - f1) / (3 * args.runs):.0f} bare; the profiler's own allocations defeat the train stage's "
        f"kept memory (pipeline.train.keep_freed_memory), and the faults land in the ops that write large "
        f"fresh tensors (conv1 forward, max pool backward), so those rows read high. "
        f"GFLOP/s are the layer's nominal FLOPs (sliding-window convolution, dense matrix products) per "
        f"second: conv2 trains in the frequency domain (pipeline.spectral), which takes fewer operations, so "
        f"its figure can pass the matrix-multiply peak. "
        f"Ceiling: with every layer still below that peak brought up to it and everything "
        f"else as measured, a step would take {ceiling_ms:.0f} ms = {args.batch / ceiling_ms * 1e3:.0f} images/s.",
    ]


def say(text: str) -> None:
    """Progress and notes, on stderr so the report on stdout stays clean."""
    print(text, file=sys.stderr, flush=True)


def profile_inference(args: argparse.Namespace) -> list[str]:
    cfg = ModelConfig()
    weights = Path(args.weights)
    if weights.exists():
        net = Net.from_weights(cfg, weights)
    else:
        net = Net(cfg)
        say(f"{weights} not found: PyTorch runs random weights (the speed does not depend on them)")
    net = net.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # torch's stubs omit memory_format
    x = np.random.default_rng(0).random((args.batch, 1, contract.SIDE, contract.SIDE), dtype=np.float32)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def torch_call():
        net(xt)
    flops = forward_flops(cfg)
    say("profiling PyTorch eager ...")
    paths = {"PyTorch eager FP32": (torch_profile(torch_call, net, args.runs), torch_call)}
    for label, path in (("onnxruntime FP32", args.model), ("onnxruntime INT8", args.int8)):
        if not Path(path).exists():
            say(f"{path} not found, {label} skipped: run `dvc repro benchmark` first, or pass its path")
        else:
            say(f"profiling {label} ...")
            s = runtime.open_session(runtime.load_checked(path), "cpu")
            paths[label] = (ort_profile(Path(path), cfg, x, args.runs), functools.partial(s.run, x))
    say("timing each path without the profiler, then the matrix-multiply peaks ...")
    walls = {label: median_seconds(call, args.runs) * 1e3 for label, (_, call) in paths.items()}
    peaks = gemm_peaks()
    per_image = sum(flops.values())
    lines = [f"## Inference, batch {args.batch}, CPU", "", f"Machine: {machine()}.", "",
             "| path | ms per batch (no profiler) | images/s | GFLOP/s | vs PyTorch |", "|---|---:|---:|---:|---:|"]
    base = walls["PyTorch eager FP32"]
    for label, ms in walls.items():
        lines.append(f"| {label} | {ms:.2f} | {args.batch / ms * 1e3:.0f} | "
                     f"{per_image * args.batch / ms / 1e6:.0f} | {base / ms:.2f}x |")
    lines += ["", f"Best dense matrix multiplies (n = 512, 1024, 2048) on the same threads: PyTorch FP32 "
              f"{peaks['torch_fp32_gflops']:.0f} GFLOP/s, onnxruntime FP32 {peaks['ort_fp32_gflops']:.0f} GFLOP/s, "
              f"onnxruntime INT8 (U8S8) {peaks['ort_u8s8_gops']:.0f} GOP/s "
              f"= {peaks['ort_u8s8_gops'] / peaks['ort_fp32_gflops']:.2f}x its FP32.", ""]
    for label, (rows, _) in paths.items():
        lines += [f"### {label}", "", *table(rows, flops, args.batch, "op"), ""]
    best = max(peaks["torch_fp32_gflops"], peaks["ort_fp32_gflops"])
    target = 2 * args.batch / base * 1e3
    lines += [f"Twice PyTorch's throughput would be {target:.0f} images/s = {target * per_image / 1e9:.0f} GFLOP/s "
              f"({per_image / 1e6:.1f} MFLOP per image): {target * per_image / 1e9 / best:.0%} of the best "
              f"measured FP32 matrix-multiply peak ({best:.0f} GFLOP/s)."]
    if "onnxruntime INT8" in paths and "onnxruntime FP32" in paths:
        fp, i8 = paths["onnxruntime FP32"][0], paths["onnxruntime INT8"][0]
        layer_ms = {name: [sum(v for k, v in rows.items() if k.startswith(f"{name} (")) for rows in (fp, i8)]
                    for name in flops}
        speedups = ", ".join(f"{name} {a / b:.2f}x" for name, (a, b) in layer_ms.items() if a and b)
        weighted = sum(b for _, b in layer_ms.values()) / sum(i8.values())
        # the best mix: each weighted layer in whichever precision is faster, the rest as in INT8
        best_mix = sum(i8.values()) - sum(b - min(a, b) for a, b in layer_ms.values() if a and b)
        lines += ["", f"INT8 vs FP32 onnxruntime: {walls['onnxruntime FP32'] / walls['onnxruntime INT8']:.2f}x. "
                  f"Per layer (profiled): {speedups}. The quantised convolutions and Gemms take {weighted:.0%} of "
                  f"the INT8 model's time; onnxruntime's INT8 matrix multiply peaks at "
                  f"{peaks['ort_u8s8_gops'] / peaks['ort_fp32_gflops']:.2f}x its FP32 one on this CPU. "
                  f"Even with each layer in whichever precision is faster and everything else as in the "
                  f"INT8 profile, INT8 would be {sum(fp.values()) / best_mix:.2f}x FP32 (profiled times)."]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="benchmarks.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="one training step, per layer")
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--runs", type=int, default=10, help="steps profiled")
    i = sub.add_parser("inference", help="batch inference: PyTorch, onnxruntime FP32 and INT8")
    i.add_argument("--batch", type=int, default=256)
    i.add_argument("--runs", type=int, default=20, help="calls profiled (and timed)")
    i.add_argument("--model", default=str(contract.DEFAULT_MODEL))
    i.add_argument("--int8", default="models/model.int8.onnx")
    i.add_argument("--weights", default="models/model.pt", help="PyTorch weights (random if missing)")
    for s in (t, i):
        s.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    lines = profile_train(args) if args.what == "train" else profile_inference(args)
    lines[1:1] = ["", f"Written by `python -m benchmarks.profile {args.what}` on {time.strftime('%Y-%m-%d')}; "
                  "one run on a shared machine, so read the shares and ratios, not the third digit."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from pipeline import atomic
        atomic.write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
