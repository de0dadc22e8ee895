"""Accuracy of the exported model under onnxruntime, as a user will run it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import contract, runtime
from pipeline.params import require


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 1000
    misclassified_shown: int = 36  # digits in the misclassified picture

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "a whole number >= 1")
        require(self.misclassified_shown >= 0, "evaluate.misclassified_shown", self.misclassified_shown,
                "a whole number >= 0")


def predict_logits(session: runtime.Session, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([session.run(contract.to_input(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = contract.CLASSES) -> np.ndarray:
    """cm[true, predicted] = count."""
    cm = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return cm


def model_metrics(report: dict) -> dict[str, float]:
    """What a model is ranked by, from its ``accuracy_report``: the same names for every model,
    so MLflow's model view lines FP32 and INT8 up (``cross_entropy`` is the test loss)."""
    return {"accuracy": report["accuracy"], "cross_entropy": report["loss"], "errors": report["errors"]}


def accuracy_report(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    pred = logits.argmax(1)
    cm = confusion_matrix(labels, pred)
    support = cm.sum(axis=1)
    per_class = np.where(support > 0, cm.diagonal() / np.maximum(support, 1), np.inf)  # absent: not "worst"
    probs = softmax(logits)
    nll = -np.log(np.maximum(probs[np.arange(len(labels)), labels.astype(np.int64)], 1e-12)).mean()
    return {
        "accuracy": float((pred == labels).mean()),
        "errors": int((pred != labels).sum()),
        "images": int(len(labels)),
        "loss": float(nll),
        "worst_class": int(per_class.argmin()),
        "worst_class_accuracy": float(per_class.min()),
    }
