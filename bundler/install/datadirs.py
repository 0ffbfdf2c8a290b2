"""Data directories: where a release keeps its own files (profile `data:`).

Each lives at `<root>/data/<name>/`, outside every release, so upgrades, rollbacks and prunes
never touch it. It is owned by the release's `user` (else root), mode as declared (0750 by
default), and the services find it through `{data:NAME}`. Before an upgrade that migrates
(`backup: migrate`, the default) or before every upgrade (`always`) it is backed up, with the
databases, into `<root>/backups/data-<name>-<time>.tar`, and restored with them when the
upgrade fails or is interrupted.

The account owns what is inside, so everything root does there assumes a hostile tree: a
symlink the account planted (to /etc/shadow, to another product's data) is never followed,
and a file it hard-linked from elsewhere is never handed over.

- `<root>/data/` is root's and not group/world-writable, so only bundler names, creates and
  renames what is directly under it; a data directory is opened `O_NOFOLLOW`.
- Inside, nothing is reached by path: the tree is walked with directory descriptors
  (`os.fwalk`, which checks each directory it enters is the one it listed), every entry is
  opened `O_PATH|O_NOFOLLOW` and acted on through that descriptor (`fchownat(AT_EMPTY_PATH)`
  changes a symlink itself, never its target; a file is read through `/proc/self/fd`).
- Re-owning a tree (the release's `user` changed) changes only what the previous owner owned:
  a hard link to root's file (uid 0) stays root's.
- A backup is a PAX tar of directories, regular files and symlinks (sockets, FIFOs and devices
  are skipped), with numeric owners, modes and nanosecond mtimes, streamed (memory stays flat)
  into a 0600 temp file, read back in full and only then renamed into place; its sha256 and
  the tree's digest are journaled.
- A restore extracts into a fresh root-only directory beside the data directory with its own
  strict reader (never by the archive's paths: each name checked, its parent a directory this
  restore made, files created `O_EXCL|O_NOFOLLOW`), checks the archive's sha256 and the tree's
  digest, and only then swaps it in by rename. What it replaces is deleted (a failed install's
  writes, as for its databases) or, in recovery, kept in `<root>/backups/`.

A tree's digest (what "nothing changed" means) is a sha256 over every entry's path, type,
mode, owner, size, mtime (ns) and symlink target: what a restore reproduces exactly.
Extended attributes and ACLs are not kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

from bundler import ui
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import DataDir
from bundler.errors import InstallError, RecoveryPendingError, SpaceError
from bundler.fsutil import CHUNK, human_bytes, private_dir, require_space
from bundler.install import runas
from bundler.install.layout import Layout

# (step, status, detail): the install journal's record, or recovery's.
Record = Callable[[str, str, str], None]

ABSENT = "absent"  # the digest of a data directory that does not exist
_AT_EMPTY_PATH = 0x1000
_TAR_OVERHEAD = 3 * 512  # a member's header and PAX header, at most, for the space estimate
_LEFTOVER = (".restore-", ".old-")  # bundler's own names under data/ (a NAME never starts ".")


def base(layout: Layout) -> Path:
    return layout.data


def path(layout: Layout, name: str) -> Path:
    return base(layout) / name


def _owner(m: Manifest) -> tuple[int, int]:
    """(uid, gid) a data directory of release `m` belongs to: its `user`'s, else bundler's."""
    user = runas.maybe(m.runtime.user)
    if user is None or not user.switches:
        return os.geteuid(), os.getegid()
    return user.uid, user.gid


# --------------------------------------------------------------------------- <root>/data/

@contextlib.contextmanager
def _base_fd(layout: Layout, create: bool = True) -> Iterator[int | None]:
    """`<root>/data/` opened as a directory: root's, not group/world-writable, not a symlink
    (InstallError otherwise). None when it does not exist and `create` is false."""
    where = base(layout)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(where, 0o700)
            os.chmod(where, 0o755)  # the account must reach its own directory below
    try:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise
        yield None
        return
    except OSError as exc:
        raise InstallError(f"{where} is not a directory ({exc.strerror})",
                           hint="it must be a plain directory owned by root; move it away"
                           ) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise InstallError(f"{where} is owned by uid {st.st_uid}, mode "
                               f"{stat.S_IMODE(st.st_mode):04o}: only root may create or "
                               "rename what is in it",
                               hint=f"chown root:root {where} && chmod 0755 {where}")
        yield fd
    finally:
        os.close(fd)


def _open_dir(name: str, dir_fd: int) -> int:
    """The data directory `name` under data/, never through a symlink (InstallError)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except (NotADirectoryError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise InstallError(f"data directory {name} is not a directory ({exc.strerror})",
                           hint="it must be a plain directory, never a symlink: move it away "
                                "and install again") from None


def _remove_leftovers(dir_fd: int, layout: Layout) -> None:
    """A restore interrupted before its swap leaves `.restore-*` / `.old-*`: the backup is still
    there and the restore runs again, so they go."""
    for entry in os.listdir(dir_fd):
        if entry.startswith(_LEFTOVER):
            shutil.rmtree(base(layout) / entry, ignore_errors=True)  # never follows symlinks


def check(layout: Layout, m: Manifest) -> None:
    """Refuse, before an install creates anything, data directories it could not use: `data/`
    or one of them a symlink or not a directory, `data/` not root's (InstallError)."""
    if not m.runtime.data:
        return
    with _base_fd(layout, create=False) as dfd:
        if dfd is None:
            return
        for spec in m.runtime.data:
            with contextlib.suppress(FileNotFoundError):
                os.close(_open_dir(spec.name, dfd))


def prepare(layout: Layout, m: Manifest) -> None:
    """Every data directory of release `m` exists, is owned by its `user` (else root) and has
    its declared mode; a tree whose owner changed is re-owned (see `_reown`). Never removes
    anything in it."""
    if not m.runtime.data:
        return
    uid, gid = _owner(m)
    with _base_fd(layout) as dfd:
        assert dfd is not None
        _remove_leftovers(dfd, layout)
        for spec in m.runtime.data:
            try:
                fd = _open_dir(spec.name, dfd)
            except FileNotFoundError:
                os.mkdir(spec.name, 0o700, dir_fd=dfd)
                fd = _open_dir(spec.name, dfd)
                os.fchown(fd, uid, gid)
                ui.note(f"data directory {spec.name} created: {path(layout, spec.name)}")
            try:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    _reown(fd, spec.name, st.st_uid, uid, gid)
                if stat.S_IMODE(os.fstat(fd).st_mode) != spec.mode:
                    os.fchmod(fd, spec.mode)
            finally:
                os.close(fd)


def _fchown(fd: int, uid: int, gid: int) -> None:
    """chown what an O_PATH descriptor refers to (a symlink itself, never its target)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fchownat(fd, b"", uid, gid, _AT_EMPTY_PATH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _reown(top: int, name: str, old_uid: int, uid: int, gid: int) -> None:
    """Hand the tree under `top` from `old_uid` to uid:gid. Only entries `old_uid` owns change:
    whatever else is in there (a hard link to root's file, another account's file) is left as
    it is and counted. The kernel clears set-id bits on a chown."""
    changed = kept = 0
    os.fchown(top, uid, gid)
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top,
                                                         follow_symlinks=False):
        for entry in dirnames + filenames:
            try:
                fd = os.open(entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_uid == old_uid:
                    _fchown(fd, uid, gid)
                    changed += 1
                else:
                    kept += 1
            finally:
                os.close(fd)
    ui.note(f"data directory {name}: owner uid {old_uid} -> {uid}, {changed} entries re-owned"
            + (f", {kept} not owned by uid {old_uid} left as they were" if kept else ""))


# --------------------------------------------------------------------------- walking a tree

@dataclass(frozen=True)
class _Entry:
    rel: str    # "." for the data directory itself, else "a/b"
    kind: str   # "d", "f" or "l"
    st: os.stat_result
    link: str   # a symlink's target

    def line(self) -> bytes:
        """What the tree's digest covers of this entry (see the module docstring)."""
        size = self.st.st_size if self.kind == "f" else 0
        head = (f"{self.kind} {stat.S_IMODE(self.st.st_mode):o} {self.st.st_uid} "
                f"{self.st.st_gid} {size} {self.st.st_mtime_ns} ")
        return head.encode() + os.fsencode(self.rel) + b"\0" + os.fsencode(self.link) + b"\n"


_KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l"}


def _walk(top: int) -> Iterator[tuple[_Entry, int | None]]:
    """Every directory, regular file and symlink under the directory `top` (itself first),
    parents before children, names sorted: each with an O_PATH descriptor for a regular file
    (valid until the next item), else None. Never follows a symlink."""
    yield _Entry(".", "d", os.fstat(top), ""), None
    for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top,
                                                        follow_symlinks=False):
        dirnames.sort()
        prefix = "" if dirpath == "." else dirpath[2:] + "/"
        for entry in sorted(dirnames + filenames):
            try:
                fd = os.open(entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            except FileNotFoundError:
                continue
            try:
                st = os.fstat(fd)
                kind = _KINDS.get(stat.S_IFMT(st.st_mode))
                if kind is None:
                    continue  # a socket, FIFO or device: nothing a restore could bring back
                link = os.readlink(entry, dir_fd=dirfd) if kind == "l" else ""
                yield _Entry(prefix + entry, kind, st, link), (fd if kind == "f" else None)
            finally:
                os.close(fd)


def tree_digest(top: int) -> str:
    digest = hashlib.sha256()
    for entry, _ in _walk(top):
        digest.update(entry.line())
    return "tree:" + digest.hexdigest()


def fingerprint(layout: Layout, name: str) -> str:
    """The digest of data directory `name` now (ABSENT when it does not exist)."""
    with _base_fd(layout, create=False) as dfd:
        if dfd is None:
            return ABSENT
        try:
            fd = _open_dir(name, dfd)
        except FileNotFoundError:
            return ABSENT
        try:
            return tree_digest(fd)
        finally:
            os.close(fd)


def _estimate(top: int) -> int:
    """Bytes a tar of the tree takes, at most."""
    total = 2 * tarfile.RECORDSIZE
    for entry, _ in _walk(top):
        size = entry.st.st_size if entry.kind == "f" else 0
        total += _TAR_OVERHEAD + -(-size // 512) * 512
    return total


# --------------------------------------------------------------------------- backup

@dataclass(frozen=True)
class DataBackup:
    """A data directory's backup, as journaled: the tar, its size and sha256, and the digest
    of the tree it holds."""

    name: str
    path: Path
    size: int
    sha256: str
    created: str
    digest: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "path": str(self.path), "size": self.size,
                "sha256": self.sha256, "created": self.created, "digest": self.digest}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DataBackup:
        return cls(str(data["name"]), Path(str(data["path"])), int(data["size"]),
                   str(data["sha256"]), str(data["created"]), str(data["digest"]))


def due(m: Manifest, migrating: bool) -> tuple[DataDir, ...]:
    """The data directories an install of `m` backs up."""
    return tuple(d for d in m.runtime.data
                 if d.backup == "always" or (d.backup == "migrate" and migrating))


def space_needed(layout: Layout, m: Manifest) -> int:
    """Bytes the backups of `m`'s data directories may take (for the up-front space check:
    those backed up before a migration count when `m` has migrations)."""
    total = 0
    with _base_fd(layout, create=False) as dfd:
        if dfd is None:
            return 0
        for spec in due(m, bool(m.runtime.migrations)):
            try:
                fd = _open_dir(spec.name, dfd)
            except FileNotFoundError:
                continue
            try:
                total += _estimate(fd)
            finally:
                os.close(fd)
    return total


class _Hashing:
    """A file wrapper that hashes and counts every byte written through it or read from it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _ns_text(ns: int) -> str:
    """Nanoseconds as PAX writes a time: seconds with nine decimals (exact, unlike a float)."""
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _member(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.rel)
    info.type = {"d": tarfile.DIRTYPE, "f": tarfile.REGTYPE, "l": tarfile.SYMTYPE}[entry.kind]
    info.mode = stat.S_IMODE(entry.st.st_mode)
    info.uid, info.gid = entry.st.st_uid, entry.st.st_gid
    info.uname = info.gname = ""  # numeric owners only: the same host restores it
    info.size = entry.st.st_size if entry.kind == "f" else 0
    info.linkname = entry.link
    info.mtime = entry.st.st_mtime_ns // 1_000_000_000
    info.pax_headers = {"mtime": _ns_text(entry.st.st_mtime_ns)}
    return info


def _write_tar(top: int, sink: _Hashing) -> str:
    """Stream the tree under `top` into `sink` as a PAX tar; return the tree's digest (of
    exactly what was written)."""
    digest = hashlib.sha256()
    with tarfile.open(fileobj=sink, mode="w|",  # type: ignore[call-overload]
                      format=tarfile.PAX_FORMAT) as tar:
        for entry, pfd in _walk(top):
            if pfd is None:
                tar.addfile(_member(entry))
                digest.update(entry.line())
                continue
            # Read through the O_PATH descriptor: the very inode that was checked.
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    continue
                entry = _Entry(entry.rel, "f", st, "")
                tar.addfile(_member(entry), fh)
                digest.update(entry.line())
    return "tree:" + digest.hexdigest()


def _backup_name(dest: Path, name: str, when: datetime) -> Path:
    stem = f"data-{name}-{when.strftime('%Y%m%dT%H%M%SZ')}"
    found, n = dest / f"{stem}.tar", 1
    while found.exists():
        found, n = dest / f"{stem}-{n}.tar", n + 1
    return found


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SpaceError(f"{what}: the disk is full") from None
        raise InstallError(f"{what} failed: {exc.strerror or exc}",
                           hint="stop whatever still writes to the data directory, or check "
                                "the disk, and run the command again") from None
    except tarfile.TarError as exc:
        raise InstallError(f"{what} failed: {exc}",
                           hint="stop whatever still writes to the data directory and run "
                                "the command again") from None


def backup(layout: Layout, spec: DataDir) -> DataBackup:
    """Back data directory `spec` up into a new tar in `<root>/backups/`: complete and read
    back, or absent."""
    dest = private_dir(layout.backups)  # 0700: the account's files are in there
    when = datetime.now(UTC)
    final = _backup_name(dest, spec.name, when)
    tmp = dest / f".{final.name}.tmp"
    what = f"backing up the data directory {spec.name}"
    with _base_fd(layout) as dfd, _disk_errors(what):
        assert dfd is not None
        top = _open_dir(spec.name, dfd)
        try:
            require_space(dest, _estimate(top), what)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    os.fchmod(fh.fileno(), 0o600)
                    sink = _Hashing(fh)
                    digest = _write_tar(top, sink)
                    fh.flush()
                    os.fsync(fh.fileno())
                _read_back(tmp, sink.sha.hexdigest(), digest)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
        finally:
            os.close(top)
        _fsync_dir(dest)
    ui.note(f"backup of the data directory {spec.name}: {final.name}, "
            f"{human_bytes(sink.size)}")
    return DataBackup(spec.name, final, sink.size, sink.sha.hexdigest(),
                      when.strftime("%Y-%m-%dT%H:%M:%SZ"), digest)


def _read_back(tar_path: Path, sha256: str, digest: str) -> None:
    """The written tar, read in full: the bytes that were written, holding that tree."""
    with open(tar_path, "rb") as fh:
        source = _Hashing(fh)
        found = _archive_digest(source)
        source.drain()
    if source.sha.hexdigest() != sha256 or found != digest:
        raise InstallError(f"the backup {tar_path.name} did not read back as written",
                           hint="check the disk holding <root>/backups/")


def _archive_digest(source: _Hashing) -> str:
    digest = hashlib.sha256()
    with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            entry = _Entry(_member_name(member), _member_kind(member), _stat_of(member),
                           member.linkname if member.issym() else "")
            digest.update(entry.line())
    return "tree:" + digest.hexdigest()


def _fsync_dir(where: Path) -> None:
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- restore

def _member_name(member: tarfile.TarInfo) -> str:
    """The member's name, checked: "." or components that are none of "", ".", "..", no NUL;
    InstallError otherwise."""
    name = member.name.rstrip("/") if member.isdir() else member.name
    name = name or "."
    if name != "." and ("\0" in name or name.startswith("/") or any(
            part in ("", ".", "..") for part in name.split("/"))):
        raise InstallError(f"data backup member {name!r} is not a plain relative path",
                           hint="the backup is not one bundler wrote; restore by hand")
    return name


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "d"
    if member.isreg():
        return "f"
    if member.issym():
        return "l"
    raise InstallError(f"data backup member {member.name!r} is not a directory, file or "
                       "symlink", hint="the backup is not one bundler wrote; restore by hand")


def _mtime_ns(member: tarfile.TarInfo) -> int:
    exact = member.pax_headers.get("mtime")
    return int(Decimal(exact) * 1_000_000_000) if exact else int(member.mtime) * 1_000_000_000


def _stat_of(member: tarfile.TarInfo) -> os.stat_result:
    """The metadata the digest covers, from a member (the other fields are zero)."""
    kind = {"d": stat.S_IFDIR, "f": stat.S_IFREG, "l": stat.S_IFLNK}[_member_kind(member)]
    ns = _mtime_ns(member)
    fields = [kind | member.mode, 0, 0, 0, member.uid, member.gid, member.size, 0,
              ns // 1_000_000_000, 0]
    return os.stat_result(fields, {"st_mtime_ns": ns})


@dataclass
class _Extract:
    """One restore's extraction into the private directory `fd` (root's, 0700)."""

    fd: int
    dirs: dict[str, tarfile.TarInfo]  # created so far; their metadata is set last

    def member(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        name = _member_name(member)
        kind = _member_kind(member)
        if name == ".":
            if kind != "d" or self.dirs:
                raise InstallError("data backup: '.' is not its first directory",
                                   hint="the backup is not one bundler wrote")
            self.dirs["."] = member
            return
        parent = name.rpartition("/")[0] or "."
        if parent not in self.dirs:  # never below a symlink or a file, nor out of order
            raise InstallError(f"data backup member {name!r} comes before its directory",
                               hint="the backup is not one bundler wrote; restore by hand")
        ns = _mtime_ns(member)
        if kind == "d":
            os.mkdir(name, 0o700, dir_fd=self.fd)
            self.dirs[name] = member
        elif kind == "l":
            os.symlink(member.linkname, name, dir_fd=self.fd)
            os.chown(name, member.uid, member.gid, dir_fd=self.fd, follow_symlinks=False)
            os.utime(name, ns=(ns, ns), dir_fd=self.fd, follow_symlinks=False)
        else:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
            with os.fdopen(out, "wb") as fh:
                data = tar.extractfile(member)
                assert data is not None
                shutil.copyfileobj(data, fh, CHUNK)
                fh.flush()
                os.fchown(fh.fileno(), member.uid, member.gid)
                os.fchmod(fh.fileno(), member.mode)  # after the chown, which clears set-id
                os.utime(fh.fileno(), ns=(ns, ns))

    def finish(self) -> None:
        """Directories last (creating their entries changed their mtimes), the top last of
        all: only then can the account reach the new tree."""
        if "." not in self.dirs:
            raise InstallError("data backup holds no directory",
                               hint="the backup is not one bundler wrote; restore by hand")
        for name, member in sorted(self.dirs.items(), key=lambda x: x[0] == "."):
            ns = _mtime_ns(member)
            os.chown(name, member.uid, member.gid, dir_fd=self.fd, follow_symlinks=False)
            os.chmod(name, member.mode, dir_fd=self.fd)
            os.utime(name, ns=(ns, ns), dir_fd=self.fd, follow_symlinks=False)


def restore(layout: Layout, made: DataBackup, keep_in: Path | None = None) -> Path | None:
    """Put data directory `made.name` back exactly as `made` holds it. What it replaces is
    deleted, or with `keep_in` moved there first (returned). All or nothing: the tree is
    built aside and checked (the archive's sha256, the tree's digest) before the swap."""
    what = f"restoring the data directory {made.name}"
    require_space(base(layout), made.size, what)
    with _base_fd(layout) as dfd, _disk_errors(what):
        assert dfd is not None
        _remove_leftovers(dfd, layout)
        staging = Path(tempfile.mkdtemp(prefix=f".restore-{made.name}-", dir=base(layout)))
        try:
            _extract_into(made, staging)
            old = _swap(dfd, layout, made.name, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if old is None:
        return None
    if keep_in is None:
        shutil.rmtree(old, ignore_errors=True)
        return None
    kept = private_dir(keep_in) / f"data-{made.name}-replaced-" \
        f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    shutil.move(old, kept)
    return kept


def _extract_into(made: DataBackup, staging: Path) -> None:
    sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with open(made.path, "rb") as fh:
            source = _Hashing(fh)
            job = _Extract(sfd, {})
            with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    job.member(member, tar)
            source.drain()
            job.finish()
        if (source.sha.hexdigest(), source.size) != (made.sha256, made.size):
            raise InstallError(
                f"data backup {made.path} is missing or changed since it was taken (expected "
                f"{made.size} bytes, sha256 {made.sha256[:16]}…)",
                hint=f"the data directory {made.name} was NOT restored; restore it by hand "
                     "from another copy")
        got = tree_digest(sfd)
        if got != made.digest:
            raise InstallError(f"the data directory {made.name} restored from {made.path.name}"
                               " differs from what was backed up",
                               hint="it was NOT swapped in; check the disk and restore again")
    except FileNotFoundError as exc:
        if exc.filename != str(made.path):
            raise
        raise InstallError(f"data backup {made.path} is missing",
                           hint=f"the data directory {made.name} was NOT restored; restore "
                                "it by hand from another copy") from None
    finally:
        os.close(sfd)


def _swap(dfd: int, layout: Layout, name: str, staging: Path) -> Path | None:
    """The restored tree `staging` becomes data/<name>; the one it replaces (if any) is
    renamed aside and returned. A crash in between leaves the backup to restore again."""
    aside = base(layout) / f".old-{name}-{staging.name.rsplit('-', 1)[-1]}"
    try:
        os.rename(name, aside.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        old: Path | None = aside
    except FileNotFoundError:
        old = None
    os.rename(staging.name, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)
    return old


# --------------------------------------------------------------------------- install's undo

def restore_taken(layout: Layout, taken: Sequence[DataBackup], record: Record,
                  done: set[str]) -> None:
    """A failed install's undo: every data directory backed up by this attempt is put back,
    unless it is unchanged; its writes are discarded, as its databases' are."""
    for made in taken:
        if fingerprint(layout, made.name) == made.digest:
            record("restore-data", f"done:{made.name}", "unchanged since its backup")
        else:
            ui.step(f"Restoring the data directory {made.name} from {made.path.name}")
            restore(layout, made)
            record("restore-data", f"done:{made.name}", made.path.name)
        done.add(made.name)


def record_left(layout: Layout, taken: Sequence[DataBackup], done: set[str],
                record: Record) -> None:
    """The undo failed: what each data directory it did not restore looks like now, so a later
    recovery can tell whether anything wrote to it since. Best effort."""
    for made in taken:
        if made.name not in done:
            with contextlib.suppress(Exception):
                record("data-state", f"after-failed-rollback:{made.name}",
                       fingerprint(layout, made.name))


# --------------------------------------------------------------------------- recovery

@dataclass(frozen=True)
class PendingData:
    """A data directory's backup an interrupted install must still restore, with its digest as
    that attempt's failed rollback left it (None: not recorded, e.g. after a kill -9)."""

    backup: DataBackup
    after: str | None

    def to_json(self) -> dict[str, object]:
        return self.backup.to_json()


def pending_restores(events: Sequence[tuple[str, str, str, str]]) -> tuple[PendingData, ...]:
    """From one install transaction's journal (ts, step, status, detail): each data directory
    it backed up whose restore neither completed nor was declined."""
    done = {(step, status) for _, step, status, _ in events}
    if ("restore", "skipped") in done:
        return ()
    latest: dict[str, DataBackup] = {}
    after: dict[str, str] = {}
    for _, step, status, detail in events:
        if (step, status) == ("data-backup", "file"):
            made = DataBackup.from_json(json.loads(detail))
            latest[made.name] = made
        elif step == "data-state" and status.startswith("after-failed-rollback:"):
            after[status.partition(":")[2]] = detail
    return tuple(PendingData(made, after.get(name)) for name, made in latest.items()
                 if not done & {("restore-data", f"done:{name}"),
                                ("restore-data", f"skipped:{name}")})


@dataclass(frozen=True)
class Plan:
    backup: DataBackup
    changed: bool  # False: the tree equals its backup, nothing to restore


def plan_restores(layout: Layout, pend: Sequence[PendingData], db_choice: str | None,
                  what: str, running: Callable[[], list[str]]) -> list[Plan]:
    """The pending restores that may run: RecoveryPendingError, before anything is touched, if
    one would discard writes made after the interrupted attempt and the operator has not
    chosen (`--restore-db` / `--keep-db` settle the data directories with the databases)."""
    if db_choice == "keep":
        return []
    plans = []
    for pd in pend:
        now = fingerprint(layout, pd.backup.name)
        if now == pd.backup.digest:
            plans.append(Plan(pd.backup, False))
            continue
        if pd.after is not None:
            later = "it was written to since the failed rollback" if now != pd.after else ""
        else:
            names = running()
            later = (f"{', '.join(names)} ran since the interruption and may have written to "
                     "it" if names else "")
        if later and db_choice != "restore":
            raise RecoveryPendingError(
                f"{what}; the data directory {pd.backup.name}: {later}, and restoring its "
                f"backup would discard every change made since {pd.backup.created}; nothing "
                "was changed")
        plans.append(Plan(pd.backup, True))
    return plans


def run_restores(layout: Layout, plans: Sequence[Plan], record: Record) -> None:
    """Recovery's restores: what each replaces is kept in `<root>/backups/`."""
    for plan in plans:
        made = plan.backup
        if not plan.changed:
            record("restore-data", f"done:{made.name}", "unchanged since its backup")
            continue
        ui.step(f"Restoring the data directory {made.name} from {made.path.name}")
        kept = restore(layout, made, keep_in=layout.backups)
        if kept is not None:
            ui.note(f"its contents as they were are kept in {kept}")
            record("restore-data", f"saved:{made.name}", str(kept))
        record("restore-data", f"done:{made.name}", made.path.name)


def skip_restores(pend: Sequence[PendingData], record: Record) -> None:
    for pd in pend:
        record("restore-data", f"skipped:{pd.backup.name}", "kept as it is (--keep-db)")
