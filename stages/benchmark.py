"""Stage benchmark: onnxruntime (per provider, FP32 and INT8) vs PyTorch eager, over batch sizes."""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import atomic, bench, contract, data, figures, runtime
from pipeline.model import ModelConfig, Net
from stages import _cli
from tracking.run import Tracker

COLUMNS = ["path", "provider", "precision", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
           "images_per_s", "runs", "rss_growth_mb", "gpu_mem_mb", "providers_used", "note"]


def main(args: argparse.Namespace) -> None:
    all_params = _cli.load_params()
    cfg = _cli.section(bench.BenchConfig, "benchmark", all_params)
    model_cfg = _cli.section(ModelConfig, "model", all_params)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    fp32 = runtime.load_checked(args.model)
    net = Net.from_weights(model_cfg, args.weights)
    test_x, _ = data.load_split(args.data, "test")
    x = contract.to_input(test_x[:max(cfg.batch_sizes)])

    models = {"fp32": fp32, "int8": runtime.load_checked(args.int8)}  # the quantize stage made INT8
    summary: dict = {"hardware": bench.hardware()}

    cases, status = bench.choose_cases(models, cfg)
    with tqdm(total=len(cases) * len(cfg.batch_sizes), desc="benchmark", unit="case") as bar:
        def on_case(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update()
        rows = bench.sweep(cases, models, net, x, cfg, on_case)
    for name, state in status.items():
        if state != "ran":
            print(f"benchmark: {name.removesuffix('_status')} was asked for but is not usable here: "
                  f"{state.removeprefix('unavailable: ')}; measured on CPU only", flush=True)
    summary.update(status)
    summary.update(bench.ratios(rows, cfg))

    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    atomic.write_text(args.plots, out.getvalue())
    atomic.write_json(args.metrics, {**summary, "rows": rows})
    hw = summary["hardware"]
    gpu = f", {hw['gpu']}" if "gpu" in hw else ""
    figures.benchmark_chart(rows, args.chart, f"{hw['cpu']} ({hw['cores']} cores){gpu}; "
                                              f"onnxruntime {hw['onnxruntime']}, torch {hw['torch']}")

    tracker = Tracker.resume(args.run_id)
    tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.log_metrics({f"bench_{r['path']}_{r['precision']}_b{r['batch']}_{k}": r[k]
                         for r in rows for k in ("p50_ms", "images_per_s")})
    for path in (args.chart, args.plots):
        tracker.log_artifact(path, "benchmark")
    # The last stage records dvc.lock as DVC has written it so far: the hashes of the data,
    # params, code and models every earlier stage of this run used (DVC adds this stage's own
    # entry after it ends).
    tracker.log_artifact(args.lock, "dvc")
    print(bench.table(rows))
    for k, v in summary.items():
        if k != "hardware":
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.benchmark", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--weights", type=Path, required=True, help="the trained state_dict, for PyTorch")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--int8", type=Path, required=True, help="the INT8 model (quantize stage)")
    parser.add_argument("--metrics", type=Path, required=True, help="out: results (JSON)")
    parser.add_argument("--plots", type=Path, required=True, help="out: results (CSV, DVC plot)")
    parser.add_argument("--lock", type=Path, required=True, help="dvc.lock, logged to the MLflow run")
    parser.add_argument("--chart", type=Path, required=True, help="out: latency/throughput chart (PNG)")
    _cli.run(main, parser)
