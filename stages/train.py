"""Stage train: fit the tutorial CNN, write weights, per-epoch metrics and plots, open the MLflow run.

Killed at any point, the next run of this stage (dvc repro) resumes from the last checkpoint
and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import atomic, checkpoint, data, params, train
from pipeline.model import ModelConfig, Net, count_params
from stages import _cli
from tracking.provenance import git_tags, package_version
from tracking.run import Tracker, note_opened_run, opened_run


def main(args: argparse.Namespace) -> None:
    all_params = _cli.load_params()
    model_cfg = _cli.section(ModelConfig, "model", all_params)  # validated before any work
    cfg = _cli.section(train.TrainConfig, "train", all_params)
    device = train.resolve_device(cfg.device)
    train.seed_everything(cfg.seed, cfg.threads)
    train.keep_freed_memory()
    train.configure_device(device, cfg)

    x_np, y_np = data.load_split(args.data, "train")
    if cfg.subset:
        x_np, y_np = x_np[:cfg.subset], y_np[:cfg.subset]
    x, y = train.to_tensors(x_np, y_np, device)
    xt, yt = train.to_tensors(*data.load_split(args.data, "test"), device)

    model = train.prepare(Net(model_cfg), device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fingerprint = checkpoint.fingerprint(model_cfg, cfg, device.type, torch.get_num_threads(), len(x))
    training = train.Training.start(model, cfg, x, y, args.checkpoint, fingerprint)
    # The run a killed training opened: from its checkpoint, or, killed before the first
    # checkpoint, from the note written when the run was opened. Either way, one run.
    run_note = args.checkpoint.with_name(args.checkpoint.name + ".run")
    key = training.meta.get("run_id") or opened_run(run_note, fingerprint)
    if training.resumed:
        print(f"resuming from {args.checkpoint}: epoch {training.epoch + 1}, step {training.step}")
    if key:
        tracker = Tracker(key)  # an MLflow run id, or a pending one
        print(f"continuing MLflow run {key}, opened by a training that was killed")
    else:
        outputs = (args.model, args.metrics, args.plots, args.run_id)  # DVC deletes them before we run
        tracker = Tracker.start(
            os.environ.get("DVC_EXP_NAME"), params.flatten({k: all_params.get(k) for k in ("model", "train")}),
            {**git_tags(exclude=outputs), "device": device_name, "torch": torch.__version__,
             "onnxruntime": package_version("onnxruntime-gpu"), "stage": "train"},
        )
        note_opened_run(run_note, fingerprint, tracker.key)
    opening_s = tracker.seconds  # importing MLflow, creating the run, its params
    training.meta["run_id"] = tracker.key
    print(f"training {count_params(model):,} parameters on {device_name}, {len(x):,} images, "
          f"{cfg.epochs} epochs, MLflow run {tracker.key}")

    t0 = time.perf_counter()
    with tracker.system_metrics():
        for epoch in training.remaining_epochs():
            with tqdm(total=len(x), unit="img", desc=f"epoch {epoch + 1}/{cfg.epochs}") as bar:
                row = training.run_epoch(on_step=lambda done, loss: _progress(bar, done, loss=f"{loss:.4f}"))
                row.update(train.evaluate(model, xt, yt))
                _progress(bar, len(x), loss=f"{row['loss']:.4f}", test_acc=f"{row['test_acc']:.4f}")
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            training.end_epoch(row)
    history = training.history
    speeds = [r["images_per_s"] for r in history[1:] if r["images_per_s"]] or [history[0]["images_per_s"]]
    summary = {
        "test_acc": history[-1]["test_acc"],
        "test_loss": history[-1]["test_loss"],
        # the mean over epochs after the first, which pays for warm-up (allocations, kernel choice)
        "images_per_s": sum(speeds) / len(speeds),
        "train_seconds": time.perf_counter() - t0,
        "params": count_params(model),
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
    tracker.log_metrics(_summary_metrics(summary))
    print(f"test accuracy {summary['test_acc']:.4f}, {summary['images_per_s']:.0f} images/s, "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB; logging to MLflow took {tracker.seconds:.2f} s "
          f"({opening_s:.2f} s opening the run)")


def _progress(bar: tqdm, done: int, **shown: str) -> None:
    bar.update(done - bar.n)
    bar.set_postfix(**shown, img_s=f"{bar.format_dict['rate'] or 0:.0f}")


def _summary_metrics(summary: dict) -> dict:
    """The run's summary for MLflow. Its speed gets a key of its own (under ``images_per_s``, steps
    1..N, the dashboard showed the last epoch's rate); test accuracy and loss are the last epoch's."""
    out = {k: v for k, v in summary.items() if k not in ("test_acc", "test_loss", "images_per_s")}
    return {**out, "mean_images_per_s": summary["images_per_s"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.train", description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="folder of the four IDX files")
    parser.add_argument("--model", type=Path, required=True, help="out: the trained state_dict (.pt)")
    parser.add_argument("--metrics", type=Path, required=True, help="out: final metrics (JSON)")
    parser.add_argument("--plots", type=Path, required=True, help="out: per-epoch metrics (CSV)")
    parser.add_argument("--run-id", type=Path, required=True, help="out: the MLflow run id")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="where to keep the resumable checkpoint while training (removed at the end)")
    _cli.run(main, parser)
