"""What every stage does the same way: read its params, run, and fail with a clear message."""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

from pipeline import params as P
from pipeline.errors import PipelineError

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")  # DVC runs every stage from the repository root


def load_params(path: Path = PARAMS_FILE) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise P.ParamError(f"{path.resolve()} not found: run stages from the repository root") from None
    except yaml.YAMLError as e:
        raise P.ParamError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise P.ParamError(f"{path} must be a mapping of sections (download, model, train, ...)")
    return data


def section(cls: type[T], name: str, params: dict | None = None) -> T:
    """The typed config of one params.yaml section, validated."""
    params = load_params() if params is None else params
    return P.parse(cls, params.get(name), name)


def describe(e: BaseException) -> str:
    """An error's message, or its kind when it has none (a bare MemoryError): never empty."""
    return str(e).strip() or type(e).__name__


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Run a stage; known failures print one clear line (no traceback) and exit 1."""
    args = parser.parse_args()
    try:
        main(args)
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; nothing was written at a final path", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if not isinstance(e, PipelineError):  # ours say what is wrong; anything else is a bug
            traceback.print_exc()
        print(f"{parser.prog}: error: {describe(e)}", file=sys.stderr)
        sys.exit(1)
