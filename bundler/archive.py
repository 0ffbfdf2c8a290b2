"""Streaming pack and verify of the bundle tar.

Layout: a plain (uncompressed) tar whose FIRST member is `envelope.json`; every other member
is a payload file listed in the signed manifest, in sorted order. Verification is one pass
over the stream (`tarfile` mode "r|"): the envelope is checked before anything else is parsed,
then each member is checked against the manifest and written, hashed as it is written, under a
path the verifier chooses. Nothing here ever extracts a member by its own name.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bundler.errors import IntegrityError, SignatureError
from bundler.fsutil import CHUNK, atomic_write
from bundler.manifest import FileEntry, Manifest
from bundler.signing import MAX_ENVELOPE_BYTES, TrustedKey, Verified, verify_envelope

ENVELOPE = "envelope.json"
Progress = Callable[[int], None]

_TYPE_NAMES = {
    tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
    tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO", tarfile.CONTTYPE: "a contiguous file",
}


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def pack(
    out: Path,
    envelope: bytes,
    members: list[tuple[FileEntry, Path]],
    mtime: int,
    progress: Progress | None = None,
) -> None:
    """Write the bundle atomically: envelope first, then payloads sorted by path.

    Every header field is fixed (owner, mode, mtime) so the same inputs give the same bytes.
    """
    with atomic_write(out) as raw, tarfile.open(
        fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK
    ) as tar:
        info = _tarinfo(ENVELOPE, len(envelope), mtime)
        tar.addfile(info, _BytesReader(envelope))
        for entry, source in sorted(members, key=lambda m: m[0].path):
            with open(source, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size != entry.size:
                    raise IntegrityError(f"{source} changed size while packing "
                                         f"({size} != {entry.size})",
                                         hint="something modified the cache; build again")
                tar.addfile(_tarinfo(entry.path, entry.size, mtime), fh)
            if progress:
                progress(entry.size)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos:end]
        self._pos += len(chunk)
        return chunk


class _Tap:
    """A read-only wrapper that counts bytes and remembers the last few chunks read,
    so that what follows the end-of-archive marker can be checked for junk."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.pos = 0
        self.recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=4)

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.recent.append((self.pos, data))
            self.pos += len(data)
        return data

    def since(self, offset: int) -> bytes | None:
        """Bytes from absolute `offset` to the current position, if still remembered."""
        parts = [(start, d) for start, d in self.recent if start + len(d) > offset]
        if not parts or parts[0][0] > offset:
            return None if self.pos > offset else b""
        joined = b"".join(d for _, d in parts)
        return joined[offset - parts[0][0]:]


@dataclass(frozen=True)
class Extracted:
    verified: Verified
    dest: Path | None
    bytes_read: int


class BundleReader:
    """One forward pass over a bundle stream. Use `open_bundle`."""

    def __init__(self, raw: BinaryIO, label: str) -> None:
        self.label = label
        self._tap = _Tap(raw)
        try:
            self._tar: tarfile.TarFile = tarfile.open(  # noqa: SIM115 - closed with the file
                fileobj=self._tap, mode="r|", bufsize=CHUNK)  # type: ignore[call-overload]
        except tarfile.TarError as exc:
            raise IntegrityError(f"{label} is not a bundle (not a tar archive: {exc})",
                                 hint="check that you passed the .bundle file") from None
        self.verified: Verified | None = None

    def _next(self) -> tarfile.TarInfo | None:
        try:
            member: tarfile.TarInfo | None = self._tar.next()
            return member
        except tarfile.TarError as exc:
            raise IntegrityError(f"{self.label}: corrupt tar header after offset "
                                 f"{self._tar.offset}: {exc}") from None

    def read_envelope(self, trusted: list[TrustedKey]) -> Verified:
        """Read the first member, which must be the envelope, and verify its signature."""
        member = self._next()
        if member is None or member.name != ENVELOPE:
            name = member.name if member else "nothing"
            raise SignatureError(f"{self.label}: first member is {name!r}, not {ENVELOPE}",
                                 hint="this is not a bundler bundle, or it was re-packed")
        if not member.isreg():
            raise SignatureError(f"{self.label}: {ENVELOPE} is not a regular file")
        if member.size > MAX_ENVELOPE_BYTES:
            raise SignatureError(f"{self.label}: {ENVELOPE} is {member.size} bytes, over the "
                                 f"{MAX_ENVELOPE_BYTES} byte limit",
                                 hint="this is not a bundler bundle")
        data = self._read_member(member)
        self.verified = verify_envelope(data, trusted)
        return self.verified

    def _read_member(self, member: tarfile.TarInfo) -> bytes:
        fh = self._tar.extractfile(member)
        assert fh is not None
        try:
            data: bytes = fh.read(member.size)
        except tarfile.TarError as exc:
            raise IntegrityError(f"{self.label}: truncated in {member.name}: {exc}") from None
        if len(data) != member.size:
            raise IntegrityError(f"{self.label}: truncated in {member.name}",
                                 hint="the copy is incomplete: copy the bundle again")
        return data

    def extract(self, dest: Path | None, progress: Progress | None = None) -> Extracted:
        """Check every payload member; write each to `dest/<manifest path>` if dest is given.

        Raises at the first problem. The caller owns `dest` and removes it on failure.
        """
        assert self.verified is not None, "read_envelope() first"
        manifest = self.verified.manifest
        listed = {f.path: f for f in manifest.files}
        seen: set[str] = set()
        while (member := self._next()) is not None:
            name = member.name
            if not member.isreg():
                kind = _TYPE_NAMES.get(member.type, f"of tar type {member.type!r}")
                raise IntegrityError(f"{self.label}: member {name!r} is {kind}; bundles hold "
                                     "regular files only")
            if name == ENVELOPE or name in seen:
                raise IntegrityError(f"{self.label}: member {name!r} appears twice")
            entry = listed.get(name)
            if entry is None:
                raise IntegrityError(f"{self.label}: member {name!r} is not listed in the "
                                     "signed manifest")
            if member.size != entry.size:
                raise IntegrityError(f"{self.label}: member {name!r} is {member.size} bytes, "
                                     f"the manifest says {entry.size}")
            self._check_payload(member, entry, dest, progress)
            seen.add(name)
        self._check_end()
        missing = sorted(set(listed) - seen)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise IntegrityError(f"{self.label}: member {missing[0]!r}{more} listed in the "
                                 "manifest is missing from the bundle",
                                 hint="the copy is incomplete or was re-packed: copy it again")
        return Extracted(self.verified, dest, self._tap.pos)

    def _check_payload(self, member: tarfile.TarInfo, entry: FileEntry, dest: Path | None,
                       progress: Progress | None) -> None:
        src = self._tar.extractfile(member)
        assert src is not None
        digest = hashlib.sha256()
        with _open_dest(dest, entry.path) as out:
            remaining = entry.size
            while remaining:
                try:
                    chunk = src.read(min(CHUNK, remaining))
                except tarfile.TarError as exc:
                    raise IntegrityError(f"{self.label}: truncated in {entry.path!r}: {exc}",
                                         hint="the copy is incomplete: copy it again") from None
                if not chunk:
                    raise IntegrityError(f"{self.label}: truncated in {entry.path!r}",
                                         hint="the copy is incomplete: copy it again")
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
                remaining -= len(chunk)
                if progress:
                    progress(len(chunk))
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"{self.label}: member {entry.path!r} does not match its "
                                 "signed sha256")

    def _check_end(self) -> None:
        """After the last header: only the zero end-of-archive blocks and record padding."""
        end = self._tar.offset
        seen = self._tap.since(end)
        if seen is None:
            raise IntegrityError(f"{self.label}: cannot check the end of the archive")
        limit = 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE
        rest = seen + self._tap.raw.read(limit + 1 - len(seen)) if len(seen) <= limit else seen
        if len(rest) < 2 * tarfile.BLOCKSIZE:
            raise IntegrityError(f"{self.label}: truncated (end-of-archive marker missing)",
                                 hint="the copy is incomplete: copy the bundle again")
        if len(rest) > limit or rest.count(0) != len(rest):
            raise IntegrityError(f"{self.label}: unexpected data after offset {end} "
                                 "(a corrupt member header, or junk appended to the bundle)")


@contextlib.contextmanager
def _open_dest(dest: Path | None, rel: str) -> Iterator[BinaryIO | None]:
    if dest is None:
        yield None
        return
    target = dest.joinpath(*rel.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL|O_NOFOLLOW: never write through something that already exists at that path.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        yield out


@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[BundleReader]:
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise IntegrityError(f"cannot open bundle {path}: {exc.strerror}",
                             hint="check the path to the .bundle file") from None
    with raw:
        yield BundleReader(raw, path.name)


def manifest_of(path: Path, trusted: list[TrustedKey]) -> Manifest:
    with open_bundle(path) as reader:
        return reader.read_envelope(trusted).manifest
