"""Training speed, side by side in one run: our loop vs the reference PyTorch MNIST loop.

The reference is pytorch/examples' mnist/main.py: a DataLoader over a torchvision-style
dataset that turns each sample into a PIL image, then ToTensor and Normalize, one sample
at a time; batch 64; NCHW model; default (foreach) Adam. Ours: the dataset held as one
tensor, batches gathered by index, channels-last, fused Adam, pool-before-ReLU, conv2 in
the frequency domain (pipeline.spectral), freed memory kept by the allocator. Both
train the same network on the same images with the same thread count, each in a fresh
process set up as it runs: the reference as published, ours as the train stage sets its
process up (freed memory kept, pipeline.train.keep_freed_memory), and the reference once more
under that setting, to show how much of the gap the allocator alone makes. The loops
alternate, so machine noise hits all of them. Prints images/s for each and the ratios.

    python -m benchmarks.train_loop [--images 6400] [--repeats 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import data, train
from pipeline.model import Net


class ReferenceMNIST(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST + ToTensor + Normalize do per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L")  # torchvision returns a PIL image
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).float().div(255).unsqueeze(0)  # ToTensor
        x = (x - 0.1307) / 0.3081  # Normalize((0.1307,), (0.3081,))
        return x, int(self.labels[i])


def reference_epoch(images, labels) -> float:
    model = Net(relu_before_pool=True, spectral_convs=False)  # the tutorial's network as the reference runs it
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(ReferenceMNIST(images, labels), batch_size=64, shuffle=True)
    model.train()
    t0 = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return len(images) / (time.perf_counter() - t0)


def our_epoch(images, labels) -> float:
    cfg = train.TrainConfig(epochs=1)
    dev = torch.device("cpu")
    x, y = train.to_tensors(images, labels, dev)
    model = train.prepare(Net(), dev)
    opt, sched = train.make_optimizer(model, cfg, train.steps_per_epoch(len(x), cfg.batch_size))
    return train.train_epoch(model, opt, sched, x, y, cfg, 0)["images_per_s"]


LOOPS = {  # name -> (epoch function, whether the process keeps freed memory as the train stage does)
    "reference": (reference_epoch, False),  # pytorch/examples as published
    "ours": (our_epoch, True),  # the train stage's loop and process set-up
    "reference, memory kept": (reference_epoch, True),  # how much of the gap is the allocator
}


def one_run(loop: str, raw: Path, images: int) -> float:
    """images/s of one loop in this process, set up as that loop runs (see LOOPS)."""
    fn, keep = LOOPS[loop]
    train.seed_everything(0, 0)
    if keep:
        train.keep_freed_memory()
    x, y = data.load_split(raw, "train")
    return fn(x[:images], y[:images])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, default=Path("data/raw"), help="folder of the IDX files")
    p.add_argument("--images", type=int, default=6400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--one", choices=LOOPS, help=argparse.SUPPRESS)  # internal: one loop, one process
    args = p.parse_args()
    if args.one:
        print(one_run(args.one, args.raw, args.images))
        return
    rates: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    for r in range(args.repeats):
        for loop in LOOPS:  # a fresh process each: the allocator setting is per process
            out = subprocess.run([sys.executable, "-m", "benchmarks.train_loop", "--one", loop, "--raw", str(args.raw),
                                  "--images", str(args.images)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"benchmarks.train_loop: the {loop!r} run failed:\n{out.stderr.strip()}")
            rates[loop].append(float(out.stdout.split()[-1]))
        print(f"repeat {r + 1}: " + "   ".join(f"{loop} {v[-1]:5.0f} img/s" for loop, v in rates.items()))
    med = {loop: float(np.median(v)) for loop, v in rates.items()}
    print(f"median over {args.repeats} repeats of {args.images} images, {torch.get_num_threads()} threads: "
          f"ours {med['ours']:.0f} img/s, reference {med['reference']:.0f} img/s, "
          f"ratio {med['ours'] / med['reference']:.2f}x "
          f"({med['ours'] / med['reference, memory kept']:.2f}x the reference with memory kept, "
          f"{med['reference, memory kept']:.0f} img/s)")


if __name__ == "__main__":
    main()
