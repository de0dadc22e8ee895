"""Promote a registered model version to 'champion', only if its test accuracy is not worse.

    python -m commands.promote [--version N]     (default: the version aliased 'candidate')
The accuracy compared is the evaluate stage's (tag eval_accuracy on each version).
"""
from __future__ import annotations

import argparse
import sys

from pipeline.contract import RegistryConfig
from stages import _cli
from tracking.registry import CANDIDATE, CHAMPION
from tracking.store import tracking_uri


def main(args: argparse.Namespace) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = args.name or _cli.section(RegistryConfig, "registry").model_name
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    try:
        version = (client.get_model_version(name, args.version) if args.version
                   else client.get_model_version_by_alias(name, CANDIDATE))
    except MlflowException as e:
        sys.exit(f"promote: no such version of {name!r} in {tracking_uri()}: {e.message}")
    acc = _accuracy(version)
    if acc is None:
        sys.exit(f"promote: {name} version {version.version} has no eval_accuracy tag; run the evaluate stage first")
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    champ_acc = _accuracy(champion) if champion else None
    if champion is not None and champ_acc is not None and acc < champ_acc:
        sys.exit(f"promote: refused: version {version.version} has test accuracy {acc:.4f}, worse than the "
                 f"champion (version {champion.version}, {champ_acc:.4f})")
    client.set_registered_model_alias(name, CHAMPION, version.version)
    before = f"version {champion.version} ({champ_acc:.4f})" if champion else "none"
    print(f"{name}@{CHAMPION} -> version {version.version} (test accuracy {acc:.4f}); was {before}")


def _accuracy(version) -> float | None:
    value = (version.tags or {}).get("eval_accuracy")
    return float(value) if value is not None else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="commands.promote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="registered model (default: registry.model_name in params.yaml)")
    parser.add_argument("--version", help="the version to promote (default: the candidate)")
    _cli.run(main, parser)
