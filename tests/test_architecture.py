"""The import structure DESIGN.md describes, read from the source.

pipeline/ is the library (it imports no other package of ours), tracking/ is a subsystem the
stages and commands call, serving/ is a deployable of its own (onnxruntime, never PyTorch,
MLflow or DVC; its third-party imports are exactly serving/requirements.txt), stages/ are
thin DVC entry points, commands/ thin commands, and no module imports itself back through
others.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from harness.services import REPO

PACKAGES = ("pipeline", "stages", "commands", "serving", "tracking")
NEVER_IN_SERVING = {"torch", "mlflow", "dvc"}
# import name -> distribution name, where they differ (serving/requirements.txt lists distributions)
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "prometheus_client": "prometheus-client",
                 "onnxruntime": "onnxruntime-gpu"}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for pkg in PACKAGES for p in sorted((REPO / pkg).glob("*.py")) if p.name != "__init__.py"}


def imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def third_party(names: set[str]) -> set[str]:
    """The top-level packages among ``names`` that are neither ours nor the standard library."""
    tops = {n.split(".")[0] for n in names}
    return {t for t in tops if t not in PACKAGES and t not in sys.stdlib_module_names and t != "__future__"}


MODULES = modules()
GRAPH = {name: imported_names(path) & set(MODULES) for name, path in MODULES.items()}
EXTERNAL = {name: third_party(imported_names(path)) for name, path in MODULES.items()}


def closure(name: str) -> set[str]:
    """``name`` and every module of ours it imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        if (m := todo.pop()) not in seen:
            seen.add(m)
            todo.extend(GRAPH[m])
    return seen


def check_serving(name: str) -> set[str]:
    """The third-party packages a serving module needs, through every module it imports;
    fails if any is one the deployable must never carry, or is missing from its requirements."""
    needs = set().union(*(EXTERNAL[m] for m in closure(name)))
    forbidden = needs & NEVER_IN_SERVING
    assert not forbidden, f"{name} imports {sorted(forbidden)} (through {sorted(closure(name))})"
    listed = {re.split(r"[<>=~ #\[]", line.strip())[0].lower()
              for line in (REPO / "serving/requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    missing = {p for p in needs if DISTRIBUTIONS.get(p, p).lower().replace("_", "-") not in listed}
    assert not missing, f"{name} imports {sorted(missing)}, which serving/requirements.txt does not list"
    return needs


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("pipeline.")))
def test_pipeline_imports_no_other_package_of_ours(name):
    assert not {m for m in GRAPH[name] if not m.startswith("pipeline.")}, GRAPH[name]


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("tracking.")))
def test_tracking_imports_no_stage_command_or_service(name):
    assert not {m for m in GRAPH[name] if m.startswith(("stages.", "commands.", "serving."))}, GRAPH[name]


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("serving.")))
def test_serving_needs_neither_torch_nor_mlflow_nor_dvc_and_lists_what_it_needs(name):
    assert not {m for m in closure(name) if m.startswith(("stages.", "commands.", "tracking."))}, closure(name)
    check_serving(name)


def test_the_serving_check_sees_torch_imported_through_another_module(monkeypatch):
    check_serving("serving.server")  # as it is: passes
    monkeypatch.setitem(EXTERNAL, "pipeline.digits", EXTERNAL["pipeline.digits"] | {"torch"})
    with pytest.raises(AssertionError, match=r"serving.server imports \['torch'\]"):
        check_serving("serving.server")


def test_the_serving_check_sees_an_unlisted_package(monkeypatch):
    monkeypatch.setitem(EXTERNAL, "serving.batcher", EXTERNAL["serving.batcher"] | {"requests"})
    with pytest.raises(AssertionError, match="requests.*does not list"):
        check_serving("serving.server")


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("stages.")))
def test_stages_import_no_command(name):
    assert not {m for m in GRAPH[name] if m.startswith("commands.")}, GRAPH[name]


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"
    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("path", sorted([*(REPO / "stages").glob("*.py"), *(REPO / "commands").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stages_and_commands_are_thin(path):
    assert len(path.read_text().splitlines()) <= 120, f"{path.name}: move the logic into pipeline/ or tracking/"


def test_the_cycle_check_sees_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "pipeline.data", GRAPH["pipeline.data"] | {"pipeline.atomic"})
    monkeypatch.setitem(GRAPH, "pipeline.atomic", GRAPH["pipeline.atomic"] | {"pipeline.data"})
    with pytest.raises(AssertionError, match="import cycle: pipeline.atomic -> pipeline.data -> pipeline.atomic"):
        test_no_import_cycles()


@pytest.mark.parametrize("path", sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "harness").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmarks_and_the_harness_import_no_test_module(path):
    """What a benchmark and a test both need lives in harness/: a benchmark runs without tests/."""
    assert not {n for n in imported_names(path) if n.split(".")[0] == "tests"}, path.name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_product_never_imports_the_harness(name):
    assert not {n for n in imported_names(MODULES[name]) if n.split(".")[0] in ("harness", "tests")}, name
