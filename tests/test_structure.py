"""The shape of the package: no import circle, no region marker, a light ``import tollway``.

Import circles. The graph has one node per module of ``python/tollway``
(``.py``, and ``.pyi`` for the compiled ``_core``) and an edge for every
import statement naming another of them, wherever it stands: at the top,
inside a function, or under ``if TYPE_CHECKING:``. TYPE_CHECKING-only edges
count: they cost nothing at run time, but a circle through them is still a
circle for a reader (and the first place where a run-time import gets added
"just for this one function"). ``from a import b`` is an edge to ``a.b``
when that is a module, else to ``a``. Not counted: that importing ``a.b.c``
first runs the ``__init__`` of ``a`` and ``a.b``; with it, every package
whose ``__init__`` imports its own submodules would be a circle.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "tollway"
# Merge scaffolding: a comment opening with four "=" (`BEGIN events wiring`, between bars).
# Spelled out, never written, so that this file does not match itself.
BAR = "=" * 4
MARKER = re.compile(r"(#|//)[ \t]*" + BAR + r"=*[ \t]*[^=\s]")  # a bare rule is fine
MARKER_DIRS = ("python", "tests", "benchmarks", "rust_core")
MARKER_SUFFIXES = {".py", ".pyi", ".rs", ".toml", ".md"}
NOT_SOURCE = {"target", "__pycache__", ".hypothesis", ".pytest_cache"}  # build output, caches

Graph = dict[str, dict[str, str]]  # module -> imported module -> where (line, kind)


def modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.pyi")]):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        found.setdefault(".".join(parts), (path, is_pkg))  # .py before .pyi: sorted
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                inside.update(id(n) for n in ast.walk(stmt))
    return inside


def _imported(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool,
              known: dict[str, tuple[Path, bool]]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        here = name if is_pkg else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            here = here.rpartition(".")[0]
        base = f"{here}.{base}" if base else here
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in known else base


def import_graph(package: Path) -> Graph:
    known = modules(package)
    graph: Graph = {}
    for name, (path, is_pkg) in known.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        checking = _type_checking_nodes(tree)
        edges = graph.setdefault(name, {})
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported(node, name, is_pkg, known):
                while target and target not in known:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    kind = "TYPE_CHECKING" if id(node) in checking else "import"
                    where = f"{path.relative_to(package.parent)}:{node.lineno}"
                    edges.setdefault(target, f"{where} {kind}")
    return graph


def circles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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


def describe(graph: Graph, component: list[str]) -> str:
    return "\n".join(f"  {a} -> {b}  ({graph[a][b]})"
                     for a in component for b in sorted(graph[a]) if b in component)


def test_no_import_circle_in_the_package() -> None:
    graph = import_graph(PACKAGE)
    assert "tollway.gateway" in graph and "tollway._core" in graph  # the walk found them
    found = circles(graph)
    assert not found, "import circles:\n" + "\n\n".join(describe(graph, c) for c in found)


def test_the_check_sees_circles_through_functions_and_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "tollway"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tollway.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tollway import a\n")
    (pkg / "d.py").write_text("import tollway.a\n")  # into the circle, not part of it
    graph = import_graph(pkg)
    assert circles(graph) == [["tollway.a", "tollway.sub.b", "tollway.sub.c"]]
    assert graph["tollway.sub.c"]["tollway.a"].endswith("TYPE_CHECKING")


def _marked_lines() -> Iterator[str]:
    for top in MARKER_DIRS:
        for folder, dirs, files in os.walk(ROOT / top):
            dirs[:] = sorted(d for d in dirs if d not in NOT_SOURCE)
            for file in sorted(files):
                path = Path(folder, file)
                if path.suffix not in MARKER_SUFFIXES:
                    continue
                for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
                    if MARKER.search(line):
                        yield f"{path.relative_to(ROOT)}:{n}: {line.strip()}"


def test_no_region_marker_left() -> None:
    assert MARKER.search(f"    # {BAR} BEGIN events wiring {BAR}")
    assert MARKER.search(f'    "user",  # {BAR} shadow {BAR}')
    assert MARKER.search(f"// {BAR} END limiter + breaker bindings {BAR}")
    assert not any(MARKER.search(line) for line in ("# A heading", f"# {BAR}{BAR}",
                                                    "if a == b: pass"))
    marked = list(_marked_lines())
    assert not marked, "region markers:\n" + "\n".join(marked)


def test_import_tollway_stays_light_and_create_app_still_works() -> None:
    probe = (
        "import json, sys\n"
        "import tollway\n"
        "before = sorted(m for m in ('starlette', 'tollway.app', 'tollway.gateway',"
        " 'nats') if m in sys.modules)\n"
        "from tollway.app import create_app\n"
        "from tollway.inprocess import APIError, Gateway\n"
        "from tollway.middleware.guard import GuardMiddleware\n"
        "print(json.dumps({'before': before, 'same': tollway.create_app is create_app"
        " and tollway.Gateway is Gateway and tollway.APIError is APIError"
        " and tollway.GuardMiddleware is GuardMiddleware,"
        " 'version': tollway.__version__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out) == {"before": [], "same": True, "version": version("tollway")}
    import tollway

    with pytest.raises(AttributeError, match="no_such_name"):
        tollway.no_such_name  # type: ignore[attr-defined]  # noqa: B018
