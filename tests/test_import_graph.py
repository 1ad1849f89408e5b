"""Neither package has an import circle, counting imports inside functions too.

A circle that works today only works in some import orders, and a function-level import hides
it from every import-time test. The graph is read from the source (ast), so the check costs no
torch import. An edge to a package also counts its `__init__` (importing `a.b.c` runs `a/b`'s
`__init__` first), except from a module inside that package: the package is already initialising
when its own submodules run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"personalize": ROOT / "trainer" / "personalize", "pj_operator": ROOT / "operator" / "pj_operator"}


def modules_of(package: str, folder: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = [package, *path.relative_to(folder).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of `known` that `module` imports anywhere in its file (top level or in a function)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    targets = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            inside = module == candidate or module.startswith(candidate + ".")
            if candidate in known and candidate != module and not inside:
                targets.add(candidate)
    return targets


def import_graph(package: str, folder: Path) -> dict[str, set[str]]:
    known = modules_of(package, folder)
    return {name: imported_names(name, path, known) for name, path in known.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_package_has_no_import_circle(package):
    graph = import_graph(package, PACKAGES[package])
    assert len(graph) > 5  # the walk found the package's modules
    circle = find_circle(graph)
    assert not circle, "import circle: " + " -> ".join(circle)


def test_a_function_level_import_back_is_a_circle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_circle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_circle({"p.a": {"p.b"}, "p.b": set()}) == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "run.py").write_text("def main():\n    from pkg.job import Runner\n")
    (folder / "job.py").write_text("from pkg import run\nfrom .helpers import x\n")
    (folder / "helpers.py").write_text("x = 1\n")
    graph = import_graph("pkg", folder)
    assert graph["pkg.run"] == {"pkg.job"}
    assert graph["pkg.job"] == {"pkg.run", "pkg.helpers"}
    assert find_circle(graph) == ["pkg.job", "pkg.run", "pkg.job"]
