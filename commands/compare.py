"""Compare runs: the headline metrics (pipeline/headline.py) side by side, with what changed.

    python -m commands.compare                              # this workspace's headline, in a few lines
    python -m commands.compare main exp-1a2b3               # two git revisions or DVC experiments (Markdown)
    python -m commands.compare HEAD workspace --out report.md --html report/   # ... and a page with DVC's plots
    python -m commands.compare --runs RUN RUN               # two MLflow runs (ids or names)
    python -m commands.compare --last 5                     # the last MLflow runs, a line each

A revision is anything git or DVC resolves (a branch, a commit, an experiment's name), or
``workspace``. The report is what a team posts on a pull request: the params that differ, every
headline metric of both with its change and whether it is better, the stability of the speed
ratios, and (with --html) the training curves, confusion matrices and throughput overlaid.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import atomic, headline, params, report
from stages import _cli
from tracking import store
from tracking.store import EXPERIMENT, tracking_uri

WORKSPACE = "workspace"


def at_revision(rev: str) -> report.Side:
    """The params and the headline metrics files of a git revision or DVC experiment (or the workspace)."""
    import dvc.api

    def read(path: str) -> str:
        return Path(path).read_text() if rev == WORKSPACE else dvc.api.read(path, rev=rev)
    try:
        values = {row: json.loads(read(f"metrics/{row}.json")) for row in headline.ROWS}
        sections = yaml.safe_load(read("params.yaml"))
    except Exception as e:  # noqa: BLE001 - git's, DVC's and the file's own errors: all say the same to the user
        raise params.ParamError(f"compare: {rev!r} has no headline metrics ({type(e).__name__}: {e}); give a "
                                "revision or experiment that `dvc repro` or `dvc exp run` completed") from None
    return report.Side(rev, params.flatten(sections), values)


def of_run(run) -> report.Side:
    """An MLflow run's params and headline metrics (the summary stage logged them as ``<row>_<key>``)."""
    values: headline.Grid = {}
    for m in headline.HEADLINE:
        if (v := run.data.metrics.get(m.name)) is not None:
            values.setdefault(m.row, {})[m.key] = bool(v) if m.fmt == "{}" else int(v) if "," in m.fmt else v
    return report.Side(run.info.run_name or run.info.run_id[:8], dict(run.data.params), values)


def runs(client, which: list[str]) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        sys.exit(f"compare: no runs yet in {tracking_uri()}; run `dvc repro` first")
    found = []
    for key in which:  # a run id, else the newest run of that name (MLflow's filters have no OR)
        hits = client.search_runs([exp.experiment_id], f"attributes.run_id = '{key}'", max_results=1) \
            or client.search_runs([exp.experiment_id], f"attributes.run_name = '{key}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not hits:
            sys.exit(f"compare: no run {key!r} in {tracking_uri()}")
        found.append(hits[0])
    return found


def main(args: argparse.Namespace) -> None:
    if args.last or args.runs:
        client = store.client()
        if args.last:
            exp = client.get_experiment_by_name(EXPERIMENT)
            found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                       max_results=args.last) if exp else []
            print(report.table([of_run(r) for r in found]) if found else f"compare: no runs yet in {tracking_uri()}")
            return
        a, b = (of_run(r) for r in runs(client, args.runs))
    elif not args.revisions:
        print("\n".join(headline.summary(at_revision(WORKSPACE).values)))
        return
    elif len(args.revisions) == 2:
        a, b = (at_revision(rev) for rev in args.revisions)
    else:
        sys.exit("compare: give two revisions or experiments (or none for this workspace's summary)")
    plots = None
    if args.html and not args.runs:
        out, template = args.html / "plots", args.html / "plots-template.html"
        atomic.write_text(template, report.plots_template())
        revs = [r for r in args.revisions if r != WORKSPACE]  # one revision: DVC draws it beside the workspace
        subprocess.run([sys.executable, "-m", "dvc", "plots", "diff", *revs, "-o", str(out), "--html-template",
                        str(template)], check=True, stdout=subprocess.DEVNULL)
        template.unlink()
        plots = "plots/index.html"
    if args.html:
        atomic.write_text(args.html / "report.html", report.html_page(a, b, plots))
    text = report.markdown(a, b, str(args.html / plots) if plots and args.out is None else plots)
    if args.out:
        atomic.write_text(args.out, text)
    print(text, end="")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="commands.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="*", help="two git revisions or DVC experiments, or 'workspace'")
    parser.add_argument("--runs", nargs=2, metavar="RUN", help="two MLflow runs, by id or name")
    parser.add_argument("--last", type=int, help="the last N MLflow runs, newest first")
    parser.add_argument("--out", type=Path, help="write the Markdown report here too")
    parser.add_argument("--html", type=Path, help="a folder for report.html and DVC's plots of both runs")
    _cli.run(main, parser)
