"""Predict the digit in each image file, with onnxruntime (no PyTorch).

    python -m commands.predict photo.jpg drawing.png            # one line per image
    python -m commands.predict --json *.png                     # JSON lines, with probabilities
    python -m commands.predict --info                           # what the model file is and where it came from

Any size, any background: images are cropped, scaled and centred the way MNIST was made
(pipeline/digits.py). Exit status 1 if any image could not be read; the others still run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline import contract, digits, evaluate, runtime
from serving.config import ServeConfig
from stages import _cli


def main(args: argparse.Namespace) -> None:
    model = runtime.load_checked(args.model)
    if args.info:
        return info(args.model, runtime.metadata(model), args.json)
    if not args.images:
        sys.exit("predict: give image files (or --info)")
    session = runtime.open_session(model, "cpu")
    # the service's own limits: its body size (params.yaml when run from the repository), and
    # digits' pixel limit, checked from the image header before decoding
    limit = _cli.section(ServeConfig, "serve").max_body_bytes if _cli.PARAMS_FILE.is_file() \
        else ServeConfig.max_body_bytes
    failed = 0
    for path in args.images:
        try:
            x = digits.image_to_input(digits.read_file(path, limit))
        except (OSError, digits.ImageError) as e:
            print(f"{path}: error: {_cli.describe(e)}", file=sys.stderr)
            failed += 1
            continue
        p = evaluate.softmax(session.run(x))[0]
        digit = int(np.argmax(p))
        if args.json:
            print(json.dumps({"file": str(path), "digit": digit, "probabilities": [round(float(v), 6) for v in p]}))
        else:
            print(f"{path}: {digit} ({100 * p[digit]:.1f}%)")
    if failed:
        sys.exit(1)


def info(path: Path, metadata: dict[str, str], as_json: bool) -> None:
    """What the file says it is, its SHA-256, and its registry version when the store can be read."""
    from tracking.registry import identity
    name = _cli.section(contract.RegistryConfig, "registry").model_name if _cli.PARAMS_FILE.is_file() \
        else contract.RegistryConfig.model_name
    sha256 = runtime.sha256(path)
    about = {"file": str(path), "sha256": sha256, **metadata, **identity(name, sha256)}
    if as_json:
        print(json.dumps(about, indent=2))
    else:
        width = max(map(len, about))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in about.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="commands.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, nargs="*", help="PNG, JPEG, ... files of single digits")
    parser.add_argument("--model", type=Path, default=contract.DEFAULT_MODEL)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--info", action="store_true",
                        help="what the model file is: provenance, input contract, SHA-256, registry version")
    _cli.run(main, parser)
