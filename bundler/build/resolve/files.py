"""Plain files and directories from the profile's `files:` list."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from bundler.build.cache import Cache
from bundler.build.profile import FileSpec
from bundler.bundle.manifest import PATH_RE, FileEntry
from bundler.errors import BuildError


@dataclass(frozen=True)
class Collected:
    entries: tuple[FileEntry, ...]
    sources: dict[str, Path]


def _walk(spec: FileSpec) -> list[tuple[str, Path]]:
    if spec.is_glob:
        out: list[tuple[str, Path]] = []
        base = spec.src.parent
        while any(ch in str(base) for ch in "*?["):
            base = base.parent
        for match in sorted(base.glob(str(spec.src.relative_to(base)))):
            if _excluded(spec, match.name, match.name):
                continue
            sub = FileSpec(src=match, dest=f"{spec.dest}/{match.name}", exclude=spec.exclude)
            out += _walk(sub)
        if not out:
            raise BuildError(f"pattern {spec.src} matches no files",
                             hint="check the `files` src pattern in the profile")
        return out
    if spec.src.is_file():
        return [(spec.dest, spec.src)]
    out = []
    for dirpath, dirnames, filenames in os.walk(spec.src):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            rel = (base / name).relative_to(spec.src).as_posix()
            if _excluded(spec, rel, name):
                continue
            out.append((f"{spec.dest}/{rel}", base / name))
        dirnames[:] = [d for d in dirnames
                       if not any(fnmatch.fnmatch(d, pat) for pat in spec.exclude)]
    return out


def _excluded(spec: FileSpec, rel: str, name: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in spec.exclude)


def collect(specs: tuple[FileSpec, ...], cache: Cache) -> Collected:
    entries: list[FileEntry] = []
    sources: dict[str, Path] = {}
    for spec in specs:
        for rel, src in _walk(spec):
            path = f"files/{rel}"
            if not PATH_RE.match(path):
                raise BuildError(f"cannot bundle {src}: its name has characters bundles do not "
                                 "allow", hint="use letters, digits and . _ + = @ , - in names, "
                                 "or exclude it")
            if path in sources:
                raise BuildError(f"two sources map to {path}", hint="give each `files` entry "
                                 "its own dest")
            try:
                sha, size = cache.put_file(src)
            except OSError as exc:
                raise BuildError(f"cannot read {src}: {exc.strerror}") from None
            entries.append(FileEntry(path=path, size=size, sha256=sha, kind="file"))
            sources[path] = cache.path(sha)
    return Collected(tuple(entries), sources)
