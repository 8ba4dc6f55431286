"""The fastsam3d package's import graph has no cycles, and its leaf modules stay leaves.

Every import counts, also deferred ones inside functions and ``TYPE_CHECKING`` blocks: a deferred
import hides a cycle, it does not remove it. Cheap (``ast`` only, nothing is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastsam3d

PKG = Path(fastsam3d.__file__).parent

# None left: volume <-> dicom/nifti went with the one-root-exception step (VolumeError lives in
# the errors leaf, is_orthogonal in nifti).
KNOWN_CYCLES: list[set[str]] = []

# Modules everything else builds on, which must import nothing from the package.
LEAVES = ("fastsam3d.configs", "fastsam3d.modeling.rel_pos", "fastsam3d.errors")


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, relative imports resolved."""
    files = {_module_name(p): p for p in pkg.rglob("*.py")}
    modules = {name for name, _ in files}
    root = pkg.name
    graph: dict[str, set[str]] = {}
    for (name, is_pkg), path in files.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != root:
                    continue
                for alias in node.names:  # `from pkg import submodule` is an edge to it
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_fastsam3d():
    graph = import_graph()
    assert "fastsam3d.modeling.attention" in graph and "fastsam3d.build" in graph
    new = [sorted(c) for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_leaf_modules_import_nothing_from_the_package():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] == set(), f"{leaf} imports {sorted(graph[leaf])}"


@pytest.mark.parametrize("module", ["configs.py", "weights.py"])
def test_registries_are_torch_free(module):
    tree = ast.parse((PKG / module).read_text(encoding="utf-8"))
    imported = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    imported |= {
        (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    assert not imported & {"torch", "numpy"}, imported
