"""Python wheels for the target, from a pinned requirements file.

pip downloads (isolated from host pip configuration) for the target's Python and platform
tags; bundler itself evaluates markers for the target, checks each wheel's tags, and checks
that the pinned set is complete (every dependency of every wheel is pinned), so a missing
dependency fails the BUILD rather than the air-gapped install.
"""

from __future__ import annotations

import contextlib
import email.parser
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import Version

from bundler import proc, ui
from bundler.cache import Cache
from bundler.errors import BuildError, CommandError, Problem, ProfileError
from bundler.manifest import FileEntry
from bundler.models import Target
from bundler.profile import PythonSpec
from bundler.resolve import target as tgt
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
    from bundler.resolve import pylock

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
            wheels = _download(pins, spec, target, attempt, log)
            try:
                _check_complete(pins, wheels, target)
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
        out = []
        for pin in pins:
            sha, size = cache.put_file(wheels[pin.name])
            out.append(LockedWheel(pin.name, pin.version, pin.extras, wheels[pin.name].name,
                                   sha, size))
        return tuple(out)


def materialize(locked: Sequence[LockedWheel], spec: PythonSpec, target: Target, cache: Cache,
                log: Log) -> tuple[Fetched, int]:
    """Bundle entries for locked wheels, downloading only those not in the cache.

    Returns the entries and how many wheels had to be fetched (0: no network needed).
    """
    missing = [w for w in locked if not cache.has(w.sha256)]
    if missing:
        pins = [Pin(canonicalize_name(w.name), w.version, w.extras, (w.sha256,), None, 0)
                for w in missing]
        with _workdir(cache) as work:
            got = _download(pins, spec, target, work, log)
            for w in missing:
                sha, _size = cache.put_file(got[canonicalize_name(w.name)])
                if sha != w.sha256:
                    raise BuildError(f"{w.file} from the index differs from bundle.lock "
                                     f"({sha[:12]} != {w.sha256[:12]})",
                                     hint="the index served other bytes; investigate before "
                                          "re-locking with `bundle lock`")
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


DOWNLOAD_WORKERS = 4


def _download(pins: Sequence[Pin], spec: PythonSpec, target: Target, work: Path,
              log: Log) -> dict[str, Path]:
    """Download the pins' wheels for the target: several pip processes in parallel (pip
    fetches one file at a time), each with pip's own retries."""
    n = max(1, min(DOWNLOAD_WORKERS, len(pins)))
    groups = [list(pins[i::n]) for i in range(n)]
    log(f"downloading {len(pins)} wheel(s) for CPython {target.python} / {target.platform}"
        + (f" ({n} in parallel)" if n > 1 else ""))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="pip-download") as pool, \
            ui.activity(f"downloading {len(pins)} wheel(s)") as spinner:
        futures = [pool.submit(_pip_download, group, spec, target, work / f"g{i}")
                   for i, group in enumerate(groups)]
        while wait(futures, timeout=0.25).not_done:
            # pip moves each finished file into --dest: count them
            got = sum(1 for i in range(n) for _ in (work / f"g{i}" / "dl").glob("*.whl")
                      ) if ui.live() else 0
            spinner.update(f"{got}/{len(pins)} files")
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        messages = [e.message for e in errors if isinstance(e, CommandError)]
        if any("No matching distribution found" in m for m in messages):
            raise _no_wheel_error(pins, spec, target) from None
        first = errors[0]
        if isinstance(first, CommandError):
            raise BuildError(f"downloading wheels failed: {first.message}") from None
        raise first  # type: ignore[misc]
    out = work / "dl"
    out.mkdir()
    for i in range(n):
        for whl in (work / f"g{i}" / "dl").glob("*"):
            os.replace(whl, out / whl.name)
    found: dict[str, Path] = {}
    supported = tgt.supported_tags(target)
    for whl in sorted(out.glob("*")):
        try:
            name, version, _build, wtags = parse_wheel_filename(whl.name)
        except InvalidWheelFilename:
            raise BuildError(f"pip produced {whl.name}, which is not a wheel",
                             hint="only wheels can be installed offline") from None
        if not wtags & supported:
            raise BuildError(f"{whl.name} does not fit CPython {target.python} on "
                             f"{target.platform}")
        found[name] = whl
        pin = next((p for p in pins if p.name == name), None)
        if pin is None or Version(pin.version) != version:
            raise BuildError(f"pip downloaded {whl.name}, which was not asked for")
    missing_pins = [p.name for p in pins if p.name not in found]
    if missing_pins:
        raise BuildError(f"pip did not download {', '.join(missing_pins)}")
    return found


def _pip_download(pins: Sequence[Pin], spec: PythonSpec, target: Target, work: Path) -> None:
    work.mkdir(parents=True)
    req_file = work / "requirements.txt"
    hashed = all(p.hashes for p in pins)
    req_file.write_text("".join(
        f"{p.name}{'[' + ','.join(p.extras) + ']' if p.extras else ''}=={p.version}"
        + "".join(f" --hash=sha256:{h}" for h in (p.hashes if hashed else ()))
        + "\n" for p in pins))
    args: list[str] = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                       "--only-binary=:all:", "--implementation", "cp",
                       "--python-version", target.python, "--dest", str(work / "dl"),
                       "--retries", "5", "--progress-bar", "off", "-r", str(req_file)]
    for plat in tgt.platforms(target):
        args += ["--platform", plat]
    proc.run([*args, *spec.index_args()], what="pip download", timeout=1800)


def _no_wheel_error(pins: Sequence[Pin], spec: PythonSpec, target: Target) -> BuildError:
    """Name EVERY pin without a fitting wheel, each with its reason (pip stops at the first)."""
    from bundler.resolve import pyindex

    reasons = []
    for pin in pins:
        reason = pyindex.why_no_wheel(spec, target, pin.name, pin.version)
        if "has a fitting wheel" not in reason:
            reasons.append(reason)
    detail = "; ".join(reasons) or "pip found no matching distribution"
    return BuildError(
        f"no wheel for CPython {target.python} on {target.platform}: {detail}",
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
