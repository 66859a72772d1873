"""The package's modules import each other downwards only (DESIGN.md, "arrows go down").

An import inside a function is still an arrow: a lazy import that closes a circle hides a
dependency the module table forbids, and breaks as soon as someone hoists it. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import pathlib

import dask_gpuresources

PACKAGE = pathlib.Path(dask_gpuresources.__file__).parent
NAME = "dask_gpuresources"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, at any depth but under ``TYPE_CHECKING``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module and target in modules:
                found.add(target)
            for alias in node.names:  # ``from . import _wire`` names a module
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


# The package root and the public re-export modules sit above everything: they may import
# any module, and nothing below them imports them back.
TOP = {NAME, f"{NAME}.api"}


def test_no_import_cycles():
    graph = {m: deps - TOP for m, deps in import_graph().items()}
    assert _cycles(graph) == [], "modules that import each other (lazily counts too)"


def test_nothing_below_the_top_imports_the_package_root():
    offenders = {
        m: sorted(deps & TOP)
        for m, deps in import_graph().items()
        if m not in TOP and deps & TOP and not m.startswith(f"{NAME}.util")
    }
    assert offenders == {}


def test_scheduler_side_does_not_import_the_worker_stack():
    graph = import_graph()
    for module in ("_placement", "_table", "_overlap"):
        assert f"{NAME}.worker" not in graph[f"{NAME}.{module}"], module


def test_pure_modules_know_nothing_of_dask():
    for module in ("_allocator", "_devices", "_requests", "_wire", "_child"):
        source = (PACKAGE / f"{module}.py").read_text()
        tree = ast.parse(source)
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.level
        }
        assert not names & {"dask", "distributed"}, module
