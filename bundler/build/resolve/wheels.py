"""Python wheels for the target, from a pinned requirements file.

Each pin's wheel is the one `pip download --only-binary=:all:` would take for the target's
Python and platform tags (bundler.build.resolve.pyindex lists the profile's sources and chooses as
pip does), downloaded directly into the cache over the shared HTTP pool, several at once, each
checked against its hashes. No `pip download` process: nothing it does is missing here (host
pip configuration was never used). bundler evaluates markers for the target and checks that
the pinned set is complete (every dependency of every wheel is pinned), so a missing
dependency fails the BUILD rather than the air-gapped install.
"""

from __future__ import annotations

import contextlib
import email.parser
import re
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    NormalizedName,
    canonicalize_name,
)

from bundler import ui
from bundler.build.cache import Cache
from bundler.build.profile import PythonSpec
from bundler.build.resolve import http, pyindex
from bundler.build.resolve import target as tgt
from bundler.bundle.manifest import FileEntry
from bundler.bundle.models import Target
from bundler.errors import BuildError, Problem, ProfileError
from bundler.ui import Log

LOCK_PATH = "python/requirements.lock"
_HARMLESS_OPTIONS = ("--only-binary", "--prefer-binary")
_HASH_RE = re.compile(r"--hash[= ]sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    name: NormalizedName
    version: str
    extras: tuple[str, ...]
    hashes: tuple[str, ...]
    marker: Marker | None
    line: int


@dataclass(frozen=True)
class Fetched:
    entries: tuple[FileEntry, ...]
    lock: FileEntry
    sources: dict[str, Path]  # manifest path -> cached file


def parse_requirements(path: Path) -> list[Pin]:
    """Parse a pinned (`name==version`, optional `--hash`) requirements file, all errors at once."""
    return parse_requirements_text(path.read_text(encoding="utf-8"), path)


def parse_requirements_text(text: str, path: Path) -> list[Pin]:
    problems: list[Problem] = []
    pins: list[Pin] = []
    lines = text.splitlines()
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for no, raw in enumerate(lines, 1):
        text = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not buf:
            start = no
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        buf += text
        if buf.strip():
            logical.append((start, buf.strip()))
        buf = ""
    for no, text in logical:
        hashes = tuple(_HASH_RE.findall(text))
        rest = _HASH_RE.sub("", text).strip()
        if rest.startswith(_HARMLESS_OPTIONS):
            continue  # lock tools echo these; wheels-only is bundler's rule anyway
        if rest.startswith("-"):
            problems.append(Problem(str(path), no, f"option lines are not supported: {rest!r}",
                                    "put index settings under `python:` in the profile"))
            continue
        try:
            req = Requirement(rest)
        except InvalidRequirement as exc:
            problems.append(Problem(str(path), no, f"invalid requirement: {exc}"))
            continue
        specs = list(req.specifier)
        if req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(Problem(str(path), no, f"'{rest}' is not pinned to one version",
                                    "pin every package as name==version (pip-compile does this)"))
            continue
        pins.append(Pin(canonicalize_name(req.name), specs[0].version, tuple(sorted(req.extras)),
                        hashes, req.marker, no))
    seen: dict[str, int] = {}
    for p in pins:
        if p.name in seen and p.marker is None:
            problems.append(Problem(str(path), p.line, f"{p.name} is pinned twice "
                                    f"(also line {seen[p.name]})"))
        seen[p.name] = p.line
    if problems:
        raise ProfileError(problems)
    return pins


def for_target(pins: Sequence[Pin], target: Target) -> list[Pin]:
    env = tgt.marker_env(target)
    return [p for p in pins if p.marker is None or p.marker.evaluate(env)]


@dataclass(frozen=True)
class LockedWheel:
    """One wheel as recorded in bundle.lock: enough to fetch exactly it again, or to find it
    in the cache without asking anyone."""

    name: str
    version: str
    extras: tuple[str, ...]
    file: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "extras": list(self.extras),
                "file": self.file, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LockedWheel:
        return cls(str(d["name"]), str(d["version"]), tuple(d.get("extras", ())),
                   str(d["file"]), str(d["sha256"]), int(d["size"]))


def resolve(spec: PythonSpec, target: Target, cache: Cache, log: Log) -> tuple[LockedWheel, ...]:
    """Lock (if the requirements are loose), download for the target, check, cache."""
    from bundler.build.resolve import pylock

    with _workdir(cache) as work:
        for relock in (False, True):
            attempt = work / ("uv" if relock else "first")
            attempt.mkdir()
            if spec.requirements is not None:
                text, label = spec.requirements.read_text(encoding="utf-8"), spec.requirements
            else:
                text = pylock.compile_requirements(spec, target, attempt, cache.root, log,
                                                   for_target=relock)
                source = spec.requirements_in or spec.pyproject or Path("requirements")
                label = Path(f"{source} (as locked)")
            pins = for_target(parse_requirements_text(text, label), target)
            if not pins:
                return ()
            got = _fetch([_Want(p) for p in pins], spec, target, cache, log)
            try:
                _check_complete(pins, {n: g.path for n, g in got.items()}, target)
                break
            except BuildError as gap:
                if relock or spec.requirements is not None or spec.resolver != "pip-tools":
                    raise
                # pip-compile evaluated markers for this interpreter's exact version; the
                # target is any CPython X.Y.z, taken as X.Y.0 (e.g. redis needs async-timeout
                # before 3.11.3, and Debian 12 ships 3.11.2). uv resolves for exactly that.
                log(f"pip-compile resolved for this host's CPython {sys.version.split()[0]}, "
                    f"and the target (CPython {target.python}.x) needs more: {gap.message}; "
                    "re-locking with uv for the target")
        return tuple(LockedWheel(p.name, p.version, p.extras, got[p.name].file,
                                 got[p.name].sha256, got[p.name].size) for p in pins)


def materialize(locked: Sequence[LockedWheel], spec: PythonSpec, target: Target, cache: Cache,
                log: Log) -> tuple[Fetched, int]:
    """Bundle entries for locked wheels, downloading only those not in the cache.

    Returns the entries and how many wheels had to be fetched (0: no network needed).
    """
    missing = [w for w in locked if not cache.has(w.sha256)]
    if missing:
        # exactly the locked file, its bytes checked against the lock's sha256
        _fetch([_Want(Pin(canonicalize_name(w.name), w.version, w.extras, (w.sha256,), None, 0),
                      w.file, "bundle.lock") for w in missing], spec, target, cache, log)
    entries: list[FileEntry] = []
    sources: dict[str, Path] = {}
    lock_lines = [f"# bundler lock for CPython {target.python} on {target.platform}; "
                  "install with --no-index --require-hashes"]
    for w in locked:
        path = f"python/wheels/{w.file}"
        entries.append(FileEntry(path=path, size=w.size, sha256=w.sha256, kind="wheel"))
        sources[path] = cache.path(w.sha256)
        extras = f"[{','.join(w.extras)}]" if w.extras else ""
        lock_lines.append(f"{w.name}{extras}=={w.version} --hash=sha256:{w.sha256}")
    sha, size = cache.put_bytes(("\n".join(lock_lines) + "\n").encode())
    lock = FileEntry(path=LOCK_PATH, size=size, sha256=sha, kind="lock")
    sources[LOCK_PATH] = cache.path(sha)
    return Fetched(tuple(entries), lock, sources), len(missing)


@contextlib.contextmanager
def _workdir(cache: Cache) -> Iterator[Path]:
    cache.tmp.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wheels-", dir=cache.tmp))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class _Want:
    pin: Pin
    file: str | None = None        # exactly this file (a locked wheel fetched again)
    hashes_from: str = "the requirements' --hash"


@dataclass(frozen=True)
class Got:
    """A pin's wheel, in the cache."""

    file: str
    sha256: str
    size: int
    path: Path


def _fetch(wants: Sequence[_Want], spec: PythonSpec, target: Target, cache: Cache,
           log: Log) -> dict[NormalizedName, Got]:
    """Each pin's wheel for the target, chosen as pip would (pyindex.choose_wheel), streamed
    into the cache (hashed as it is written, checked against the pin's or the index's
    sha256) over the shared HTTP pool, up to http.MAX_PARALLEL at once. Every pin without a
    fitting wheel is named in one error; any other failure stops the rest."""
    workers = max(1, min(http.MAX_PARALLEL, len(wants)))
    log(f"downloading {len(wants)} wheel(s) for CPython {target.python} / {target.platform}"
        + (f" ({workers} in parallel)" if workers > 1 else ""))
    started = time.monotonic()
    listings: dict[NormalizedName, list[pyindex.ProjectFile]] = {}
    got: dict[NormalizedName, Got] = {}
    fetched = [0, 0]  # files, bytes
    lock = threading.Lock()

    def one(want: _Want, progress: ui.Downloads) -> None:
        pin = want.pin
        files = pyindex.project_files(spec, pin.name)
        chosen = pyindex.choose_wheel(files, pin.name, pin.version, target, pin.hashes,
                                      want.file)
        if chosen is None:
            with lock:
                listings[pin.name] = files
            progress.file_done()
            return
        result, downloaded = _into_cache(chosen, want, cache, progress)
        with lock:
            got[pin.name] = result
            if downloaded:
                fetched[0] += 1
                fetched[1] += result.size

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wheels") as pool, \
            ui.downloads("wheels", len(wants)) as progress:
        http.wait_in_order({pool.submit(one, w, progress): i for i, w in enumerate(wants)})
    if listings:
        missing = [w.pin for w in wants if w.pin.name in listings]
        if any(w.file is not None for w in wants if w.pin.name in listings):
            w = next(w for w in wants if w.pin.name in listings)
            raise BuildError(f"{w.file} ({w.pin.name} {w.pin.version}) is not on the "
                             "package index any more",
                             hint="re-lock with `bundle lock`, or restore the file on the index")
        raise _no_wheel_error(missing, spec, target, listings)
    log(f"fetched {fetched[0]} wheel(s), {fetched[1] / 1e6:.1f} MB, in "
        f"{time.monotonic() - started:.1f}s" if fetched[0] else "every wheel was in the cache")
    return got


def _into_cache(f: pyindex.ProjectFile, want: _Want, cache: Cache,
                progress: ui.Downloads) -> tuple[Got, bool]:
    """The file in the cache, verified: against the pin's hashes when it has any (a lock,
    --require-hashes), else against the sha256 the index states (as pip checks a link's)."""
    expected = set(want.pin.hashes) or ({f.sha256} if f.sha256 else set())
    source = want.hashes_from if want.pin.hashes else "the sha256 the index states"
    # The cache holds bytes, not names, and a pin's hashes name every file of its version (one
    # per Python ABI and platform): only the chosen file's own hash may come from the cache,
    # or another target's wheel would stand in for it. Without a stated hash, only a pin that
    # admits one file says which bytes the chosen file must be.
    if f.sha256 and f.sha256 in expected:
        known = [f.sha256]
    else:
        known = list(expected) if not f.sha256 and len(expected) == 1 else []
    for sha in known:
        if cache.has(sha):  # verified when it was stored
            progress.file_done()
            return Got(f.filename, sha, cache.path(sha).stat().st_size, cache.path(sha)), False

    def check(sha: str, size: int) -> None:
        if expected and sha not in expected:
            raise BuildError(f"{f.filename} does not match {source}: {size} bytes from "
                             f"{f.url} hash to sha256 {sha[:16]}..., expected "
                             f"{' or '.join(h[:16] + '...' for h in sorted(expected))}",
                             hint="the index served other bytes than the hashes name: do not "
                                  "ship them; find out why (re-lock only if the change is "
                                  "legitimate)")

    with ui.file_progress(progress, f.filename) as bar:
        if f.is_local:
            path = f.local_path()
            bar.total(path.stat().st_size)
            with open(path, "rb") as fh:
                def read_local(n: int) -> bytes:
                    chunk = fh.read(n)
                    bar.advance(len(chunk))
                    return chunk

                sha, size = cache.put_stream(read_local, check)
        else:
            def into_cache(chunks: Iterator[bytes]) -> tuple[str, int]:
                def read(_n: int) -> bytes:
                    chunk = next(chunks, b"")
                    bar.advance(len(chunk))
                    return chunk

                bar.restart()
                return cache.put_stream(read, check)

            try:
                sha, size = http.stream(f.url, into_cache, on_retry=bar.retrying,
                                        on_length=bar.total)
            except http.NotFound:
                raise BuildError(f"{f.filename} is listed by the index but {f.url} is not "
                                 "found", hint="the index is inconsistent; try again later or "
                                               "use another index") from None
            except http.HttpFailed as exc:
                raise BuildError(f"downloading {f.filename} failed: {exc.message}",
                                 hint="check the network and the index, then run again "
                                      "(finished downloads stay cached)") from None
    return Got(f.filename, sha, size, cache.path(sha)), True


def _no_wheel_error(pins: Sequence[Pin], spec: PythonSpec, target: Target,
                    listings: dict[NormalizedName, list[pyindex.ProjectFile]]) -> BuildError:
    """Name EVERY pin without a fitting wheel, each with its reason."""
    reasons = [pyindex.why_no_wheel(spec, target, p.name, p.version, listings.get(p.name))
               for p in pins]
    return BuildError(
        f"no wheel for CPython {target.python} on {target.platform}: {'; '.join(reasons)}",
        hint="pin versions that publish wheels for the target (sdists are not installable "
             "offline), or change target.python / target.platform",
    )


def _requires(whl: Path) -> list[Requirement]:
    with zipfile.ZipFile(whl) as zf:
        meta = next((n for n in zf.namelist()
                     if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
        if meta is None:
            raise BuildError(f"{whl.name} has no METADATA", hint="the wheel is broken")
        msg = email.parser.BytesParser().parsebytes(zf.read(meta), headersonly=True)
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def _check_complete(pins: Sequence[Pin], wheels: dict[str, Path], target: Target) -> None:
    """Every dependency of every pinned wheel (for the target) must be pinned too."""
    env = tgt.marker_env(target)
    by_name = {p.name: p for p in pins}
    gaps: list[str] = []
    for pin in pins:
        for req in _requires(wheels[pin.name]):
            extras = ("", *pin.extras)
            if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": e}) for e in extras
            ):
                continue
            dep = by_name.get(canonicalize_name(req.name))
            if dep is None:
                gaps.append(f"{pin.name} needs {req.name}{req.specifier or ''}, not pinned")
            elif not req.specifier.contains(dep.version, prereleases=True):
                gaps.append(f"{pin.name} needs {req.name}{req.specifier}, "
                            f"pinned {dep.version}")
    if gaps:
        raise BuildError(
            f"the requirements are incomplete for the target: {'; '.join(gaps)}",
            hint="pin the full dependency closure (pip-compile --generate-hashes writes one)",
        )
