"""Serve model.onnx over HTTP (KServe v2 + a drawing page), on onnxruntime alone.

    python -m stages.serve --model models/model.onnx            # http://127.0.0.1:8000/
    python -m stages.serve --model models/model.onnx --port 9000 --max-batch 64

Settings come from the ``serve`` section of params.yaml; a flag overrides its key.
PyTorch is never imported: this process needs only onnxruntime, numpy, Pillow and the HTTP stack
(uvicorn, Starlette, orjson, prometheus-client); MLflow names the registry version of the file
served, when the tracking store can be read, from a short-lived child process.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline import contract, runtime, serve
from pipeline.params import ParamError
from stages import _cli
from tracking.registry import identity


def main(args: argparse.Namespace) -> None:
    params = _cli.load_params()
    cfg = _cli.section(serve.ServeConfig, "serve", params)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg)
                 if getattr(args, f.name, None) is not None}
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except TypeError as e:
        raise ParamError(str(e)) from None
    name = args.name or _cli.section(contract.RegistryConfig, "registry", params).model_name
    # The registry version whose file is this one, when the tracking store can be read; looked up
    # in a child process, so MLflow's client (about 180 MB resident, measured) never loads into the
    # long-running service.
    found = {}
    if args.model.is_file():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as lookup:
            found = lookup.submit(identity, name, runtime.sha256(args.model)).result()
    sys.exit(serve.serve(args.model, name, cfg, verbose=args.verbose, parameters=found))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=contract.DEFAULT_MODEL, help="the ONNX model to serve")
    parser.add_argument("--name", help="model name in the v2 API (default: registry.model_name)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port; 0 = any free one")
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"])
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (0 = one per core)")
    parser.add_argument("--max-batch", type=int, help="images per request and per onnxruntime run")
    parser.add_argument("--batching", action=argparse.BooleanOptionalAction,
                        help="join concurrent requests into one onnxruntime run")
    parser.add_argument("--batch-delay-ms", type=float, help="wait to fill a batch (0 = take what is queued)")
    parser.add_argument("--max-concurrency", type=int, help="inference requests queued or running before 503s")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body accepted")
    parser.add_argument("--body-memory-bytes", type=int, help="request bodies held in memory, all requests together")
    parser.add_argument("--body-timeout-s", type=float, help="a body must arrive whole within this (else 408)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    _cli.run(main, parser)
