"""The import graph of `stages` and `tui`, read from the source with ast: no circles, and the bottom
layer (errors, the raw store, paths, the schema, io, the stage registry, the libraries' quieting, progress lines)
imports nothing above it.

Every import counts, at module level or inside a function (a lazy import hides a circle, it does
not remove it); only `if TYPE_CHECKING:` blocks are left out, as they never run.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "tui")
# the modules everything else builds on; they may import each other, never a module outside this set
BOTTOM = {"stages.errors", "stages.io", "stages.layout", "stages.progress", "stages.quiet", "stages.raw",
          "stages.registry", "stages.schema"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def _runs(tree: ast.AST) -> list[ast.AST]:
    """Every node that can run: the bodies of `if TYPE_CHECKING:` are dropped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    return list(ast.walk(tree))


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports: `from a.b import c` is a.b.c when that is a module, else a.b."""
    found = set()
    for node in _runs(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    found.add(full)
                elif node.module in known:
                    found.add(node.module)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def describe(group: list[str], edges: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} imports {', '.join(sorted(edges[m] & set(group)))}" for m in group)


def test_no_import_circles():
    edges = graph()
    found = cycles(edges)
    assert not found, "import circles (move the shared part down a layer):\n" + "\n".join(
        describe(g, edges) for g in found)


def test_the_bottom_imports_nothing_above_it():
    edges = graph()
    assert BOTTOM <= set(edges), f"bottom modules missing: {sorted(BOTTOM - set(edges))}"
    upward = {m: sorted(edges[m] - BOTTOM) for m in sorted(BOTTOM) if edges[m] - BOTTOM}
    assert not upward, f"the bottom layer imports modules above it: {upward}"


def test_the_checks_see_a_lazy_circle_and_an_upward_import(tmp_path):
    (tmp_path / "tui").mkdir()
    (tmp_path / "stages" / "sources").mkdir(parents=True)
    (tmp_path / "stages" / "sources" / "__init__.py").write_text("def make():\n    from stages import http\n")
    (tmp_path / "stages" / "http.py").write_text("from stages.sources import make\n")
    (tmp_path / "stages" / "errors.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                   "    from stages import http\n")
    (tmp_path / "stages" / "io.py").write_text("import stages.http\n")
    edges = graph(tmp_path)
    assert edges["stages.errors"] == set()  # type-only: never runs
    assert edges["stages.io"] == {"stages.http"}
    assert cycles(edges) == [["stages.http", "stages.sources"]]
