"""Training: the whole dataset held as tensors on the device, shuffled and batched there.

``train_epoch`` and ``evaluate`` are the canonical pair (pytorch/examples mnist); the caller
owns the epoch loop, with ``Training`` holding what makes it resumable. Shuffling uses a
generator seeded from (seed, epoch), so an epoch's order doesn't depend on what ran before
it; with a fixed seed and thread count the CPU run is bit-for-bit reproducible.
"""
from __future__ import annotations

import csv
import ctypes
import io
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint, contract, data, distributed
from pipeline.distributed import World
from pipeline.errors import PipelineError
from pipeline.model import ModelConfig, Net
from pipeline.params import require

M = TypeVar("M", bound=nn.Module)


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
    checkpoint_every: int = 100  # steps between checkpoints (0 = only at the end of each epoch)
    gpu_precision: Literal["fp32", "tf32", "bf16"] = "tf32"  # CUDA only; the CPU always trains in fp32
    processes: int | Literal["auto"] = 1  # >1: torchrun + DDP (gloo on CPU, NCCL on GPUs); auto: one per GPU

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "train.epochs", self.epochs, "a whole number >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "a whole number >= 1")
        require(self.lr > 0 and np.isfinite(self.lr), "train.lr", self.lr, "a learning rate > 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        require(self.threads >= 0, "train.threads", self.threads, "a whole number >= 0 (0 = all cores)")
        require(self.subset >= 0, "train.subset", self.subset, "a whole number >= 0 (0 = all images)")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every,
                "a whole number of steps >= 0 (0 = once per epoch)")
        require(self.processes == "auto" or int(self.processes) >= 1, "train.processes", self.processes,
                "a whole number >= 1, or auto (one per GPU)")


class DeviceError(PipelineError, RuntimeError):
    """The device asked for cannot train here: the user's setting, not a bug."""


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device. ``cuda`` where PyTorch sees none is refused, not run
    on the CPU instead: a training asked for on a GPU would otherwise take hours unannounced."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"train.device='cuda' but PyTorch sees no CUDA device (torch {torch.__version__}, "
                          f"{built}); set train.device to auto (a GPU when there is one, else the CPU) or cpu, "
                          "e.g. dvc exp run -S train.device=auto")
    return torch.device(name)


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)  # CPU kernels are deterministic


def keep_freed_memory() -> bool:
    """Keep the memory of freed activations in the process instead of handing it back to the OS.

    A CPU training step allocates and frees the same large activations every time (25.7 MB for
    conv1's output at batch 256). glibc serves blocks that large with mmap, or trims them off
    the heap, when they are freed, so the next step page-faults them in again: 1,000-12,000
    faults per step measured here, about 2 us each (conv1's forward alone: 33 ms with its
    12,500 faults, 7 ms without). Raising the mmap threshold to its maximum (32 MiB) and the
    trim threshold to 1 GiB does on the CPU what PyTorch's caching allocator does on a GPU.
    glibc only (Linux); returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def configure_device(device: torch.device, cfg: TrainConfig) -> None:
    """GPU math settings: TF32 tensor cores for fp32 matmuls/convs unless 'fp32' is asked for;
    cuDNN picks the fastest conv algorithms for our fixed shapes."""
    if device.type == "cuda":
        fast = cfg.gpu_precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
        torch.backends.cudnn.benchmark = True


def to_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 28, 28) + labels -> float32 (N, 1, 28, 28) in [0, 1] and int64 (N,), on ``device``.

    The images are laid out channels-last (NHWC in memory), the layout oneDNN and cuDNN
    convolutions run fastest in; the model is converted to match by ``prepare``.
    """
    x = torch.from_numpy(np.array(images, copy=True)).to(device).unsqueeze(1).float().div_(contract.PIXEL_MAX)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y


def prepare(model: M, device: torch.device) -> M:
    """Move the model to ``device`` in channels-last layout (1.3x faster steps on CPU, measured)."""
    return model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit memory_format


@dataclass
class Setup:
    """A training process, ready for its first step: where it runs, among how many, on what."""

    device: torch.device
    world: World  # this process's rank among the processes training together (one without torchrun)
    model: nn.Module  # the network, on ``device`` in channels-last layout
    x: torch.Tensor  # the training images (``train.subset`` of them), (N, 1, 28, 28) in [0, 1], on ``device``
    y: torch.Tensor
    xt: torch.Tensor  # the 10,000 test images, the same way
    yt: torch.Tensor


def set_up_process(cfg: TrainConfig) -> tuple[torch.device, World]:
    """What a training process sets before it allocates anything: its device (CUDA when there
    and asked for), its place in the process group (under torchrun), the seed (plus its rank)
    and threads (the cores shared out among the processes on this machine), freed memory kept,
    and the GPU math settings."""
    device = resolve_device(cfg.device)
    world = distributed.init(device)
    device = distributed.device_of(world, device)
    seed_everything(cfg.seed + world.rank, distributed.threads_per_process(cfg.threads, world))
    keep_freed_memory()
    configure_device(device, cfg)
    return device, world


def set_up(model_cfg: ModelConfig, cfg: TrainConfig, raw_dir: Path) -> Setup:
    """The one training set-up, as the train stage, scripts/gpu_check.py and the tests' trained
    model all use it: the process (``set_up_process``), the data as tensors on the device, and
    the network built (after the seed, so the same seed gives the same weights) and prepared."""
    device, world = set_up_process(cfg)
    x_np, y_np = data.load_split(raw_dir, "train")
    if cfg.subset:
        x_np, y_np = x_np[:cfg.subset], y_np[:cfg.subset]
    x, y = to_tensors(x_np, y_np, device)
    xt, yt = to_tensors(*data.load_split(raw_dir, "test"), device)
    return Setup(device, world, prepare(Net(model_cfg), device), x, y, xt, yt)


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    # fused: one kernel for the whole update instead of a dozen elementwise passes
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.schedule == "onecycle":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)  # the last, smaller batch is kept


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def train_epoch(model: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                epoch: int, on_step: Callable[[int, float], None] | None = None, log_every: int = 20,
                start_step: int = 0, totals: dict | None = None,
                after_step: Callable[[int, dict], None] | None = None, world: World | None = None) -> dict[str, float]:
    """One pass over (x, y) in a seeded random order; returns loss, accuracy, images/s, seconds.

    ``start_step`` and ``totals`` continue an epoch that a checkpoint interrupted;
    ``after_step(next_step, totals)`` runs after every step (the caller checkpoints there).
    On several processes (``world``), ``model`` is the DDP-wrapped one: each rank computes its
    slice of every global batch, and the returned sums are over all ranks.
    """
    world = world or World()
    model.train()
    order = epoch_order(len(x), cfg.seed, epoch, x.device)
    totals = totals or new_totals(x.device)
    t_last = time.perf_counter()
    for step in range(start_step, steps_per_epoch(len(x), cfg.batch_size)):
        start = step * cfg.batch_size
        idx = order[start:start + cfg.batch_size]
        mine = world.shard(idx)  # this rank's slice of the global batch
        xb, yb = x[mine], y[mine]  # (B, 1, 28, 28), (B,)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda and cfg.gpu_precision == "bf16"):
            logits = model(xb)
            if world.size == 1:
                loss = F.cross_entropy(logits, yb)
            else:  # DDP averages the ranks' gradients: scaled so that gives the global batch's mean
                loss = F.cross_entropy(logits, yb, reduction="sum") * (world.size / len(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        totals["loss_sum"] += loss.detach() * (len(idx) / world.size)  # this rank's sum; no sync in the epoch
        totals["correct"] += (logits.argmax(1) == yb).sum()
        if on_step is not None and (step + 1) % log_every == 0:
            on_step(min(start + cfg.batch_size, len(x)), loss.item())
        if after_step is not None:
            now = time.perf_counter()
            totals["seconds"] += now - t_last
            after_step(step + 1, totals)
            t_last = time.perf_counter()  # time spent checkpointing is not training time
    if x.is_cuda:
        torch.cuda.synchronize()
    totals["seconds"] += time.perf_counter() - t_last
    if on_step is not None:
        on_step(len(x), loss.item() if start_step < steps_per_epoch(len(x), cfg.batch_size) else 0.0)
    seconds = world.max(totals["seconds"])  # the epoch lasts as long as its slowest rank
    return {
        "loss": world.sum(totals["loss_sum"]).item() / len(x),
        "train_acc": world.sum(totals["correct"]).item() / len(x),  # running accuracy, with dropout on
        # every image of the epoch over the time of every step, those before a resume included
        # (``totals`` carries both): the same span on both sides of the division
        "images_per_s": len(x) / seconds if seconds else 0.0,
        "seconds": seconds,
    }


def new_totals(device: torch.device) -> dict:
    return {"loss_sum": torch.zeros((), device=device), "correct": torch.zeros((), dtype=torch.int64, device=device),
            "seconds": 0.0}


class Training:
    """A resumable training run: the model, its optimiser and schedule, and where it stands.
    The caller owns the epoch loop::

        training = Training.start(model, cfg, x, y, checkpoint_path, fingerprint)
        for epoch in training.remaining_epochs():
            row = training.run_epoch(on_step)        # checkpoints every cfg.checkpoint_every steps
            row.update(evaluate(model, x_test, y_test))
            training.end_epoch(row)                  # the history, and a checkpoint at the boundary

    With ``checkpoint_path``, ``start`` continues a killed run from its last checkpoint (read
    once, here) and the run ends with the same weights, bit for bit on CPU, as one never
    stopped. The caller deletes the checkpoint once it has written its outputs (a kill in
    between then costs nothing: the next run resumes at the end and writes them again).
    ``meta`` (plain values, such as the MLflow run id) travels in every checkpoint.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
                 checkpoint_path: str | os.PathLike | None = None, fingerprint: str = "",
                 world: World | None = None):
        self.model, self.cfg, self.x, self.y = model, cfg, x, y
        self.world = world or World()
        # on several processes the steps run through DDP, which averages the ranks' gradients
        self.net: nn.Module = model if self.world.size == 1 else nn.parallel.DistributedDataParallel(
            model, device_ids=[x.device.index] if x.is_cuda else None)
        self.opt, self.sched = make_optimizer(model, cfg, steps_per_epoch(len(x), cfg.batch_size))
        self.checkpoint_path, self.fingerprint = checkpoint_path, fingerprint
        self.epoch, self.step = 0, 0  # the next epoch to run, and the next step within it
        self.totals: dict | None = None  # sums of the epoch so far, when resuming mid-epoch
        self.history: list[dict] = []
        self.meta: dict = {}
        self.resumed = False

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
              checkpoint_path: str | os.PathLike | None = None, fingerprint: str = "",
              world: World | None = None) -> Training:
        """A new run, or the killed one ``checkpoint_path`` holds (CheckpointError if it can't be
        trusted). Every rank reads the same checkpoint (one file system) and takes its own RNG state."""
        state = checkpoint.load(checkpoint_path, fingerprint) if checkpoint_path else None
        if state is not None:  # before DDP wraps the model: it broadcasts rank 0's weights
            model.load_state_dict(state["model"])
        training = cls(model, cfg, x, y, checkpoint_path, fingerprint, world)
        if state is not None:
            training.opt.load_state_dict(state["optimizer"])
            training.sched.load_state_dict(state["scheduler"])
            rng_cpu, rng_cuda = state["rng_cpu"], state.get("rng_cuda")
            if isinstance(rng_cpu, list):  # one per rank
                rank = training.world.rank
                rng_cpu, rng_cuda = rng_cpu[rank], (rng_cuda or [None] * len(rng_cpu))[rank]
            torch.set_rng_state(rng_cpu)
            if x.is_cuda and rng_cuda is not None:
                torch.cuda.set_rng_state(rng_cuda, x.device)
            training.epoch, training.step, training.history = state["epoch"], state["step"], state["history"]
            training.totals = {k: (v.to(x.device) if torch.is_tensor(v) else v) for k, v in state["totals"].items()}
            training.meta, training.resumed = state["meta"], True
        return training

    def remaining_epochs(self) -> range:
        return range(self.epoch, self.cfg.epochs)

    def run_epoch(self, on_step: Callable[[int, float], None] | None = None) -> dict:
        """Train the current epoch from where it stands; returns its row (epoch number from 1)."""
        after_step = self._after_step if self.checkpoint_path else None
        row = train_epoch(self.net, self.opt, self.sched, self.x, self.y, self.cfg, self.epoch, on_step,
                          start_step=self.step, totals=self.totals, after_step=after_step, world=self.world)
        return {"epoch": self.epoch + 1, **row}

    def end_epoch(self, row: dict) -> None:
        """Record the finished epoch's row; checkpoint at the boundary unless it was the last."""
        self.history.append(row)
        self.epoch, self.step, self.totals = self.epoch + 1, 0, None
        if self.checkpoint_path and self.epoch < self.cfg.epochs:
            self.save()

    def save(self) -> None:
        """Every rank calls it at the same step; rank 0 writes, with every rank's RNG state."""
        assert self.checkpoint_path is not None
        x = self.x
        rng: Any = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        if self.world.size > 1:  # [rank 0's, rank 1's, ...] of each
            rng = tuple(map(list, zip(*self.world.gather(rng))))
        if not self.world.main:
            return
        checkpoint.save(self.checkpoint_path, {
            "fingerprint": self.fingerprint, "meta": self.meta, "epoch": self.epoch, "step": self.step,
            "history": self.history, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "rng_cpu": rng[0], "rng_cuda": rng[1],
            "totals": {k: (v.cpu() if torch.is_tensor(v) else v)
                       for k, v in (self.totals or new_totals(x.device)).items()},
        })

    def _after_step(self, next_step: int, totals: dict) -> None:
        if self.cfg.checkpoint_every and next_step % self.cfg.checkpoint_every == 0:
            self.step, self.totals = next_step, totals
            self.save()


def history_csv(rows: list[dict]) -> str:
    """The per-epoch rows as CSV, floats to 6 decimals (DVC plots and the README read it)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return out.getvalue()


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
