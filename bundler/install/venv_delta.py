"""A venv made partly from an installed release's: what to leave out of the clone (the files of
the distributions whose wheel changed or went), and a proof that installing the new wheels
into the rest writes no file the clone shares with that release.

Pure planning over the old venv's record (bundler.install.reuse) and the wheels' own RECORDs:
python_env.provide clones `Plan.keep`, installs `Plan.install` into it and checks the result.
Any doubt (a RECORD that does not match the record, a file two distributions both claim, a
path a new wheel would write that the clone already holds) raises reuse.Doubt: the caller
installs the whole venv from the wheels instead. Why it is safe: docs/design/reuse.md.
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from configparser import ConfigParser
from configparser import Error as ConfigError
from dataclasses import dataclass
from pathlib import Path

from bundler.fsutil import atomic_write_bytes, sha256_file
from bundler.install.reuse import Doubt, Entry, Record

FORMAT = 1
NAME = "venv.dists.json"  # beside venv.record.json, in the release's bundle/ directory
_DIST_INFO = re.compile(r"^([^/]+\.dist-info)/")


@dataclass(frozen=True)
class Dist:
    """A wheel as it was installed: its file name, signed sha256, and its dist-info
    directory in the venv (relative to the venv's top)."""

    wheel: str
    sha256: str
    dist_info: str


@dataclass(frozen=True)
class Dists:
    """Which wheels a recorded venv holds, and what else made it (`base`: the interpreter,
    installer and recipe, not the wheels); valid only with the record whose fingerprint it
    names."""

    fingerprint: str
    base: str
    site: str  # site-packages, relative to the venv's top
    dists: tuple[Dist, ...]

    def to_bytes(self) -> bytes:
        return (json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                            "base": self.base, "site": self.site,
                            "dists": [[d.wheel, d.sha256, d.dist_info] for d in self.dists]},
                           separators=(",", ":")) + "\n").encode()

    @classmethod
    def load(cls, path: Path) -> Dists | None:
        try:
            data = json.loads(path.read_bytes())
            if data["format"] != FORMAT:
                return None
            dists = tuple(Dist(str(w), str(s), str(d)) for w, s, d in data["dists"])
            return cls(str(data["fingerprint"]), str(data["base"]), str(data["site"]), dists)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_bytes(), 0o644)


def describe(rec: Record, wheels: Path, new: Mapping[str, str], base: str) -> Dists | None:
    """The Dists of a venv just made from `new` (wheel file name -> signed sha256, files in
    `wheels`) and recorded as `rec`; None if a wheel's dist-info is not where it should be."""
    dirs = {e.path for e in rec.entries if e.kind == "d"}
    sites = [p for p in dirs if re.fullmatch(r"lib/python[0-9.]+t?/site-packages", p)]
    if len(sites) != 1:
        return None
    dists = []
    for wheel, sha in sorted(new.items()):
        try:
            info = _wheel_dist_info(wheels / wheel)
        except Doubt:
            return None
        if f"{sites[0]}/{info}" not in dirs:
            return None
        dists.append(Dist(wheel, sha, f"{sites[0]}/{info}"))
    return Dists(rec.fingerprint, base, sites[0], tuple(dists))


@dataclass(frozen=True)
class Plan:
    keep: tuple[Entry, ...]         # the old record's entries to clone
    install: tuple[str, ...]        # wheel file names to install into the clone
    installs: tuple[str, ...]       # their dist-info directories (relative to the venv)
    writes: tuple[str, ...]         # every path installing them writes (relative to the venv)
    changes: tuple[str, ...]        # "requests 2.31.0 -> 2.32.3", "+idna 3.7", "-six 1.16.0"
    pruned: int                     # entries of the old record left out


def plan(rec: Record, old: Dists, new: Mapping[str, str], wheels: Path,
         read: Callable[[Entry], bytes]) -> Plan:
    """What to clone of the venv `rec` (holding `old`) and which of `new` (wheel file name ->
    signed sha256, the files in `wheels`) to install into it. `read` returns a recorded file's
    bytes, verified against the record. Doubt if the result could not be proved to be what a
    fresh install of `new` gives without writing a file the clone shares."""
    kept = [d for d in old.dists if new.get(d.wheel) == d.sha256]
    gone = [d for d in old.dists if new.get(d.wheel) != d.sha256]
    if not kept:
        raise Doubt("no distribution in common")
    install = sorted(w for w in new if w not in {d.wheel for d in kept})
    by_path = {e.path: e for e in rec.entries}
    owned = {d.wheel: _installed_files(rec, by_path, d, read) for d in old.dists}
    keep_files = set().union(*(owned[d.wheel] for d in kept))
    drop = set().union(*(owned[d.wheel] for d in gone)) if gone else set()
    both = sorted(drop & keep_files)
    if both:
        raise Doubt(f"{both[0]} belongs to a changed distribution and to an unchanged one")
    drop |= _bytecode_of(rec.entries, drop)
    keep = _without(rec.entries, drop)
    held = {e.path: e.kind for e in keep}
    installs, all_writes = [], []
    for wheel in install:
        sha, _ = sha256_file(wheels / wheel)
        if sha != new[wheel]:
            raise Doubt(f"{wheel} is not the wheel the manifest signs")
        info, writes = wheel_writes(wheels / wheel, old.site)
        for path in writes:
            _refuse_collision(path, held)
        installs.append(info)
        all_writes += writes
    return Plan(tuple(keep), tuple(install), tuple(installs), tuple(all_writes),
                _changes(gone, install),
                len(rec.entries) - len(keep))


def _installed_files(rec: Record, by_path: Mapping[str, Entry], d: Dist,
                     read: Callable[[Entry], bytes]) -> set[str]:
    """Every path (relative to the venv) the dist's installed RECORD lists, plus everything
    in its dist-info directory; each must be a file or link the venv's record lists."""
    entry = by_path.get(f"{d.dist_info}/RECORD")
    if entry is None or entry.kind != "f" or by_path.get(d.dist_info, Entry("", "?", 0)).kind \
            != "d":
        raise Doubt(f"{d.dist_info} has no RECORD in the venv's record")
    site = posixpath.dirname(d.dist_info)
    files = {p for p in by_path if p.startswith(d.dist_info + "/")}
    for name in record_names(read(entry)):
        path = _inside(site, name, d.dist_info)
        e = by_path.get(path)
        if e is None or e.kind not in ("f", "l"):
            raise Doubt(f"{d.dist_info}/RECORD lists {name}, which the venv does not hold")
        files.add(path)
    return files


def record_names(data: bytes) -> list[str]:
    """The paths a RECORD lists (rows of path, hash, size)."""
    try:
        rows = list(csv.reader(data.decode().splitlines()))
    except (UnicodeDecodeError, csv.Error):
        raise Doubt("a RECORD is not valid CSV") from None
    names = []
    for row in rows:
        if not row:
            continue
        if len(row) != 3 or not row[0]:
            raise Doubt(f"a RECORD row is not path,hash,size: {','.join(row)[:80]}")
        names.append(row[0])
    return names


def _inside(site: str, name: str, who: str) -> str:
    """A RECORD path (relative to site-packages) relative to the venv; Doubt if outside."""
    if name.startswith("/") or "\\" in name:
        raise Doubt(f"{who}: RECORD path {name} is not relative")
    path = posixpath.normpath(posixpath.join(site, name))
    if path == ".." or path.startswith("../") or path == ".":
        raise Doubt(f"{who}: RECORD path {name} leaves the venv")
    return path


def _bytecode_of(entries: Iterable[Entry], sources: set[str]) -> set[str]:
    """The bytecode files (`d/__pycache__/m.<tag>.pyc`) of the given sources (`d/m.py`)."""
    out = set()
    for e in entries:
        head, name = posixpath.split(e.path)
        if e.kind == "f" and name.endswith(".pyc") and posixpath.basename(head) == "__pycache__":
            source = posixpath.join(posixpath.dirname(head), name.split(".", 1)[0] + ".py")
            if source in sources:
                out.add(e.path)
    return out


def _without(entries: tuple[Entry, ...], drop: set[str]) -> list[Entry]:
    """The entries but `drop`, and the directories that held only dropped entries (or lie in
    one that did): a fresh install of the new wheels would not have them."""
    alive: set[str] = set()
    touched: set[str] = set()
    for e in entries:
        if e.kind == "d":
            continue
        target = touched if e.path in drop else alive
        head = posixpath.dirname(e.path)
        while head:
            target.add(head)
            head = posixpath.dirname(head)
    keep, gone_dirs = [], set()
    for e in entries:  # parents before children
        if e.path in drop:
            continue
        if e.kind == "d" and e.path != "." and e.path not in alive and (
                e.path in touched or posixpath.dirname(e.path) in gone_dirs):
            gone_dirs.add(e.path)
            continue
        keep.append(e)
    return keep


def wheel_writes(wheel: Path, site: str) -> tuple[str, list[str]]:
    """(its dist-info directory, every path relative to the venv that installing `wheel`
    writes): its RECORD's files (with the .data schemes where installers put them), its
    console and GUI scripts, and the dist-info directory's installer files."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = _dist_info(zf.namelist(), wheel.name)
            record = zf.read(f"{info}/RECORD")
            entry_points = zf.read(f"{info}/entry_points.txt") \
                if f"{info}/entry_points.txt" in zf.namelist() else b""
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise Doubt(f"{wheel.name}: cannot read its RECORD ({exc})") from None
    writes = [f"{site}/{info}"]
    for name in record_names(record):
        writes.append(_scheme_path(site, info, name, wheel.name))
    writes += [f"bin/{s}" for s in _scripts(entry_points, wheel.name)]
    return f"{site}/{info}", writes


def _wheel_dist_info(wheel: Path) -> str:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return _dist_info(zf.namelist(), wheel.name)
    except (OSError, zipfile.BadZipFile) as exc:
        raise Doubt(f"{wheel.name}: {exc}") from None


def _dist_info(names: list[str], wheel: str) -> str:
    found = {m[1] for n in names if (m := _DIST_INFO.match(n))}
    if len(found) != 1:
        raise Doubt(f"{wheel} has {len(found)} .dist-info directories, not one")
    return found.pop()


def _scheme_path(site: str, info: str, name: str, wheel: str) -> str:
    """Where an installer puts a wheel's file: `<dist>.data/<scheme>/...` by scheme."""
    data = info[:-len(".dist-info")] + ".data/"
    if not name.startswith(data):
        return _inside(site, name, wheel)
    scheme, _, rest = name[len(data):].partition("/")
    py = posixpath.basename(posixpath.dirname(site))  # pythonX.Y
    where = {"purelib": site, "platlib": site, "scripts": "bin", "data": ".",
             "headers": f"include/site/{py}/{info[:-len('.dist-info')].split('-')[0]}"}
    if scheme not in where or not rest:
        raise Doubt(f"{wheel}: {name} is in no scheme bundler knows")
    return _inside(where[scheme], rest, wheel) if where[scheme] != "." else \
        _inside(".", rest, wheel)


def _scripts(entry_points: bytes, wheel: str) -> list[str]:
    if not entry_points:
        return []
    parser = ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(entry_points.decode())
    except (ConfigError, UnicodeDecodeError):
        raise Doubt(f"{wheel}: entry_points.txt does not parse") from None
    names = []
    for section in ("console_scripts", "gui_scripts"):
        if parser.has_section(section):
            names += [n.strip() for n in parser.options(section)]
    bad = [n for n in names if not n or "/" in n or n.startswith(".")]
    if bad:
        raise Doubt(f"{wheel}: script name {bad[0]!r} is not a file name")
    return names


def _refuse_collision(path: str, held: Mapping[str, str]) -> None:
    """A path a new wheel writes must not be a file or link the clone holds (it would be
    written through a hard link into the other release), nor lie under one."""
    if held.get(path, "d") != "d":
        raise Doubt(f"{path} would be written by a new wheel and is already in the venv "
                    "(shared with the earlier release)")
    head = posixpath.dirname(path)
    while head:
        if held.get(head, "d") != "d":
            raise Doubt(f"{path} would be written under {head}, which is not a directory")
        head = posixpath.dirname(head)


def _changes(gone: list[Dist], install: list[str]) -> tuple[str, ...]:
    """`name old -> new` for a distribution whose wheel changed; `+name v`, `-name v`."""
    was = {_name_version(d.wheel)[0]: _name_version(d.wheel)[1] for d in gone}
    now = {_name_version(w)[0]: _name_version(w)[1] for w in install}
    out = [f"{n} {was[n]} -> {now[n]}" if n in was and n in now else
           f"+{n} {now[n]}" if n in now else f"-{n} {was[n]}"
           for n in sorted(was.keys() | now.keys())]
    return tuple(out)


def _name_version(wheel: str) -> tuple[str, str]:
    parts = wheel.split("-")
    return (parts[0].lower().replace("-", "_").replace(".", "_"),
            parts[1] if len(parts) > 1 else "?")

