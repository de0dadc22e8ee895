"""Pictures a person looks at: misclassified digits, the confusion matrix, conv1's filters, feature
maps, and the benchmark chart (DVC draws the training curves from plots/train.csv)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import atomic  # noqa: E402

if TYPE_CHECKING:  # the benchmark's records, for the chart's signature only (bench is not imported to draw)
    from pipeline import bench


def _save(fig, path: str | os.PathLike) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def misclassified_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                       confidence: np.ndarray, path: str | os.PathLike, n: int = 36) -> None:
    """A grid of wrongly classified digits, most confident mistakes first."""
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong])][:n]
    cols = 9
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{labels[i]}→{predicted[i]} {confidence[i]:.0%}", fontsize=8, color="crimson")
    fig.suptitle(f"{(predicted != labels).sum()} misclassified test digits "
                 f"(true→predicted, confidence), most confident first", fontsize=9)
    _save(fig, path)


def confusion_png(cm: np.ndarray, path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    off = cm.astype(float).copy()
    np.fill_diagonal(off, np.nan)  # colour the mistakes; the diagonal would drown them
    ax.imshow(off, cmap="Reds")
    for t in range(cm.shape[0]):
        for p in range(cm.shape[1]):
            ax.text(p, t, cm[t, p], ha="center", va="center", fontsize=7,
                    color="black" if t != p else "darkgreen", weight="bold" if t == p else None)
    ax.set_xticks(range(cm.shape[1]))
    ax.set_yticks(range(cm.shape[0]))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, accuracy {cm.trace() / cm.sum():.2%}")
    _save(fig, path)


def conv_filters(weights: np.ndarray, path: str | os.PathLike, title: str = "conv1 filters") -> None:
    """Each filter of the first conv layer (K, 1, F, F) as a small grey picture."""
    k = weights.shape[0]
    cols = min(k, 8)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, w in zip(axes.flat, weights[:, 0]):
        lim = np.abs(w).max() or 1.0
        ax.imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim)  # red excites, blue inhibits
    fig.suptitle(f"{title}: {k} learned {weights.shape[2]}x{weights.shape[3]} filters (red +, blue -)",
                 fontsize=9)
    _save(fig, path)


def feature_maps(images: np.ndarray, maps: dict[str, np.ndarray], path: str | os.PathLike,
                 channels: int = 8) -> None:
    """Rows: a test digit, then the first ``channels`` activation maps of each layer in ``maps``."""
    n = len(images)
    cols = 1 + channels * len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(cols * 0.75, n * 0.85 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r in range(n):
        axes[r, 0].imshow(images[r], cmap="gray")
        c = 1
        for act in maps.values():
            for ch in range(min(channels, act.shape[1])):
                axes[r, c].imshow(act[r, ch], cmap="viridis")
                c += 1
    for i, (name, act) in enumerate(maps.items()):
        axes[0, 1 + i * channels].set_title(f"{name} (first {channels} of {act.shape[1]} maps)",
                                            fontsize=8, loc="left")
    fig.suptitle("what each layer sees: digit, then activation maps", fontsize=9)
    _save(fig, path)


def benchmark_chart(rows: list[bench.Row], path: str | os.PathLike, title: str,
                    ratios: bench.Ratios | None = None) -> None:
    """Latency (p50, with the interquartile range of its per-round medians as error bars) and
    throughput against batch size, one line per path, precision and thread count (the per-core
    lines dashed). A point flagged unstable (its rounds disagreed, its threads waited for a CPU,
    or other processes were busy) is drawn as a red X. Below, the paired ratios with their
    interquartile ranges, and which of them are flagged."""
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.8 if ratios else 4.4))
    lines: dict[str, list[bench.Row]] = {}
    several = len({r.threads for r in rows}) > 1  # the per-core rows the ratios come from, beside the rest
    for r in rows:
        threads = f", {r.threads} thread{'s' if r.threads > 1 else ''}" if several else ""
        lines.setdefault(f"{r.path} {r.precision}{threads}", []).append(r)
    fewest = min(r.threads for r in rows)
    flagged = False
    for name, rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: r.batch)
        b = [r.batch for r in rs]
        style = "--" if several and rs[0].threads == fewest else "-"
        p50 = np.array([r.p50_ms for r in rs])
        err = np.array([[max(p - r.p50_q25_ms, 0), max(r.p50_q75_ms - p, 0)] for p, r in zip(p50, rs)]).T
        drawn = lat.errorbar(b, p50, yerr=err, marker="o", capsize=3, linestyle=style, label=name)
        thr.plot(b, [r.images_per_s for r in rs], marker="o", linestyle=style, color=drawn[0].get_color(), label=name)
        shaky = [r for r in rs if not r.stable]
        for ax, key in ((lat, "p50_ms"), (thr, "images_per_s")):
            ax.scatter([r.batch for r in shaky], [getattr(r, key) for r in shaky], marker="X", s=90, color="crimson",
                       zorder=5, label="unstable (see the console)" if ax is thr and shaky and not flagged else None)
        flagged = flagged or bool(shaky)
    for ax, ylabel in ((lat, "p50 latency per call (ms), IQR of rounds"), (thr, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    thr.legend(fontsize=8)
    if ratios:
        text = "   ".join(f"{r.name}: {r.value:.3f} (IQR {r.iqr_low:.3f}-{r.iqr_high:.3f})"
                           f"{'' if r.stable else ' UNSTABLE'}" for r in ratios.ratios)
        fig.text(0.5, 0.01, f"paired ratios on {ratios.threads} thread(s) per path:\n{text}",
                 ha="center", va="bottom", fontsize=7.5, wrap=True)
        fig.subplots_adjust(bottom=0.2)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
