"""The headline metrics: one definition, every value from the stage reports, readable in 100 columns."""
from __future__ import annotations

import dataclasses

from pipeline import bench, headline, report

ROW = dict(p50_ms=1.0, p50_q25_ms=1.0, p50_q75_ms=1.0, p90_ms=1.0, p99_ms=1.0, mean_ms=1.0, runs=9, rounds=9,
           spread=0.01, outside_load=0.0, contention=0.0, stable=True, provider="cpu")


def reports(**changes) -> dict:
    rows = [bench.Row(**{**ROW, "images_per_s": speed}, path=path, precision=precision, threads=threads, batch=batch)
            for path, precision, threads, batch, speed in [
                ("onnxruntime-cpu", "fp32", 2, 1, 2900.0), ("onnxruntime-cpu", "fp32", 2, 256, 6081.4),
                ("onnxruntime-cpu", "fp32", 2, 1024, 6220.3), ("onnxruntime-cpu", "int8", 2, 256, 8303.6),
                ("onnxruntime-cpu", "fp32", 1, 256, 9999.0),  # a per-core row: never the "best on every core"
                ("pytorch-cpu", "fp32", 2, 256, 4725.0)]]
    ratios = bench.Ratios(1, (bench.Ratio("ort_vs_torch_cpu_p50_ratio_b1", 0.56123, 0.55, 0.57, 9, True, "latency"),
                              bench.Ratio("ort_vs_torch_cpu_throughput_ratio_b256", 1.2361, 1.22, 1.24, 9,
                                          changes.get("stable", True), "throughput"),
                              bench.Ratio("int8_vs_fp32_cpu_throughput_ratio_b256", 1.5621, 1.55, 1.57, 9, True,
                                          "int8")), 6220.3)
    return dict(train={"test_acc": 0.9943, "test_loss": 0.017888, "images_per_s": 2107.4, "train_seconds": 148.53,
                       "params": 3274634},
                evaluate={"accuracy": 0.9943, "loss": 0.017891, "errors": 57},
                quantize={"int8": {"accuracy": 0.9941, "loss": 0.0181, "errors": 59}},
                verify={"params_onnx": 3274634, "verify_ok": True},
                benchmark={**ratios.record(), "rows": [r.record() for r in rows]})


def test_every_headline_metric_is_written_and_nothing_else():
    values = headline.grid(**reports())
    written = {(row, key) for row, keys in values.items() for key in keys}
    assert written == {(m.row, m.key) for m in headline.HEADLINE}  # a rename on one side fails here
    assert values["fp32"] == {"accuracy": 0.9943, "loss": 0.0179, "params": 3274634,
                              "img_per_s": 6220, "latency": 0.561, "ratio": 1.236, "stable": True}
    assert values["int8"] == {"accuracy": 0.9941, "loss": 0.0181, "img_per_s": 8304, "ratio": 1.562,
                              "stable": True}
    assert values["train"] == {"accuracy": 0.9943, "loss": 0.0179, "img_per_s": 2107, "seconds": 148.5}
    assert headline.flat(values)["fp32_accuracy"] == 0.9943 and len(headline.flat(values)) == len(headline.HEADLINE)


def test_a_ratio_not_measured_is_left_out_not_invented():
    r = reports()
    r["benchmark"]["ratios"] = [x for x in r["benchmark"]["ratios"] if x["kind"] != "int8"]
    values = headline.grid(**r)
    assert "ratio" not in values["int8"] and "stable" not in values["int8"] and values["fp32"]["stable"] is True


def test_the_summary_is_a_few_short_lines_and_says_when_a_ratio_is_unstable():
    lines = headline.summary(headline.grid(**reports()))
    assert all(len(line) <= 100 for line in lines), [len(line) for line in lines]
    assert "test accuracy 99.43% (INT8 99.41%, PyTorch 99.43%), test loss 0.0179; 3,274,634 parameters" == lines[0]
    assert lines[-1].startswith("every ratio measured")
    shaky = headline.summary(headline.grid(**reports(stable=False)))
    assert shaky[-1].startswith("UNSTABLE: the fp32 ratios")


def side(label: str, **changes) -> report.Side:
    values = headline.grid(**reports())
    for name, value in changes.items():
        m = headline.BY_NAME[name]
        values[m.row][m.key] = value
    return report.Side(label, {"train.epochs": 4, "train.lr": 0.004}, values)


def test_the_report_shows_each_sides_numbers_the_change_and_which_is_better():
    a = side("main")
    b = dataclasses.replace(side("exp-wide", fp32_accuracy=0.9951, fp32_params=1234567, train_seconds=200.0,
                                 fp32_stable=False), params={"train.epochs": 6, "train.lr": 0.004})
    text = report.markdown(a, b, "plots/index.html")
    assert "| `train.epochs` | 4 | 6 |" in text and "train.lr" not in text  # only what differs
    assert "| fp32 accuracy: test accuracy, onnxruntime, all 10,000 test images | 99.43% | 99.51% | +0.08 points | " \
           "better |" in text
    assert "| fp32 params: parameters of the ONNX graph, each layer verified against the arithmetic | 3,274,634 | " \
           "1,234,567 | -2,040,067 |  |" in text  # a count: neither better nor worse
    assert "| train seconds: training wall time | 148.5 | 200.0 | +51.5 | worse |" in text
    assert "| int8 loss: its test loss | 0.0181 | 0.0181 |  |  |" in text  # no change: nothing to say
    assert "**exp-wide: the fp32 speed ratios are flagged unstable**" in text and "**main:" not in text
    assert "[plots/index.html](plots/index.html)" in text
    page = report.html_page(a, b, "plots/index.html")
    assert "<td>99.51%</td>" in page and 'iframe src="plots/index.html"' in page


def test_the_runs_table_fills_every_column_it_names():
    line = report.table([side("a"), side("b", train_img_per_s=1000)]).splitlines()
    assert line[0].split() == ["run", "fp32_accuracy", "int8_accuracy", "train_img_per_s", "train_seconds",
                               "fp32_latency", "fp32_ratio", "int8_ratio"]
    assert line[1].split() == ["a", "99.43%", "99.41%", "2,107", "148.5", "0.561x", "1.236x", "1.562x"]
    assert "-" not in line[2].split()
