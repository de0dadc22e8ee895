"""What every stage and command of a checkout does alike: read its params from params.yaml, run, and
fail with a clear message (pipeline/cli.py)."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pipeline import params as P
from pipeline.cli import describe, run

__all__ = ["PARAMS_FILE", "describe", "load_params", "run", "section"]

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")  # DVC runs every stage from the repository root


def load_params(path: Path = PARAMS_FILE) -> dict:
    return P.read_file(path)


def section(cls: type[T], name: str, params: dict | None = None) -> T:
    """The typed config of one params.yaml section, validated."""
    params = load_params() if params is None else params
    return P.parse(cls, params.get(name), name)
