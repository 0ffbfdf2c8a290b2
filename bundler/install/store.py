"""The content store under an install root: one copy of each artifact the kept releases hold
(wheels, npm tarballs and pre-built trees, carried runtimes, files), named by its sha256 and
hard-linked into the release directories (docs/delta.md).

    <root>/store/            0700, like state/
      sha256/<digest>        0444, one object per artifact; `.tmp-*` while being added

The store is checked, never trusted: an object is re-hashed each time it is used (linked
into a release, reused by an install, listed in a receipt). Images are not kept here: the
engine holds them. Objects go when no release directory left under the root names them
(`collect`: after a failed install's undo, and after pruning).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bundler.bundle.manifest import SHA256_RE, FileEntry, Manifest
from bundler.errors import BundlerError, DeltaError
from bundler.fsutil import CHUNK, private_dir
from bundler.install.layout import Layout, ReleaseDir

OBJECT_MODE = 0o444
# Where a link cannot be made the object is copied (another filesystem; a link count at its
# limit; hard links refused by a filesystem).
_NO_LINK = (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP)


def stored(entry: FileEntry) -> bool:
    """Every kind of payload but the images (the engine holds those)."""
    return entry.kind != "images"


@dataclass(frozen=True)
class Problem:
    entry: FileEntry
    why: str  # "missing", "corrupt: ..."

    def __str__(self) -> str:
        return f"{self.entry.path} (sha256 {self.entry.sha256[:12]}, {self.why})"


def _hash(path: Path) -> tuple[str, int]:
    """(sha256, size) of a regular file, opened without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        digest, size, buf = hashlib.sha256(), 0, bytearray(CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def problem(layout: Layout, sha256: str, size: int) -> str | None:
    """Why the object `sha256` cannot be used (re-hashed now), or None."""
    try:
        got, got_size = _hash(layout.store_object(sha256))
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if got_size != size:
        return f"corrupt: {got_size} bytes, {size} expected"
    if got != sha256:
        return "corrupt: its content does not hash to its name"
    return None


def check(layout: Layout, entries: Iterable[FileEntry]) -> list[Problem]:
    """Each of `entries` the store lacks or holds damaged (every one re-hashed)."""
    return [Problem(e, why) for e in entries
            if stored(e) and (why := problem(layout, e.sha256, e.size)) is not None]


def supply(layout: Layout, manifest: Manifest, dest: Path) -> int:
    """Put each file a delta bundle leaves to the host into `dest` (a staging directory): a
    hard link to its store object, checked (re-hashed) first; a copy, checked, where a link
    cannot be made. DeltaError if an object went missing or bad since it was checked."""
    count = 0
    for entry in manifest.from_host:
        if not stored(entry):
            continue
        why = problem(layout, entry.sha256, entry.size)
        if why is not None:
            raise missing_error([str(Problem(entry, why))], manifest)
        target = dest.joinpath(*entry.path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(layout.store_object(entry.sha256), target, entry)
        count += 1
    return count


def _link_or_copy(source: Path, target: Path, entry: FileEntry) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OBJECT_MODE)
    with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, CHUNK)
    if _hash(target) != (entry.sha256, entry.size):  # the copy, not only its source
        target.unlink()
        raise DeltaError(f"{entry.path}: its copy from the store does not match the signed "
                         "sha256", hint="check the disk; then install again")


def adopt(layout: Layout, release: Path, manifest: Manifest) -> tuple[int, int]:
    """After a release is placed: each of its stored payloads becomes the store's one copy (a
    verified payload added to the store) or a link to it (an intact object reused, re-hashed
    first). Returns (objects added, bytes added)."""
    private_dir(layout.store)
    objects = private_dir(layout.store_objects)
    added = size = 0
    for entry in manifest.files:
        if not stored(entry):
            continue
        path = release.joinpath(*entry.path.split("/"))
        obj = layout.store_object(entry.sha256)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.lstat(path), os.lstat(obj)):
                continue  # linked from the store already (a delta's file)
        if problem(layout, entry.sha256, entry.size) is None:
            _replace_with_link(obj, path)
            continue
        os.chmod(path, OBJECT_MODE)
        tmp = _tmp_name(objects)
        try:
            try:
                os.link(path, tmp, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                _link_or_copy(path, tmp, entry)
                _replace_with_link(tmp, path)
            os.replace(tmp, obj)  # over a damaged object, if there was one
        finally:
            tmp.unlink(missing_ok=True)
        added += 1
        size += entry.size
    return added, size


def _tmp_name(objects: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=".tmp-", dir=objects)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def _replace_with_link(obj: Path, path: Path) -> None:
    """`path` becomes a hard link to `obj` (atomically; left as it is where no link can be
    made: it is a verified copy all the same)."""
    tmp = path.with_name(f".{path.name}.link")
    try:
        os.link(obj, tmp, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return
        raise
    os.replace(tmp, path)


def needed(layout: Layout) -> set[str] | None:
    """The digests some release directory under the root still names (None: a release whose
    manifest cannot be read is there, so nothing may go)."""
    out: set[str] = set()
    if not layout.releases.is_dir():
        return out
    for path in layout.releases.iterdir():
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            manifest = ReleaseDir(path).manifest()
        except (BundlerError, OSError):  # unreadable: keep everything
            return None
        if manifest is None:
            continue  # a directory without a manifest links to nothing of the store's
        out.update(e.sha256 for e in manifest.files if stored(e))
    return out


def collect(layout: Layout, log: Callable[[str], None] | None = None) -> int:
    """Remove the objects no release directory names any more (and temp names a killed run
    left); the number removed. Call under the root lock."""
    if not layout.store_objects.is_dir():
        return 0
    keep = needed(layout)
    if keep is None:
        if log:
            log("store not pruned: a release's manifest is unreadable")
        return 0
    removed = 0
    for entry in os.scandir(layout.store_objects):
        if entry.name in keep and SHA256_RE.match(entry.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


@dataclass(frozen=True)
class Held:
    sha256: str
    size: int


def holdings(layout: Layout) -> tuple[list[Held], list[str]]:
    """Every object the store holds and can prove (re-hashed now), and the names of those it
    cannot (damaged, or not an object)."""
    good: list[Held] = []
    bad: list[str] = []
    if not layout.store_objects.is_dir():
        return good, bad
    for entry in sorted(os.scandir(layout.store_objects), key=lambda e: e.name):
        if entry.name.startswith(".tmp-"):
            continue
        try:
            digest, size = _hash(Path(entry.path))
        except OSError:
            bad.append(entry.name)
            continue
        if digest != entry.name:
            bad.append(entry.name)
            continue
        good.append(Held(digest, size))
    return good, bad


def missing_error(lacking: list[str], manifest: Manifest) -> DeltaError:
    """The refusal of a delta whose host-supplied artifacts are not all here, intact."""
    shown = "; ".join(lacking[:5])
    more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
    return DeltaError(f"{manifest.name} {manifest.version} is a delta bundle and this root "
                      f"lacks {len(lacking)} artifact(s) it leaves to the host: {shown}{more}; "
                      "nothing was changed")
