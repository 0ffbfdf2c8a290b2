"""The two sides of bundler never import each other (issue 9 §2): the install side is what the
target kit carries, and it must run without the build side's code or dependencies.

Every import statement of every module is read with `ast` (top-level and inside functions),
relative imports resolved, so a lazy `from bundler.build.resolve... import` inside a function is
caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "bundler"

# The layers, top down: a module may import its own layer and those its layer lists.
# cli -> build | install -> bundle -> plumbing; build and install never import each other, and
# nothing imports cli (but the entry point bundler/__main__.py).
LAYERS: dict[str, tuple[str, ...]] = {
    "cli": ("build", "install", "bundle", "plumbing"),
    "build": ("bundle", "plumbing"),
    "install": ("bundle", "plumbing"),
    "bundle": ("plumbing",),
    "plumbing": (),
}
BUILD_SIDE = ("bundler.build",)
INSTALL_SIDE = ("bundler.install",)


def layer_of(module: str) -> str:
    """The layer of a bundler module: its package under bundler/, else plumbing."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("cli", "build", "install", "bundle"):
        return parts[1]
    if parts[:2] == ["bundler", "__main__"]:
        return "cli"
    return "plumbing"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, package: str) -> set[str]:
    """Every module that `source` (a module of `package`) imports, as dotted names
    (`from a import b` gives a and a.b)."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules(prefixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if _is_under(_module_name(p), prefixes))


def _offenders(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in _modules(sources):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = imports_of(path.read_text(encoding="utf-8"), package)
        bad = sorted(n for n in found if _is_under(n, forbidden))
        out += [f"{_module_name(path)} imports {n}" for n in bad]
    return out


def _graph() -> dict[str, set[str]]:
    """Every bundler module -> the bundler modules it imports (top level or lazily)."""
    names = {_module_name(p) for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = imports_of(path.read_text(encoding="utf-8"), package)
        graph[name] = {n for n in found if n in names and n != name and n != "bundler"}
    return graph


def test_the_sides_are_found() -> None:
    """The check looks at real modules (a renamed package would make it pass vacuously)."""
    graph = _graph()
    counts = {layer: sum(layer_of(m) == layer for m in graph) for layer in LAYERS}
    assert counts["install"] > 15 and counts["build"] > 15 and counts["bundle"] > 10
    assert counts["cli"] > 5 and counts["plumbing"] > 5


def test_every_import_runs_down_the_layers() -> None:
    bad = [f"{m} ({layer_of(m)}) imports {n} ({layer_of(n)})"
           for m, deps in sorted(_graph().items()) for n in sorted(deps)
           if layer_of(n) != layer_of(m) and layer_of(n) not in LAYERS[layer_of(m)]]
    assert bad == []


def test_install_side_imports_no_build_side() -> None:
    assert _offenders(INSTALL_SIDE, BUILD_SIDE) == []


def test_build_side_imports_no_install_side() -> None:
    assert _offenders(BUILD_SIDE, INSTALL_SIDE) == []


def test_no_module_imports_itself_through_others() -> None:
    """No cycle of imports, lazy ones included (Tarjan's strongly connected components)."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    src = ("def f():\n    from bundler.build.resolve.images import fetch\n"
           "from ..resolve import npm\nimport bundler.build.builder\n")
    found = imports_of(src, "bundler.install")
    assert {"bundler.build.resolve.images", "bundler.resolve.npm",
            "bundler.build.builder"} <= found
    assert layer_of("bundler.build.resolve.npm") == "build"
    assert layer_of("bundler.proc") == "plumbing" and layer_of("bundler.__main__") == "cli"
