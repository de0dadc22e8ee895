"""The datasets a run reads, as MLflow 3 records them (the run's inputs, and what a model's
metrics were measured on): MNIST's two splits, each named, with DVC's hash of ``data/raw`` in
the digest (and whole in the source), so a run and its models name the bytes ``dvc.lock`` names."""
from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline import contract, data

CONTEXTS = {"train": "training", "test": "evaluation"}  # MLflow's input context of each split


@dataclass(frozen=True)
class Dataset:
    name: str  # mnist-train, mnist-test
    digest: str  # DVC's md5 of data/raw (as dvc.lock records it) and the split: "<24 hex of it>-train"
    source_type: str
    source: str  # JSON: where the bytes are, and which files and SHA-256s make the split


def mnist(split: str, dvc_md5: str) -> Dataset:
    """One split of MNIST as the pipeline reads it from ``data/raw``."""
    files = data.SPLITS[split]
    images = contract.TRAIN_IMAGES if split == "train" else contract.TEST_IMAGES
    source = {"path": "data/raw", "dvc_md5": dvc_md5, "images": images,
              "files": {name: {"sha256": data.FILES[name]} for name in files}}
    # one digest per split (MLflow tells datasets apart by name and digest), each naming data/raw's hash
    digest = f"{dvc_md5.removesuffix('.dir')[:24]}-{split}"
    return Dataset(f"mnist-{split}", digest, "dvc", json.dumps(source, sort_keys=True))
