"""Imports point down, and no two modules import each other (issue 11, DESIGN.md).

An AST walk over server/ and pipelines/ (TYPE_CHECKING imports count: a loop that closes
through one is still a loop). Each module has a layer; a module may import only from its
own layer or below. The layout is being moved into place a step at a time, so what still
breaks the rule today is listed in ``KNOWN_ALL``: the test fails when anything *new* breaks
it, and when something listed is fixed but still listed, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]

# Top to bottom (DESIGN.md): cli/tools -> app -> http -> batches -> serving -> ops ->
# routing -> providers -> wire/media/store -> catalog/job/errors/config -> pipelines.
# A module's layer is the first prefix that matches its dotted name.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (10, ("server.cli", "server.tools")),
    (9, ("server.app",)),
    (8, ("server.http", "server.services")),
    (7, ("server.batches",)),
    (6, ("server.serving",)),
    (5, ("server.ops",)),
    (4, ("server.routing",)),
    (3, ("server.providers",)),
    (2, ("server.wire", "server.media", "server.store")),
    (1, ("server.catalog", "server.job", "server.errors", "server.config", "server.redact",
         "server.retry_after")),
    (0, ("pipelines",)),
]

def layer_of(module: str) -> int:
    if module == "server":  # the package itself: below everything in it
        return 1
    for rank, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for package in ("server", "pipelines"):
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts and path.parent.name == "versions":
                continue  # alembic revisions: loaded by alembic, never imported
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (a package import counts as its
    ``__init__``; ``from pkg import mod`` as ``pkg.mod``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import mod` imports pkg.mod; `from mod import name`, mod.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports_of(m, p, set(found)) for m, p in found.items()}


def upward(g: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in g.items() for b in targets if layer_of(b) > layer_of(a)}


def mutual(g: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Pairs that reach each other (one loop may span many modules): strongly connected
    components by Tarjan's algorithm, reported as (member, member) pairs."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    pairs: set[tuple[str, str]] = set()

    def visit(v: str) -> None:  # recursion depth = module count: small
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                first = min(component)
                pairs.update((first, c) for c in component if c != first)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return pairs


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_pipelines_import_nothing_from_server() -> None:
    g = graph()
    assert not {(a, b) for a, targets in g.items() if a.startswith("pipelines")
                for b in targets if b.startswith("server")}


def test_imports_point_down_and_no_loops_beyond_the_known_ones() -> None:
    g = graph()
    found = {("up", a, b) for a, b in upward(g)} | {("loop", a, b) for a, b in mutual(g)}
    known = {(kind, a, b) for kind, a, b in KNOWN_ALL}
    assert found - known == set(), "new upward imports or import loops"
    assert known - found == set(), "fixed: remove these from KNOWN_ALL"


# ("up", importer, imported) and ("loop", a, b): what is still wrong, from the tree of
# 2026-12-02. One loop today (the ten modules the layers issue names, now with the Batch
# API's parts): every module in it reaches server.http.auth and back, through AppState.
KNOWN_ALL: set[tuple[str, str, str]] = {
}
