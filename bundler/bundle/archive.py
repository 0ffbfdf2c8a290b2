"""Streaming pack and verify of the bundle tar.

Layout: a plain (uncompressed) tar whose FIRST member is `envelope.json`; every other member
is a payload file listed in the signed manifest: the SBOM first when there is one (so
`bundle sbom`, `inspect` and `diff` read it without reading on), then the rest sorted by
path. Verification is one pass over the stream with a strict reader of our own
(`TarStream`): the envelope is checked before anything else is parsed, then each member is
checked against the manifest and written, hashed as it is written, under a path the verifier
chooses. Nothing here ever extracts a member by its own name. See
docs/design/bundle-format.md and docs/design/security-model.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bundler.bundle import volumes
from bundler.bundle.manifest import SBOM_PATH, FileEntry
from bundler.bundle.signing import (
    ENVELOPE_NAME,
    MAX_ENVELOPE_BYTES,
    Trust,
    Verified,
    envelope_digest,
    verify_envelope,
)
from bundler.errors import IntegrityError, SignatureError
from bundler.fsutil import CHUNK, atomic_write

MAX_CAPTURE = 4 * 1024 * 1024  # a compose file `bundle verify` reads back

ENVELOPE = ENVELOPE_NAME
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
    part_size: int | None = None,
    corrupt: Callable[[Path], None] | None = None,
) -> volumes.PartIndex | None:
    """Write the bundle: envelope first, then the SBOM, then payloads sorted by path.

    Every header field is fixed (owner, mode, mtime) so the same inputs give the same bytes.
    Each payload is hashed as it is copied and must match its entry's sha256 (and size): a
    damaged source fails the build (after `corrupt(source)`) instead of yielding a signed
    bundle that every target refuses.
    Written atomically: a single file via temp + rename, or (with `part_size`) a volume set
    whose parts are renamed into place only when all of them are complete; returns its index.
    """
    if part_size is None:
        with atomic_write(out) as raw, _Writeback(raw) as sink:
            _write_tar(sink, envelope, members, mtime, progress, corrupt)
        return None
    # The envelope member is the set's head, on its own: signing rewrites it alone.
    head = tarfile.BLOCKSIZE + len(envelope) + (-len(envelope) % tarfile.BLOCKSIZE)
    writer = volumes.SplitWriter(out, part_size, head_size=head)
    try:
        _write_tar(writer, envelope, members, mtime, progress, corrupt)
        return writer.commit(envelope_digest(envelope))
    except BaseException:
        writer.abort()
        raise


class _Writeback:
    """A writer that hands what was written to the disk while packing goes on: a background
    fdatasync every STEP bytes, so the fsync that commits the bundle waits for the last part
    only (here: packing 0.42 -> 0.33 s for 156 MB). Their errors are raised here: the kernel
    reports a failed writeback once per open file, and the final fsync would not see it."""

    STEP = 64 * 1024 * 1024

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeback")
        self._pending: Future[None] | None = None
        self._since = 0

    def __enter__(self) -> _Writeback:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._pool.shutdown(wait=True)
        if kind is None and self._pending is not None:
            self._pending.result()

    def write(self, data: bytes | memoryview) -> int:
        n = self._raw.write(data)
        self._since += len(data)
        if self._since >= self.STEP and (self._pending is None or self._pending.done()):
            if self._pending is not None:
                self._pending.result()
            self._raw.flush()
            self._pending = self._pool.submit(os.fdatasync, self._raw.fileno())
            self._since = 0
        return n


def _header(name: str, size: int, mtime: int) -> bytes:
    """One member's header blocks (a pax header first when the name needs one), exactly as
    tarfile's PAX_FORMAT writer makes them."""
    return _tarinfo(name, size, mtime).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING,
                                             "surrogateescape")


def _write_tar(raw: BinaryIO | io.RawIOBase | _Writeback, envelope: bytes,
               members: list[tuple[FileEntry, Path]], mtime: int,
               progress: Progress | None, corrupt: Callable[[Path], None] | None) -> None:
    """The bytes `tarfile.open(mode="w|", format=PAX_FORMAT)` writes for these members
    (tests/test_archive.py holds the two equal), written directly: tarfile's stream writer
    re-copies its whole buffer on every 16 KiB write, which made packing cost ~0.7 s per
    150 MB. Each payload is read once into one reused buffer, hashed and written from it."""
    written = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal written
        raw.write(data)
        written += len(data)

    def pad() -> None:
        if written % tarfile.BLOCKSIZE:
            put(tarfile.NUL * (tarfile.BLOCKSIZE - written % tarfile.BLOCKSIZE))

    put(_header(ENVELOPE, len(envelope), mtime))
    put(envelope)
    pad()
    view = memoryview(bytearray(CHUNK))
    for entry, source in sorted(members, key=_order):
        with open(source, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != entry.size:
                raise IntegrityError(f"{source} changed size while packing "
                                     f"({size} != {entry.size})",
                                     hint="something modified the cache; build again")
            put(_header(entry.path, entry.size, mtime))
            digest = hashlib.sha256()
            left = entry.size
            while left:
                n = fh.readinto(view[:min(left, CHUNK)])
                if not n:
                    raise IntegrityError(f"{source} shrank while packing",
                                         hint="something modified the cache; build again")
                digest.update(view[:n])
                put(view[:n])
                left -= n
        if digest.hexdigest() != entry.sha256:
            hint = "replace it with an intact copy"
            if corrupt is not None:
                corrupt(source)
                hint = "it was removed from the cache: build again to fetch it anew"
            raise IntegrityError(f"{source} (for {entry.path}) does not hash to its sha256 "
                                 f"{entry.sha256}: the copy on disk is damaged", hint=hint)
        pad()
        if progress:
            progress(entry.size)
    put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
    if written % tarfile.RECORDSIZE:  # tarfile rounds the archive up to whole records
        put(tarfile.NUL * (tarfile.RECORDSIZE - written % tarfile.RECORDSIZE))


def _order(member: tuple[FileEntry, Path]) -> tuple[bool, str]:
    return member[0].path != SBOM_PATH, member[0].path


@dataclass(frozen=True)
class Member:
    name: str
    type: bytes
    size: int
    offset: int  # of its header in the stream
    in_form: bool  # owner, mode, time and link fields as `pack` writes them

    def isreg(self) -> bool:
        return self.type in (tarfile.REGTYPE, tarfile.AREGTYPE)


_MAX_PAX = 64 * 1024
_DIGITS = re.compile(r"[0-9]{1,20}")


class TarStream:
    """A strict, forward-only tar reader over anything with `readinto`.

    Only what bundles use is accepted: regular members, each optionally preceded by one pax
    header (for long names). Header fields are parsed by `tarfile.TarInfo.frombuf` (checksum
    included); payload bytes go straight from `readinto` into one reused buffer, with no
    copies, so verification runs at close to raw hashing speed.
    """

    def __init__(self, raw: io.RawIOBase | io.BufferedIOBase, label: str) -> None:
        self.raw = raw
        self.label = label
        self.pos = 0
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)
        self._mtime: float | None = None  # every header carries the envelope's mtime

    def _fill(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = self.raw.readinto(view[got:])
            if not n:
                break
            got += n
        self.pos += got
        return got

    def _upto(self, n: int) -> bytes:
        """n bytes, fewer only at the end of the stream (one read may return less: a volume
        set's part boundary, a pipe)."""
        buf = bytearray(n)
        return bytes(buf[:self._fill(memoryview(buf))])

    def _exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        if self._fill(memoryview(buf)) != n:
            raise IntegrityError(f"{self.label}: truncated in {what}",
                                 hint="the copy is incomplete: copy the bundle again")
        return bytes(buf)

    def next(self) -> Member | None:
        """The next member header, or None at a proper end-of-archive marker."""
        pax: dict[str, str] = {}
        while True:
            offset = self.pos
            block = self._upto(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise IntegrityError(
                    f"{self.label}: truncated at offset {offset} (end-of-archive marker "
                    "missing)" if not block else f"{self.label}: truncated at offset {offset}",
                    hint="the copy is incomplete: copy the bundle again")
            if block.count(0) == tarfile.BLOCKSIZE:
                self._check_end(offset)
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise IntegrityError(f"{self.label}: corrupt tar header at offset {offset}: "
                                     f"{exc} (a damaged copy, or junk in the bundle)") from None
            if info.type == tarfile.XHDTYPE:
                if pax or info.size > _MAX_PAX:
                    raise IntegrityError(f"{self.label}: bad pax header at offset {offset}")
                pax = _parse_pax(self._exact(info.size, "a pax header"), self.label, offset)
                self._skip_padding(info.size)
                continue
            name = pax.get("path", info.name)
            size = info.size
            if "size" in pax:
                # ASCII digits only: str.isdigit() also takes superscripts and Arabic-Indic digits.
                if not _DIGITS.fullmatch(pax["size"]):
                    raise IntegrityError(f"{self.label}: bad pax size at offset {offset}")
                size = int(pax["size"])
            return Member(name, info.type, size, offset, self._in_form(info, pax))

    def _in_form(self, info: tarfile.TarInfo, pax: dict[str, str]) -> bool:
        """Whether the header fields bundler never reads hold what `pack` writes (the same for
        every member). Checked so that no byte of a bundle goes unchecked: payloads are hashed,
        names and sizes matched to the manifest, padding and the end marker must be zeros, and
        the header checksum covers the rest."""
        if self._mtime is None:
            self._mtime = info.mtime
        form = (info.mode, info.uid, info.gid, info.uname, info.gname, info.linkname,
                info.devmajor, info.devminor, sorted(set(pax) - {"path", "size"}))
        return form == (0o644, 0, 0, "", "", "", 0, 0, []) and info.mtime == self._mtime

    def _skip_padding(self, size: int) -> None:
        pad = -size % tarfile.BLOCKSIZE
        if pad and self._exact(pad, "block padding").count(0) != pad:
            raise IntegrityError(f"{self.label}: non-zero block padding before offset "
                                 f"{self.pos}", hint="the bundle was modified or damaged")

    def read_data(self, member: Member, sink: Callable[[memoryview], None]) -> None:
        """Feed the member's data to `sink` in chunks (views into one reused buffer)."""
        remaining = member.size
        while remaining:
            view = self._view[:min(CHUNK, remaining)]
            n = self._fill(view)
            if n == 0:
                raise IntegrityError(f"{self.label}: truncated in {member.name!r}",
                                     hint="the copy is incomplete: copy the bundle again")
            sink(view[:n])
            remaining -= n
        self._skip_padding(member.size)

    def _check_end(self, offset: int) -> None:
        """After the first zero block: a second one, then only zero padding up to one record."""
        second = self._upto(tarfile.BLOCKSIZE)
        rest = self._upto(tarfile.RECORDSIZE + 1)
        if len(second) < tarfile.BLOCKSIZE:
            raise IntegrityError(f"{self.label}: truncated (end-of-archive marker incomplete)",
                                 hint="the copy is incomplete: copy the bundle again")
        tail = second + rest
        if tail.count(0) != len(tail) or len(rest) > tarfile.RECORDSIZE:
            raise IntegrityError(f"{self.label}: unexpected data after offset {offset} "
                                 "(junk appended to the bundle, or a damaged copy)")


def _parse_pax(data: bytes, label: str, offset: int) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            if not data[pos:space].isdigit():  # bytes: ASCII digits only
                raise ValueError("bad record length")
            length = int(data[pos:space])
            record = data[space + 1:pos + length]
            if length <= 0 or not record.endswith(b"\n"):
                raise ValueError("bad record")
            key, _, value = record[:-1].partition(b"=")
            out[key.decode()] = value.decode("utf-8")
            pos += length
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{label}: malformed pax header at offset {offset}") from None
    return out


@dataclass(frozen=True)
class Extracted:
    verified: Verified
    dest: Path | None
    bytes_read: int
    # The members asked for by `extract(capture=...)`, each only once its sha256 matched.
    captured: dict[str, bytes] = field(default_factory=dict)


class BundleReader:
    """One forward pass over a bundle stream. Use `open_bundle`."""

    def __init__(self, raw: io.RawIOBase | io.BufferedIOBase, label: str,
                 trusted: Trust) -> None:
        self.label = label
        self.trusted = trusted
        self._raw = raw
        self._tar = TarStream(raw, label)
        self.verified: Verified | None = None
        self.envelope = b""

    def read_envelope(self) -> Verified:
        """Read the first member, which must be the envelope, and verify its signature."""
        member = self._tar.next()
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
        chunks: list[bytes] = []
        self._diagnosed(lambda: self._tar.read_data(member, lambda v: chunks.append(bytes(v))))
        self.envelope = b"".join(chunks)  # its signatures and carried trust documents
        self.verified = verify_envelope(self.envelope, self.trusted)
        if isinstance(self._raw, volumes.VolumeSet):  # its index and parts, now checked
            self._raw.open_parts(self.verified, self.trusted, self._tar.pos)
        return self.verified

    @property
    def part_index(self) -> volumes.PartIndex | None:
        """A volume set's verified index (after `read_envelope`); None for a single file."""
        if isinstance(self._raw, (volumes.PartsReader, volumes.VolumeSet)):
            return self._raw.index
        return None

    def _diagnosed(self, fn: Callable[[], None]) -> None:
        """Run fn; if it finds damage inside a volume set, name the corrupt part instead."""
        try:
            fn()
        except IntegrityError:
            if isinstance(self._raw, (volumes.PartsReader, volumes.VolumeSet)):
                self._raw.diagnose()
            raise

    def extract(self, dest: Path | None, progress: Progress | None = None,
                capture: Collection[str] = ()) -> Extracted:
        """Check every payload member; write each to `dest/<manifest path>` if dest is given.
        The members named in `capture` (small ones: at most MAX_CAPTURE bytes each, else
        IntegrityError) are also kept in memory, for `bundle verify` to read.

        Raises at the first problem. The caller owns `dest` and removes it on failure.
        """
        result: list[Extracted] = []
        self._diagnosed(lambda: result.append(self._extract(dest, progress,
                                                            frozenset(capture))))
        return result[0]

    def _extract(self, dest: Path | None, progress: Progress | None,
                 capture: frozenset[str] = frozenset()) -> Extracted:
        assert self.verified is not None, "read_envelope() first"
        manifest = self.verified.manifest
        listed = {f.path: f for f in manifest.travelling}
        supplied = {f.path for f in manifest.from_host}
        seen: set[str] = set()
        captured: dict[str, bytes] = {}
        while (member := self._tar.next()) is not None:
            name = member.name
            if not member.isreg():
                kind = _TYPE_NAMES.get(member.type, f"of tar type {member.type!r}")
                raise IntegrityError(f"{self.label}: member {name!r} is {kind}; bundles hold "
                                     "regular files only")
            if name == ENVELOPE or name in seen:
                raise IntegrityError(f"{self.label}: member {name!r} appears twice")
            entry = listed.get(name)
            if name in supplied:
                raise IntegrityError(f"{self.label}: member {name!r} is one the signed manifest "
                                     "leaves to the host (a delta bundle does not carry it)")
            if entry is None:
                raise IntegrityError(f"{self.label}: member {name!r} is not listed in the "
                                     "signed manifest")
            if member.size != entry.size:
                raise IntegrityError(f"{self.label}: member {name!r} is {member.size} bytes, "
                                     f"the manifest says {entry.size}")
            if not member.in_form:
                raise IntegrityError(f"{self.label}: the tar header of {name!r} is not in the "
                                     "form bundler writes (owner, mode, time or link fields "
                                     "altered)", hint="the bundle was modified or re-packed")
            if name in capture and entry.size > MAX_CAPTURE:
                raise IntegrityError(f"{self.label}: member {name!r} is {entry.size} bytes, "
                                     f"over the {MAX_CAPTURE} byte limit for a compose file")
            kept = self._check_payload(member, entry, dest, progress, name in capture)
            if kept is not None:
                captured[name] = kept
            seen.add(name)
        missing = sorted(set(listed) - seen)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise IntegrityError(f"{self.label}: member {missing[0]!r}{more} listed in the "
                                 "manifest is missing from the bundle",
                                 hint="the copy is incomplete or was re-packed: copy it again")
        return Extracted(self.verified, dest, self._tar.pos, captured)

    def first_payload(self, entry: FileEntry) -> bytes:
        """The member after the envelope, which must be `entry` (small: MAX_SBOM), checked
        against it like any payload; nothing after it is read."""
        member = self._tar.next()
        if member is None or member.name != entry.path or not member.isreg() \
                or member.size != entry.size or not member.in_form:
            name = member.name if member is not None else "nothing"
            raise IntegrityError(f"{self.label}: the member after the envelope is {name!r}, "
                                 f"not {entry.path} as bundler packs it ({entry.size} bytes)",
                                 hint="the bundle was modified or re-packed")
        if entry.size > MAX_SBOM:
            raise IntegrityError(f"{self.label}: {entry.path} is {entry.size} bytes, over "
                                 f"the {MAX_SBOM} byte limit")
        kept = self._check_payload(member, entry, None, None, keep=True)
        assert kept is not None
        return kept

    def _check_payload(self, member: Member, entry: FileEntry, dest: Path | None,
                       progress: Progress | None, keep: bool = False) -> bytes | None:
        digest = hashlib.sha256()
        kept: list[bytes] = []
        with _open_dest(dest, entry.path) as out:

            def sink(view: memoryview) -> None:
                digest.update(view)
                if out is not None:
                    out.write(view)
                if keep:
                    kept.append(bytes(view))
                if progress:
                    progress(len(view))

            self._tar.read_data(member, sink)
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"{self.label}: member {entry.path!r} does not match its "
                                 "signed sha256")
        return b"".join(kept) if keep else None


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
def open_bundle(path: Path, trusted: Trust) -> Iterator[BundleReader]:
    """A reader over a bundle file or a volume set (any part, its index, or its base name).

    For a volume set the head's envelope is verified, then the signed part index, and every
    part checked present and of the right size, before a byte of any part is read (a set
    without a head, from an older bundler: its index first).
    """
    index_file = volumes.find_index(path)
    if index_file is not None and volumes.head_of(index_file).exists():
        # The head's envelope is verified first; the reader then checks the index and parts.
        with volumes.VolumeSet(index_file) as whole:
            yield BundleReader(whole, index_file.name[:-len(volumes.INDEX_SUFFIX)], trusted)
        return
    if index_file is not None:
        index = volumes.open_index(index_file, trusted)
        if index.manifest_sha256 is not None:
            head = volumes.head_of(index_file).name
            raise IntegrityError(f"{head} (the volume set's head: its signed envelope) is "
                                 "missing", hint=f"copy {head} next to the other parts")
        # Every byte is checked by the reader (payloads against the signed manifest, the rest
        # for form), so part hashes are only computed to name a part after a failure.
        with volumes.PartsReader(index_file.parent, index, hash_parts=False) as parts:
            yield BundleReader(parts, index.bundle, trusted)
        return
    try:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise IntegrityError(f"cannot open bundle {path}: {exc.strerror}",
                             hint="check the path to the .bundle file") from None
    with raw:
        yield BundleReader(raw, path.name, trusted)


def manifest_of(path: Path, trusted: Trust) -> Verified:
    with open_bundle(path, trusted) as reader:
        return reader.read_envelope()


MAX_SBOM = 256 * 1024 * 1024  # read into memory: an SBOM of ~1 million components


def sbom_of(path: Path, trusted: Trust) -> tuple[Verified, bytes | None]:
    """The verified manifest and the SBOM's bytes, checked against their signed sha256 (None:
    the bundle carries none, e.g. built by an older bundler). Only the envelope and the member
    after it are read: the SBOM is packed first."""
    with open_bundle(path, trusted) as reader:
        return sbom_in(reader)


def sbom_in(reader: BundleReader) -> tuple[Verified, bytes | None]:
    """`sbom_of` on an open reader (which then still answers `part_index`)."""
    verified = reader.read_envelope()
    entry = next((f for f in verified.manifest.travelling if f.path == SBOM_PATH), None)
    if entry is None:
        return verified, None
    found: list[bytes] = []
    reader._diagnosed(lambda: found.append(reader.first_payload(entry)))
    return verified, found[0]
