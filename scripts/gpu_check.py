"""The GPU check, in one run: train with the default params, export, onnxruntime accuracy,
the benchmark sweep (onnxruntime CPU and CUDA with I/O binding and CUDA graphs, PyTorch
CUDA), and, with two GPUs or more, DDP scaling efficiency (images/s with N GPUs over N x
images/s with 1, torchrun + NCCL), written as JSON and a log to OUT. Calls pipeline/
directly: the GPU machine has no dvc or mlflow.

    python scripts/gpu_check.py --mirror DIR --out DIR [--tiny]

--tiny is the rehearsal for a CPU: a subset, one epoch, small batches, and the scaling
measurement with 1 and 2 processes on the CPU (gloo) instead of GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import bench, contract, data, distributed, engines, evaluate, export, machine, params, runtime, train  # noqa: E402,E501
from pipeline.model import ModelConfig, Net  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    import onnxruntime
    if torch.cuda.is_available() and hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()  # the CUDA/cuDNN libraries of the pip packages, for the CUDA provider
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", help="folder (or URL) with the four MNIST .gz files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: small and fast")
    p.add_argument("--scaling-worker", type=Path, metavar="RAW", help=argparse.SUPPRESS)  # one torchrun rank
    args = p.parse_args()
    if args.scaling_worker:
        return scaling_worker(args.scaling_worker, args.out, args.tiny)
    if not args.mirror:
        p.error("--mirror is required")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "raw"
    data.download(raw, (args.mirror,), data.DownloadConfig())
    all_params = yaml.safe_load((ROOT / "params.yaml").read_text())
    model_cfg = params.parse(ModelConfig, all_params["model"], "model")
    cfg = params.parse(train.TrainConfig, all_params["train"], "train")
    bcfg = params.parse(bench.BenchConfig, all_params["benchmark"], "benchmark")
    if args.tiny:
        cfg = train.TrainConfig(**{**cfg.__dict__, "epochs": 1, "subset": 1024, "checkpoint_every": 0})
        bcfg = bench.BenchConfig(batch_sizes=(1, 16), warmup=1, min_runs=3, min_seconds=0.0)
    result: dict = {"hardware": machine.hardware(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "train_config": cfg.__dict__, "tiny": args.tiny}
    log(json.dumps(result["hardware"]))

    # --- training: per-epoch wall time, and the time at which test accuracy first reaches 99.3%
    run = train.set_up(model_cfg, cfg, raw)  # exactly as the train stage sets a process up
    device, model, x, y, xt, yt = run.device, run.model, run.x, run.y, run.xt, run.yt
    t0 = time.perf_counter()
    reached = {}

    def on_epoch(row: dict) -> None:
        row["wall_s"] = time.perf_counter() - t0  # training plus per-epoch evaluation
        if row["test_acc"] >= 0.993 and "wall_s_to_99.3" not in reached:
            reached["wall_s_to_99.3"] = row["wall_s"]
        log(f"epoch {row['epoch']}: {row['seconds']:.3f} s train, {row['images_per_s']:.0f} img/s, "
            f"test_acc {row['test_acc']:.4f}, wall {row['wall_s']:.2f} s")

    training = train.Training.start(model, cfg, x, y)
    for _ in training.remaining_epochs():
        row = training.run_epoch()
        row.update(train.evaluate(model, xt, yt))
        on_epoch(row)
        training.end_epoch(row)
    history = training.history
    result["train"] = {"history": history, **reached, **train.peak_memory(device),
                       "best_epoch_seconds_after_first": min((r["seconds"] for r in history[1:]), default=None)}

    # --- export, parity, onnxruntime accuracy on the GPU when it runs there
    onnx_path = args.out / "model.onnx"
    cpu_model = Net(model_cfg)
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    export.export_onnx(cpu_model, onnx_path, export.ExportConfig())
    proto = runtime.load_checked(onnx_path)
    images, labels = data.load_split(raw, "test")
    result["parity"] = export.parity(cpu_model, runtime.open_session(proto, "cpu"),
                                     contract.to_input(images[:1000]), 1e-3)
    for provider in ("cpu", "cuda"):
        s = runtime.open_session(proto, provider)
        acc = evaluate.accuracy_report(labels, evaluate.predict_logits(s, images, 1000))["accuracy"]
        result[f"ort_accuracy_{s.label}"] = acc
        log(f"onnxruntime asked {provider}, ran {s.providers}: accuracy {acc:.4f} {s.note}")

    # --- the benchmark sweep
    x_in = contract.to_input(images[:max(bcfg.batch_sizes)])
    models = {"fp32": proto}
    cases, status = engines.choose_cases(models, bcfg)
    rows, rounds = engines.measure(cases, models, cpu_model, x_in, bcfg, lambda batch: log(f"  batch {batch} done"))
    result.update(status)
    result["benchmark"] = [r.record() for r in rows]
    result["ratios"] = bench.ratios(rows, rounds, bcfg).record()
    log(bench.table(rows))
    log(json.dumps({**status, **result["ratios"]}, indent=1))
    # --- DDP scaling: the same training on 1 and on N GPUs (CPU processes in the rehearsal)
    gpus = torch.cuda.device_count()
    if gpus >= 2 or args.tiny:
        result["ddp_scaling"] = scaling(raw, (1, gpus) if gpus >= 2 else (1, 2), args.tiny)
        log(json.dumps(result["ddp_scaling"]))
    else:
        result["ddp_scaling"] = f"not measured: needs 2 GPUs or more, this machine has {gpus}"
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    onnx_path.unlink()  # 13 MB that need not come back
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()


def _configs(tiny: bool) -> tuple[ModelConfig, train.TrainConfig]:
    all_params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = params.parse(train.TrainConfig, all_params["train"], "train")
    scaled = {"epochs": 2, "subset": 2048 if tiny else 0, "checkpoint_every": 0,
              "device": "cpu" if tiny else cfg.device}
    return params.parse(ModelConfig, all_params["model"], "model"), train.TrainConfig(**{**cfg.__dict__, **scaled})


def scaling(raw: Path, counts: tuple[int, int], tiny: bool) -> dict:
    """images/s of the second epoch (the first pays for warm-up) with each process count, and the
    efficiency: speed with N / (N x speed with 1). The global batch stays the params' batch size,
    split among the processes, as in the train stage."""
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = Path(tmp) / str(n)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                       "--nproc-per-node", str(n), "--max-restarts", "0", __file__,
                       "--scaling-worker", str(raw), "--out", str(out), *(["--tiny"] if tiny else [])]
            log(f"scaling: {n} process(es) ...")
            subprocess.run(command, check=True, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
            speeds[n] = json.loads((out / "speed.json").read_text())
    one, many = (speeds[n]["images_per_s"] for n in counts)
    return {"processes": list(counts), "runs": speeds, "global_batch": _configs(tiny)[1].batch_size,
            "efficiency": many / (counts[1] * one)}


def scaling_worker(raw: Path, out: Path, tiny: bool) -> None:
    """One rank under torchrun: two epochs of the params' training; rank 0 writes the speed."""
    model_cfg, cfg = _configs(tiny)
    run = train.set_up(model_cfg, cfg, raw)
    device, world = run.device, run.world
    training = train.Training.start(run.model, cfg, run.x, run.y, world=world)
    for _ in training.remaining_epochs():
        training.end_epoch(training.run_epoch())
    distributed.finish(world)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps({
            "images_per_s": training.history[-1]["images_per_s"], "world_size": world.size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}))


if __name__ == "__main__":
    main()
