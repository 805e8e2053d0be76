"""The house plan, checked: no import cycle, dependencies point one way, the core speaks no gRPC.

The graph is read from the source (every import statement, including those inside functions:
a lazy import is still a dependency), so a cycle hidden behind a deferred import fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> import root, as pyproject.toml maps them.
PACKAGES = {"server": "canvaswatch.server", "monitors": "canvaswatch.monitors", "client": "canvaswatch.client",
            "proto/canvaswatch/v1": "canvaswatch.v1"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, root in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([root, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module named by an import in `path` (absolute names; relative imports resolved)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            # `from pkg import module` names a module too.
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


GRAPH = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _closure(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_graph_sees_the_packages():
    assert "canvaswatch.server.pipeline.engine" in MODULES and "canvaswatch.monitors.base" in MODULES
    assert "canvaswatch.monitors.base" in GRAPH["canvaswatch.server.pipeline.session"]


def test_no_import_cycle_anywhere():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package, forbidden", [
    ("canvaswatch.monitors", ("canvaswatch.server", "canvaswatch.v1", "canvaswatch.client", "grpc", "google.protobuf")),
    ("canvaswatch.client", ("canvaswatch.server", "canvaswatch.monitors")),
])
def test_dependencies_point_one_way(package, forbidden):
    wrong = sorted(f"{name} imports {dep}" for name, path in MODULES.items() if name.startswith(package + ".")
                   for dep in _imports(name, path) if dep.startswith(forbidden))
    assert wrong == []


@pytest.mark.parametrize("core", ["canvaswatch.server.pipeline", "canvaswatch.server.bottleneck",
                                  "canvaswatch.server.evaluation"])
def test_the_core_speaks_no_grpc(core):
    """Engine, session, stream handling and the bottleneck (and all they reach) never import grpc."""
    reached = set().union(*(_closure(name) for name in MODULES if name.startswith(core + ".")))
    wrong = sorted(f"{name} imports {dep}" for name in reached for dep in _imports(name, MODULES[name])
                   if dep == "grpc" or dep.startswith("grpc."))
    assert wrong == []
