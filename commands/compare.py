"""Compare the last N training runs in the terminal: the params that differ, accuracy, speed.

    python -m commands.compare [--last 5]
"""
from __future__ import annotations

import argparse

from stages import _cli
from tracking.store import EXPERIMENT, tracking_uri

METRICS = [("eval_accuracy", "test acc", "{:.4f}"), ("mean_images_per_s", "train img/s", "{:.0f}"),
           ("train_seconds", "train s", "{:.0f}"),
           ("bench_onnxruntime-cpu_fp32_b1_p50_ms", "ort b1 p50 ms", "{:.3f}"),
           ("ort_cpu_fp32_best_images_per_s", "ort best img/s", "{:.0f}")]


def table(runs: list) -> str:
    """Rows of runs (newest first); columns: id, when, each param that differs, metrics."""
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    head = ["run", "started", "exp", *differing, *[m[1] for m in METRICS]]
    rows = []
    for r in runs:
        import datetime
        started = datetime.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%m-%d %H:%M")
        rows.append([r.info.run_id[:8], started, r.data.tags.get("dvc_exp_name", "-"),
                     *[r.data.params.get(k, "-") for k in differing],
                     *[fmt.format(r.data.metrics[m]) if m in r.data.metrics else "-" for m, _, fmt in METRICS]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    if not differing:
        out.append("(all params are the same in these runs)")
    return "\n".join(out)


def main(args: argparse.Namespace) -> None:
    import mlflow
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise SystemExit(f"compare: no runs yet in {tracking_uri()}; run `dvc repro` first")
    runs = mlflow.MlflowClient().search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                             max_results=args.last)
    print(table(runs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="commands.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--last", type=int, default=5, help="how many runs, newest first (default 5)")
    _cli.run(main, parser)
