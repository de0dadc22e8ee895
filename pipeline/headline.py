"""The headline metrics: the few numbers that say whether a run is better, defined once.

DVC shows them as a grid, one metrics file per thing compared and a column per quantity, so
``dvc metrics show`` and ``dvc exp show`` stay readable; MLflow holds them as the run's metrics
(``<row>_<key>``); the comparison report and the summary after ``dvc repro`` read them through
this module. A metric renamed here is renamed for the writer and every reader at once, and a
test checks that the pipeline writes every one of them.

    row    file                what it describes
    fp32   metrics/fp32.json   model.onnx under onnxruntime: the model that is deployed
    int8   metrics/int8.json   model.int8.onnx under onnxruntime
    train  metrics/train.json  the PyTorch network the export came from, and its training

The stage reports they come from (reports/*.json) keep the detail: every benchmark row with
its interquartile ranges, every layer's shapes, the machine, the misclassified count (the
accuracy on 10,000 test images says the same: errors = (1 - accuracy) x 10,000). The grid has
eight columns so that ``dvc metrics show`` fits in 100 characters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline import bench

ROWS = ("fp32", "int8", "train")  # DVC's files, in the order dvc exp show lists them


@dataclass(frozen=True)
class Metric:
    row: str  # which of ROWS
    key: str  # its key in that row's metrics file
    meaning: str
    fmt: str = "{:.4f}"
    better: Literal["higher", "lower", ""] = "higher"  # "": neither (a count, a flag)

    @property
    def name(self) -> str:
        """Its name where the rows are flattened: MLflow's metric key, the report's row."""
        return f"{self.row}_{self.key}"

    def show(self, value: float | bool | None) -> str:
        return "-" if value is None else self.fmt.format(value)


HEADLINE = (
    Metric("fp32", "accuracy", "test accuracy, onnxruntime, all 10,000 test images", "{:.2%}"),
    Metric("fp32", "loss", "test loss (cross-entropy)", "{:.4f}", "lower"),
    Metric("fp32", "params", "parameters of the ONNX graph, each layer verified against the arithmetic", "{:,}", ""),
    Metric("fp32", "img_per_s", "best onnxruntime CPU throughput, every core", "{:,.0f}"),
    Metric("fp32", "latency", "p50 latency at batch 1 over PyTorch's, per core", "{:.3f}x", "lower"),
    Metric("fp32", "ratio", "throughput at batch 256 over PyTorch's, per core", "{:.3f}x"),
    Metric("fp32", "stable", "both ratios measured without spread or waiting for a CPU", "{}", ""),
    Metric("int8", "accuracy", "test accuracy of the INT8 model", "{:.2%}"),
    Metric("int8", "loss", "its test loss", "{:.4f}", "lower"),
    Metric("int8", "img_per_s", "best INT8 CPU throughput, every core", "{:,.0f}"),
    Metric("int8", "ratio", "INT8 throughput at batch 256 over FP32's, per core", "{:.3f}x"),
    Metric("int8", "stable", "that ratio measured without spread or waiting for a CPU", "{}", ""),
    Metric("train", "accuracy", "test accuracy of the PyTorch network after the last epoch", "{:.2%}"),
    Metric("train", "loss", "its test loss", "{:.4f}", "lower"),
    Metric("train", "img_per_s", "training images/s (the epochs after the first)", "{:,.0f}"),
    Metric("train", "seconds", "training wall time", "{:.1f}", "lower"),
)
BY_NAME = {m.name: m for m in HEADLINE}

Grid = dict[str, dict[str, float | int | bool]]  # row -> key -> value, as the metrics files hold them


def train_row(train: dict) -> dict[str, float | int]:
    """The train row, from reports/train.json (what the train stage logs before the rest exist)."""
    return {"accuracy": round(train["test_acc"], 4), "loss": round(train["test_loss"], 4),
            "img_per_s": round(train["images_per_s"]), "seconds": round(train["train_seconds"], 1)}


def grid(train: dict, evaluate: dict, quantize: dict, verify: dict, benchmark: dict) -> Grid:
    """The headline values from the stage reports (reports/<stage>.json, as the stages wrote
    them), rounded to what they can say: accuracies and losses to 4 decimals (10,000 images),
    speeds to whole images/s, ratios to 3 decimals."""
    ratios = bench.Ratios.from_record(benchmark)
    rows = [bench.Row.from_record(r) for r in benchmark["rows"]]
    every = max((r.threads for r in rows), default=0)

    def best(precision: str) -> int | None:
        speeds = [r.images_per_s for r in rows
                  if (r.path, r.precision, r.threads) == ("onnxruntime-cpu", precision, every)]
        return round(max(speeds)) if speeds else None

    def ratio(kind: str) -> float | None:
        r = ratios.of(kind)
        return None if r is None else round(r.value, 3)

    def stable(*kinds: str) -> bool | None:
        found = [ratios.of(k) for k in kinds]
        return None if any(r is None for r in found) else all(r.stable for r in found)  # type: ignore[union-attr]

    int8 = quantize["int8"]
    values: dict[str, dict[str, float | int | bool | None]] = {
        "fp32": {"accuracy": round(evaluate["accuracy"], 4), "loss": round(evaluate["loss"], 4),
                 "params": verify["params_onnx"], "img_per_s": best("fp32"),
                 "latency": ratio("latency"), "ratio": ratio("throughput"), "stable": stable("latency", "throughput")},
        "int8": {"accuracy": round(int8["accuracy"], 4), "loss": round(int8["loss"], 4), "img_per_s": best("int8"),
                 "ratio": ratio("int8"), "stable": stable("int8")},
        "train": {**train_row(train)},
    }
    return {row: {k: v for k, v in keys.items() if v is not None} for row, keys in values.items()}


def flat(values: Grid) -> dict[str, float | int | bool]:
    """The grid as one mapping of metric names (fp32_accuracy, ...), what MLflow holds."""
    return {m.name: values[m.row][m.key] for m in HEADLINE if m.key in values.get(m.row, {})}


def summary(values: Grid) -> list[str]:
    """A few lines, none over 100 characters, that say what a run measured."""
    fp32, int8, train = (values.get(row, {}) for row in ROWS)

    def get(row: dict, key: str, fmt: str) -> str:
        return fmt.format(row[key]) if key in row else "-"
    lines = [f"test accuracy {get(fp32, 'accuracy', '{:.2%}')} (INT8 {get(int8, 'accuracy', '{:.2%}')}, PyTorch "
             f"{get(train, 'accuracy', '{:.2%}')}), test loss {get(fp32, 'loss', '{:.4f}')}; "
             f"{get(fp32, 'params', '{:,}')} parameters",
             f"training {get(train, 'img_per_s', '{:,}')} images/s, {get(train, 'seconds', '{:.1f}')} s; "
             f"best inference {get(fp32, 'img_per_s', '{:,}')} images/s FP32, {get(int8, 'img_per_s', '{:,}')} INT8",
             f"per core: onnxruntime {get(fp32, 'latency', '{:.3f}')}x PyTorch's batch-1 latency, "
             f"{get(fp32, 'ratio', '{:.3f}')}x its throughput; INT8 {get(int8, 'ratio', '{:.3f}')}x FP32"]
    shaky = [row for row in ("fp32", "int8") if values.get(row, {}).get("stable") is False]
    lines.append(f"UNSTABLE: the {' and '.join(shaky)} ratios were measured on a busy machine" if shaky
                 else "every ratio measured without spread or waiting for a CPU")
    return lines
