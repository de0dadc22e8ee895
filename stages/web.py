"""Stage web: a static site that runs the model in the browser with onnxruntime-web.

Serve the folder with any static web host, e.g. python -m http.server -d models/web (docs/web.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import contract, runtime, web
from stages import _cli


def main(args: argparse.Namespace) -> None:
    params = _cli.load_params()
    cfg = _cli.section(web.WebConfig, "web", params)
    name = _cli.section(contract.RegistryConfig, "registry", params).model_name
    model = args.int8 if cfg.model == "int8" else args.fp32
    runtime.load_checked(model)  # self-contained and well-formed, as onnxruntime-web needs it too
    tarball, origin = web.fetch_runtime(cfg, web.sources(cfg), log=print)
    files = web.write_site(args.out, args.page, model, tarball, web.manifest(cfg, name, model, runtime.sha256(model)))
    print(f"web: {cfg.tarball} from {origin}, integrity verified; wrote {args.out}/ ({len(files)} files, "
          f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB), the page running {model} ({cfg.model.upper()})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.web", description=__doc__)
    parser.add_argument("--fp32", type=Path, required=True, help="model.onnx")
    parser.add_argument("--int8", type=Path, required=True, help="model.int8.onnx (the page runs it if web.model=int8)")
    parser.add_argument("--page", type=Path, required=True, help="folder of the page's files (serving/static)")
    parser.add_argument("--out", type=Path, required=True, help="out: the site folder")
    _cli.run(main, parser)
