"""The two sides of bundler never import each other (issue 9 §2): the install side is what the
target kit carries, and it must run without the build side's code or dependencies.

Every import statement of every module is read with `ast` (top-level and inside functions),
relative imports resolved, so a lazy `from bundler.resolve... import` inside a function is
caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "bundler"
BUILD_SIDE = ("bundler.resolve", "bundler.build", "bundler.lockfile", "bundler.actions",
              "bundler.kit", "bundler.export")
INSTALL_SIDE = ("bundler.install",)


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


def test_the_sides_are_found() -> None:
    """The check looks at real modules (a renamed package would make it pass vacuously)."""
    assert len(_modules(INSTALL_SIDE)) > 15
    assert len(_modules(("bundler.resolve", "bundler.build"))) > 5


def test_install_side_imports_no_build_side() -> None:
    assert _offenders(INSTALL_SIDE, BUILD_SIDE) == []


def test_build_side_imports_no_install_side() -> None:
    assert _offenders(BUILD_SIDE, INSTALL_SIDE) == []


@pytest.mark.parametrize("neutral", ["bundler.imageref", "bundler.imagearchive",
                                     "bundler.npmlock", "bundler.platforms", "bundler.engine",
                                     "bundler.hostneeds", "bundler.kitboot", "bundler.hostreq"])
def test_shared_modules_import_neither_side(neutral: str) -> None:
    assert _offenders((neutral,), BUILD_SIDE + INSTALL_SIDE) == []


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    src = ("def f():\n    from bundler.resolve.images import fetch\n"
           "from ..resolve import npm\nimport bundler.build\n")
    found = imports_of(src, "bundler.install")
    assert {"bundler.resolve.images", "bundler.resolve.npm", "bundler.build"} <= found
