"""The code's shape, checked from its syntax tree: no private imports across modules, no import
cycle among mmlens modules, no function longer than 80 lines, and input key names only in
adapter-facing code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mmlens": ROOT / "mmlens", "mmlens.hooks": ROOT / "hooks", "mmlens.analyses": ROOT / "analyses"}
MAX_LINES = 80
# where input key names may appear: the adapters, the model registry, data builders and the models
ADAPTER_FACING = ("mmlens/data/", "mmlens/models/", "mmlens/training/", "hooks/")
INPUT_KEYS = re.compile(r"node_features|pixel_values|input_features")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> list[tuple[str, list[str], int, bool]]:
    """(imported module, names, line, at top level) for every import of an mmlens module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if _is_package(module) else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            if base == "mmlens" or base.startswith("mmlens."):
                out.append((base, [a.name for a in node.names], node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mmlens"):
                    out.append((alias.name, [], node.lineno, id(node) in top))
    return out


def test_no_private_names_imported_across_modules():
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line}: from {base} import {name}"
        for m in MODULES
        for base, names, line, _ in _imports(m)
        for name in names
        if name.startswith("_") and base != m
    ]
    assert not bad, "private names imported across modules (make them public or move them):\n" + "\n".join(bad)


def _resolve(base: str, name: str) -> str | None:
    """The mmlens module an import statement depends on."""
    if f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    return base if base in MODULES else None


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for base, names, _, _ in _imports(m):
            for target in {_resolve(base, n) for n in names or [""]} - {None, m}:
                if not (_is_package(target) and m.startswith(target + ".")):
                    graph[m].add(target)
    cycles = _cycles(graph)
    assert not cycles, "import cycles (function-local imports count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_functions_are_short():
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


def test_input_keys_only_in_adapter_facing_code():
    hits = []
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith("mmlens/") or rel.startswith(ADAPTER_FACING):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if INPUT_KEYS.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "input key names outside the adapters (ask the adapter instead):\n" + "\n".join(hits)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    __import__(module)
