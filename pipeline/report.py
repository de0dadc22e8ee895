"""The comparison report a team posts on a pull request: two runs side by side.

What differs in their params, every headline metric (pipeline/headline.py) of each with the
change and whether it is better, the stability flag of the speed ratios, and where the plots
are. Markdown, with an HTML page beside it when the plots are drawn (``dvc plots diff``).
The numbers are the metrics files' own, formatted once by ``headline.Metric.show``.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

from pipeline import headline


@dataclass(frozen=True)
class Side:
    """One of the two runs: what to call it, its params (flattened: ``train.epochs``), its headline grid."""

    label: str
    params: dict[str, object]
    values: headline.Grid


def differing_params(a: Side, b: Side) -> list[tuple[str, object, object]]:
    keys = sorted(set(a.params) | set(b.params))
    return [(k, a.params.get(k, "-"), b.params.get(k, "-")) for k in keys if a.params.get(k) != b.params.get(k)]


def change(metric: headline.Metric, before: float | bool | None, after: float | bool | None) -> tuple[str, str]:
    """(the change from ``before`` to ``after`` as a person reads it, and 'better', 'worse' or '')."""
    if before is None or after is None or isinstance(before, bool) or isinstance(after, bool):
        return ("" if before == after else "changed"), ""
    delta = after - before
    if delta == 0:
        return "", ""
    if metric.fmt.endswith("%}"):
        text = f"{delta * 100:+.2f} points"
    elif metric.fmt.endswith("x"):
        text = f"{delta:+.3f}"
    elif isinstance(before, int) and isinstance(after, int):
        text = f"{delta:+,}"
    else:
        text = f"{delta:+.4g}"
    if not metric.better:
        return text, ""
    return text, "better" if (delta > 0) == (metric.better == "higher") else "worse"


def rows(a: Side, b: Side) -> list[tuple[headline.Metric, str, str, str, str]]:
    """(metric, a's value, b's value, change, verdict) for every headline metric either has."""
    out = []
    for m in headline.HEADLINE:
        va, vb = a.values.get(m.row, {}).get(m.key), b.values.get(m.row, {}).get(m.key)
        if va is None and vb is None:
            continue
        out.append((m, m.show(va), m.show(vb), *change(m, va, vb)))
    return out


def unstable(side: Side) -> list[str]:
    return [row for row in headline.ROWS if side.values.get(row, {}).get("stable") is False]


def table(sides: list[Side]) -> str:
    """The last runs, a line each: name, the params that differ among them, a few headline metrics."""
    keys = sorted({k for s in sides for k in s.params})
    differing = [k for k in keys if len({s.params.get(k) for s in sides}) > 1]
    shown = [headline.BY_NAME[n] for n in ("fp32_accuracy", "int8_accuracy", "train_img_per_s", "train_seconds",
                                           "fp32_latency", "fp32_ratio", "int8_ratio")]
    head = ["run", *differing, *(m.name for m in shown)]
    body = [[s.label, *(str(s.params.get(k, "-")) for k in differing),
             *(m.show(s.values.get(m.row, {}).get(m.key)) for m in shown)] for s in sides]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    return "\n".join(lines) + ("" if differing else "\n(all params are the same in these runs)")


def markdown(a: Side, b: Side, plots: str | None = None) -> str:
    lines = [f"# {a.label} vs {b.label}", ""]
    params = differing_params(a, b)
    if params:
        lines += ["## Params that differ", "", f"| param | {a.label} | {b.label} |", "| --- | --- | --- |",
                  *(f"| `{k}` | {va} | {vb} |" for k, va, vb in params), ""]
    else:
        lines += ["The two runs have the same params.", ""]
    lines += ["## Headline metrics", "", f"| metric | {a.label} | {b.label} | change | |",
              "| --- | ---: | ---: | ---: | --- |"]
    for m, va, vb, delta, verdict in rows(a, b):
        lines.append(f"| {m.row} {m.key}: {m.meaning} | {va} | {vb} | {delta} | {verdict} |")
    lines.append("")
    for side in (a, b):
        if shaky := unstable(side):
            lines.append(f"**{side.label}: the {' and '.join(shaky)} speed ratios are flagged unstable** (measured "
                         "on a busy machine: their rounds spread or their threads waited for a CPU); compare them "
                         "with care.")
    if plots:
        lines += ["", f"Plots (training curves, confusion matrices, throughput by batch size, both runs overlaid): "
                      f"[{plots}]({plots})"]
    return "\n".join(lines).rstrip() + "\n"


def plots_template() -> str:
    """A page template for ``dvc plots diff --html-template`` that works offline: Vega, Vega-Lite
    and Vega-Embed inlined (vl-convert's bundle, from the Vega project), where DVC's own page
    loads them from a CDN, so the plots draw on a machine without internet too."""
    import vl_convert
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n<title>DVC plots</title>\n"
            f"<script>{vl_convert.javascript_bundle('window.vegaEmbed = vegaEmbed;')}</script>\n"
            "<style>table{border-spacing:15px}</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")


def html_page(a: Side, b: Side, plots: str | None = None) -> str:
    """The same report as a page, with DVC's plots of both runs below the tables."""
    def table(head: list[str], body: list[list[str]]) -> str:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>"
    params = differing_params(a, b)
    parts = [f"<h1>{html.escape(a.label)} vs {html.escape(b.label)}</h1>",
             "<h2>Params that differ</h2>" + (table(["param", a.label, b.label], [list(map(str, p)) for p in params])
                                              if params else "<p>The two runs have the same params.</p>"),
             "<h2>Headline metrics</h2>" + table(["metric", a.label, b.label, "change", ""],
                                                 [[f"{m.row} {m.key}: {m.meaning}", va, vb, d, v]
                                                  for m, va, vb, d, v in rows(a, b)])]
    for side in (a, b):
        if shaky := unstable(side):
            parts.append(f"<p><strong>{html.escape(side.label)}: the {' and '.join(shaky)} speed ratios are flagged "
                         "unstable</strong> (measured on a busy machine).</p>")
    if plots:
        parts.append(f'<h2>Plots</h2><iframe src="{html.escape(plots)}" style="width:100%;height:2400px;border:0">'
                     "</iframe>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}")
    return f"<!doctype html><meta charset=utf-8><title>{html.escape(a.label)} vs {html.escape(b.label)}</title>" \
           f"<style>{style}</style>" + "".join(parts)
