"""Inference benchmark: onnxruntime per execution provider, and PyTorch eager beside it.

Each case is one (path, batch size): warm up, then time single calls until both a minimum
number of runs and a minimum time are reached. Latency percentiles come from the per-call
times; throughput is images divided by the summed time of the timed calls. Labels come
from what ran (``session.get_providers()``), never from what was asked for.

Fairness: every path gets the same input, the same thread count, and its fast settings:
onnxruntime with full graph optimisation and intra-op threads = cores; on CUDA, inputs
and outputs bound on the device (I/O binding), a cuDNN algorithm choice by heuristic (an
exhaustive search would charge the first call of every new batch size), and CUDA graphs
for the fixed shape of each case; PyTorch under ``torch.inference_mode()`` with the same
threads, in the channels-last layout that its oneDNN/cuDNN convolutions prefer.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from pipeline import runtime
from pipeline.params import require


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256, 1024)
    providers: tuple[Literal["cpu", "cuda", "tensorrt"], ...] = ("cpu", "cuda", "tensorrt")
    warmup: int = 5  # untimed calls first: allocations, kernel choice, caches
    min_runs: int = 20  # timed calls per case, at least ...
    min_seconds: float = 1.0  # ... and for at least this long
    max_runs: int = 2000
    threads: int = 0  # 0 = one per core, for every path alike

    def __post_init__(self) -> None:
        require(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes), "benchmark.batch_sizes",
                list(self.batch_sizes), "a non-empty list of whole numbers >= 1")
        require("cpu" in self.providers, "benchmark.providers", list(self.providers),
                "a list that includes 'cpu' (plus 'cuda' and/or 'tensorrt')")
        require(self.warmup >= 0, "benchmark.warmup", self.warmup, "a whole number >= 0")
        require(self.min_runs >= 1, "benchmark.min_runs", self.min_runs, "a whole number >= 1")
        require(self.max_runs >= self.min_runs, "benchmark.max_runs", self.max_runs, "at least min_runs")
        require(self.min_seconds >= 0, "benchmark.min_seconds", self.min_seconds, "a number of seconds >= 0")


# ------------------------------------------------------------------------------ statistics


def time_calls(fn: Callable[[], object], warmup: int, min_runs: int, min_seconds: float,
               max_runs: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each timed call of ``fn`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = clock()
    while len(times) < max_runs and (len(times) < min_runs or clock() - start < min_seconds):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def latency_stats(times: list[float], batch: int) -> dict[str, float]:
    """Latency percentiles (ms) and throughput (images/s) of per-call times in seconds."""
    t = np.asarray(times, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99], method="linear") * 1e3
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(t.mean() * 1e3), "images_per_s": float(batch * len(t) / t.sum()),
            "runs": int(len(t))}


def rss_mb() -> float:
    """Current resident memory of this process (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------ the paths


def ort_case(model: onnx.ModelProto | bytes, provider: str, batch: int, x: np.ndarray,
             cfg: BenchConfig, precision: str = "fp32") -> dict:
    """One onnxruntime case; on CUDA with device-resident I/O and a CUDA graph."""
    rss0 = rss_mb()
    options = {}
    if provider == "cuda":
        options = {"cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"}
    elif provider == "tensorrt":
        cache = Path(tempfile.gettempdir()) / "mnist-onnx-trt-cache"
        options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                   "trt_fp16_enable": "False"}
    session = runtime.open_session(model, provider, cfg.threads, provider_options=options)
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    if session.label in ("cuda", "tensorrt"):
        call, gpu_mem = _bound_gpu_call(session, xb)
    else:
        call, gpu_mem = (lambda: session.run(xb)), None
    times = time_calls(call, cfg.warmup, cfg.min_runs, cfg.min_seconds, cfg.max_runs)
    row = {"path": f"onnxruntime-{session.label}", "provider": session.label, "precision": precision,
           "batch": batch, "providers_used": ",".join(session.providers), "note": session.note,
           **latency_stats(times, batch), "rss_growth_mb": rss_mb() - rss0}
    if gpu_mem is not None:
        row["gpu_mem_mb"] = gpu_mem()
    return row


def _bound_gpu_call(session: runtime.Session, xb: np.ndarray):
    """A call with input and output already on the GPU: the timing excludes host copies."""
    import onnxruntime as ort
    s = session.session
    x_dev = ort.OrtValue.ortvalue_from_numpy(xb, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type((len(xb), 10), np.float32, "cuda", 0)
    binding = s.io_binding()
    binding.bind_ortvalue_input(s.get_inputs()[0].name, x_dev)
    binding.bind_ortvalue_output(s.get_outputs()[0].name, y_dev)
    free0 = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None

    def call():
        s.run_with_iobinding(binding)
        binding.synchronize_outputs()

    def mem():
        return (free0 - torch.cuda.mem_get_info()[0]) / 2**20 if free0 is not None else float("nan")
    return call, mem


def torch_case(model: torch.nn.Module, device: torch.device, batch: int, x: np.ndarray, cfg: BenchConfig) -> dict:
    """PyTorch eager on ``device``, same threads, inference mode, channels-last."""
    rss0 = rss_mb()
    model = model.to(device=device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # torch's stubs omit memory_format
    xb = torch.from_numpy(np.resize(x, (batch, *x.shape[1:]))).to(device).contiguous(
        memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    @torch.inference_mode()
    def call():
        model(xb)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = time_calls(call, cfg.warmup, cfg.min_runs, cfg.min_seconds, cfg.max_runs)
    row = {"path": f"pytorch-{device.type}", "provider": device.type, "precision": "fp32", "batch": batch,
           "providers_used": f"torch {torch.__version__}", "note": "", **latency_stats(times, batch),
           "rss_growth_mb": rss_mb() - rss0}
    if device.type == "cuda":
        row["gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def choose_cases(models: dict[str, onnx.ModelProto],
                 cfg: BenchConfig) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """The cases to run: onnxruntime CPU per model precision, PyTorch CPU, and each GPU provider
    (and PyTorch CUDA) only where it really runs; and, per GPU provider asked for, 'ran' or why not."""
    cases = [("ort", "cpu", p) for p in models] + [("torch", "cpu", "fp32")]
    status = {}
    for gpu in [p for p in cfg.providers if p != "cpu"]:
        probe = runtime.open_session(models["fp32"], gpu)
        status[f"{gpu}_status"] = "ran" if probe.label == gpu else f"unavailable: {probe.note}"
        if probe.label == gpu:
            cases.append(("ort", gpu, "fp32"))
    if torch.cuda.is_available():
        cases.append(("torch", "cuda", "fp32"))
    return cases, status


def sweep(cases: list[tuple[str, str, str]], models: dict[str, onnx.ModelProto], net: torch.nn.Module,
          x: np.ndarray, cfg: BenchConfig, on_case: Callable[[str], None] = lambda name: None) -> list[dict]:
    """Every case at every batch size; ``on_case`` is told each one as it finishes. The cases
    of one batch size run back to back, so the ratios compare measurements taken within
    seconds of each other (this machine's speed drifts by 20% over minutes); rows come back
    grouped by case, in batch order."""
    rows = {}
    for batch in cfg.batch_sizes:
        for case in cases:
            kind, provider, precision = case
            if kind == "ort":
                rows[case, batch] = ort_case(models[precision], provider, batch, x, cfg, precision)
            else:
                rows[case, batch] = torch_case(net, torch.device(provider), batch, x, cfg)
            on_case(f"{kind} {provider} {precision} batch {batch}")
    return [rows[case, batch] for case in cases for batch in cfg.batch_sizes]


# ------------------------------------------------------------------------------ reporting


def ratios(rows: list[dict], cfg: BenchConfig) -> dict[str, float]:
    """The side-by-side ratios, measured in this one run."""
    def get(path, precision, batch, key):
        for r in rows:
            if r["path"] == path and r["precision"] == precision and r["batch"] == batch:
                return r[key]
        return None
    out = {}
    small, big = min(cfg.batch_sizes), (256 if 256 in cfg.batch_sizes else max(cfg.batch_sizes))
    pairs = {
        f"ort_vs_torch_cpu_p50_ratio_b{small}": (get("onnxruntime-cpu", "fp32", small, "p50_ms"),
                                                 get("pytorch-cpu", "fp32", small, "p50_ms")),
        f"ort_vs_torch_cpu_throughput_ratio_b{big}": (get("onnxruntime-cpu", "fp32", big, "images_per_s"),
                                                      get("pytorch-cpu", "fp32", big, "images_per_s")),
        f"int8_vs_fp32_cpu_throughput_ratio_b{big}": (get("onnxruntime-cpu", "int8", big, "images_per_s"),
                                                      get("onnxruntime-cpu", "fp32", big, "images_per_s")),
        f"ort_vs_torch_cuda_throughput_ratio_b{max(cfg.batch_sizes)}": (
            get("onnxruntime-cuda", "fp32", max(cfg.batch_sizes), "images_per_s"),
            get("pytorch-cuda", "fp32", max(cfg.batch_sizes), "images_per_s")),
    }
    for name, (a, b) in pairs.items():
        if a is not None and b:
            out[name] = a / b
    best = max((r["images_per_s"] for r in rows if r["path"] == "onnxruntime-cpu" and r["precision"] == "fp32"),
               default=0.0)
    out["ort_cpu_fp32_best_images_per_s"] = best
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'path':<18} {'prec':<5} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'images/s':>10} "
            f"{'RSS+ MB':>8}  ran on")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['path']:<18} {r['precision']:<5} {r['batch']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['images_per_s']:>10.0f} {r['rss_growth_mb']:>8.1f}  "
                     f"{r['providers_used']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the machine


def hardware() -> dict[str, str]:
    import onnxruntime as ort
    info = {"cpu": _cpu_model(), "cores": str(os.cpu_count()), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "ort_available_providers": ",".join(ort.get_available_providers())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
        info["driver"] = _nvidia_driver()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> str:
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
