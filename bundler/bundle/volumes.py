"""Volume sets: one bundle split into parts small enough for FAT32 sticks.

`NAME-VERSION.bundle.001, .002, …` are consecutive slices of the bundle tar; the signed part
index `NAME-VERSION.bundle.parts` (a DSSE envelope) lists each part's size and sha256. Readers
verify the index, check every part is present with the right size before reading a byte of
payload, then stream the parts in order (never joining them into a temp file); a bad part is
named: "part 2 of 3 (app-1.0.bundle.002) is corrupt". When verifying, the members' hashes check
every byte, and part hashes are computed only to name a bad part (PartsReader;
docs/design/bundle-format.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle.manifest import canonical_json, strict_loads
from bundler.bundle.signing import Trust, sign_payload, verify_payload
from bundler.errors import BuildError, IntegrityError, SignatureError

INDEX_TYPE = "application/vnd.bundler.parts+json"
INDEX_SUFFIX = ".parts"
# FAT32 refuses files of 4 GiB and more; stay clearly below.
DEFAULT_PART_SIZE = 4 * 1024**3 - 1024**2
_PART_RE = re.compile(r"^(?P<base>.+)\.(?P<num>\d{3})$")
_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


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
    total_size: int
    parts: tuple[Part, ...]

    def to_json(self) -> dict[str, Any]:
        return {"schema": 1, "bundle": self.bundle, "total_size": self.total_size,
                "parts": [{"file": p.file, "size": p.size, "sha256": p.sha256}
                          for p in self.parts]}

    @classmethod
    def parse(cls, body: bytes) -> PartIndex:
        try:
            doc = strict_loads(body)
            parts = tuple(Part(str(p["file"]), int(p["size"]), str(p["sha256"]))
                          for p in doc["parts"])
            index = cls(str(doc["bundle"]), int(doc["total_size"]), parts)
        except (ValueError, KeyError, TypeError) as exc:
            raise SignatureError(f"part index is malformed: {exc}") from None
        for i, p in enumerate(index.parts, 1):
            if p.file != f"{index.bundle}.{i:03d}" or "/" in p.file:
                raise SignatureError(f"part index names an unexpected file {p.file!r}")
        if sum(p.size for p in index.parts) != index.total_size:
            raise SignatureError("part index sizes do not add up")
        return index


class SplitWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into parts of at most `part_size`,
    hashing each. Parts are written under temp names and renamed by `commit()`."""

    def __init__(self, out: Path, part_size: int) -> None:
        self.out = out
        self.part_size = part_size
        self.parts: list[Part] = []
        self._temps: list[Path] = []
        self._fh: io.BufferedWriter | None = None
        self._hash = hashlib.sha256()
        self._in_part = 0

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

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = 0
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

    def commit(self) -> PartIndex:
        self._close_part()
        for i, tmp in enumerate(self._temps, 1):
            os.replace(tmp, self.out.with_name(f"{self.out.name}.{i:03d}"))
        # A previous, longer set of the same name must not leave stray parts behind.
        n = len(self._temps) + 1
        while (stale := self.out.with_name(f"{self.out.name}.{n:03d}")).exists():
            stale.unlink()
            n += 1
        return PartIndex(self.out.name, sum(p.size for p in self.parts), tuple(self.parts))

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for tmp in self._temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def index_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + INDEX_SUFFIX)


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


def open_index(path: Path, trusted: Trust) -> PartIndex:
    try:
        data = path.read_bytes() if path.stat().st_size <= 1024 * 1024 else b""
    except OSError as exc:
        raise IntegrityError(f"cannot read part index {path}: {exc.strerror}",
                             hint="copy the .parts file together with the parts") from None
    if not data:
        raise SignatureError(f"{path.name} is too large to be a part index")
    body, _keyid = verify_payload(data, trusted, INDEX_TYPE, what=path.name)
    return PartIndex.parse(body)
