"""The operator package's modules import each other without a circle (a circle forces imports
into functions and `Any` types, and makes the import order matter)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "pj_operator"


def imports_of(path: Path) -> set[str]:
    """Modules of the package that `path` imports at any level (functions included)."""
    found = set()
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names if alias.name in modules)
            elif node.module and node.module.startswith("pj_operator."):
                found.add(node.module.split(".")[1])
            elif node.module == "pj_operator":
                found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pj_operator."))
    return found - {path.stem}


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import circle as a path [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_operator_package_has_no_import_circle():
    edges = graph()
    assert {"handlers", "reconcile", "lifecycle", "pump"} <= set(edges)
    assert "lifecycle" in edges["reconcile"]  # the walk sees relative imports
    assert find_cycle(edges) == []
