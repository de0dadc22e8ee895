"""Pictures a person looks at: misclassified digits, the confusion matrix, training curves."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import atomic  # noqa: E402


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
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, accuracy {cm.trace() / cm.sum():.2%}")
    _save(fig, path)
