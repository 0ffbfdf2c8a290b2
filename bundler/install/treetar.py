"""A directory tree reached only through descriptors, and its PAX tar (bundler.install.datadirs
backs data directories up and restores them with it; why this way: that module's docstring).

- `walk` yields every directory, regular file and symlink under a directory descriptor,
  parents first, names sorted, never following a symlink (`os.fwalk`), each regular file with
  an O_PATH descriptor of the very inode that was checked.
- `tree_digest`: a sha256 over every entry's path, type, mode, owner, size, mtime (ns) and
  symlink target (`Entry.line`): what a restore reproduces exactly.
- `write_tar` streams the tree as a PAX tar (numeric owners, nanosecond mtimes) and returns the
  digest of exactly what it wrote; `archive_digest` reads a tar's digest back.
- `Extract` builds a tree from a tar with its own strict reader, never by the archive's paths:
  each name checked, its parent a directory this extraction made, files `O_EXCL|O_NOFOLLOW`,
  directories' metadata set last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import BinaryIO

from bundler.errors import InstallError
from bundler.fsutil import CHUNK

_TAR_OVERHEAD = 3 * 512  # a member's header and PAX header, at most, for the space estimate


@dataclass(frozen=True)
class Entry:
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


def walk(top: int) -> Iterator[tuple[Entry, int | None]]:
    """Every directory, regular file and symlink under the directory `top` (itself first),
    parents before children, names sorted: each with an O_PATH descriptor for a regular file
    (valid until the next item), else None. Never follows a symlink."""
    yield Entry(".", "d", os.fstat(top), ""), None
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
                yield Entry(prefix + entry, kind, st, link), (fd if kind == "f" else None)
            finally:
                os.close(fd)


def tree_digest(top: int) -> str:
    digest = hashlib.sha256()
    for entry, _ in walk(top):
        digest.update(entry.line())
    return "tree:" + digest.hexdigest()


def estimate(top: int) -> int:
    """Bytes a tar of the tree takes, at most."""
    total = 2 * tarfile.RECORDSIZE
    for entry, _ in walk(top):
        size = entry.st.st_size if entry.kind == "f" else 0
        total += _TAR_OVERHEAD + -(-size // 512) * 512
    return total



class Hashing:
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


def _member(entry: Entry) -> tarfile.TarInfo:
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


def write_tar(top: int, sink: Hashing) -> str:
    """Stream the tree under `top` into `sink` as a PAX tar; return the tree's digest (of
    exactly what was written)."""
    digest = hashlib.sha256()
    with tarfile.open(fileobj=sink, mode="w|",  # type: ignore[call-overload]
                      format=tarfile.PAX_FORMAT) as tar:
        for entry, pfd in walk(top):
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
                entry = Entry(entry.rel, "f", st, "")
                tar.addfile(_member(entry), fh)
                digest.update(entry.line())
    return "tree:" + digest.hexdigest()


def archive_digest(source: Hashing) -> str:
    digest = hashlib.sha256()
    with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            entry = Entry(_member_name(member), _member_kind(member), _stat_of(member),
                           member.linkname if member.issym() else "")
            digest.update(entry.line())
    return "tree:" + digest.hexdigest()


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
class Extract:
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
