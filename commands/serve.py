"""Serve model.onnx over HTTP (KServe v2 + a drawing page), on onnxruntime alone, from a checkout.

    python -m commands.serve                                 # http://127.0.0.1:8000/
    python -m commands.serve --port 9000 --max-batch 64

Settings come from the ``serve`` section of params.yaml; a flag overrides its key (``--help``
lists them all). PyTorch and MLflow are never imported into the service: the registry version
of the file served is looked up, when the tracking store can be read, in a short-lived child
process. The container image runs the same service as ``python -m serving``.
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline import contract, runtime
from serving.config import ServeConfig, command_line, configured
from serving.server import serve
from stages import _cli
from tracking.registry import identity


def main(args) -> None:
    params = _cli.load_params()
    cfg = configured(_cli.section(ServeConfig, "serve", params), args)
    name = args.name or _cli.section(contract.RegistryConfig, "registry", params).model_name
    # The registry version whose file is this one, when the tracking store can be read; looked up
    # in a child process, so MLflow's client (about 180 MB resident, measured) never loads into the
    # long-running service.
    found = {}
    if Path(args.model).is_file():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as lookup:
            found = lookup.submit(identity, name, runtime.sha256(args.model)).result()
    sys.exit(serve(args.model, name, cfg, verbose=args.verbose, parameters=found))


if __name__ == "__main__":
    _cli.run(main, command_line("commands.serve", __doc__, str(contract.DEFAULT_MODEL)))
