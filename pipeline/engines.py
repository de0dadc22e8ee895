"""What the inference benchmark measures: onnxruntime per execution provider and precision, and
PyTorch eager beside it, each ready to call; which of them really run here; and the sweep over
batch sizes that times them in interleaved rounds (``pipeline/bench.py`` says how).

Fairness: every path gets the same input, the same thread count, and its fast settings:
onnxruntime with full graph optimisation and intra-op threads = cores; on CUDA, inputs
and outputs bound on the device (I/O binding), a cuDNN algorithm choice by heuristic (an
exhaustive search would charge the first call of every new batch size), and CUDA graphs
for the fixed shape of each case; PyTorch under ``torch.inference_mode()`` with the same
threads, in the channels-last layout that its oneDNN/cuDNN convolutions prefer.
"""
from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline import contract, runtime
from pipeline.bench import (
    BenchConfig,
    Rounds,
    RoundsKey,
    Row,
    contention,
    cpu_snapshot,
    interleave,
    outside_load,
    row_stats,
    rss_mb,
)

Case = tuple[str, str, str]  # (kind 'ort' or 'torch', provider, precision)

# onnxruntime's worker threads otherwise spin between runs, on the cores the next path needs:
# interleaved with it, PyTorch at batch 256 took 83 ms instead of 52. The price, measured alone:
# 1.16x onnxruntime's batch-1 latency (0.307 vs 0.265 ms), none from batch 64 up.
QUIET_BETWEEN_RUNS = {"session.force_spinning_stop": "1"}


def ort_path(model: onnx.ModelProto | bytes, provider: str, batch: int, x: np.ndarray,
             precision: str = "fp32", threads: int = 0) -> tuple[Callable[[], object], dict]:
    """One onnxruntime path, ready to call, and what its row says about it; on CUDA with
    device-resident I/O and a CUDA graph."""
    options = {}
    if provider == "cuda":
        options = {"cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"}
    elif provider == "tensorrt":
        cache = Path(tempfile.gettempdir()) / "mnist-onnx-trt-cache"
        options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                   "trt_fp16_enable": "False"}
    session = runtime.open_session(model, provider, threads, provider_options=options, config=QUIET_BETWEEN_RUNS)
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    meta: dict = {"path": f"onnxruntime-{session.label}", "provider": session.label, "precision": precision,
                  "batch": batch, "providers_used": ",".join(session.providers), "note": session.note}
    if session.label in ("cuda", "tensorrt"):
        call, meta["gpu_mem_mb"] = _bound_gpu_call(session, xb)
        return call, meta
    return functools.partial(session.run, xb), meta


def _bound_gpu_call(session: runtime.Session, xb: np.ndarray) -> tuple[Callable[[], None], Callable[[], float]]:
    """A call with input and output already on the GPU: the timing excludes host copies."""
    import onnxruntime as ort
    s = session.session
    x_dev = ort.OrtValue.ortvalue_from_numpy(xb, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type((len(xb), contract.CLASSES), np.float32, "cuda", 0)
    binding = s.io_binding()
    binding.bind_ortvalue_input(s.get_inputs()[0].name, x_dev)
    binding.bind_ortvalue_output(s.get_outputs()[0].name, y_dev)
    free0 = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None

    def call() -> None:
        s.run_with_iobinding(binding)
        binding.synchronize_outputs()

    def mem() -> float:
        return (free0 - torch.cuda.mem_get_info()[0]) / 2**20 if free0 is not None else float("nan")
    return call, mem


def torch_path(model: torch.nn.Module, device: torch.device, batch: int,
               x: np.ndarray) -> tuple[Callable[[], object], dict]:
    """PyTorch eager on ``device``: same threads, inference mode, channels-last."""
    model = model.to(device=device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # torch's stubs omit memory_format
    xb = torch.from_numpy(np.resize(x, (batch, *x.shape[1:]))).to(device).contiguous(
        memory_format=torch.channels_last)
    meta: dict = {"path": f"pytorch-{device.type}", "provider": device.type, "precision": "fp32", "batch": batch,
                  "providers_used": f"torch {torch.__version__}", "note": ""}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        meta["gpu_mem_mb"] = lambda: torch.cuda.max_memory_allocated(device) / 2**20

    @torch.inference_mode()
    def call() -> None:
        model(xb)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call, meta


def choose_cases(models: dict[str, onnx.ModelProto],
                 cfg: BenchConfig) -> tuple[list[Case], dict[str, str]]:
    """The cases to run: onnxruntime CPU per model precision, PyTorch CPU, and each GPU provider
    (and PyTorch CUDA) only where it really runs; and, per GPU provider asked for, 'ran' or why not."""
    cases: list[Case] = [("ort", "cpu", p) for p in models] + [("torch", "cpu", "fp32")]
    status = {}
    for gpu in [p for p in cfg.providers if p != "cpu"]:
        probe = runtime.open_session(models["fp32"], gpu)
        status[f"{gpu}_status"] = "ran" if probe.label == gpu else f"unavailable: {probe.note}"
        if probe.label == gpu:
            cases.append(("ort", gpu, "fp32"))
    if torch.cuda.is_available():
        cases.append(("torch", "cuda", "fp32"))
    return cases, status




def sweep(cases: list[Case], models: dict[str, onnx.ModelProto], net: torch.nn.Module, x: np.ndarray,
          cfg: BenchConfig, on_batch: Callable[[int], None] = lambda batch: None, threads: int | None = None,
          batch_sizes: tuple[int, ...] | None = None) -> tuple[list[Row], dict[RoundsKey, Rounds]]:
    """Every case at every batch size (``cfg.batch_sizes`` unless given), on ``threads`` per path
    (``cfg.threads`` unless given; onnxruntime and PyTorch alike), the cases of one batch size in
    interleaved rounds. Returns the rows (grouped by case, in batch order) and each row's rounds,
    keyed by (path, precision, batch, threads), for the paired ratios. ``on_batch`` hears each
    batch size done."""
    n = cfg.resolved_threads(cfg.threads if threads is None else threads)
    batch_sizes = batch_sizes or cfg.batch_sizes
    rows: dict[tuple[Case, int], Row] = {}
    measured: dict[RoundsKey, Rounds] = {}
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        for batch in batch_sizes:
            calls, metas = {}, {}
            for case in cases:
                kind, provider, precision = case
                rss0 = rss_mb()
                calls[case], metas[case] = (
                    ort_path(models[precision], provider, batch, x, precision, n) if kind == "ort"
                    else torch_path(net, torch.device(provider), batch, x))
                calls[case]()  # the first call allocates: count it in the path's memory
                metas[case].update(threads=n, rss_growth_mb=rss_mb() - rss0)
            before = cpu_snapshot()
            rounds = interleave(calls, batch, cfg)
            after = cpu_snapshot()
            others, waited = outside_load(before, after), contention(before, after)
            for case in cases:
                meta = metas[case]
                gpu_mem = meta.pop("gpu_mem_mb", None)
                rows[case, batch] = row = Row(**dataclasses.asdict(row_stats(rounds[case], cfg, others, waited)),
                                              **meta, gpu_mem_mb=gpu_mem() if gpu_mem else None)
                measured[row.path, row.precision, batch, n] = rounds[case]
            on_batch(batch)
    finally:
        torch.set_num_threads(torch_threads)
    return [rows[case, batch] for case in cases for batch in batch_sizes], measured


def steps(cfg: BenchConfig) -> int:
    """How many batch-size sweeps ``measure`` runs (for a progress bar)."""
    return len(cfg.batch_sizes) + (len(set(cfg.ratio_batches())) if cfg.ratios_apart() else 0)


def measure(cases: list[Case], models: dict[str, onnx.ModelProto], net: torch.nn.Module, x: np.ndarray,
            cfg: BenchConfig, on_batch: Callable[[int], None] = lambda batch: None
            ) -> tuple[list[Row], dict[RoundsKey, Rounds]]:
    """The benchmark: every case at every batch size on ``cfg.threads``; then, where the ratios
    have a thread count of their own (``cfg.ratio_threads``, per core by default), the CPU cases
    again at the ratios' batch sizes on that many threads. Rows of both, and their rounds."""
    rows, rounds = sweep(cases, models, net, x, cfg, on_batch)
    if cfg.ratios_apart():
        cpu = [case for case in cases if case[1] == "cpu"]
        more, more_rounds = sweep(cpu, models, net, x, cfg, on_batch, cfg.ratio_threads,
                                  tuple(sorted(set(cfg.ratio_batches()))))
        rows, rounds = rows + more, {**rounds, **more_rounds}
    return rows, rounds


