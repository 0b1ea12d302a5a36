"""The package's shape: no import cycle inside daskdp, read from the source's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daskdp"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``daskdp.a.b`` for ``a/b.py``; a package's ``__init__.py`` is the package's own node."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The daskdp modules ``path`` imports, at any level (functions and TYPE_CHECKING blocks too).

    ``from daskdp.x import y`` names ``daskdp.x.y`` when that is a module, else ``daskdp.x``.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(path, root) for path in files}
    return {module_name(path, root): imported(path, modules, root) for path in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_inside_daskdp():
    graph = import_graph()
    assert "daskdp.engine.loop" in graph and graph["daskdp.engine.loop"], graph
    assert cycles(graph) == [], "modules that import each other: " + "; ".join(
        " <-> ".join(group) for group in cycles(graph)
    )


@pytest.mark.parametrize("where", ["top", "function", "type-checking"])
def test_a_cycle_is_found(tmp_path, where):
    """The check fails on a cycle, whichever kind of import closes it."""
    package = tmp_path / "daskdp"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("import os\n")
    (package / "sub" / "high.py").write_text("from daskdp import low\nfrom . import other\n")
    (package / "sub" / "other.py").write_text("from daskdp.errors import UserError\n")
    closing = {
        "top": "from daskdp.sub.high import x\n",
        "function": "def f():\n    from daskdp.sub import high\n",
        "type-checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import daskdp.sub.high\n",
    }[where]
    graph = import_graph(package)
    assert cycles(graph) == [] and graph["daskdp.sub.high"] == {"daskdp.low", "daskdp.sub.other"}
    (package / "low.py").write_text(closing)
    assert cycles(import_graph(package)) == [["daskdp.low", "daskdp.sub.high"]]


def test_architecture_names_every_module():
    """docs/architecture.md gives each module its one job; a module added or moved is named there."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        shown = path.relative_to(PACKAGE).as_posix()
        assert f"`{shown}`" in text or f"`daskdp/{shown}`" in text, (
            f"docs/architecture.md does not name {shown}"
        )
