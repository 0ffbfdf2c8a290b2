"""A project's `node_modules`, pre-built at build time, as one payload: its format and its
strict extraction.

`pack` writes a deterministic zstd-compressed tar (directories, regular files, relative
symlinks, all under `node_modules/`); `extract` never trusts the archive's own paths. Why, and
the rules: docs/design/bundle-format.md, "Pre-built node_modules".
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from bundler.errors import IntegrityError

ROOT = "node_modules"
TREE_NAME = "node_modules.tar.zst"
# npm's own record of the tree, with the build machine's tarball paths in it; npm rebuilds
# the tree's description from disk without it.
_HIDDEN_LOCK = f"{ROOT}/.package-lock.json"
_LEVEL = 3
_CHUNK = 1024 * 1024


class NotPortable(Exception):
    """The built tree holds something that may not run on another machine."""


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _walk(project: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, path) of node_modules and everything under it, sorted, parents first."""
    stack = [(ROOT, project / ROOT)]
    while stack:
        name, path = stack.pop()
        yield name, path
        if path.is_dir() and not path.is_symlink():
            children = sorted(os.listdir(path), reverse=True)
            stack.extend((f"{name}/{c}", path / c) for c in children)


def pack(project: Path, out: BinaryIO) -> int:
    """Write `project/node_modules` to `out` (zstd tar); returns the number of files.

    Raises NotPortable for what a tree built here must not carry to another machine: native
    addons (`*.node`), ELF executables, and anything but directories, files and symlinks."""
    files = 0
    cctx = zstandard.ZstdCompressor(level=_LEVEL, threads=0)  # one thread: same bytes always
    with cctx.stream_writer(out, closefd=False) as zout, \
            tarfile.open(fileobj=zout, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _walk(project):
            if name == _HIDDEN_LOCK:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                link = os.readlink(path)
                try:
                    _check_link(name, link)
                except IntegrityError as exc:
                    raise NotPortable(exc.message) from None
                tar.addfile(_tarinfo(name, tarfile.SYMTYPE, 0o777, link=link))
            elif stat.S_ISDIR(st.st_mode):
                tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    if name.endswith(".node") or fh.read(4) == b"\x7fELF":
                        raise NotPortable(f"{name} is native code")
                    fh.seek(0)
                    mode = 0o755 if st.st_mode & 0o111 else 0o644
                    tar.addfile(_tarinfo(name, tarfile.REGTYPE, mode, st.st_size), fh)
                files += 1
            else:
                raise NotPortable(f"{name} is not a file, directory or symlink")
    return files


def _check_name(name: str) -> list[str]:
    parts = name.split("/")
    if parts[0] != ROOT or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise IntegrityError(f"the node_modules payload names an unsafe path {name!r}",
                             hint="the bundle was not made by bundler: rebuild it")
    return parts


def _check_link(name: str, link: str) -> None:
    target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
    if link.startswith("/") or "\0" in link or not target.startswith(f"{ROOT}/") \
            or ".." in target.split("/"):
        raise IntegrityError(f"the node_modules payload's symlink {name!r} points outside "
                             f"node_modules ({link!r})",
                             hint="the bundle was not made by bundler: rebuild it")


def extract(payload: Path, sha256: str, size: int, project: Path) -> int:
    """Write the tree into `project/node_modules` (which must not exist); returns the number
    of files. The payload is read once into memory (it is compressed: seed 001's is 2.8 MB)
    and checked against the signed manifest's sha256 and size before a byte is unpacked."""
    with open(payload, "rb") as fh:
        data = fh.read(size + 1)
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"{payload} does not match the manifest",
                             hint="the staged files were changed after verification: install "
                                  "the bundle again")
    links: list[tuple[str, str]] = []
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as zin, \
                tarfile.open(fileobj=zin, mode="r|") as tar:
            files = _unpack(tar, str(project), links)
        for path, link in links:  # last: nothing above was written through one
            os.symlink(link, path)
    except (OSError, tarfile.TarError, zstandard.ZstdError) as exc:
        raise IntegrityError(f"cannot unpack the node_modules payload into {project}: {exc}",
                             hint="the bundle was not made by bundler, or the disk is full"
                             ) from None
    return files


def _unpack(tar: tarfile.TarFile, base: str, links: list[tuple[str, str]]) -> int:
    link_names: set[str] = set()
    files = 0
    for n, member in enumerate(tar):
        parts = _check_name(member.name)
        if n == 0 and not (member.name == ROOT and member.isdir()):
            # node_modules itself first, made here by mkdir (which fails if it exists), so
            # nothing below is written through anything already on disk.
            raise IntegrityError("the node_modules payload does not begin with node_modules/",
                                 hint="the bundle was not made by bundler: rebuild it")
        if any("/".join(parts[:i]) in link_names for i in range(1, len(parts) + 1)):
            raise IntegrityError(f"the node_modules payload puts {member.name!r} under "
                                 "a symlink", hint="the bundle was not made by bundler")
        path = os.path.join(base, *parts)
        if member.isdir():
            os.mkdir(path, 0o755)
        elif member.isreg():
            mode = 0o755 if member.mode & 0o111 else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as out:
                src = tar.extractfile(member)
                assert src is not None
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            files += 1
        elif member.issym():
            _check_link(member.name, member.linkname)
            links.append((path, member.linkname))
            link_names.add(member.name)
        else:
            raise IntegrityError(f"the node_modules payload's {member.name!r} is not a "
                                 "file, directory or symlink",
                                 hint="the bundle was not made by bundler: rebuild it")
    return files
