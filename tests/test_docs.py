"""Executable docs: every ```python block of README.md and docs/**/*.md runs (the blocks of one file in
order, in one namespace, in a fresh temporary folder, offline); the hook tables in docs/hooks.md equal
what ``mmlens hooks NAME --markdown`` prints; the README stays a front door.

Regenerate the hook tables after changing an adapter (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.test_docs
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HOOKS_PAGE = ROOT / "docs" / "hooks.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
SUPPORTED_PAGE = ROOT / "docs" / "supported.md"
SUPPORTED_BLOCK = re.compile(r"(<!-- supported:begin -->\n)(.*?)(<!-- supported:end -->)", flags=re.S)
HOOK_TABLE = re.compile(r"(<!-- mmlens hooks (\S+) --markdown -->\n)(.*?)(<!-- end hooks -->)", flags=re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
MAX_README_LINES = 200
FLOW = [
    "mmlens/",
    "data/",
    "models/",
    "core/",
    "methods/",
    "metrics/",
    "plots.py",
    "runs/",
    "training/",
    "store.py",
    "hooks/",
    "analyses/",
    "notebooks/",
    "tests/",
]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order (```py blocks are excerpts and do not run)."""
    return PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))


def hook_tables(text: str) -> dict[str, str]:
    """``{registry name: table}`` for every generated table between the markers of docs/hooks.md."""
    return {m.group(2): m.group(3) for m in HOOK_TABLE.finditer(text)}


def cli_hook_table(name: str) -> str:
    """What ``mmlens hooks NAME --markdown`` prints."""
    from mmlens.runs.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["hooks", name, "--markdown"]) == 0
    return out.getvalue()


def regenerate(page: Path = HOOKS_PAGE) -> list[str]:
    """Rewrite every table between the markers of ``page`` from the CLI, and the supported-architecture
    block of docs/supported.md and the README; returns what was rewritten."""
    text = page.read_text(encoding="utf-8")
    names = list(hook_tables(text))
    text = HOOK_TABLE.sub(lambda m: m.group(1) + cli_hook_table(m.group(2)) + m.group(4), text)
    page.write_text(text, encoding="utf-8")
    table = supported_table()
    for doc in (SUPPORTED_PAGE, README):
        text = doc.read_text(encoding="utf-8")
        if SUPPORTED_BLOCK.search(text):
            doc.write_text(SUPPORTED_BLOCK.sub(lambda m: m.group(1) + table + m.group(3), text), encoding="utf-8")
            names.append(_rel(doc))
    return names


def supported_table() -> str:
    """What ``mmlens hooks --supported`` prints."""
    from mmlens.runs.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["hooks", "--supported"]) == 0
    return out.getvalue()


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=_rel)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = types.ModuleType("docs_" + re.sub(r"\W", "_", _rel(page)))
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses defined in a block look it up
    for i, block in enumerate(python_blocks(page), 1):
        exec(compile(block, f"{_rel(page)} python block {i}", "exec"), module.__dict__)


def test_docs_have_examples():
    assert len(python_blocks(README)) >= 2
    assert sum(len(python_blocks(p)) for p in PAGES) >= 10


@pytest.mark.parametrize("name", sorted(hook_tables(HOOKS_PAGE.read_text(encoding="utf-8"))))
def test_hook_table_matches_cli(name: str):
    assert hook_tables(HOOKS_PAGE.read_text(encoding="utf-8"))[name] == cli_hook_table(name), (
        f"docs/hooks.md's table for {name} drifted from the adapter: regenerate with `python -m tests.test_docs`"
    )


def test_supported_architectures_are_generated_from_the_registry():
    """The README's and docs/supported.md's supported-architecture lists are what the adapter tables and the
    registry say (hand table or automatic, per class); regenerate with `python -m tests.test_docs`."""
    table = supported_table()
    assert "| automatic |" in table and "| hand-written |" in table
    for doc in (SUPPORTED_PAGE, README):
        found = SUPPORTED_BLOCK.search(doc.read_text(encoding="utf-8"))
        assert found, f"{_rel(doc)} lacks the <!-- supported:begin --> ... <!-- supported:end --> block"
        assert found.group(2) == table, (
            f"{_rel(doc)}'s supported list drifted: regenerate with `python -m tests.test_docs`"
        )


def test_hooks_page_has_tables():
    assert len(hook_tables(HOOKS_PAGE.read_text(encoding="utf-8"))) >= 5


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: Path):
    missing = [
        target
        for target in LINK.findall(page.read_text(encoding="utf-8"))
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not missing, f"{_rel(page)} links to missing files: {missing}"


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES
    layout = "\n".join(lines[lines.index("## Layout: the flow in folders") :])
    found = [re.search(rf"^ *{re.escape(name)}(?=\s)", layout, flags=re.M) for name in FLOW]
    positions = [m.start() if m else -1 for m in found]
    assert -1 not in positions and positions == sorted(positions), dict(zip(FLOW, positions))


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q"
    assert command in README.read_text(encoding="utf-8") and command in ci.splitlines()


if __name__ == "__main__":
    print("regenerated:", ", ".join(regenerate()))
