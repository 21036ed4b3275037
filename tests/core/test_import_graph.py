"""The package's import graph: no cycles among packmask modules, no private cross-module imports.

Parsed with ``ast`` (nothing is imported). A *private cross-module import* is ``from x import _name``
where ``x`` is another packmask module: what two modules share is public. Module-level and
function-level imports both count, for that rule and for cycles: an import moved into a function
still makes the two modules depend on each other (deferring a heavy *third-party* import is fine,
and not looked at here).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "src"
PACKAGE = ROOT / "packmask"

# The data side of issue 22 removed its cycles (cli/demo -> output -> inputs -> demo, data/packing <->
# data/streaming) and private imports (data/arrow, data/tree, data/preference); nothing is allowed.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str):
    """``(target module, imported name or None, at module level)`` of every packmask import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    # imports inside `if TYPE_CHECKING:` / try blocks at module level are module level too
    for stmt in tree.body:
        if isinstance(stmt, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        at_top = id(node) in top
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "packmask":
                    yield alias.name, None, at_top
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, path.name == "__init__.py")
            if target.split(".")[0] != "packmask":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from . import costs`: the submodule itself
                    yield sub, None, at_top
                else:
                    yield target, alias.name, at_top


def graph() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports(m):
            if target in MODULES and target != m:
                edges[m].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_cycle_and_a_private_import():
    """Control: the checker finds a cycle in a graph that has one, and flags ``from x import _y``."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    node = ast.parse("from ..layout import _as_bool_mask").body[0]
    assert resolve("packmask.backends.flex", node, False) == "packmask.layout"


def test_no_import_cycles():
    edges = graph()
    for a, b in KNOWN_CYCLE_EDGES:
        edges.get(a, set()).discard(b)
    found = cycles(edges)
    assert not found, "import cycles among packmask modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_cross_module_imports():
    found = []
    for m in MODULES:
        for target, name, _ in imports(m):
            if name and name.startswith("_") and not name.startswith("__") and target != m:
                if (m, target, name) not in KNOWN_PRIVATE:
                    found.append(f"{m} imports {target}.{name}")
    assert not found, "private cross-module imports:\n" + "\n".join(found)


@pytest.mark.parametrize("module", ["packmask", "packmask.backends", "packmask.inputs"])
def test_the_graph_reads_the_package(module):
    assert module in MODULES and graph()[module] is not None
