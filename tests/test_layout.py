"""The package tree keeps its shape: no import cycles, and lower layers never import upper ones.

The graph is read with ``ast`` from the source, so an import inside a function
or under ``TYPE_CHECKING`` counts as much as one at the top: a cycle hidden in
a function body is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "proxy"

# Bottom to top. A module may import its own unit (the same subpackage or module) and units of lower
# layers only. ``http`` is an HTTP/1.1 library that happens to live here; ``signing`` is pure.
LAYERS: list[set[str]] = [
    {"proxy.signing", "proxy.http", "proxy.awsenv", "proxy.files"},
    {"proxy.hosts"},  # reads S3 host names with signing's table
    {"proxy.config", "proxy.ca", "proxy.ops.logs", "proxy.ops.workers", "proxy.demo"},
    {"proxy.credentials", "proxy.routing", "proxy.forward", "proxy.ops.metrics", "proxy.cors", "proxy.payload"},
    {"proxy.forwarding"},
    {"proxy.websocket", "proxy.ops.admin"},
    {"proxy.server", "proxy.presign"},
    {"proxy.cli"},
    {"proxy.__main__"},
]
# Edges that the layers alone would allow but the design forbids.
FORBIDDEN_PREFIXES = {
    "proxy.http": ("proxy.",),  # beyond proxy.http itself
    "proxy.signing": ("proxy.",),
    "proxy.awsenv": ("proxy.",),
    "proxy.files": ("proxy.",),
    "proxy.hosts": ("proxy.http", "proxy.awsenv"),  # pure: signing's tables only
    "proxy.ca": ("proxy.http", "proxy.signing", "proxy.awsenv"),  # standalone but for files.replace_file
    "proxy.credentials": ("proxy.http", "proxy.forwarding"),
}

Graph = dict[str, set[str]]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_graph(package: Path = PACKAGE) -> Graph:
    """Every module of the package and the package modules it imports."""
    files = {module_name(path): path for path in package.rglob("*.py")}
    graph: Graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    imported.add(candidate if candidate in files else base)
        graph[name] = {target for target in imported if target in files and target != name}
    return graph


def unit(module: str) -> str:
    """The layer entry a module belongs to: itself, or the subpackage that holds it."""
    for layer in LAYERS:
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return entry
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def layer_of(module: str) -> int:
    entry = unit(module)
    return next(index for index, layer in enumerate(LAYERS) if entry in layer)


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def forbidden_edges(graph: Graph) -> list[str]:
    """Every import that goes up a layer or crosses a forbidden line, as 'a -> b: why'."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if unit(source) == unit(target):
                continue
            if layer_of(target) >= layer_of(source):
                found.append(f"{source} -> {target}: layer {layer_of(source)} imports layer {layer_of(target)}")
            for guarded, prefixes in FORBIDDEN_PREFIXES.items():
                if unit(source) == guarded and target.startswith(prefixes):
                    found.append(f"{source} -> {target}: {guarded} must not import it")
    return found


def test_every_module_has_a_layer() -> None:
    for module in module_graph():
        if module not in ("proxy", "proxy.ops"):  # packages that only hold others (docstring only)
            unit(module)


def test_no_import_cycles() -> None:
    assert find_cycle(module_graph()) is None


def test_no_import_goes_up_or_across_a_forbidden_line() -> None:
    assert forbidden_edges(module_graph()) == []


def test_the_graph_sees_relative_and_nested_imports() -> None:
    graph = module_graph()
    assert "proxy.http.http1" in graph["proxy.http.front"]  # from .http1 import ...
    assert "proxy.config" in graph["proxy.credentials.sts"]  # from ..config import ...
    assert "proxy.credentials.cognito" in graph["proxy.credentials"]  # a package's own __init__
    assert "proxy.server" in graph["proxy.cli"]  # imported inside a function


@pytest.mark.parametrize(
    ("added", "complaint"),
    [
        (("proxy.signing", "proxy.config"), "proxy.signing -> proxy.config"),
        (("proxy.http.front", "proxy.credentials.base"), "proxy.http.front -> proxy.credentials.base"),
        (("proxy.credentials.sts", "proxy.forwarding"), "proxy.credentials.sts -> proxy.forwarding"),
        (("proxy.credentials.aws", "proxy.http.upstream"), "proxy.credentials.aws -> proxy.http.upstream"),
        (("proxy.config", "proxy.routing"), "proxy.config -> proxy.routing"),
        (("proxy.forwarding", "proxy.server"), "proxy.forwarding -> proxy.server"),
    ],
)
def test_an_added_forbidden_edge_is_caught(added: tuple[str, str], complaint: str) -> None:
    graph = module_graph()
    graph[added[0]].add(added[1])
    assert any(line.startswith(complaint) for line in forbidden_edges(graph))


def test_an_added_cycle_is_caught() -> None:
    graph = module_graph()
    graph["proxy.credentials.base"].add("proxy.credentials.cognito")  # cognito imports base
    cycle = find_cycle(graph)
    assert cycle is not None and {"proxy.credentials.base", "proxy.credentials.cognito"} <= set(cycle)


def test_every_subpackage_is_installed() -> None:
    """A non-editable install (the container image) ships every subpackage, not only the ones once listed."""
    import tomllib

    from setuptools import find_packages

    settings = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(PACKAGE.parent), include=settings["include"]))
    on_disk = {module_name(path.parent / "__init__.py") for path in PACKAGE.rglob("__init__.py")}
    assert on_disk <= shipped, on_disk - shipped
