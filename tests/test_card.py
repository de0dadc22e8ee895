"""The model card: every number from the inputs it is given, per-class rows and mistakes counted right."""
from __future__ import annotations

import numpy as np

from pipeline import bench, card, contract
from pipeline.model import ModelConfig


def latency_row(**changes) -> bench.Row:
    """onnxruntime FP32 at batch 1 on every core, as the benchmark writes it."""
    values = dict(p50_ms=0.34, p50_q25_ms=0.33, p50_q75_ms=0.35, p90_ms=0.4, p99_ms=0.5, mean_ms=0.35,
                  images_per_s=2900.0, runs=900, rounds=9, spread=0.02, outside_load=0.01, contention=0.01,
                  stable=True, path="onnxruntime-cpu", provider="cpu", precision="fp32", threads=2, batch=1)
    return bench.Row(**{**values, **changes})


def inputs(**overrides) -> card.CardInputs:
    actual = np.array([0, 0, 1, 1, 1, 4, 4, 9, 9, 9] * 10)  # no 2, 3, 5, 6, 7 or 8
    predicted = actual.copy()
    predicted[:10] = [0, 6, 1, 7, 1, 9, 4, 4, 9, 9]  # 0->6, 1->7, 4->9, 9->4 once each
    values = dict(
        metadata={**contract.INPUT_CONTRACT, "git_commit": "c" * 40, "git_dirty": "False",
                  "mlflow_run_id": "run42", "data_md5": "d0193b.dir", "params_md5": "p1",
                  "training_device": "cpu"},
        sha256="ab" * 32, onnx_bytes=13_100_000, architecture=ModelConfig().describe(),
        train={"params": 3_274_634, "device": "cpu", "images_per_s": 2107.1, "train_images": 60_000},
        evaluate={"accuracy": 0.9943, "errors": 57, "images": 10_000, "loss": 0.0179},
        quantize={"int8": {"accuracy": 0.9941}, "int8_accuracy_delta": -0.0002},
        benchmark={"hardware": {"cpu": "AMD EPYC", "cores": "2"}, "best_images_per_s": 9876.5,
                   "rows": [latency_row().record()]},
        actual=actual, predicted=predicted,
        pictures={"confusion": "../plots/confusion.png", "misclassified": "../plots/misclassified.png"})
    return card.CardInputs(**{**values, **overrides})


def test_per_class_accuracy_and_the_most_frequent_mistakes():
    c = inputs()
    rows = {label: (n, acc) for label, n, acc in card.per_class(c.actual, c.predicted)}
    assert rows["0"] == (20, 0.95) and rows["1"] == (30, 29 / 30) and rows["4"][1] == 0.95
    assert rows["2"][0] == 0 and np.isnan(rows["2"][1])  # no test image of 2: no accuracy, not 0%
    mistakes = card.confusions(c.actual, c.predicted)
    assert sorted(mistakes) == [("0", "6", 1), ("1", "7", 1), ("4", "9", 1), ("9", "4", 1)]


def test_the_card_says_what_the_metrics_and_the_file_say():
    page = card.render(inputs())
    for text in ("**99.43%** (57 errors in 10,000)", "99.41%, -0.02 points against FP32", "3,274,634 parameters",
                 "13.1 MB", "0.34 ms per single image (p50), up to 9,876 images/s", "AMD EPYC (2 cores)",
                 "`d0193b.dir`", "| git_commit | `" + "c" * 40 + "` |", "| mlflow_run_id | `run42` |",
                 "`" + "ab" * 32 + "`", "![Confusion matrix](../plots/confusion.png)",
                 "white digit on black", "| 0 | 20 | 95.00% |", "| 1 | 7 | 1 |"):
        assert text in page, text


def test_no_benchmark_row_is_said_not_invented():
    page = card.render(inputs(benchmark={"rows": []}))
    assert "Not measured" in page and "images/s in batches" not in page


def test_the_architecture_and_the_training_images_are_those_of_the_params_not_typed_in():
    small = ModelConfig(channels=(16, 32), fc_units=256)
    page = card.render(inputs(architecture=small.describe(),
                              train={"params": 123_456, "device": "cpu", "images_per_s": 900.0, "train_images": 3_000}))
    assert "conv 5x5x16 -> max pool 2x2 -> conv 5x5x32 -> max pool 2x2 -> fc 256 -> dropout 0.5 -> fc 10" in page
    assert "5x5x64" not in page and "fc 1024" not in page
    assert "3,000 of the 60,000 training images" in page and "all 60,000" not in page
    assert "all 60,000 training images" in card.render(inputs())


def test_a_latency_from_a_row_flagged_unstable_says_so():
    assert "unstable" not in card.render(inputs()).lower()
    shaky = latency_row(stable=False, spread=0.31, contention=0.4, outside_load=0.5)
    page = card.render(inputs(benchmark={"hardware": {"cpu": "AMD EPYC", "cores": "2"},
                                         "best_images_per_s": 9876.5, "rows": [shaky.record()]}))
    assert "0.34 ms per single image (p50) (**unstable**" in page
    assert "its threads waited 40% of their time for a CPU" in page and "do not compare it with a quiet run" in page
    waited_only = latency_row(stable=False, spread=0.05, contention=0.4, outside_load=0.0)
    page = card.render(inputs(benchmark={"hardware": {}, "best_images_per_s": 1.0, "rows": [waited_only.record()]}))
    assert "its threads waited 40%" in page and "spread" not in page and "other processes" not in page  # only the cause
