"""Replay into MLflow what stages could not log while the tracking store was unreachable.

    python -m commands.sync            # replays .mlflow-spool/ (or $MLFLOW_SPOOL_DIR) into $MLFLOW_TRACKING_URI

Every stage also does this on its own when it starts. Exit status 1 if something is left.
"""
from __future__ import annotations

import argparse
import sys

from stages import _cli
from tracking.spool import pending_keys, replay
from tracking.store import spool_dir, tracking_uri


def main(args: argparse.Namespace) -> None:
    if not pending_keys():
        print(f"sync: nothing to replay in {spool_dir()}")
        return
    done, complete = replay(log=print)
    total = sum(done.values())
    if not complete:
        sys.exit(f"sync: replayed {total} operations; the rest of {', '.join(pending_keys())} stays in "
                 f"{spool_dir()} until {tracking_uri()} answers")
    print(f"sync: replayed {total} operations into {tracking_uri()}; the spool is empty")


if __name__ == "__main__":
    _cli.run(main, argparse.ArgumentParser(prog="commands.sync", description=__doc__))
