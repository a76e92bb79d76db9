"""fleetserve's import graph, read from the source with `ast`: layers point down, no cycles.

Edges are the `import` statements of each module, those inside functions included (they run
too, only later); imports under `if TYPE_CHECKING:` are left out (they never run). Relative
imports are resolved, and `from pkg import name` points at `pkg.name` when that is a module,
else at `pkg`. A registry's `"module:Attr"` strings are not imports: that is what they are for.

Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`. The cycle check leaves
those implicit edges out (a package's `__init__` re-exporting its own modules is no cycle
Python minds); the torch check counts them (they do run, and could import torch).
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fleetserve"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, type_checking: bool) -> Iterator[ast.AST]:
    """Every node below `node`; the bodies of `if TYPE_CHECKING:` only if `type_checking`."""
    for child in ast.iter_child_nodes(node):
        if not type_checking and isinstance(child, ast.If) and _is_type_checking(child.test):
            for orelse in child.orelse:
                yield orelse
                yield from _walk(orelse, type_checking)
            continue
        yield child
        yield from _walk(child, type_checking)


def _imported(
    module: str, path: Path, known: Collection[str], type_checking: bool = False
) -> Iterator[str]:
    """Absolute names of what `module` imports at run time (any package, not only ours), and
    for type checking too if `type_checking`; `from pkg import name` gives `pkg.name` when that
    is in `known` modules."""
    is_package = path.name == "__init__.py"
    for node in _walk(ast.parse(path.read_text(), str(path)), type_checking):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else target


@cache
def graph() -> dict[str, frozenset[str]]:
    """fleetserve module -> the fleetserve modules it imports (explicit edges only)."""
    return {
        m: frozenset(t for t in _imported(m, p, modules()) if t in modules() and t != m)
        for m, p in modules().items()
    }


@cache
def imports_torch(module: str) -> bool:
    """True when `module` imports torch itself."""
    imported = _imported(module, modules()[module], modules())
    return any(t == "torch" or t.startswith("torch.") for t in imported)


def strongly_connected_components(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module only, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def path_between(edges: dict[str, frozenset[str]], start: str, goal: str) -> list[str] | None:
    """Shortest import path from `start` to `goal` (breadth first), or None."""
    parents: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child == goal:
                    path = [child, node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return None


def cycle_path(edges: dict[str, frozenset[str]], component: list[str]) -> str:
    """One cycle through the component's first module, as `a -> b -> a`."""
    inside = {m: edges[m] & set(component) for m in component}
    start = component[0]
    for child in sorted(inside[start]):
        back = path_between(inside, child, start) if child != start else [start]
        if back is not None:
            return " -> ".join([start, *back])
    raise AssertionError(f"no cycle through {start} in {component}")


def test_no_import_cycles() -> None:
    """Imports inside functions count; `if TYPE_CHECKING:` ones do not."""
    edges = graph()
    cycles = [cycle_path(edges, c) for c in strongly_connected_components(edges)]
    assert not cycles, "import cycles among fleetserve modules:\n" + "\n".join(cycles)


def test_models_import_nothing_from_the_engine() -> None:
    """Type-checking imports count here: a layer that names the one above it depends on it."""
    wrong = sorted(
        f"{m} -> {t}"
        for m, path in modules().items()
        if m == "fleetserve.models" or m.startswith("fleetserve.models.")
        for t in _imported(m, path, modules(), type_checking=True)
        if t == "fleetserve.engine" or t.startswith("fleetserve.engine.")
    )
    assert not wrong, "models/ sits below engine/ but imports from it:\n" + "\n".join(wrong)


def test_no_empty_packages() -> None:
    """A package holds code: at least one module besides an `__init__.py` with no code."""
    empty = sorted(
        str(init.parent.relative_to(ROOT))
        for init in (ROOT / PACKAGE).rglob("__init__.py")
        if not ast.parse(init.read_text()).body
        and not [p for p in init.parent.iterdir() if p.suffix == ".py" and p != init]
    )
    assert not empty, f"empty packages: {empty}"


def _with_parent_packages(edges: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Add the implicit edges: importing `a.b.c` runs `a` and `a.b` first."""

    def parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))} & modules().keys()

    return {
        m: frozenset({*targets, *parents(m), *(p for t in targets for p in parents(t))} - {m})
        for m, targets in edges.items()
    }


@pytest.mark.parametrize("layer", ["fleetserve.gateway", "fleetserve.bench"])
def test_layer_never_imports_torch(layer: str) -> None:
    edges = _with_parent_packages(graph())
    wrong = []
    for module in sorted(m for m in edges if m == layer or m.startswith(f"{layer}.")):
        for culprit in sorted(m for m in edges if imports_torch(m)):
            path = [module] if module == culprit else path_between(edges, module, culprit)
            if path is not None:
                wrong.append(" -> ".join([*path, "torch"]))
                break
    assert not wrong, f"{layer} must run without torch, but:\n" + "\n".join(wrong)


# The checker itself, on small made-up graphs.


def test_strongly_connected_components_finds_each_cycle_once() -> None:
    edges = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a", "d"}),
        "d": frozenset(),
        "e": frozenset({"f"}),
        "f": frozenset({"e"}),
    }
    components = strongly_connected_components(edges)
    assert components == [["a", "b", "c"], ["e", "f"]]
    assert cycle_path(edges, components[0]) == "a -> b -> c -> a"
    assert strongly_connected_components({"a": frozenset({"b"}), "b": frozenset()}) == []


def test_imports_are_read_as_python_runs_them(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from .sibling import thing\n"
        "from .. import other\n"
        "if TYPE_CHECKING:\n"
        "    import hidden\n"
        "else:\n"
        "    import shown\n"
        "def f():\n"
        "    import torch\n"
    )
    known = {"fleetserve", "fleetserve.pkg", "fleetserve.pkg.mod", "fleetserve.pkg.sibling"}
    found = set(_imported("fleetserve.pkg.mod", source, known))
    assert found == {"typing", "fleetserve.pkg.sibling", "fleetserve", "shown", "torch"}
    assert "hidden" in set(_imported("fleetserve.pkg.mod", source, known, type_checking=True))


def test_the_simulator_does_not_import_the_gateways_asyncio_shell():
    """It runs the pure policies (dispatcher, autoscaler) on a virtual clock; the live
    gateway and the fleet controller are asyncio code it must not depend on."""
    reached = set()
    todo = [m for m in modules() if m.startswith("fleetserve.sim")]
    while todo:
        m = todo.pop()
        if m in reached:
            continue
        reached.add(m)
        todo.extend(graph().get(m, ()))
    assert not reached & {"fleetserve.gateway.gateway", "fleetserve.fleet.controller"}
