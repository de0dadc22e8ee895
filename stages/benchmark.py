"""Stage benchmark: onnxruntime (per provider, FP32 and INT8) vs PyTorch eager, over batch sizes."""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import atomic, bench, data, evaluate, figures, runtime
from pipeline.model import ModelConfig, Net
from stages import _cli
from stages._tracking import Tracker

COLUMNS = ["path", "provider", "precision", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
           "images_per_s", "runs", "rss_growth_mb", "gpu_mem_mb", "providers_used", "note"]


def main(args: argparse.Namespace) -> None:
    all_params = _cli.load_params()
    cfg = _cli.section(bench.BenchConfig, "benchmark", all_params)
    model_cfg = _cli.section(ModelConfig, "model", all_params)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    fp32 = runtime.load_checked(args.model)
    net = Net(model_cfg)
    net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    test_x, test_y = data.load_split(args.data, "test")
    x = evaluate.images_to_input(test_x[:max(cfg.batch_sizes)])

    models = {"fp32": fp32}
    summary: dict = {"hardware": bench.hardware()}
    if cfg.int8:
        train_x, _ = data.load_split(args.data, "train")
        bench.quantize_int8(args.model, args.int8, evaluate.images_to_input(train_x[:cfg.calibration_images]))
        models["int8"] = runtime.load_checked(args.int8)
        for name, proto in models.items():
            session = runtime.open_session(proto, "cpu", cfg.threads)
            summary[f"{name}_accuracy"] = evaluate.summarize(test_y, evaluate.predict_logits(session, test_x, 1000))["accuracy"]

    cases = [("ort", "cpu", p) for p in models] + [("torch", "cpu", "fp32")]
    for gpu in [p for p in cfg.providers if p != "cpu"]:
        probe = runtime.open_session(fp32, gpu)
        summary[f"{gpu}_status"] = "ran" if probe.label == gpu else f"unavailable: {probe.note}"
        if probe.label == gpu:
            cases.append(("ort", gpu, "fp32"))
        else:
            print(f"benchmark: {gpu} was asked for but is not usable here ({probe.note}); "
                  "measuring CPU only for it", flush=True)
    if torch.cuda.is_available():
        cases.append(("torch", "cuda", "fp32"))

    rows = []
    with tqdm(total=len(cases) * len(cfg.batch_sizes), desc="benchmark", unit="case") as bar:
        for kind, provider, precision in cases:
            for batch in cfg.batch_sizes:
                bar.set_postfix_str(f"{kind} {provider} {precision} batch {batch}")
                if kind == "ort":
                    rows.append(bench.ort_case(models[precision], provider, batch, x, cfg, precision))
                else:
                    rows.append(bench.torch_case(net, torch.device(provider), batch, x, cfg))
                bar.update()
    summary.update(_ratios(rows, cfg))

    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    atomic.write_text(args.plots, out.getvalue())
    atomic.write_json(args.metrics, {**summary, "rows": rows})
    hw = summary["hardware"]
    figures.benchmark_chart(rows, args.chart, f"{hw['cpu']} ({hw['cores']} cores)"
                            + (f", {hw['gpu']}" if "gpu" in hw else "") + f"; onnxruntime {hw['onnxruntime']}, torch {hw['torch']}")

    tracker = Tracker.resume(args.run_id)
    tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.log_metrics({f"bench_{r['path']}_{r['precision']}_b{r['batch']}_{k}": r[k]
                         for r in rows for k in ("p50_ms", "images_per_s")})
    for path in (args.chart, args.plots):
        tracker.log_artifact(path, "benchmark")
    print(table(rows))
    for k, v in summary.items():
        if k != "hardware":
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")


def _ratios(rows: list[dict], cfg: bench.BenchConfig) -> dict[str, float]:
    """The side-by-side ratios, measured in this one run."""
    def get(path, precision, batch, key):
        for r in rows:
            if r["path"] == path and r["precision"] == precision and r["batch"] == batch:
                return r[key]
        return None
    out = {}
    small, big = min(cfg.batch_sizes), (256 if 256 in cfg.batch_sizes else max(cfg.batch_sizes))
    pairs = {
        f"ort_vs_torch_cpu_p50_ratio_b{small}": (get("onnxruntime-cpu", "fp32", small, "p50_ms"),
                                                 get("pytorch-cpu", "fp32", small, "p50_ms")),
        f"ort_vs_torch_cpu_throughput_ratio_b{big}": (get("onnxruntime-cpu", "fp32", big, "images_per_s"),
                                                      get("pytorch-cpu", "fp32", big, "images_per_s")),
        f"int8_vs_fp32_cpu_throughput_ratio_b{big}": (get("onnxruntime-cpu", "int8", big, "images_per_s"),
                                                      get("onnxruntime-cpu", "fp32", big, "images_per_s")),
        f"ort_vs_torch_cuda_throughput_ratio_b{max(cfg.batch_sizes)}": (
            get("onnxruntime-cuda", "fp32", max(cfg.batch_sizes), "images_per_s"),
            get("pytorch-cuda", "fp32", max(cfg.batch_sizes), "images_per_s")),
    }
    for name, (a, b) in pairs.items():
        if a is not None and b:
            out[name] = a / b
    best = max((r["images_per_s"] for r in rows if r["path"] == "onnxruntime-cpu" and r["precision"] == "fp32"),
               default=0.0)
    out["ort_cpu_fp32_best_images_per_s"] = best
    return out


def table(rows: list[dict]) -> str:
    head = f"{'path':<18} {'prec':<5} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'images/s':>10} {'RSS+ MB':>8}  ran on"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['path']:<18} {r['precision']:<5} {r['batch']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['images_per_s']:>10.0f} {r['rss_growth_mb']:>8.1f}  {r['providers_used']}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.benchmark", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--weights", type=Path, required=True, help="the trained state_dict, for PyTorch")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--int8", type=Path, required=True, help="out: the INT8 model")
    parser.add_argument("--metrics", type=Path, required=True, help="out: results (JSON)")
    parser.add_argument("--plots", type=Path, required=True, help="out: results (CSV, DVC plot)")
    parser.add_argument("--chart", type=Path, required=True, help="out: latency/throughput chart (PNG)")
    _cli.run(main, parser)
