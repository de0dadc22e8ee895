"""Training: the whole dataset held as tensors on the device, shuffled and batched there.

``train_epoch`` and ``evaluate`` are the canonical pair (pytorch/examples mnist); the caller
owns the four-line epoch loop. Shuffling uses a generator seeded from (seed, epoch), so an
epoch's order doesn't depend on what ran before it; with a fixed seed and thread count the
CPU run is bit-for-bit reproducible.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.params import require


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 4
    batch_size: int = 256
    lr: float = 4e-3  # peak learning rate of the one-cycle schedule (Adam)
    weight_decay: float = 0.0
    schedule: Literal["onecycle", "constant"] = "onecycle"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    threads: int = 0  # CPU threads for PyTorch; 0 = one per core
    subset: int = 0  # train on the first N images only (0 = all 60,000); for quick checks

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "train.epochs", self.epochs, "a whole number >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "a whole number >= 1")
        require(self.lr > 0 and np.isfinite(self.lr), "train.lr", self.lr, "a learning rate > 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        require(self.threads >= 0, "train.threads", self.threads, "a whole number >= 0 (0 = all cores)")
        require(self.subset >= 0, "train.subset", self.subset, "a whole number >= 0 (0 = all images)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but PyTorch sees no CUDA device "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                           "use device: auto or cpu")
    return torch.device(name)


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)  # CPU kernels are deterministic


def to_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 28, 28) + labels -> float32 (N, 1, 28, 28) in [0, 1] and int64 (N,), on ``device``.

    The images are laid out channels-last (NHWC in memory), the layout oneDNN and cuDNN
    convolutions run fastest in; the model is converted to match by ``prepare``.
    """
    x = torch.from_numpy(np.array(images, copy=True)).to(device).unsqueeze(1).float().div_(255.0)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """Move the model to ``device`` in channels-last layout (1.3x faster steps on CPU, measured)."""
    return model.to(device=device, memory_format=torch.channels_last)


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    # fused: one kernel for the whole update instead of a dozen elementwise passes
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps_per_epoch)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)  # the last, smaller batch is kept


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def train_epoch(model: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                epoch: int, on_step: Callable[[int, float], None] | None = None,
                log_every: int = 20) -> dict[str, float]:
    """One pass over (x, y) in a seeded random order; returns loss, accuracy, images/s, seconds."""
    model.train()
    order = epoch_order(len(x), cfg.seed, epoch, x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    t0 = time.perf_counter()
    for step, start in enumerate(range(0, len(x), cfg.batch_size)):
        idx = order[start:start + cfg.batch_size]
        xb, yb = x[idx], y[idx]  # (B, 1, 28, 28), (B,)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach() * len(idx)  # stays on the device: no sync inside the epoch
        correct += (logits.argmax(1) == yb).sum()
        if on_step is not None and (step + 1) % log_every == 0:
            on_step(min(start + cfg.batch_size, len(x)), loss.item())
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if on_step is not None:
        on_step(len(x), loss.item())
    return {
        "loss": loss_sum.item() / len(x),
        "train_acc": correct.item() / len(x),  # running accuracy, measured with dropout on
        "images_per_s": len(x) / seconds,
        "seconds": seconds,
    }


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        yb = y[start:start + batch_size]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return {"test_loss": loss_sum / len(x), "test_acc": correct / len(x)}


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, and of the GPU's allocator when training there."""
    mem = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if device.type == "cuda":
        mem["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return mem
