"""The README and docs/ say only what exists: every relative link and anchor resolves, every
``python -m ...`` of ours and every script they tell people to run is there."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.services import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OURS = ("pipeline", "stages", "commands", "serving", "tracking", "benchmarks", "scripts")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            base, n = slug(m[1]), 0
            while (name := base if n == 0 else f"{base}-{n}") in found:
                n += 1
            found.add(name)
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file or anchor does not exist, said as 'target: why'."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links
    bad = []
    for m in LINK.finditer(text):
        target = m[1] or m[2]
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif REPO.resolve() not in dest.resolve().parents and dest.resolve() != REPO.resolve():
            bad.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def missing_commands(page: Path) -> list[str]:
    """Each ``python -m <ours>`` module and ``scripts/...`` program the page names that does not exist."""
    text = page.read_text()
    bad = []
    for module in re.findall(r"python3? -m ((?:\w+\.)*\w+)(?![\w.<])", text):
        if module.split(".")[0] in OURS:
            parts = Path(*module.split("."))
            if not ((REPO / parts).with_suffix(".py").is_file() or (REPO / parts / "__main__.py").is_file()):
                bad.append(f"python -m {module}")
    for script in re.findall(r"(?<![\w/.])(?:\./)?(scripts/[\w-]+(?:\.\w+)?)", text):
        if not (REPO / script).is_file():
            bad.append(script)
    return bad


def missing_tests(page: Path) -> list[str]:
    """Each test file and test function the page cites (as its evidence) that does not exist."""
    text = page.read_text()
    defined = {name for f in (REPO / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    files = [f for f in re.findall(r"(tests/test_\w+\.py)", text) if not (REPO / f).is_file()]
    # a test's name is a sentence (test_cuda_request_is_labelled_honestly); `test_acc` is a metric
    cited = {t for t in re.findall(r"`(test_\w+)`", text) if t.count("_") >= 3}
    return files + sorted(cited - defined)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_test_a_page_cites_exists(page):
    assert not missing_tests(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    assert not broken_links(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_a_page_tells_people_to_run_exists(page):
    assert not missing_commands(page)


def test_the_checks_see_a_broken_link_a_missing_anchor_and_a_missing_command(tmp_path):
    page = REPO / "docs" / "_probe_.md"  # inside docs/, so relative links mean what they mean there
    try:
        page.write_text("# A page\n\n[ok](serving.md#the-inference-service) [self](#a-page)\n"
                        "[gone](nowhere.md) [anchor](serving.md#no-such-heading) ![pic](missing.png)\n"
                        "```\n[in code](not-checked.md)\n```\n"
                        "Run `python -m commands.nothing`, `python -m commands.serve` and ./scripts/nope.sh.\n"
                        "Tested by `test_no_such_test_here` in tests/test_docs.py and tests/test_nothing.py; "
                        "`test_acc` is a metric.\n")
        assert broken_links(page) == ["nowhere.md: no such file",
                                      "serving.md#no-such-heading: no heading #no-such-heading in serving.md",
                                      "missing.png: no such file"]
        assert missing_commands(page) == ["python -m commands.nothing", "scripts/nope.sh"]
        assert missing_tests(page) == ["tests/test_nothing.py", "test_no_such_test_here"]
    finally:
        page.unlink()


def test_anchors_follow_githubs_rules():
    assert slug("What `dvc repro` does") == "what-dvc-repro-does"
    assert slug("Data, models and results: a DVC remote") == "data-models-and-results-a-dvc-remote"
    assert slug("Training on several processes, GPUs and machines") == "training-on-several-processes-gpus-and-machines"
