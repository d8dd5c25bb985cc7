"""The library's shape: every module listed in the README's layout, and no import circle between modules
(deferred imports included: a circle hidden in a function is still one)."""

from __future__ import annotations

import ast

from .conftest import ROOT

PACKAGE = ROOT / "raypatch"


def imports() -> dict[str, set[str]]:
    mods = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raypatch":
                parts = node.module.split(".")
                names = parts[1:2] if len(parts) > 1 else [a.name for a in node.names]
                edges[m] |= {n for n in names if n in mods and n != m}
    return edges


def test_no_module_imports_one_that_imports_it_back():
    edges = imports()
    circles = []
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for n in sorted(edges[node]):
                if n == start:
                    circles.append(" -> ".join([*path, start]))
                elif n not in path and n > start:  # each circle once, from its smallest module
                    stack.append((n, [*path, n]))
    assert not circles, circles


def test_every_module_is_in_the_readme_layout():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__" and f"  {p.name} " not in readme]
    assert not missing, missing
