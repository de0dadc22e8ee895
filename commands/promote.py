"""Promote a registered model version to 'champion', only if its test accuracy is not worse.

    python -m commands.promote [--version N]     (default: the version aliased 'candidate')
The accuracy compared is the evaluate stage's (tag eval_accuracy on each version); the rule is
tracking.registry.promote's, which the evaluate stage also applies to the first version.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.contract import RegistryConfig
from stages import _cli
from tracking.registry import CANDIDATE, promote
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
    print(promote(client, name, version))  # PromotionRefused: one line, exit 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="commands.promote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="registered model (default: registry.model_name in params.yaml)")
    parser.add_argument("--version", help="the version to promote (default: the candidate)")
    _cli.run(main, parser)
