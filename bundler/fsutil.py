"""Filesystem helpers: atomic writes, streaming hashes, free-space checks.

Files and directories are created with explicit modes (`make_dir`, `private_dir`,
`create_file`, `atomic_write`), never with whatever the umask leaves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from bundler.errors import SpaceError

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> tuple[str, int]:
    """Hash a file in constant memory; return (hex digest, size)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def make_dir(path: Path, mode: int, parents_mode: int = 0o755) -> Path:
    """Create directory `path` with exactly `mode` (missing parents: `parents_mode`), whatever
    the umask. An existing directory is left as it is."""
    if path.is_dir():
        return path
    if not path.parent.is_dir():
        make_dir(path.parent, parents_mode, parents_mode)
    try:
        os.mkdir(path, 0o700)  # never wider than asked while it is being set up
    except FileExistsError:
        if not path.is_dir():
            raise
        return path
    os.chmod(path, mode)
    return path


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can use (0700): created so, or tightened."""
    make_dir(path, 0o700)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def create_file(path: Path, mode: int) -> None:
    """Create `path` (if missing) with exactly `mode`, whatever the umask; an existing file is
    narrowed to `mode` if it allows more."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o600)
    except FileExistsError:
        if os.stat(path).st_mode & 0o777 & ~mode:
            os.chmod(path, mode)
        return
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path` and rename it into place only on success.

    A crash or an exception leaves the old file (or no file), never a half-written one.
    """
    make_dir(path.parent, 0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_write(path, mode) as fh:
        fh.write(data)


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` in one rename: readers see the old or the new, never neither."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


# Below this much free space a failure is taken to be the disk's: a service that cannot write
# its pidfile or log fails with its own words, not ENOSPC.
FULL_MARGIN = 4 * 1024 * 1024


def nearly_full(path: Path) -> bool:
    """The filesystem holding `path` has (almost) no free blocks left, counting those reserved
    for root: writes there fail now."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bfree * st.f_frsize < FULL_MARGIN


def require_space(path: Path, needed: int, what: str) -> None:
    available = free_bytes(path)
    if available < needed:
        raise SpaceError(
            f"{what} needs {human_bytes(needed)} on {path} but only "
            f"{human_bytes(available)} is free ({needed} > {available} bytes)",
        )


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
