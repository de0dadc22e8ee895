"""Training on several processes with torch.distributed: torchrun launches them (elastic
agent, c10d rendezvous), DistributedDataParallel averages their gradients (gloo on CPUs,
NCCL between GPUs, one GPU per process).

The global batch stays ``train.batch_size``: every rank walks the same seeded permutation
and takes its own slice of each batch, so N processes see the batches one process sees.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes (1 = no distribution)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs, checkpoints, progress and MLflow."""
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch of indices (the whole batch on one process)."""
        return batch if self.size == 1 else batch.tensor_split(self.size)[self.rank]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over every rank (every rank must call it)."""
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value, dist.ReduceOp.SUM)
        return value

    def max(self, value: float) -> float:
        """The largest ``value`` over every rank (every rank must call it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order (every rank must call it)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def launched() -> bool:
    """Whether torchrun started this process (it sets RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def wanted(processes: int | str, device: torch.device) -> int:
    """train.processes -> how many processes to start here: ``auto`` is one per visible GPU,
    or 1 on a CPU."""
    if processes == "auto":
        return max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1
    return int(processes)


def torchrun_command(processes: int, module: str, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` (torchrun) starting ``processes`` copies of ``module``
    on this machine: a standalone c10d rendezvous on a free port, no restarts."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(processes), "--max-restarts", "0", "-m", module, *args]


def die_with_parent() -> None:
    """End this worker when its torchrun agent ends, SIGKILL included (Linux). torchrun starts
    each worker in a session of its own, so without this a killed agent leaves its workers
    training on, writing outputs and deleting checkpoints under the next run's feet."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <sys/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the agent was already gone before the line above
        os._exit(1)


def init(device: torch.device) -> World:
    """Join the process group torchrun prepared (gloo on CPU, NCCL on CUDA, one GPU per local
    rank); a World of one without torchrun."""
    if not launched():
        return World()
    die_with_parent()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")
    return world


def device_of(world: World, device: torch.device) -> torch.device:
    """This rank's device: its own GPU (by local rank), or the CPU."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" else device


def threads_per_process(threads: int, world: World) -> int:
    """train.threads, or (0) this machine's cores shared out among the processes on it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    return threads or max((os.cpu_count() or 1) // local, 1)


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
