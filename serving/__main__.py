"""Serve an ONNX model over HTTP (KServe v2 + a drawing page): the deployable's entry point.

    python -m serving --model /models/model.onnx --host 0.0.0.0 --port 8000

Settings are ServeConfig's defaults, or the ``serve`` section of ``--params FILE``; a flag
overrides its key. This is what the container image runs; from a checkout,
``python -m commands.serve`` reads params.yaml and also names the registry version.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline import cli, contract, params
from serving.config import ServeConfig, command_line, configured
from serving.server import serve


def main() -> None:
    parser = command_line("serving", __doc__, str(contract.DEFAULT_MODEL))
    parser.add_argument("--params", type=Path, help="a params file whose `serve` section sets the defaults")

    def run(args) -> None:
        base = params.parse(ServeConfig, params.read_file(args.params).get("serve"), "serve") if args.params \
            else ServeConfig()
        name = args.name or contract.RegistryConfig.model_name
        sys.exit(serve(args.model, name, configured(base, args), verbose=args.verbose))
    cli.run(run, parser)


if __name__ == "__main__":
    main()
