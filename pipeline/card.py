"""The model card: what the model is, what it is for, how good and how fast it is, where it
fails and where it came from, as one Markdown page (reports/model_card.md).

Every number comes from the pipeline's own metrics files and the model file's metadata;
nothing here is typed in by hand.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline import bench, contract


@dataclass(frozen=True)
class CardInputs:
    metadata: dict[str, str]  # the model file's metadata_props
    sha256: str
    onnx_bytes: int
    architecture: str  # ModelConfig.describe() of the params the model was trained with
    train: dict  # metrics/train.json
    evaluate: dict  # metrics/evaluate.json
    quantize: dict  # metrics/quantize.json
    benchmark: dict  # metrics/benchmark.json
    actual: np.ndarray  # the test labels, and what the model answered (plots/confusion.csv)
    predicted: np.ndarray
    pictures: dict[str, str]  # {"confusion": path, "misclassified": path}, relative to the card
    bench_config: bench.BenchConfig = bench.BenchConfig()  # the bounds the benchmark flagged its rows by


def per_class(actual: np.ndarray, predicted: np.ndarray) -> list[tuple[str, int, float]]:
    """(label, test images, accuracy) per class; NaN for a class with no test image."""
    rows = []
    for c, label in enumerate(contract.LABELS):
        mine = actual == c
        rows.append((label, int(mine.sum()), float((predicted[mine] == c).mean()) if mine.any() else float("nan")))
    return rows


def confusions(actual: np.ndarray, predicted: np.ndarray, top: int = 5) -> list[tuple[str, str, int]]:
    """The most frequent mistakes: (true label, answer, how many), most frequent first."""
    wrong = Counter((int(a), int(p)) for a, p in zip(actual, predicted) if a != p)
    return [(contract.LABELS[a], contract.LABELS[p], n) for (a, p), n in wrong.most_common(top)]


def _latency_row(benchmark: dict) -> bench.Row | None:
    """onnxruntime FP32 on the CPU at batch 1, on every core (the per-core rows the ratios come
    from follow it in the file): the latency one caller sees."""
    rows = [bench.Row.from_record(r) for r in benchmark.get("rows", [])]
    return next((r for r in rows if (r.path, r.precision, r.batch) == ("onnxruntime-cpu", "fp32", 1)), None)


def _flag(row: bench.Row, cfg: bench.BenchConfig) -> str:
    """What the card says after a figure from a row the benchmark flagged, and why (the bounds it
    passed, as the benchmark words them); nothing if it is stable."""
    if row.stable:
        return ""
    why = bench.unstable_because(row, cfg) or ["its rounds could not be paired"]
    return f" (**unstable**: measured on a busy machine, {', '.join(why)}; do not compare it with a quiet run)"


def _training_images(train: dict) -> str:
    """How many training images the model saw, against MNIST's 60,000 (``train.subset`` may use fewer)."""
    n = train.get("train_images", contract.TRAIN_IMAGES)
    return f"all {n:,} training images" if n == contract.TRAIN_IMAGES else \
        f"{n:,} of the {contract.TRAIN_IMAGES:,} training images (train.subset)"


def render(c: CardInputs) -> str:
    m, ev, tr, q, b = c.metadata, c.evaluate, c.train, c.quantize, c.benchmark
    side = contract.SIDE
    classes = per_class(c.actual, c.predicted)
    mistakes = confusions(c.actual, c.predicted)
    hw = b.get("hardware", {})
    lines = [
        "# Model card: the MNIST CNN (TensorFlow tutorial), ONNX",
        "",
        "## What it is and what it is for",
        "",
        f"A convolutional network that reads one handwritten digit, 0 to 9, from a {side}x{side} grey picture:",
        f"{c.architecture}, the TensorFlow tutorial's network with these params;",
        f"{tr['params']:,} parameters, {c.onnx_bytes / 1e6:.1f} MB of ONNX. For teaching,",
        "for testing a deployment path end to end, and for reading single digits written on a clean",
        "background. It is not for letters, several digits at once, or anything where a wrong answer costs",
        "more than a retry: see the limitations below.",
        "",
        "## Input contract",
        "",
        "| | |",
        "| --- | --- |",
        f"| input | `{m.get('input_name')}`, {m.get('input_dtype')}, shape `{m.get('input_shape')}`, "
        f"layout {m.get('input_layout')} |",
        f"| pixels | {m.get('input_range')}, {m.get('input_polarity')}, the digit centred by its centre of mass |",
        f"| output | `{m.get('output_name')}`: {m.get('output')} `{m.get('labels')}` (argmax = the digit) |",
        "",
        "## Training data",
        "",
        f"MNIST: {ev['images']:,} test images held out; trained on {_training_images(tr)} "
        f"(DVC hash of `data/raw`: `{m.get('data_md5')}`), on {tr['device']} "
        f"at {tr['images_per_s']:,.0f} images/s.",
        "",
        "## How good it is",
        "",
        f"- Test accuracy (onnxruntime, the deployed file): **{ev['accuracy']:.2%}** "
        f"({ev['errors']} errors in {ev['images']:,}); test loss {ev['loss']:.4f}.",
        f"- INT8 model (`model.int8.onnx`): {q['int8']['accuracy']:.2%}, "
        f"{q['int8_accuracy_delta'] * 100:+.2f} points against FP32.",
        "",
        "| digit | test images | accuracy |",
        "| --- | ---: | ---: |",
        *(f"| {label} | {n:,} | {acc:.2%} |" for label, n, acc in classes),
        "",
        f"![Confusion matrix]({c.pictures['confusion']})",
        "",
        "## How fast it is",
        "",
    ]
    row = _latency_row(b)
    best = b.get("best_images_per_s")
    if row is not None and best is not None:
        lines += [f"On {hw.get('cpu', 'the benchmark CPU')} ({hw.get('cores', '?')} cores), onnxruntime on the CPU: "
                  f"{row.p50_ms:.2f} ms per single image (p50){_flag(row, c.bench_config)}, "
                  f"up to {best:,.0f} images/s in batches. "
                  "Other machines differ: run `dvc repro benchmark` on yours (see docs/performance.md)."]
    else:
        lines += ["Not measured: the benchmark has no onnxruntime CPU row."]
    lines += [
        "",
        "## Known limitations",
        "",
        "- Digits only, one per picture, upright; letters or several digits are read as some digit anyway:",
        "  the model always answers one of its ten labels.",
        "- The input contract above: black ink on white must be inverted first (`commands.predict` and the",
        "  service do it for pictures), and digits are expected centred as MNIST centres them.",
        "- Weakest digit: {} ({:.2%}). The most frequent mistakes on the test set:".format(
            *min(((label, acc) for label, _, acc in classes), key=lambda r: r[1])),
        "",
        "| true digit | read as | times |",
        "| --- | --- | ---: |",
        *(f"| {a} | {p} | {n} |" for a, p, n in mistakes),
        "",
        f"![Misclassified test digits]({c.pictures['misclassified']})",
        "",
        "MNIST was written by American census employees and students: other handwriting styles (a crossed 7,",
        "a 1 with a flag) are rarer in it and may read worse than these figures.",
        "",
        "## Provenance",
        "",
        "| | |",
        "| --- | --- |",
        f"| file SHA-256 | `{c.sha256}` |",
        *(f"| {key} | `{m[key]}` |" for key in ("git_commit", "git_dirty", "mlflow_run_id", "data_md5",
                                              "params_md5", "params_sections", "training_device",
                                              "torch_version", "onnx_version") if key in m),
        "",
        "The same fields are in the model file's `metadata_props` (`python -m commands.predict --info`),",
        "the SHA-256 is the `sha256` tag of its MLflow registry version, and the service shows both under",
        "`parameters` at `GET /v2/models/<name>`.",
        "",
    ]
    return "\n".join(lines)
