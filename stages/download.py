"""Stage download: the four MNIST files, each verified, into the folder given by dvc.yaml."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from pipeline import data
from stages import _cli


def main(args: argparse.Namespace) -> None:
    cfg = _cli.section(data.DownloadConfig, "download")
    mirrors = data.mirrors_with_override(cfg.mirrors)
    with tqdm(unit="B", unit_scale=True, desc="MNIST", leave=False) as bar:
        sources = data.download(args.out, mirrors, cfg, lambda name, n: bar.update(n), tqdm.write)
    for name, source in sources.items():
        print(f"{name}: verified sha256, from {source}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.download", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the four IDX files")
    _cli.run(main, parser)
