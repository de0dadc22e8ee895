"""How the inference benchmark measures: interleaved rounds, their statistics, the typed rows
and ratios it reports, and when a figure is not to be trusted. What it measures (onnxruntime
per provider and precision, PyTorch eager) is in ``pipeline/engines.py``; the machine it ran on
in ``pipeline/machine.py``. Nothing here imports PyTorch or onnxruntime.

For each batch size, every path is prepared and warmed up, then timed in interleaved rounds
(A, B, C, A, B, C, ...), each round a short burst of calls per path, so that outside load
lands on all of them alike. Latency percentiles come from the per-call times; throughput is
images divided by the summed time of the timed calls; each row's uncertainty is the
interquartile range of its per-round medians. Ratios between paths are taken round by round
(the median of per-round ratios, with their interquartile range), never from two separate
blocks of time. A row whose rounds disagree beyond ``max_spread`` is measured longer, and
flagged ``stable: false`` if that does not settle it; so is every row whose threads waited for
a CPU (``max_contention``) or that was measured while other processes took more than
``max_outside_load`` of the CPUs. Labels come from what ran (``session.get_providers()``),
never from what was asked for.

The ratios between CPU paths are measured per core (``ratio_threads``, one thread per path):
a steady outside load that takes some of the cores makes a path with as many threads as cores
wait for the taken one, and paths wait unalike (a two-thread batch-1 call waits on every
call, a one-thread one never), so a ratio at every core says as much about the load as about
the software. On one thread, and as long as a core is free, no path waits, and the ratio is
the quiet machine's; the rows at every core are still measured, and flagged when they waited.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import numpy as np

from pipeline.params import require


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256, 1024)
    providers: tuple[Literal["cpu", "cuda", "tensorrt"], ...] = ("cpu", "cuda", "tensorrt")
    warmup: int = 5  # untimed calls first: allocations, kernel choice, caches
    min_runs: int = 20  # timed calls per path and batch size, at least ...
    min_seconds: float = 1.0  # ... and this long per path, spread over the rounds
    max_runs: int = 2000
    min_rounds: int = 9  # rounds of A, B, C, ...; each ratio is the median of this many or more
    burst_ms: float = 25.0  # how long one path's burst in a round lasts (at least one call)
    pause_ms: float = 10.0  # idle after each burst: OpenMP's threads stop spin-waiting and sleep
    max_spread: float = 0.15  # a row whose per-round medians spread more (IQR / median) is unstable
    max_outside_load: float = 0.10  # ... as is one measured while other processes used more of the CPUs
    max_contention: float = 0.05  # ... or while our threads waited this share of their time for a CPU
    retry_seconds: float = 3.0  # extra rounds for a batch size with an unstable row, before flagging it
    threads: int = 0  # 0 = one per core, for every path alike
    ratio_threads: int = 1  # the CPU ratios' threads per path: 1 = per core, 0 = as the rows (threads)

    def __post_init__(self) -> None:
        require(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes), "benchmark.batch_sizes",
                list(self.batch_sizes), "a non-empty list of whole numbers >= 1")
        require("cpu" in self.providers, "benchmark.providers", list(self.providers),
                "a list that includes 'cpu' (plus 'cuda' and/or 'tensorrt')")
        require(self.warmup >= 0, "benchmark.warmup", self.warmup, "a whole number >= 0")
        require(self.min_runs >= 1, "benchmark.min_runs", self.min_runs, "a whole number >= 1")
        require(self.max_runs >= self.min_runs, "benchmark.max_runs", self.max_runs, "at least min_runs")
        require(self.min_seconds >= 0, "benchmark.min_seconds", self.min_seconds, "a number of seconds >= 0")
        require(self.min_rounds >= 3, "benchmark.min_rounds", self.min_rounds,
                "a whole number >= 3 (a median and quartiles need a few rounds)")
        require(self.burst_ms > 0, "benchmark.burst_ms", self.burst_ms, "a number of milliseconds > 0")
        require(self.pause_ms >= 0, "benchmark.pause_ms", self.pause_ms, "a number of milliseconds >= 0")
        require(self.max_spread > 0, "benchmark.max_spread", self.max_spread, "a fraction > 0, e.g. 0.15")
        require(self.retry_seconds >= 0, "benchmark.retry_seconds", self.retry_seconds, "a number of seconds >= 0")
        require(0 < self.max_outside_load <= 1, "benchmark.max_outside_load", self.max_outside_load,
                "a fraction of the machine's CPU time, in (0, 1]")
        require(0 < self.max_contention <= 1, "benchmark.max_contention", self.max_contention,
                "a fraction of our threads' time, in (0, 1]")
        require(self.threads >= 0, "benchmark.threads", self.threads, "a whole number >= 0 (0 = one per core)")
        require(self.ratio_threads >= 0, "benchmark.ratio_threads", self.ratio_threads,
                "a whole number >= 0 (1 = per core, 0 = as benchmark.threads)")

    def resolved_threads(self, threads: int) -> int:
        """A thread setting as a count: 0 is one per core."""
        return threads or (os.cpu_count() or 1)

    def ratios_apart(self) -> bool:
        """Whether the CPU ratios need a sweep of their own: their threads differ from the rows'."""
        return self.resolved_threads(self.ratio_threads) != self.resolved_threads(self.threads)

    def ratio_batches(self) -> tuple[int, int]:
        """The batch sizes the CPU ratios compare: the smallest (latency) and 256 or the largest."""
        return min(self.batch_sizes), (256 if 256 in self.batch_sizes else max(self.batch_sizes))


# ------------------------------------------------------------------------------ measuring

RoundsKey = tuple[str, str, int, int]  # (path, precision, batch, threads): which rounds a row has
K = TypeVar("K", bound=Hashable)  # what names a path: a string, a (kind, provider, precision) case


@dataclass
class Rounds:
    """Per-call seconds of one path, round by round: ``times[r]`` is round r's burst."""

    batch: int
    times: list[list[float]] = field(default_factory=list)

    def medians(self) -> np.ndarray:
        return np.array([np.median(t) for t in self.times])

    def all(self) -> list[float]:
        return [t for burst in self.times for t in burst]

    def spread(self) -> float:
        """Interquartile range of the per-round medians, relative to their median."""
        q25, q50, q75 = np.percentile(self.medians(), [25, 50, 75])
        return float((q75 - q25) / q50) if q50 > 0 else 0.0


def interleave(calls: dict[K, Callable[[], object]], batch: int, cfg: BenchConfig,
               clock: Callable[[], float] = time.perf_counter,
               pause: Callable[[float], None] = time.sleep) -> dict[K, Rounds]:
    """Time ``calls`` in rounds, A B C A B C ..., each a short burst of calls, so that outside
    load lands on every path alike and each ratio can be taken round by round.

    After each burst the process idles ``cfg.pause_ms``, long enough for the worker threads
    of the path that ran (OpenMP's spin for a while) to fall asleep instead of taking the
    next path's cores: with it, every path measures within a few percent of its speed alone.

    Each path is warmed up, then given a burst size that lasts about ``cfg.burst_ms``. Rounds
    go on until every path has ``cfg.min_runs`` calls and ``cfg.min_rounds`` rounds, and the
    rounds have lasted ``cfg.min_seconds`` per path. If a path's per-round medians then spread
    by more than ``cfg.max_spread``, rounds go on (all paths alike, a measurement stays paired)
    for up to ``cfg.retry_seconds`` more, and the rows say whether that settled it.
    """
    bursts = {}
    for name, fn in calls.items():
        for _ in range(max(cfg.warmup, 1)):
            t0 = clock()
            fn()
            once = clock() - t0
        bursts[name] = max(1, min(cfg.max_runs, round(cfg.burst_ms / 1e3 / max(once, 1e-9))))
    out = {name: Rounds(batch) for name in calls}
    order = list(calls)

    def round_() -> None:
        for name in order:
            burst = out[name].times
            times = []
            for _ in range(bursts[name]):
                t0 = clock()
                calls[name]()
                times.append(clock() - t0)
            burst.append(times)
            pause(cfg.pause_ms / 1e3)
        order.append(order.pop(0))  # who goes first rotates: no path always follows the same one

    start = clock()
    while (len(out[order[0]].times) < cfg.min_rounds
           or any(len(r.all()) < cfg.min_runs for r in out.values())
           or clock() - start < cfg.min_seconds * len(calls)):
        if all(len(r.all()) >= cfg.max_runs for r in out.values()):
            break
        round_()
    retry_until = clock() + cfg.retry_seconds
    while any(r.spread() > cfg.max_spread for r in out.values()) and clock() < retry_until:
        round_()
    return out


@dataclass(frozen=True)
class Stats:
    """One path's timing at one batch size: percentiles over every timed call, throughput, and
    the spread of its per-round medians (the uncertainty), with why it may not be trusted."""

    p50_ms: float
    p50_q25_ms: float  # the interquartile range of the per-round medians
    p50_q75_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    runs: int  # timed calls
    rounds: int
    spread: float  # IQR / median of the per-round medians
    outside_load: float  # other processes' share of the CPUs meanwhile
    contention: float | None  # our threads' share of runnable time spent waiting for a CPU (None: unknown)
    stable: bool


def row_stats(rounds: Rounds, cfg: BenchConfig, outside_load: float = 0.0,
              contention: float | None = None) -> Stats:
    """Percentiles and throughput over every timed call, and the spread of the per-round
    medians (the row's uncertainty). ``stable`` is False when that spread is over the bound,
    when our threads waited for a CPU more than ``cfg.max_contention`` of their time, or when
    other processes used more than ``cfg.max_outside_load`` of the CPUs meanwhile: a steady
    load slows paths unequally (a two-thread call waits for the thread whose core is taken)
    while its rounds still agree, so the spread alone would not show it."""
    t = np.asarray(rounds.all(), dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99], method="linear") * 1e3
    q25, q75 = np.percentile(rounds.medians() * 1e3, [25, 75])
    stats = Stats(float(p50), float(q25), float(q75), float(p90), float(p99), float(t.mean() * 1e3),
                  float(rounds.batch * len(t) / t.sum()), int(len(t)), len(rounds.times), rounds.spread(),
                  outside_load, contention, stable=True)
    return dataclasses.replace(stats, stable=not unstable_because(stats, cfg))


@dataclass(frozen=True)
class Row(Stats):
    """A row of the benchmark table: which path, precision, threads and batch size, its timing
    (``Stats``), and what it cost. Flattened to a dict or a metric key only at the edges
    (``record``, ``metric_key``), so every writer and reader names a figure the same way."""

    path: str = ""  # what ran: onnxruntime-cpu, onnxruntime-cuda, pytorch-cpu, ...
    provider: str = ""
    precision: str = "fp32"
    threads: int = 0
    batch: int = 0
    rss_growth_mb: float = 0.0  # resident memory the path's first call added
    gpu_mem_mb: float | None = None
    providers_used: str = ""  # session.get_providers(): what really ran
    note: str = ""

    COLUMNS = ("path", "provider", "precision", "threads", "batch", "p50_ms", "p50_q25_ms", "p50_q75_ms", "p90_ms",
               "p99_ms", "mean_ms", "images_per_s", "runs", "rounds", "spread", "outside_load", "contention",
               "stable", "rss_growth_mb", "gpu_mem_mb", "providers_used", "note")

    def record(self) -> dict:
        """The row as the JSON and CSV files hold it, in the table's column order."""
        return {k: getattr(self, k) for k in self.COLUMNS}

    @classmethod
    def from_record(cls, record: dict) -> Row:
        return cls(**{k: record[k] for k in cls.COLUMNS if k in record})

    def key(self, figure: str) -> str:
        """This row's metric name for one of its figures, e.g. bench_onnxruntime-cpu_fp32_b1_t2_p50_ms."""
        return metric_key(self.path, self.precision, self.batch, self.threads, figure)


def metric_key(path: str, precision: str, batch: int, threads: int, figure: str) -> str:
    """The one way a benchmark figure is named in MLflow and by every reader."""
    return f"bench_{path}_{precision}_b{batch}_t{threads}_{figure}"


def unstable_because(row: Stats, cfg: BenchConfig) -> list[str]:
    """Why a row is flagged unstable, one phrase per reason; empty when it is stable."""
    why = []
    if row.spread > cfg.max_spread:
        why.append(f"its rounds disagree by {row.spread:.0%} (bound {cfg.max_spread:.0%}) after {row.rounds} rounds")
    if row.contention is not None and row.contention > cfg.max_contention:
        why.append(f"its threads waited {row.contention:.0%} of their time for a CPU")
    if row.outside_load > cfg.max_outside_load:
        why.append(f"other processes used {row.outside_load:.0%} of the CPUs meanwhile")
    return why


def pairable(row: Stats, cfg: BenchConfig) -> bool:
    """Whether a row's rounds can enter a paired ratio: they agree with each other, and our
    threads did not wait for a CPU. Outside load that only slows both paths of a pair alike
    (caches, memory bandwidth) cancels in the ratio; waiting does not, it depends on how many
    threads a path has. Where the kernel does not say how long our threads waited, any outside
    load counts as waiting."""
    waited = (row.contention > cfg.max_contention if row.contention is not None
              else row.outside_load > cfg.max_outside_load)
    return row.spread <= cfg.max_spread and not waited


class Snapshot(NamedTuple):
    busy: float  # CPU seconds the whole machine has been busy
    own: float  # CPU seconds of this process
    time: float  # monotonic seconds
    threads: dict[str, tuple[int, int]] | None  # per thread of ours: (ns on a CPU, ns waiting for one)


def cpu_snapshot() -> Snapshot:
    """How much CPU time the machine, this process and each of its threads have had so far."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
    own = os.times()
    return Snapshot(busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic(), _thread_times())


def _thread_times() -> dict[str, tuple[int, int]] | None:
    """Each of our threads' time on a CPU and time runnable but waiting for one (Linux's
    /proc/self/task/*/schedstat, in ns); None where the kernel does not keep them."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            ran, waited, _ = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
        except (OSError, ValueError):
            continue  # the thread ended meanwhile, or no scheduler statistics
        out[tid] = (int(ran), int(waited))
    return out or None


def outside_load(before: Snapshot, after: Snapshot) -> float:
    """The share of the machine's CPU time that other processes used between two snapshots
    (0 = none, 1 = every core, all the time). Measured here: 0.002 idle, 0.505 with one
    busy process on two cores."""
    wall = after.time - before.time
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def contention(before: Snapshot, after: Snapshot) -> float | None:
    """The share of our threads' runnable time, between two snapshots, that they spent waiting
    for a CPU: what a busy machine does to a measurement (0 = never waited). Threads that
    started or ended in between are left out; None where the kernel does not say."""
    if before.threads is None or after.threads is None:
        return None
    ran = waited = 0
    for tid, (r1, w1) in after.threads.items():
        if tid in before.threads:
            r0, w0 = before.threads[tid]
            ran, waited = ran + r1 - r0, waited + w1 - w0
    return waited / (ran + waited) if ran + waited > 0 else 0.0


@dataclass(frozen=True)
class Ratio:
    """A side-by-side ratio from rounds measured seconds apart in one run: the median of the
    per-round ratios, their interquartile range, and whether both rows it compares could be
    paired (``pairable``: their rounds agreed and their threads did not wait for a CPU)."""

    name: str  # e.g. ort_vs_torch_cpu_p50_ratio_b1: below 1, onnxruntime is faster
    value: float
    iqr_low: float
    iqr_high: float
    rounds: int
    stable: bool
    kind: str = ""  # what it compares, whatever the batch sizes: one of RATIO_KINDS

    def record(self) -> dict:
        return dataclasses.asdict(self)


# What each ratio compares (a Ratio's name also says at which batch size): readers ask by kind.
RATIO_KINDS = {
    "latency": "onnxruntime vs PyTorch, p50 latency at the smallest batch, per core (below 1: onnxruntime faster)",
    "throughput": "onnxruntime vs PyTorch, throughput at batch 256, per core (above 1: onnxruntime faster)",
    "int8": "INT8 vs FP32 onnxruntime, throughput at batch 256, per core (above 1: INT8 faster)",
    "cuda": "onnxruntime CUDA vs PyTorch CUDA, throughput at the largest batch",
}


@dataclass(frozen=True)
class Ratios:
    """The benchmark's comparisons: the ratios, the threads per path they were measured on, and
    the best onnxruntime FP32 throughput on every core."""

    threads: int
    ratios: tuple[Ratio, ...]
    best_images_per_s: float

    def record(self) -> dict:
        return {"ratio_threads": self.threads, "best_images_per_s": self.best_images_per_s,
                "ratios": [r.record() for r in self.ratios]}

    @classmethod
    def from_record(cls, record: dict) -> Ratios:
        return cls(record["ratio_threads"], tuple(Ratio(**r) for r in record["ratios"]), record["best_images_per_s"])

    def get(self, name: str) -> Ratio | None:
        return next((r for r in self.ratios if r.name == name), None)

    def of(self, kind: str) -> Ratio | None:
        """The ratio of one kind (RATIO_KINDS), if it was measured."""
        return next((r for r in self.ratios if r.kind == kind), None)


def paired_ratio(a: Rounds, b: Rounds, name: str = "") -> Ratio:
    """a's per-call time over b's, taken round by round (the two ran seconds apart), as the
    median of the per-round ratios with their interquartile range."""
    n = min(len(a.times), len(b.times))
    per_round = a.medians()[:n] / b.medians()[:n]
    q25, q50, q75 = np.percentile(per_round, [25, 50, 75])
    return Ratio(name, float(q50), float(q25), float(q75), int(n), stable=True)


def rss_mb() -> float:
    """Current resident memory of this process (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------ reporting


def ratios(rows: list[Row], rounds: dict[RoundsKey, Rounds], cfg: BenchConfig) -> Ratios:
    """The side-by-side ratios, each from rounds measured seconds apart in this one run. The CPU
    ratios come from the rounds on ``cfg.ratio_threads`` threads, the CUDA one from those on
    ``cfg.threads``; a ratio whose rows were not both measured is left out."""
    small, big = cfg.ratio_batches()
    top = max(cfg.batch_sizes)
    per_core, every = cfg.resolved_threads(cfg.ratio_threads), cfg.resolved_threads(cfg.threads)
    # name: (numerator rounds, denominator rounds); a throughput ratio is the inverse time ratio
    pairs = {
        ("latency", f"ort_vs_torch_cpu_p50_ratio_b{small}"): (("onnxruntime-cpu", "fp32", small, per_core),
                                                              ("pytorch-cpu", "fp32", small, per_core)),
        ("throughput", f"ort_vs_torch_cpu_throughput_ratio_b{big}"): (("pytorch-cpu", "fp32", big, per_core),
                                                                      ("onnxruntime-cpu", "fp32", big, per_core)),
        ("int8", f"int8_vs_fp32_cpu_throughput_ratio_b{big}"): (("onnxruntime-cpu", "fp32", big, per_core),
                                                               ("onnxruntime-cpu", "int8", big, per_core)),
        ("cuda", f"ort_vs_torch_cuda_throughput_ratio_b{top}"): (("pytorch-cuda", "fp32", top, every),
                                                                 ("onnxruntime-cuda", "fp32", top, every)),
    }
    ok = {(r.path, r.precision, r.batch, r.threads): pairable(r, cfg) for r in rows}
    found = []
    for (kind, name), (a, b) in pairs.items():
        if a in rounds and b in rounds:
            found.append(dataclasses.replace(paired_ratio(rounds[a], rounds[b], name), stable=ok[a] and ok[b],
                                             kind=kind))
    best = max((r.images_per_s for r in rows if r.path == "onnxruntime-cpu" and r.precision == "fp32"
                and r.threads == every), default=0.0)
    return Ratios(per_core, tuple(found), best)


def table_csv(rows: list[Row]) -> str:
    """Every row, as plots/benchmark.csv holds it (floats to 4 decimals)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, Row.COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.record().items()} for r in rows)
    return out.getvalue()


def throughput_csv(rows: list[Row]) -> str:
    """Images/s by batch size, one column per path and precision, on every core: the DVC plot that
    ``dvc plots diff`` overlays across revisions (the per-core rows are the ratios' business)."""
    every = max(r.threads for r in rows)
    mine = [r for r in rows if r.threads == every]
    columns = sorted({f"{r.path}_{r.precision}" for r in mine})
    by = {(r.batch, f"{r.path}_{r.precision}"): r.images_per_s for r in mine}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["batch", *columns])
    for batch in sorted({r.batch for r in mine}):
        writer.writerow([batch, *(round(by[batch, c]) if (batch, c) in by else "" for c in columns)])
    return out.getvalue()


def table(rows: list[Row]) -> str:
    head = (f"{'path':<18} {'prec':<5} {'thr':>3} {'batch':>5} {'p50 ms':>9} {'p50 IQR of rounds':>19} {'p99 ms':>9} "
            f"{'images/s':>10} {'RSS+ MB':>8}  ran on")
    lines = [head, "-" * len(head)]
    for r in rows:
        iqr = f"{r.p50_q25_ms:.3f}-{r.p50_q75_ms:.3f}"
        lines.append(f"{r.path:<18} {r.precision:<5} {r.threads:>3} {r.batch:>5} {r.p50_ms:>9.3f} {iqr:>19} "
                     f"{r.p99_ms:>9.3f} {r.images_per_s:>10.0f} {r.rss_growth_mb:>8.1f}  "
                     f"{r.providers_used}{'' if r.stable else '  UNSTABLE'}")
    return "\n".join(lines)
