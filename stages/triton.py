"""Stage triton: a Triton Inference Server model repository holding the exported model.

Serve it with: tritonserver --model-repository=models/triton   (see README, "Serving with Triton")
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import contract, runtime, triton
from stages import _cli


def main(args: argparse.Namespace) -> None:
    params = _cli.load_params()
    cfg = _cli.section(triton.TritonConfig, "triton", params)
    name = _cli.section(contract.RegistryConfig, "registry", params).model_name
    model = runtime.load_checked(args.model)
    config = triton.write_repository(args.model, args.out, name, cfg, model)
    print(f"triton: wrote {config} and {config.parent / '1' / 'model.onnx'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.triton", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--out", type=Path, required=True, help="out: the model repository folder")
    _cli.run(main, parser)
