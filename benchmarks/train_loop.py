"""Training speed, side by side in one run: our loop vs the reference PyTorch MNIST loop.

The reference is pytorch/examples' mnist/main.py: a DataLoader over a torchvision-style
dataset that turns each sample into a PIL image, then ToTensor and Normalize, one sample
at a time; batch 64; NCHW model; default (foreach) Adam. Ours: the dataset held as one
tensor, batches gathered by index, channels-last, fused Adam, pool-before-ReLU. Both
train the same network on the same images with the same thread count; the two loops
alternate, so machine noise hits both. Prints images/s for each and the ratio.

    python -m benchmarks.train_loop [--images 6400] [--repeats 2]
"""
from __future__ import annotations

import argparse
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
    model = Net(relu_before_pool=True)  # the tutorial's order, as the reference runs it
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, default=Path("data/raw"), help="folder of the IDX files")
    p.add_argument("--images", type=int, default=6400)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    train.seed_everything(0, 0)
    images, labels = data.load_split(args.raw, "train")
    images, labels = images[: args.images], labels[: args.images]
    ours, ref = [], []
    for r in range(args.repeats):
        ref.append(reference_epoch(images, labels))
        ours.append(our_epoch(images, labels))
        print(f"repeat {r + 1}: reference {ref[-1]:7.0f} img/s   ours {ours[-1]:7.0f} img/s")
    o, f = float(np.median(ours)), float(np.median(ref))
    print(f"median over {args.repeats} repeats of {args.images} images, {torch.get_num_threads()} threads: "
          f"ours {o:.0f} img/s, reference {f:.0f} img/s, ratio {o / f:.2f}x")


if __name__ == "__main__":
    main()
