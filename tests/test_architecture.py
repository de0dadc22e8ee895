"""The import structure DESIGN.md describes, read from the source.

pipeline/ is the library (it imports neither the stages nor tracking), tracking/ is a
subsystem the stages call, stages/ are thin entry points, and no module imports itself
back through others.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("pipeline", "stages", "tracking")


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for pkg in PACKAGES for p in sorted((REPO / pkg).glob("*.py")) if p.name != "__init__.py"}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found & known


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("pipeline.")))
def test_pipeline_imports_neither_stages_nor_tracking(name):
    assert not {m for m in GRAPH[name] if m.startswith(("stages.", "tracking."))}, GRAPH[name]


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("tracking.")))
def test_tracking_imports_no_stage(name):
    assert not {m for m in GRAPH[name] if m.startswith("stages.")}, GRAPH[name]


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


@pytest.mark.parametrize("path", sorted((REPO / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_are_thin(path):
    assert len(path.read_text().splitlines()) <= 120, f"{path.name}: move the logic into pipeline/ or tracking/"


def test_the_cycle_check_sees_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "pipeline.data", GRAPH["pipeline.data"] | {"pipeline.atomic"})
    monkeypatch.setitem(GRAPH, "pipeline.atomic", GRAPH["pipeline.atomic"] | {"pipeline.data"})
    with pytest.raises(AssertionError, match="import cycle: pipeline.atomic -> pipeline.data -> pipeline.atomic"):
        test_no_import_cycles()
