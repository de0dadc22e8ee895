"""dvc.yaml lists, for every stage, exactly the project modules its command imports.

A module missing from a stage's deps means a change there does not rerun the stage, and
`dvc repro` reports "up to date" for stale outputs; a listed module the stage no longer
imports reruns it for nothing. The closure is read from the source (every import
statement, also those inside functions), so it can't drift from the code.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

# the project's own code; everything else is a library
PACKAGES = ("pipeline", "stages", "commands", "serving", "tracking")


def module_file(name: str) -> Path | None:
    """pipeline.data -> pipeline/data.py (or a package's __init__.py), if it is ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _runs(tree: ast.Module) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``, which never run."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING" for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def imports_of(path: Path) -> set[Path]:
    found = set()
    for node in _runs(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pipeline import data` names a module; `from pipeline.model import Net` a name in one
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(f for f in map(module_file, names) if f is not None)
    return found


def closure(module: str) -> set[str]:
    """Repository-relative paths of every project file that `python -m module` imports."""
    start = module_file(module)
    assert start is not None, module
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imports_of(path) - seen)
    # a package's __init__.py runs on import too, but ours hold only a docstring
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py"}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_exactly_the_code_it_imports(name):
    stage = STAGES[name]
    words = stage["cmd"].split()
    module = words[words.index("-m") + 1]
    code = closure(module)
    deps = {d for d in stage["deps"] if d.endswith(".py")}
    assert not code - deps, f"{name}: imported but not in deps (a change would not rerun it): {sorted(code - deps)}"
    assert not deps - code, f"{name}: in deps but not imported (reruns it for nothing): {sorted(deps - code)}"


def test_package_inits_hold_no_code():
    """closure() leaves __init__.py out of the deps; that is right only while they run nothing."""
    for package in PACKAGES:
        tree = ast.parse((REPO / package / "__init__.py").read_text())
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body), package


def test_the_closure_finds_imports_inside_functions():
    assert "tracking/store.py" in closure("tracking.run")  # imported at the top
    assert "pipeline/atomic.py" in closure("stages.verify")
