"""Content-addressed store shared by every artifact kind.

Objects live at `objects/<first two hex>/<sha256>`; an object is only ever renamed into place
after its hash was computed, so a crash can leave temp files but never a wrong object.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from bundler.fsutil import CHUNK


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bundler"


class CacheWriter:
    """A write-only sink that hashes what it is given; see `Cache.writer()`.

    `sha256` and `size` describe the stored object once the `with` block has ended.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._digest = hashlib.sha256()
        self.size = 0
        self.sha256 = ""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._out.write(view)
        self.size += view.nbytes
        return view.nbytes

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._out.flush()

    def digest(self) -> str:
        return self._digest.hexdigest()


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"

    def path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def evict(self, path: Path) -> None:
        """Remove an object found damaged (its bytes no longer hash to its name): every
        reader checks `has()`, so the next build fetches or rebuilds it. Paths outside the
        store are left alone."""
        if path.parent.parent == self.objects and path.name.startswith(path.parent.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy `src` into the store (hashing as it copies); return (sha256, size)."""
        with open(src, "rb") as fh:
            return self.put_stream(fh.read)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        return self.put_stream(io.BytesIO(data).read)

    def put_stream(self, read: Callable[[int], bytes],
                   check: Callable[[str, int], None] | None = None) -> tuple[str, int]:
        """Store the bytes `read` yields until it returns b""; return (sha256, size).

        `check(sha256, size)` runs after the last byte and before the object is committed; if
        it raises, nothing is stored (a download is verified against the digest it was
        promised before it can enter the store)."""
        with self.writer() as sink:
            while chunk := read(CHUNK):
                sink.write(chunk)
            if check is not None:
                check(sink.digest(), sink.size)
        return sink.sha256, sink.size

    @contextlib.contextmanager
    def writer(self) -> Iterator[CacheWriter]:
        """Store what is written to the yielded sink (push-style streaming, e.g. a compressor's
        output): hashed as it is written, renamed into place only when the block ends without an
        exception; then `sink.sha256` / `sink.size` name the object. Constant memory."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = CacheWriter(out)
                yield sink
            sha = sink.digest()
            final = self.path(sha)
            if final.is_file():
                os.unlink(tmp)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
            sink.sha256 = sha
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
