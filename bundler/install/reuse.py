"""A tree an earlier release installed (its venv, a pre-built node_modules), cloned into a new
release instead of installed again, when both were made from the same signed inputs.

Every tree bundler installs gets a record beside it (`Record`, in the release's `bundle/`
directory, 0644): the fingerprint of what made it (derived from the signed manifest: wheel or
payload digests, the interpreter, the installer), the absolute path it was made at, and every
entry (path, type, mode, sha256 or link target, and whether its bytes hold the release's
path). A later release with the same fingerprint clones it (`clone`): each file is re-hashed
against the record as it is read, so a file changed since (tampering, a bad disk, an app that
wrote into its venv) is a doubt, and a doubt means a normal install; what the record does
not list (bytecode an app compiled at run time, caches) is left behind, so the clone holds
exactly what a fresh install holds. Files whose bytes hold the old release's path are given
to the caller to rewrite (see python_env); the rest are hard-linked (or copied where the
filesystem cannot link): a file shared that way and written in place through one release is
found by `shared_doubt` before the other release runs again.
Why, and what was measured: docs/design/reuse.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.fsutil import CHUNK, atomic_write_bytes

FORMAT = 1
# A file whose bytes hold the old path is read whole to be rewritten: bigger ones (none is, in
# a venv: scripts, RECORD, bytecode) make the tree not reusable.
_REWRITE_MAX = 16 * 1024 * 1024


class Doubt(Exception):
    """The earlier tree cannot be proved to be what its record says: install normally."""


@dataclass(frozen=True)
class Entry:
    path: str      # relative to the tree's top, "/"-separated
    kind: str      # "d" directory, "f" regular file, "l" symlink
    mode: int      # permission bits
    value: str = ""         # a file's sha256, a link's target
    holds_path: bool = False  # a file whose bytes hold the release's path

    def to_json(self) -> list[Any]:
        return [self.path, self.kind, self.mode, self.value, int(self.holds_path)]


@dataclass(frozen=True)
class Record:
    fingerprint: str
    top: str                      # where the tree was made (absolute)
    anchor: str                   # the path whose appearance in a file `holds_path` marks
    entries: tuple[Entry, ...]    # parents before children

    def to_bytes(self) -> bytes:
        return (json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                            "top": self.top, "anchor": self.anchor,
                            "entries": [e.to_json() for e in self.entries]},
                           separators=(",", ":")) + "\n").encode()

    @classmethod
    def load(cls, path: Path) -> Record | None:
        """The record at `path`; None if it is missing or not one this bundler writes."""
        try:
            data = json.loads(path.read_bytes())
            if data["format"] != FORMAT:
                return None
            entries = tuple(Entry(str(p), str(k), int(m), str(v), bool(h))
                            for p, k, m, v, h in data["entries"])
            return cls(str(data["fingerprint"]), str(data["top"]), str(data["anchor"]), entries)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_bytes(), 0o644)


def scan(top: Path, fingerprint: str, anchor: str = "") -> Record:
    """The record of the tree at `top` as it is now (just installed). Doubt if it holds
    anything but directories, regular files and symlinks, or a big file with `anchor` in it."""
    needle = anchor.encode() if anchor else b""
    entries = [Entry(".", "d", stat.S_IMODE(os.lstat(top).st_mode))]
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(rel, "l", 0o777, os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, "d", mode))
            elif stat.S_ISREG(st.st_mode):
                digest, found = _hash(path, needle)
                if found and st.st_size > _REWRITE_MAX:
                    raise Doubt(f"{rel} holds the release's path and is too big to rewrite")
                entries.append(Entry(rel, "f", mode, digest, found))
            else:
                raise Doubt(f"{rel} is not a file, directory or symlink")
    return Record(fingerprint, os.path.abspath(top), anchor, tuple(entries))


def _hash(path: str, needle: bytes) -> tuple[str, bool]:
    """(sha256, whether `needle` occurs) in one read."""
    digest = hashlib.sha256()
    found, tail = False, b""
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if needle and not found:
                found = needle in tail + chunk
                tail = chunk[-(len(needle) - 1):] if len(needle) > 1 else b""
    return digest.hexdigest(), found


def shared_doubt(record: Record) -> str | None:
    """What changed, if anything, in a file of this tree that is shared with another
    release's tree (a hard link, `clone`): its bytes or mode no longer the record's, written
    through the other release's name. Files with one link are this tree's alone: not looked
    at (what its own release wrote is its own). None: nothing shared was changed."""
    uid = os.geteuid()
    for e in record.entries:
        if e.kind != "f":
            continue
        path = Path(record.top) / e.path
        try:
            if os.lstat(path).st_nlink < 2:
                continue
            fd = _open(path, e, uid)
        except (OSError, Doubt) as exc:
            return f"{e.path}: {exc}"
        try:
            changed = _fd_sha256(fd) != e.value
        finally:
            os.close(fd)
        if changed:
            return f"{e.path} was written in place through another release's hard link"
    return None


@dataclass(frozen=True)
class Cloned:
    record: Record
    linked: int
    copied: int
    written: int


def read_verified(src: Path, entry: Entry) -> bytes:
    """The bytes of a file the record lists, checked against it (Doubt otherwise)."""
    try:
        fd = os.open(src / entry.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise Doubt(f"{entry.path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        _check_file(os.fstat(fd), entry)
        data = fh.read(_REWRITE_MAX + 1)
    if hashlib.sha256(data).hexdigest() != entry.value:
        raise Doubt(f"{entry.path} is not what the record says (changed since it was installed)")
    return data


def clone(old: Record, dest: Path, fingerprint: str, written: Mapping[str, bytes],
          link: bool, relink: tuple[str, str] | None = None) -> Cloned:
    """Make `dest` (which must not exist) from the tree the record `old` describes: the
    entries in `written` get those bytes, every other file is re-hashed against the record and
    hard-linked (`link`; see `shared_doubt`) or copied. Built in a temporary directory beside
    `dest`, renamed into place when complete and checked; Doubt (nothing left behind) on any
    difference from the record. `relink`: (old, new) prefix of symlink targets to rewrite."""
    src = Path(old.top)
    tmp = dest.parent / f".{dest.name}.cloning"
    if os.path.lexists(tmp):  # a killed attempt's
        remove(tmp)
    os.mkdir(tmp, 0o700)
    try:
        new, counts = _fill(src, tmp, old, written, link, relink)
        _seal_dirs(tmp, new)
        os.rename(tmp, dest)
    except OSError as exc:  # a full disk: the normal install says so, in its own words
        remove(tmp)
        raise Doubt(f"cloning failed: {exc.strerror or exc}") from None
    except BaseException:
        remove(tmp)
        raise
    record = Record(fingerprint, str(dest), _moved(old.anchor, old.top, str(dest)), new)
    try:
        check(dest, record)
    except Doubt:
        remove(dest)
        raise
    return Cloned(record, *counts)


def _moved(anchor: str, old_top: str, new_top: str) -> str:
    """The anchor of the new tree: the same path relative to its top (".." parts included)."""
    if not anchor:
        return ""
    return os.path.normpath(os.path.join(new_top, os.path.relpath(anchor, old_top)))


def _fill(src: Path, tmp: Path, old: Record, written: Mapping[str, bytes], link: bool,
          relink: tuple[str, str] | None) -> tuple[tuple[Entry, ...], tuple[int, int, int]]:
    uid = os.geteuid()
    linked = copied = 0
    out: list[Entry] = []
    src_top, tmp_top = str(src), str(tmp)  # str paths: pathlib costs a third of a clone
    for e in old.entries:
        path, target = os.path.join(src_top, e.path), os.path.join(tmp_top, e.path)
        if e.kind == "d":
            st = _lstat(path)
            # (one others could write could have anything swapped in while it is read)
            if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != e.mode \
                    or st.st_uid != uid or e.mode & 0o022:
                raise Doubt(f"{e.path}/ is not the directory the record says, or others "
                            "can write it")
            if e.path != ".":
                os.mkdir(target, 0o700)  # its mode once everything is in (_seal_dirs)
            out.append(e)
        elif e.kind == "l":
            try:
                now = os.readlink(path)
            except OSError:
                now = None
            if now != e.value:
                raise Doubt(f"{e.path} is not the symlink the record says")
            if relink is not None and now.startswith(relink[0]):
                now = relink[1] + now[len(relink[0]):]
            os.symlink(now, target)
            out.append(Entry(e.path, "l", e.mode, now))
        elif e.path in written:
            data = written[e.path]
            _write(target, data, e.mode)
            out.append(Entry(e.path, "f", e.mode, hashlib.sha256(data).hexdigest(), False))
        else:
            if e.holds_path:
                raise Doubt(f"{e.path} holds the old path and was not rewritten")
            if link and not e.mode & 0o022:
                _link(path, target, e, uid)
                linked += 1
            else:
                _copy(path, target, e, uid)
                copied += 1
            out.append(e)
    return tuple(out), (linked, copied, len(written))


def _lstat(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise Doubt(f"{path}: {exc.strerror}") from None


def _check_file(st: os.stat_result, e: Entry) -> None:
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != e.mode:
        raise Doubt(f"{e.path} is not the file the record says (type or mode)")


def _open(path: str | Path, e: Entry, uid: int) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise Doubt(f"{e.path}: {exc.strerror}") from None
    st = os.fstat(fd)
    try:
        _check_file(st, e)
        if st.st_uid != uid:
            raise Doubt(f"{e.path} is not owned by bundler's account")
    except Doubt:
        os.close(fd)
        raise
    return fd


def _fd_sha256(fd: int) -> str:
    """The sha256 of what `fd` reads from where it stands."""
    digest = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _link(path: str, target: str, e: Entry, uid: int) -> None:
    """Hash the file through a descriptor, then link it: the link must reach that inode."""
    fd = _open(path, e, uid)
    try:
        if _fd_sha256(fd) != e.value:
            raise Doubt(f"{e.path} is not what the record says (changed since it was "
                        "installed)")
        try:
            os.link(path, target, follow_symlinks=False)
        except OSError:  # another filesystem, too many links: a copy is as good
            os.lseek(fd, 0, os.SEEK_SET)
            _copy_fd(fd, target, e)
            return
        if os.lstat(target).st_ino != os.fstat(fd).st_ino:
            raise Doubt(f"{e.path} was replaced while it was being linked")
    finally:
        os.close(fd)


def _copy(path: str, target: str, e: Entry, uid: int) -> None:
    fd = _open(path, e, uid)
    try:
        _copy_fd(fd, target, e)
    finally:
        os.close(fd)


def _copy_fd(fd: int, target: str, e: Entry) -> None:
    """Copy what `fd` reads, hashing exactly the bytes written; the source's mtime kept (a
    .pyc names its source's mtime: a copied source must keep it for the bytecode to count)."""
    st = os.fstat(fd)
    digest = hashlib.sha256()
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
            os.write(out, chunk)
        os.fchmod(out, e.mode)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(out)
    if digest.hexdigest() != e.value:
        raise Doubt(f"{e.path} is not what the record says (changed since it was installed)")


def _write(target: str, data: bytes, mode: int) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
        os.fchmod(out, mode)
    finally:
        os.close(out)


def _seal_dirs(tmp: Path, entries: tuple[Entry, ...]) -> None:
    for e in reversed(entries):  # "." last
        if e.kind == "d":
            os.chmod(tmp / e.path, e.mode)


def check(top: Path, record: Record) -> None:
    """The tree at `top` has exactly the record's entries, types and modes (contents were
    checked as they were written or linked). Doubt otherwise."""
    want = {e.path: e for e in record.entries}
    base = str(top)
    seen = [_kind_ok(base, ".", want)]
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        prefix = "" if rel == "." else rel + "/"
        for name in dirnames + filenames:
            seen.append(_kind_ok(os.path.join(dirpath, name), prefix + name, want))
    if len(seen) != len(want):
        raise Doubt("the clone is missing entries")


def _kind_ok(path: str, rel: str, want: Mapping[str, Entry]) -> str:
    st = os.lstat(path)
    kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) \
        else "f" if stat.S_ISREG(st.st_mode) else "?"
    e = want.get(rel)
    if e is None or e.kind != kind or (kind != "l" and stat.S_IMODE(st.st_mode) != e.mode):
        raise Doubt(f"the clone's {rel} is not what it should be")
    return rel


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        for dirpath, _, _ in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(dirpath, 0o700)
        shutil.rmtree(path)
