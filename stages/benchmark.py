"""Stage benchmark: onnxruntime (per provider, FP32 and INT8) vs PyTorch eager, over batch sizes,
measured in interleaved rounds so that the ratios stay honest on a busy machine."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from pipeline import atomic, bench, contract, data, engines, figures, machine, runtime
from pipeline.model import ModelConfig, Net
from stages import _cli
from tracking.run import Tracker


def main(args: argparse.Namespace) -> None:
    all_params = _cli.load_params()
    cfg = _cli.section(bench.BenchConfig, "benchmark", all_params)
    model_cfg = _cli.section(ModelConfig, "model", all_params)
    fp32 = runtime.load_checked(args.model)
    net = Net.from_weights(model_cfg, args.weights)
    test_x, _ = data.load_split(args.data, "test")
    x = contract.to_input(test_x[:max(cfg.batch_sizes)])

    models = {"fp32": fp32, "int8": runtime.load_checked(args.int8)}  # the quantize stage made INT8
    hw, before = machine.hardware(), machine.state()
    cases, status = engines.choose_cases(models, cfg)
    with tqdm(total=engines.steps(cfg), desc="benchmark", unit="batch size") as bar:
        rows, rounds = engines.measure(cases, models, net, x, cfg, lambda batch: bar.update())
    after = machine.state()
    for r in rows:
        if not r.stable:
            print(f"benchmark: UNSTABLE {r.path} {r.precision} on {r.threads} thread(s), batch {r.batch}: "
                  f"{'; '.join(bench.unstable_because(r, cfg))}; do not compare it with a quiet run", flush=True)
    ratios = bench.ratios(rows, rounds, cfg)
    for ratio in ratios.ratios:
        if not ratio.stable:
            print(f"benchmark: UNSTABLE ratio {ratio.name}: a row it compares spread or waited for a CPU", flush=True)
    for name, state in status.items():
        if state != "ran":
            print(f"benchmark: {name.removesuffix('_status')} was asked for but is not usable here: "
                  f"{state.removeprefix('unavailable: ')}; measured on CPU only", flush=True)
    report = {"hardware": hw, "machine_before": before, "machine_after": after, "status": status, **ratios.record(),
              "rows": [r.record() for r in rows]}
    atomic.write_json(args.report, report)
    atomic.write_text(args.plots, bench.table_csv(rows))
    atomic.write_text(args.throughput, bench.throughput_csv(rows))
    gpu = f", {hw['gpu']}" if "gpu" in hw else ""
    waits = [r.contention for r in rows if r.contention is not None]
    load = (f"other processes' CPU share up to {max(r.outside_load for r in rows):.0%}"
            + (f", our threads waited for a CPU up to {max(waits):.0%}" if waits else ""))
    unstable = sum(not r.stable for r in rows)
    figures.benchmark_chart(rows, args.chart, f"{hw['cpu']} ({hw['cores']} cores){gpu}; onnxruntime "
                            f"{hw['onnxruntime']}, torch {hw['torch']}; {load}; {unstable} unstable of {len(rows)}",
                            ratios)

    tracker = Tracker.resume(args.run_id)  # the table is an artifact; its headline, the summary stage's metrics
    for path in (args.chart, args.plots, args.report):
        tracker.log_artifact(path, "benchmark")
    tracker.finish()
    print(bench.table(rows))
    for q in ratios.ratios:
        print(f"{q.name}: {q.value:.3f} (IQR {q.iqr_low:.3f}-{q.iqr_high:.3f}){'' if q.stable else ' UNSTABLE'}")
    print(f"best onnxruntime FP32 throughput: {ratios.best_images_per_s:,.0f} images/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.benchmark", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--weights", type=Path, required=True, help="the trained state_dict, for PyTorch")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--int8", type=Path, required=True, help="the INT8 model (quantize stage)")
    parser.add_argument("--report", type=Path, required=True, help="out: every row, the ratios, the machine (JSON)")
    parser.add_argument("--plots", type=Path, required=True, help="out: every row (CSV)")
    parser.add_argument("--throughput", type=Path, required=True, help="out: images/s by batch size and path "
                                                                       "(CSV, a DVC plot)")
    parser.add_argument("--chart", type=Path, required=True, help="out: latency/throughput chart (PNG)")
    _cli.run(main, parser)
