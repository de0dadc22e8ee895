"""Training on several processes with torch.distributed: torchrun launches them (elastic
agent, c10d rendezvous), DistributedDataParallel averages their gradients (gloo on CPUs,
NCCL between GPUs, one GPU per process).

The global batch stays ``train.batch_size``: every rank walks the same seeded permutation
and takes its own slice of each batch, so N processes see the batches one process sees.

Several machines: each runs the stage as one torchrun agent (``launch`` with torchrun's
options), in this process. Its c10d rendezvous counts the agents that reached the endpoint,
so one that waited in vain says where it waited, how long, and how many of how many nodes came.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousParameters,
    RendezvousTimeoutError,
    rendezvous_handler_registry,
)

from pipeline.errors import PipelineError

COUNTED_C10D = "c10d-counted"  # c10d's rendezvous, counting the agents that reached its store
JOIN_TIMEOUT_S = 300  # how long an agent waits for the others: time to start them by hand, not 10 minutes


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


class MissedRendezvous(PipelineError, RendezvousTimeoutError):
    """The agents did not all reach the rendezvous within its join timeout. Also torch's own
    timeout error, so torchrun's agent treats it as one."""

    def __init__(self, endpoint: str, run_id: str, waited_s: float, join_timeout_s: float,
                 arrived: int | None, min_nodes: int, max_nodes: int):
        nodes = f"{min_nodes}" if min_nodes == max_nodes else f"{min_nodes} to {max_nodes}"
        came = f"{arrived} of {nodes}" if arrived is not None else f"? of {nodes} (the store's host has gone)"
        super().__init__(f"the rendezvous at {endpoint} (id {run_id}) did not complete: {came} nodes arrived in "
                         f"{waited_s:.0f} s (join timeout {join_timeout_s:g} s); every machine must give the same "
                         "--rdzv-endpoint and --rdzv-id, and reach that address")


class _CountedRendezvous(RendezvousHandler):
    """torch's c10d rendezvous (a DynamicRendezvousHandler on a c10d store), which also counts in
    that store the agents that reached it, for the message of a timeout."""

    def __init__(self, params: RendezvousParameters):
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
        backend, self._store = create_backend(params)
        self._inner = create_handler(self._store, backend, params)
        self._endpoint, self._key = params.endpoint, f"mnist-onnx/arrived/{params.run_id}"

    def next_rendezvous(self):
        t0 = time.monotonic()
        self._store.add(self._key, 1)
        try:
            return self._inner.next_rendezvous()
        except RendezvousTimeoutError:
            try:
                arrived: int | None = self._store.add(self._key, 0)
            except Exception:  # noqa: BLE001 - the agent that hosted the store has gone
                arrived = None
            s = self._inner.settings
            raise MissedRendezvous(self._endpoint, s.run_id, time.monotonic() - t0, s.timeout.join.total_seconds(),
                                   arrived, s.min_nodes, s.max_nodes) from None

    def get_backend(self) -> str:
        return COUNTED_C10D

    @property
    def use_agent_store(self) -> bool:
        return self._inner.use_agent_store

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self._inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self._inner.get_run_id()

    def shutdown(self) -> bool:
        return self._inner.shutdown()


def launch(processes: int, agent_options: list[str] | None, module: str, args: list[str],
           log: Callable[[str], None]) -> bool:
    """Start torchrun for ``module`` (run with ``args``) where wanted; True when this process was
    its agent and the workers have run, False when this process is to do the work itself.

    ``agent_options`` (torchrun's own: ``--nnodes``, ``--rdzv-endpoint``, ``--rdzv-id``, ...):
    this machine's agent of a run over several, in this process, on c10d (counted) with a join
    timeout of JOIN_TIMEOUT_S, ``processes`` per machine and no restarts unless the options say
    otherwise. Otherwise ``processes`` > 1: this process becomes a standalone torchrun
    (``os.execv``: killing it ends the workers); 1: nothing to start.
    """
    if launched() or (agent_options is None and processes <= 1):
        return False
    if agent_options is None:
        log(f"train: starting {processes} processes with torchrun")  # they run this same command
        command = torchrun_command(processes, module, args)
        os.execv(command[0], command)
    from torch.distributed import run as torchrun
    parsed = torchrun.parse_args(["--rdzv-backend", "c10d", "--rdzv-conf", f"join_timeout={JOIN_TIMEOUT_S}",
                                  "--nproc-per-node", str(processes), "--max-restarts", "0", *agent_options,
                                  "-m", module, *args])
    if parsed.rdzv_backend == "c10d":
        rendezvous_handler_registry.register(COUNTED_C10D, _CountedRendezvous)  # again: a no-op
        parsed.rdzv_backend = COUNTED_C10D
    log(f"train: torchrun agent ({parsed.nnodes} nodes, {parsed.nproc_per_node} processes each): waiting for the "
        f"others at {parsed.rdzv_endpoint} (rendezvous {parsed.rdzv_id}, {parsed.rdzv_conf})")
    torchrun.run(parsed)
    return True


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
