"""The support archive's format (`bundle support`): a tar.gz (or tar.zst) of text members and
a MANIFEST.json naming them, written on the target, read on the connected side.

Writing is bounded: members are added in the order of their importance while a byte budget
lasts (tar headers counted); what does not fit is cut (a log keeps its last lines) or left
out, and MANIFEST.json says which. Reading never extracts: members are read into memory, each
and all of them bounded, regular files with plain names only.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bundler.errors import IntegrityError
from bundler.fsutil import atomic_write

FORMAT = "bundler-support/1"
MANIFEST = "MANIFEST.json"
MODE = 0o600  # the archive itself: diagnostic, for the operator to hand over
MEMBER_MODE = 0o644
_BLOCK = 512
MANIFEST_RESERVE = 256 * 1024  # kept for MANIFEST.json whatever the sections take
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
READ_MEMBER = 64 * 1024 * 1024   # `--show`: the largest member read
READ_TOTAL = 256 * 1024 * 1024   # `--show`: all members together (a decompression bomb stops)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


def _tar_size(n: int) -> int:
    return _BLOCK + -(-n // _BLOCK) * _BLOCK


@dataclass
class Budget:
    """What is left of the archive's size bound, and what was cut to honour it."""

    left: int
    cut: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def for_archive(cls, max_size: int) -> Budget:
        # compression may grow incompressible data slightly (deflate's stored blocks): a margin
        margin = max_size // 200 + 64 * 1024 + 2 * 10240  # + the tar's end blocks
        return cls(max(0, max_size - margin - MANIFEST_RESERVE))

    def fit(self, name: str, data: bytes, keep_tail: bool) -> bytes | None:
        """`data` as it fits (None: nothing fits), the budget spent, a cut recorded."""
        need = _tar_size(len(data))
        if need <= self.left:
            self.left -= need
            return data
        room = self.left - _BLOCK - _BLOCK  # a header, and the last block's padding
        if room < 1024:
            self.cut.append({"member": name, "size": len(data), "kept": 0,
                             "why": "the archive's size bound was reached: left out"})
            return None
        kept = cut_lines(data, room, keep_tail)
        self.left -= _tar_size(len(kept))
        self.cut.append({"member": name, "size": len(data), "kept": len(kept),
                         "why": "the archive's size bound was reached: "
                                + ("its last lines kept" if keep_tail else "its first lines "
                                                                           "kept")})
        return kept


def cut_lines(data: bytes, limit: int, keep_tail: bool) -> bytes:
    """At most `limit` bytes of `data`, cut at a line boundary (already masked text: a cut
    never splits a value that the masking would have caught whole)."""
    if len(data) <= limit:
        return data
    if keep_tail:
        part = data[len(data) - limit:]
        nl = part.find(b"\n")
        return part[nl + 1:] if nl >= 0 else b""
    part = data[:limit]
    nl = part.rfind(b"\n")
    return part[:nl + 1] if nl >= 0 else b""


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, MEMBER_MODE, int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write(out: Path, members: list[tuple[str, bytes]], manifest: dict[str, Any]) -> int:
    """Write the archive at `out` (temp name, renamed; mode 0600): MANIFEST.json first, then
    `members` in order. Its size in bytes."""
    zstd = out.name.endswith(".zst")
    now = time.time()
    with atomic_write(out, MODE) as fh:
        sink: Any  # a gzip or zstd stream
        if zstd:
            import zstandard

            compressor = zstandard.ZstdCompressor(level=10)
            sink = compressor.stream_writer(fh, closefd=False)
        else:
            import gzip

            sink = gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=int(now))
        with sink, tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            doc = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode()
            for name, data in [(MANIFEST, doc), *members]:
                tar.addfile(_info(name, len(data), now), io.BytesIO(data))
    return out.stat().st_size


@dataclass(frozen=True)
class Archive:
    """A support archive read back: its MANIFEST.json and every member's bytes."""

    manifest: dict[str, Any]
    members: dict[str, bytes]

    def json(self, name: str) -> Any:
        data = self.members.get(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None


def _bad(path: Path, why: str) -> IntegrityError:
    return IntegrityError(f"{path} is not a readable support archive: {why}",
                          hint="copy it again from the host where `bundle support` wrote it")


def _stream(fh: IO[bytes], path: Path) -> Any:
    head = fh.read(4)
    fh.seek(0)
    if head.startswith(_GZIP_MAGIC):
        import gzip

        return gzip.GzipFile(fileobj=fh, mode="rb")
    if head == _ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(fh)
    raise _bad(path, "neither gzip nor zstd")


def _entries(tar: tarfile.TarFile, path: Path) -> Iterator[tuple[str, bytes]]:
    total = 0
    for info in tar:
        if not info.isreg() or not _NAME.match(info.name) or ".." in info.name.split("/"):
            raise _bad(path, f"member {info.name!r} is not a plain file name")
        if info.size > READ_MEMBER or total + info.size > READ_TOTAL:
            raise _bad(path, f"member {info.name} is larger than a support archive holds")
        total += info.size
        src = tar.extractfile(info)
        if src is None:
            raise _bad(path, f"member {info.name} cannot be read")
        data = src.read(info.size + 1)
        if len(data) != info.size:
            raise _bad(path, f"member {info.name} is truncated")
        yield info.name, data


def read(path: Path) -> Archive:
    """The archive at `path`, in memory (never extracted); IntegrityError if it is not one."""
    members: dict[str, bytes] = {}
    try:
        with open(path, "rb") as fh, _stream(fh, path) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:
            for name, data in _entries(tar, path):
                if name in members:
                    raise _bad(path, f"member {name} appears twice")
                members[name] = data
    except IntegrityError:
        raise
    except FileNotFoundError:
        raise IntegrityError(f"{path}: no such file",
                             hint="name the archive `bundle support --out` wrote") from None
    except Exception as exc:  # tarfile, gzip and zstd each raise their own kinds
        raise _bad(path, f"{type(exc).__name__}: {exc}") from None
    try:
        manifest = json.loads(members.get(MANIFEST, b""))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(path, f"no {MANIFEST} of format {FORMAT}")
    return Archive(manifest, members)
