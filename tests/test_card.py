"""The model card: every number from the inputs it is given, per-class rows and mistakes counted right."""
from __future__ import annotations

import numpy as np

from pipeline import card, contract


def inputs(**overrides) -> card.CardInputs:
    actual = np.array([0, 0, 1, 1, 1, 4, 4, 9, 9, 9] * 10)  # no 2, 3, 5, 6, 7 or 8
    predicted = actual.copy()
    predicted[:10] = [0, 6, 1, 7, 1, 9, 4, 4, 9, 9]  # 0->6, 1->7, 4->9, 9->4 once each
    values = dict(
        metadata={**contract.INPUT_CONTRACT, "git_commit": "c" * 40, "git_dirty": "False",
                  "mlflow_run_id": "run42", "data_md5": "d0193b.dir", "params_md5": "p1",
                  "training_device": "cpu"},
        sha256="ab" * 32, onnx_bytes=13_100_000,
        train={"params": 3_274_634, "device": "cpu", "images_per_s": 2107.1},
        evaluate={"accuracy": 0.9943, "errors": 57, "images": 10_000, "loss": 0.0179},
        quantize={"int8_accuracy": 0.9941, "int8_accuracy_delta": -0.0002},
        benchmark={"hardware": {"cpu": "AMD EPYC", "cores": "2"}, "ort_cpu_fp32_best_images_per_s": 9876.5,
                   "rows": [{"path": "onnxruntime-cpu", "precision": "fp32", "batch": 1, "p50_ms": 0.34}]},
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
