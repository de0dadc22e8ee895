"""The machine a figure was measured on: the CPU (with the instruction sets that change speed:
AVX2, AVX-512, VNNI), the GPU when there is one, the libraries, and how busy it is right now.

Every speed figure names its machine, because these differ from session to session: the same
code runs 1.5x apart on an AVX2 and an AVX-512/VNNI CPU. Nothing here imports PyTorch unless
a GPU record is asked for (``gpu=True``), so the service's load benchmark can use it too.
"""
from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

# the /proc/cpuinfo flags that decide which kernels onnxruntime, oneDNN and MKL run
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile")


def cpu() -> dict[str, str]:
    """The CPU's model, cores, architecture and speed-relevant instruction sets."""
    info = {"cpu": platform.processor() or "unknown", "cores": str(os.cpu_count()), "machine": platform.machine(),
            "cpu_features": ""}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    info["cpu_features"] = " ".join(f for f in SPEED_FLAGS if f in flags)
    return info


def software() -> dict[str, str]:
    """Python and the versions of the libraries whose speed is measured (from their metadata:
    nothing is imported)."""
    info = {"python": platform.python_version()}
    for key, dists in (("torch", ("torch",)), ("onnxruntime", ("onnxruntime-gpu", "onnxruntime")),
                       ("onnx", ("onnx",))):
        for dist in dists:
            try:
                info[key] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return info


def gpu() -> dict[str, str]:
    """The first CUDA GPU PyTorch sees, its CUDA version and driver; empty without one."""
    import torch
    if not torch.cuda.is_available():
        return {}
    return {"gpu": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda), "driver": _nvidia_driver()}


def hardware(with_gpu: bool = True) -> dict[str, str]:
    """The whole record: CPU, libraries, onnxruntime's available providers and, with ``with_gpu``, the GPU."""
    import onnxruntime as ort
    return {**cpu(), **software(), "ort_available_providers": ",".join(ort.get_available_providers()),
            **(gpu() if with_gpu else {})}


def state() -> dict[str, float]:
    """How busy the machine is and how fast its CPUs run right now: load averages and the
    clock the kernel reports (MHz; mean, min and max over cores, where it is readable)."""
    one, five, fifteen = os.getloadavg()
    now = {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen}
    mhz = [int(f.read_text()) / 1e3 for f in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")]
    if not mhz and Path("/proc/cpuinfo").is_file():
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    if mhz:
        now.update(cpu_mhz_mean=float(np.mean(mhz)), cpu_mhz_min=min(mhz), cpu_mhz_max=max(mhz))
    return now


def describe(hw: dict[str, str]) -> str:
    """One line for a report: 'AMD EPYC (2 cores, avx2 fma), onnxruntime 1.31.1, torch 2.13.0'."""
    features = f", {hw['cpu_features']}" if hw.get("cpu_features") else ""
    gpu_part = f"; {hw['gpu']} (CUDA {hw.get('cuda')}, driver {hw.get('driver')})" if "gpu" in hw else ""
    libs = ", ".join(f"{k} {hw[k]}" for k in ("onnxruntime", "torch") if k in hw)
    return f"{hw['cpu']} ({hw['cores']} cores{features}){gpu_part}; {libs}"


def _nvidia_driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
