"""Volume sets: one bundle split into parts small enough for FAT32 sticks.

`NAME-VERSION.bundle.000` (the head) is the bundle tar's first member, its signed envelope, on
its own; `.001, .002, …` are consecutive slices of the rest. The signed part index
`NAME-VERSION.bundle.parts` (a DSSE envelope) lists each part's size and sha256 and the sha256
of the manifest the head signs, not the head's bytes: so signatures, countersignatures and
trust documents are added to a volume set by rewriting its head alone (`bundle sign`), and the
index stays valid. Readers verify the head's envelope first, then the index (signed by a key
that signed the envelope, and naming the same manifest), check every part is present with the
right size before reading a byte of payload, then stream the parts in order (never joining
them into a temp file); a bad part is named: "part 2 of 3 (app-1.0.bundle.002) is corrupt".
When verifying, the members' hashes check every byte, and part hashes are computed only to
name a bad part (PartsReader; docs/design/bundle-format.md).

Sets written before the head existed (index schema 1: part 1 starts with the envelope) are
still read, index first, as they always were; they cannot gather signatures.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import queue
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle.manifest import canonical_json, strict_loads
from bundler.bundle.signing import (
    ENVELOPE_NAME,
    MAX_ENVELOPE_BYTES,
    Trust,
    Verified,
    envelope_digest,
    sign_payload,
    verify_payload,
)
from bundler.errors import BuildError, IntegrityError, SignatureError

INDEX_TYPE = "application/vnd.bundler.parts+json"
INDEX_SUFFIX = ".parts"
# FAT32 refuses files of 4 GiB and more; stay clearly below.
DEFAULT_PART_SIZE = 4 * 1024**3 - 1024**2
_PART_RE = re.compile(r"^(?P<base>.+)\.(?P<num>\d{3})$")
_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HEAD = "000"
# A head is one tar member: its header, an envelope of at most MAX_ENVELOPE_BYTES, padding.
MAX_HEAD_BYTES = 512 + MAX_ENVELOPE_BYTES + 511


def parse_size(text: str) -> int:
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise BuildError(f"--volume-size {text!r} is not a size",
                         hint="write e.g. 700M, 4G or 1048576 (K/M/G/T are powers of 1024)")
    unit = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[match[2].upper()]
    size = int(match[1]) * unit
    if size < 1024 * 1024:
        raise BuildError(f"--volume-size {text!r} is below 1 MiB", hint="use a larger size")
    return size


@dataclass(frozen=True)
class Part:
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PartIndex:
    bundle: str
    total_size: int  # of the parts (a head is not counted: it is replaced by signing)
    parts: tuple[Part, ...]
    # Schema 2 (a set with a head): the sha256 of the manifest its head's envelope signs.
    manifest_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": 1 if self.manifest_sha256 is None else 2, "bundle": self.bundle,
            "total_size": self.total_size,
            "parts": [{"file": p.file, "size": p.size, "sha256": p.sha256} for p in self.parts]}
        if self.manifest_sha256 is not None:
            doc["manifest_sha256"] = self.manifest_sha256
        return doc

    @classmethod
    def parse(cls, body: bytes) -> PartIndex:
        try:
            doc = strict_loads(body)
            parts = tuple(Part(str(p["file"]), int(p["size"]), str(p["sha256"]))
                          for p in doc["parts"])
            schema = doc["schema"]
            digest = str(doc["manifest_sha256"]) if schema == 2 else None
            if schema not in (1, 2) or (digest is not None and not _SHA256_RE.match(digest)):
                raise ValueError(f"schema {schema!r} or its manifest digest is not known")
            index = cls(str(doc["bundle"]), int(doc["total_size"]), parts, digest)
        except (ValueError, KeyError, TypeError) as exc:
            raise SignatureError(f"part index is malformed: {exc}",
                                 hint="copy the .parts file again from the source") from None
        for i, p in enumerate(index.parts, 1):
            if p.file != f"{index.bundle}.{i:03d}" or "/" in p.file:
                raise SignatureError(f"part index names an unexpected file {p.file!r}")
        if sum(p.size for p in index.parts) != index.total_size:
            raise SignatureError("part index sizes do not add up")
        return index


class SplitWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into parts of at most `part_size`,
    hashing each; with `head_size`, the first that many bytes (the envelope member) go to the
    head, NAME.000, on their own. Files are written under temp names and renamed by
    `commit()`."""

    def __init__(self, out: Path, part_size: int, head_size: int = 0) -> None:
        self.out = out
        self.part_size = part_size
        self.parts: list[Part] = []
        self._temps: list[Path] = []
        self._fh: io.BufferedWriter | None = None
        self._hash = hashlib.sha256()
        self._in_part = 0
        self._head_left = head_size
        self._head: Path | None = None
        self._head_fh: io.BufferedWriter | None = None
        if head_size:
            self._head = out.with_name(f".{out.name}.{HEAD}.tmp")
            self._head_fh = open(self._head, "wb")  # noqa: SIM115 - closed in _close_head

    def writable(self) -> bool:
        return True

    def _open_next(self) -> io.BufferedWriter:
        n = len(self._temps) + 1
        if n > 999:
            raise BuildError("more than 999 parts", hint="use a larger --volume-size")
        tmp = self.out.with_name(f".{self.out.name}.{n:03d}.tmp")
        self._temps.append(tmp)
        self._fh = open(tmp, "wb")  # noqa: SIM115 - closed in _close_part
        self._hash = hashlib.sha256()
        self._in_part = 0
        return self._fh

    def _close_part(self) -> None:
        if self._fh is None:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        n = len(self._temps)
        self.parts.append(Part(f"{self.out.name}.{n:03d}", self._in_part,
                               self._hash.hexdigest()))

    def _close_head(self) -> None:
        if self._head_fh is not None:
            self._head_fh.flush()
            os.fsync(self._head_fh.fileno())
            self._head_fh.close()
            self._head_fh = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = 0
        if self._head_left:
            assert self._head_fh is not None
            written = min(self._head_left, len(view))
            self._head_fh.write(view[:written])
            self._head_left -= written
            if not self._head_left:
                self._close_head()
        while written < len(view):
            fh = self._fh or self._open_next()
            room = self.part_size - self._in_part
            chunk = view[written:written + room]
            fh.write(chunk)
            self._hash.update(chunk)
            self._in_part += len(chunk)
            written += len(chunk)
            if self._in_part == self.part_size:
                self._close_part()
        return written

    def commit(self, manifest_sha256: str | None = None) -> PartIndex:
        """Rename the files into place; the index of a set with a head names the manifest
        its envelope signs (`manifest_sha256`)."""
        if self._head is not None and (self._head_left or manifest_sha256 is None):
            raise BuildError("internal: the head of a volume set was not completed")
        self._close_part()
        for i, tmp in enumerate(self._temps, 1):
            os.replace(tmp, self.out.with_name(f"{self.out.name}.{i:03d}"))
        head = self.out.with_name(f"{self.out.name}.{HEAD}")
        if self._head is not None:
            os.replace(self._head, head)
        else:
            head.unlink(missing_ok=True)  # a set without a head must not pick up an old one
        # A previous, longer set of the same name must not leave stray parts behind.
        n = len(self._temps) + 1
        while (stale := self.out.with_name(f"{self.out.name}.{n:03d}")).exists():
            stale.unlink()
            n += 1
        return PartIndex(self.out.name, sum(p.size for p in self.parts), tuple(self.parts),
                         manifest_sha256 if self._head is not None else None)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._head is not None:
            if self._head_fh is not None:
                self._head_fh.close()
                self._head_fh = None
            self._head.unlink(missing_ok=True)
        for tmp in self._temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def index_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + INDEX_SUFFIX)


def head_of(index_file: Path) -> Path:
    """The head (NAME.000) of the set whose index is NAME.parts."""
    return index_file.with_name(index_file.name[:-len(INDEX_SUFFIX)] + "." + HEAD)


def envelope_header(first_block: bytes) -> tarfile.TarInfo | None:
    """A bundle's first tar header when it is its envelope's (a regular envelope.json), else
    None (its size is the caller's to check)."""
    try:
        info = tarfile.TarInfo.frombuf(first_block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    return info if info.name == ENVELOPE_NAME and info.isreg() else None


def head_size(first_block: bytes) -> int:
    """The size of a bundle's head (its first member: header, envelope, padding) from the
    bundle's first 512 bytes."""
    info = envelope_header(first_block)
    if info is None or info.size > MAX_ENVELOPE_BYTES:
        raise IntegrityError("the bundle does not start with its envelope",
                             hint="this is not a bundler bundle, or it was damaged")
    return 512 + info.size + (-info.size % 512)


def take_head(stream: io.RawIOBase | io.BufferedIOBase, bundle_name: str) -> tuple[bytes, Part]:
    """Read a bundle's head (its first member: header, envelope, padding) off the front of
    its stream, as the head of a volume set (NAME.000)."""
    data = b""
    size = 512
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise IntegrityError("the bundle ends inside its envelope",
                                 hint="the copy is incomplete: copy the bundle again")
        data += chunk
        if len(data) == 512 and size == 512:
            size = head_size(data)
    return data, Part(f"{bundle_name}.{HEAD}", size, hashlib.sha256(data).hexdigest())


def index_bytes(index: PartIndex, key: Ed25519PrivateKey) -> bytes:
    """The signed index file's bytes (deterministic: Ed25519 signatures are)."""
    return sign_payload(canonical_json(index.to_json()), INDEX_TYPE, key)


def write_index(bundle: Path, index: PartIndex, key: Ed25519PrivateKey) -> Path:
    from bundler.fsutil import atomic_write_bytes

    path = index_path(bundle)
    atomic_write_bytes(path, index_bytes(index, key))
    return path


def plan_parts(stream: io.RawIOBase | io.BufferedIOBase, bundle_name: str, part_size: int,
               progress: Any = None) -> PartIndex:
    """The volume set an existing bundle (read from `stream`) splits into: consecutive slices
    of at most `part_size` bytes, each hashed. The bundle's own envelope is not touched (it
    stays signed by its builder); only the part index needs signing (`index_bytes`), and the
    same bytes always give the same parts, so the slices can be written by a second pass."""
    parts: list[Part] = []
    buf = bytearray(min(part_size, 1024 * 1024))
    while True:
        digest = hashlib.sha256()
        got = 0
        while got < part_size:
            n = stream.readinto(memoryview(buf)[:min(len(buf), part_size - got)])
            if not n:
                break
            digest.update(memoryview(buf)[:n])
            got += n
            if progress:
                progress(n)
        if not got:
            break
        if len(parts) >= 999:
            raise BuildError("more than 999 parts", hint="use a larger --volume-size")
        parts.append(Part(f"{bundle_name}.{len(parts) + 1:03d}", got, digest.hexdigest()))
        if got < part_size:
            break
    return PartIndex(bundle_name, sum(p.size for p in parts), tuple(parts))


def find_index(path: Path) -> Path | None:
    """The part index a user's path means: the index itself, any part, or the base name."""
    if path.name.endswith(INDEX_SUFFIX):
        return path
    if m := _PART_RE.match(path.name):
        return path.with_name(m["base"] + INDEX_SUFFIX)
    candidate = index_path(path)
    if not path.exists() and candidate.exists():
        return candidate
    return None


def split_file(bundle: Path, out: Path, part_size: int) -> PartIndex:
    """Split a single bundle file into a volume set named `out` (head, parts; the index is
    returned unsigned: `write_index`). The bundle's own envelope is not touched."""
    with open(bundle, "rb", buffering=0) as fh:
        head, _ = take_head(fh, out.name)
        writer = SplitWriter(out, part_size, head_size=len(head))
        try:
            writer.write(head)
            while chunk := fh.read(1024 * 1024):
                writer.write(chunk)
            info = envelope_header(head[:512])
            assert info is not None  # take_head checked it
            return writer.commit(envelope_digest(head[512:512 + info.size]))
        except BaseException:
            writer.abort()
            raise


class PartsReader(io.RawIOBase):
    """Reads the parts of a verified index in order, as one stream.

    With `hash_parts` (for callers that copy the raw bytes, e.g. export), each part is hashed
    as it streams, on a worker thread (hashlib releases the GIL), and checked at its end; the
    worker is always drained before the caller's buffer can be written again.

    Without it (the bundle reader, which checks every payload byte against the signed
    manifest and every other byte for form), each byte is hashed once, by the member check:
    hashing the parts too cost half the throughput with the second core busy. Part hashes
    are then computed only by `diagnose()`, after a failure, to name the corrupt part.
    """

    def __init__(self, directory: Path, index: PartIndex, *, hash_parts: bool = True) -> None:
        self.dir = directory
        self.index = index
        self._i = -1
        self._fh: io.FileIO | None = None
        self._hash = hashlib.sha256()
        self._left = 0
        self._hasher = _Hasher() if hash_parts else None
        total = len(index.parts)
        for n, part in enumerate(index.parts, 1):
            path = directory / part.file
            if not path.is_file():
                raise IntegrityError(f"part {n} of {total} ({part.file}) is missing",
                                     hint=f"copy {part.file} next to the other parts")
            size = path.stat().st_size
            if size != part.size:
                raise IntegrityError(f"part {n} of {total} ({part.file}) is {size} bytes, "
                                     f"expected {part.size}: it is corrupt or incomplete",
                                     hint=f"copy {part.file} again from the source")

    def readable(self) -> bool:
        return True

    def _label(self) -> str:
        part = self.index.parts[self._i]
        return f"part {self._i + 1} of {len(self.index.parts)} ({part.file})"

    def _drain(self) -> None:
        if self._hasher is not None:
            self._hasher.wait()

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.stop()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()

    def _finish_part(self) -> None:
        assert self._fh is not None
        self._drain()
        self._fh.close()
        self._fh = None
        if self._hasher is not None and self._hash.hexdigest() != self.index.parts[self._i].sha256:
            self._corrupt()

    def _corrupt(self) -> None:
        raise IntegrityError(f"{self._label()} is corrupt (sha256 mismatch)",
                             hint="copy that part again from the source")

    def _next_part(self) -> bool:
        if self._i + 1 >= len(self.index.parts):
            return False
        self._i += 1
        part = self.index.parts[self._i]
        self._fh = io.FileIO(self.dir / part.file, "rb")
        self._hash = hashlib.sha256()
        self._left = part.size
        return True

    def readinto(self, buffer: Any) -> int:
        self._drain()  # the caller may be about to reuse the buffer we were hashing
        view = memoryview(buffer).cast("B")
        got = 0  # a read that spans a part boundary is completed from the next part
        while got < len(view):
            if self._fh is None and not self._next_part():
                break
            assert self._fh is not None
            n = self._fh.readinto(view[got:got + self._left]) if self._left else 0
            if n:
                if self._hasher is not None:
                    self._hasher.submit(self._hash, view[got:got + n])
                self._left -= n
                got += n
                if self._left == 0:
                    self._finish_part()
                continue
            if self._left:
                raise IntegrityError(f"{self._label()} shrank while being read",
                                     hint="copy that part again from the source")
            self._finish_part()
        return got

    def diagnose(self) -> None:
        """After a failure: name the corrupt part, if one is, rather than whichever member it
        broke. Streaming part hashes: finish the current part's. Otherwise hash, from disk,
        every part up to the one being read and name the first that does not match."""
        self._drain()
        if self._hasher is None:
            self._diagnose_from_disk()
            return
        if self._fh is None:
            return
        buf = bytearray(1024 * 1024)
        while self._left:
            n = self._fh.readinto(memoryview(buf)[:self._left])
            if not n:
                break
            self._hash.update(memoryview(buf)[:n])
            self._left -= n
        self._finish_part()


    def _diagnose_from_disk(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        last = self._i
        buf = bytearray(1024 * 1024)
        for self._i in range(last + 1):
            digest = hashlib.sha256()
            with io.FileIO(self.dir / self.index.parts[self._i].file, "rb") as fh:
                while n := fh.readinto(buf):
                    digest.update(memoryview(buf)[:n])
            if digest.hexdigest() != self.index.parts[self._i].sha256:
                self._corrupt()


class _Hasher:
    """One long-lived thread that hashes what it is handed, one chunk at a time.

    (A thread pool's per-task overhead measured here cancelled the overlap entirely; a plain
    queue keeps both cores busy.)
    """

    def __init__(self) -> None:
        self._todo: queue.SimpleQueue[tuple[Any, memoryview] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="part-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            try:
                job[0].update(job[1])
                self._done.put(None)
            except BaseException as exc:  # handed back to the reader's thread
                self._done.put(exc)

    def submit(self, digest: Any, view: memoryview) -> None:
        self.wait()
        self._busy = True
        self._todo.put((digest, view))

    def wait(self) -> None:
        if self._busy:
            self._busy = False
            error = self._done.get()
            if error is not None:
                raise error

    def stop(self) -> None:
        self.wait()
        self._todo.put(None)
        self._thread.join()


class VolumeSet(io.RawIOBase):
    """A volume set with a head, as one stream: the head first, then (`attach`) the parts.

    The bundle reader reads and verifies the head's envelope, then calls `open_parts`, which
    verifies the index by the envelope's own signers and against its manifest before a byte
    of any part is read. Until then a read past the head's end sees the end of the stream.
    """

    def __init__(self, index_file: Path) -> None:
        self.index_file = index_file
        self.head = head_of(index_file)
        try:
            size = self.head.stat().st_size
        except OSError as exc:
            raise IntegrityError(f"cannot read {self.head.name}: {exc.strerror}",
                                 hint="copy it together with the other parts") from None
        if size > MAX_HEAD_BYTES:
            raise SignatureError(f"{self.head.name} is {size} bytes: too large to be a head",
                                 hint="copy the volume set again from the source")
        self.head_bytes = size
        self._head: io.FileIO | None = io.FileIO(self.head, "rb")
        self.parts: PartsReader | None = None

    @property
    def index(self) -> PartIndex | None:
        return self.parts.index if self.parts is not None else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head is not None:
            n = self._head.readinto(buffer)
            if n or self.parts is None:
                return n
            self._head.close()
            self._head = None
        return self.parts.readinto(buffer) if self.parts is not None else 0

    def attach(self, index: PartIndex, hash_parts: bool) -> None:
        """Read the parts of `index` after the head (every part checked present and of its
        size first)."""
        self.parts = PartsReader(self.index_file.parent, index, hash_parts=hash_parts)

    def open_parts(self, verified: Verified, trusted: Trust, consumed: int) -> None:
        """After the envelope verified: the head must hold nothing else, the index must be
        signed by one of the envelope's signers and name its manifest."""
        if consumed != self.head_bytes:
            raise IntegrityError(f"{self.head.name} holds {self.head_bytes - consumed} bytes "
                                 "after the envelope", hint="copy it again from the source")
        index = open_index(self.index_file, trusted, by={s.keyid for s in verified.signers})
        if index.manifest_sha256 != verified.digest:
            raise IntegrityError(
                f"{self.head.name} and {self.index_file.name} belong to different bundles "
                "(the index names another manifest)",
                hint="copy the whole volume set again from one source")
        self.attach(index, hash_parts=False)

    def diagnose(self) -> None:
        if self.parts is not None:
            self.parts.diagnose()

    def close(self) -> None:
        if self._head is not None:
            self._head.close()
            self._head = None
        if self.parts is not None:
            self.parts.close()
        super().close()


def open_index(path: Path, trusted: Trust, by: set[str] | None = None) -> PartIndex:
    """The verified index. `by`: the key ids that signed the bundle's envelope (a set with a
    head): one of them must have signed the index too."""
    try:
        data = path.read_bytes() if path.stat().st_size <= 1024 * 1024 else b""
    except OSError as exc:
        raise IntegrityError(f"cannot read part index {path}: {exc.strerror}",
                             hint="copy the .parts file together with the parts") from None
    if not data:
        raise SignatureError(f"{path.name} is too large to be a part index")
    body, _keyid = verify_payload(data, trusted, INDEX_TYPE, what=path.name, by=by)
    index = PartIndex.parse(body)
    if by is not None and index.manifest_sha256 is None:
        raise SignatureError(f"{path.name} is the index of a set without a head, but "
                             f"{head_of(path).name} is there",
                             hint="copy the whole volume set again from one source")
    return index
