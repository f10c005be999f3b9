"""Imports point down, no two modules import each other, only http/ knows the web
framework, and every module stays small enough to read (issue 11, DESIGN.md).

An AST walk over server/ and pipelines/ (TYPE_CHECKING imports count: a loop that closes
through one is still a loop). Each module has a layer; a module may import only from its
own layer or below.
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
    (1, ("server.catalog", "server.job", "server.errors", "server.config",
         "server.config_file", "server.config_upstreams", "server.redact",
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


def test_imports_point_down() -> None:
    assert sorted(upward(graph())) == [], "(importer, imported) pairs that import upward"


def test_no_import_loops() -> None:
    assert sorted(mutual(graph())) == [], "modules that reach each other"


def test_the_checks_catch_what_they_are_for() -> None:
    """The walk itself: an upward import and a loop in a made-up graph are found."""
    g = {"server.store.ledger": {"server.http.deps"}, "server.http.deps": set(),
         "server.wire.a": {"server.wire.b"}, "server.wire.b": {"server.wire.c"},
         "server.wire.c": {"server.wire.a"}}
    assert upward(g) == {("server.store.ledger", "server.http.deps")}
    assert mutual(g) == {("server.wire.a", "server.wire.b"), ("server.wire.a", "server.wire.c")}


def test_the_data_path_never_imports_the_observers() -> None:
    """ops/ reads what the data path publishes (app.py wires its hooks); serving and the
    Batch API run the same with or without it."""
    g = graph()
    assert {(a, b) for a, targets in g.items()
            if a.startswith(("server.serving", "server.batches"))
            for b in targets if b.startswith("server.ops")} == set()


WEB_FRAMEWORKS = ("fastapi", "starlette")


def test_only_http_imports_the_web_framework() -> None:
    found = []
    for module, path in modules().items():
        if module.startswith("server.http"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(module, n) for n in names if n.split(".")[0] in WEB_FRAMEWORKS]
    assert found == []


MAX_LINES = 400  # a module is read in one sitting


def test_modules_stay_small() -> None:
    long = {m: n for m, p in modules().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
