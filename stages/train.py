"""Stage train: fit the tutorial CNN, write weights, per-epoch metrics and plots, open the MLflow run.

Killed at any point, the next run of this stage (dvc repro) resumes from the last checkpoint
and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import atomic, checkpoint, distributed, headline, params, train
from pipeline.model import ModelConfig, count_params
from stages import _cli
from tracking import datasets
from tracking.provenance import dvc_md5, git_tags, package_version, run_name
from tracking.run import Tracker, training_run


def main(args: argparse.Namespace) -> None:
    all_params = _cli.load_params()
    model_cfg = _cli.section(ModelConfig, "model", all_params)  # validated before any work
    cfg = _cli.section(train.TrainConfig, "train", all_params)
    device = train.resolve_device(cfg.device)
    stage_args = sys.argv[1:sys.argv.index("--torchrun")] if args.torchrun is not None else sys.argv[1:]
    if distributed.launch(distributed.wanted(cfg.processes, device), args.torchrun, "stages.train", stage_args,
                          lambda line: print(line, flush=True)):
        return  # this process was torchrun's agent: its workers ran this stage
    run = train.set_up(model_cfg, cfg, args.data)
    device, world, model, x, y, xt, yt = run.device, run.world, run.model, run.x, run.y, run.xt, run.yt
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fingerprint = checkpoint.fingerprint(model_cfg, cfg, device.type, torch.get_num_threads(), len(x), world.size)
    training = train.Training.start(model, cfg, x, y, args.checkpoint, fingerprint, world)
    if training.resumed and world.main:
        print(f"resuming from {args.checkpoint}: epoch {training.epoch + 1}, step {training.step}")
    run_note = args.checkpoint.with_name(args.checkpoint.name + ".run")
    outputs = (args.model, args.metrics, args.plots, args.run_id)  # DVC deletes them before we run
    training_params = {k: all_params.get(k) for k in ("model", "train")}
    tracker = Tracker(None) if not world.main else training_run(
        training.meta.get("run_id"), run_note, fingerprint, run_name(training_params, os.environ.get("DVC_EXP_NAME")),
        {**params.flatten(training_params), "train.world_size": world.size},
        lambda: {**git_tags(exclude=outputs), "device": device_name, "torch": torch.__version__,
                 "onnxruntime": package_version("onnxruntime-gpu"), "stage": "train"})
    if world.main:
        md5 = dvc_md5(args.data)  # the digest of both splits: the bytes dvc.lock names
        tracker.log_inputs([(datasets.mnist(split, md5), context) for split, context in datasets.CONTEXTS.items()])
    opening_s = tracker.seconds  # importing MLflow, creating the run, its params, the datasets
    training.meta["run_id"] = tracker.key
    if world.main:
        on = f"{device_name} x {world.size} processes" if world.size > 1 else device_name
        print(f"training {count_params(model):,} parameters on {on}, {len(x):,} images, {cfg.epochs} epochs, "
              f"MLflow run {tracker.key}")

    t0 = time.perf_counter()
    with tracker.system_metrics():
        for epoch in training.remaining_epochs():
            with tqdm(total=len(x), unit="img", desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not world.main) as bar:
                row = training.run_epoch(on_step=lambda done, loss: _progress(bar, done, loss=f"{loss:.4f}"))
                row.update(train.evaluate(model, xt, yt) if world.main else {})  # only rank 0 reports
                _progress(bar, len(x), loss=f"{row['loss']:.4f}", test_acc=f"{row.get('test_acc', 0):.4f}")
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            training.end_epoch(row)
    distributed.finish(world)
    if not world.main:
        return  # rank 0 writes every output
    history = training.history
    speeds = [r["images_per_s"] for r in history[1:] if r["images_per_s"]] or [history[0]["images_per_s"]]
    summary = {
        "test_acc": history[-1]["test_acc"],
        "test_loss": history[-1]["test_loss"],
        # the mean over epochs after the first, which pays for warm-up (allocations, kernel choice)
        "images_per_s": sum(speeds) / len(speeds),
        "train_seconds": time.perf_counter() - t0,
        "params": count_params(model),
        "train_images": len(x),
        "device": device_name,
        **train.peak_memory(device),
    }
    torch.save(model.cpu().state_dict(), buf := io.BytesIO())
    atomic.write_bytes(args.model, buf.getvalue())
    atomic.write_json(args.metrics, summary)
    atomic.write_text(args.plots, train.history_csv(history))
    atomic.write_text(args.run_id, f"{tracker.key}\n")
    args.checkpoint.unlink(missing_ok=True)  # every out is whole: the checkpoint is no longer needed
    run_note.unlink(missing_ok=True)
    tracker.log_metrics({f"train_{k}": v for k, v in headline.train_row(summary).items()})
    tracker.log_artifact(args.metrics, "train")
    tracker.finish()
    print(f"test accuracy {summary['test_acc']:.4f}, {summary['images_per_s']:.0f} images/s, "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB; logging to MLflow took {tracker.seconds:.2f} s "
          f"({opening_s:.2f} s opening the run)")


def _progress(bar: tqdm, done: int, **shown: str) -> None:
    bar.update(done - bar.n)
    bar.set_postfix(**shown, img_s=f"{bar.format_dict['rate'] or 0:.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.train", description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="folder of the four IDX files")
    parser.add_argument("--model", type=Path, required=True, help="out: the trained state_dict (.pt)")
    parser.add_argument("--metrics", type=Path, required=True, help="out: final metrics (JSON)")
    parser.add_argument("--plots", type=Path, required=True, help="out: per-epoch metrics (CSV)")
    parser.add_argument("--run-id", type=Path, required=True, help="out: the MLflow run id")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="where to keep the resumable checkpoint while training (removed at the end)")
    parser.add_argument("--torchrun", nargs=argparse.REMAINDER, metavar="OPTION", help="last: run as this machine's "
                        "torchrun agent of several, with these torchrun options (--nnodes, --rdzv-endpoint, ...)")
    _cli.run(main, parser)
