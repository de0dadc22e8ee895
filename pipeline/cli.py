"""What every command does alike, whichever package it lives in: run, and fail with one clear line.

A ``PipelineError`` says what is wrong and what to do: it is printed alone, exit status 1.
Anything else is a bug, printed with its traceback first. Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from pipeline.errors import PipelineError


def describe(e: BaseException) -> str:
    """An error's message, or its kind when it has none (a bare MemoryError): never empty."""
    return str(e).strip() or type(e).__name__


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse the command line and run ``main``; known failures print one line (no traceback) and exit 1."""
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
