"""Image deltas: the bundle's one docker-save archive without the layers the target's engine
already holds. Both sides use it: the build writes the thin archive (`thin`) from what a host
receipt says the engine holds (`HostLayers`), the install side checks the engine before it
loads (bundler.install.images).

The rule is the engine's own (moby daemon/internal/image/tarexport/load.go, the same in
20.10's image/tarexport/load.go): for layer i of an image it asks its layer store for the
ChainID of layers 0..i and reads the layer file from the archive only when that chain is not
there. So a layer member may be left out only when the whole chain below and including it is
held, for every image in the archive that uses the member. A held upper layer over a missing
lower one is not a held chain. Why, and the containerd image store (which cannot load such an
archive at all): docs/design/image-delta.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tarfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from bundler.bundle.imagearchive import SMALL, LayoutImage, Scan, config_facts, norm_member
from bundler.compat import zip_strict
from bundler.errors import BuildError
from bundler.fsutil import CHUNK

# The classic (graph-driver) image store reuses held layer chains; the containerd image store
# (Docker 24+ with the containerd-snapshotter feature) needs every layer in the archive.
CLASSIC = "classic"
CONTAINERD = "containerd"
STORES = (CLASSIC, CONTAINERD)
# The full archive's level (bundler/build/resolve/images.py), but one thread: a thin archive
# is mostly small, and multi-threaded zstd buffers about 110 MiB of jobs (measured), where one
# thread keeps the whole pass under 30 MiB; its bytes depend on nothing but the input.
ZSTD_LEVEL = 3
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _digest(value: object, what: str) -> str:
    text = str(value)
    if not _DIGEST.match(text):
        raise ValueError(f"{what} {text[:80]!r} is not sha256:<64 hex>")
    return text


def chain_ids(diff_ids: Sequence[str]) -> tuple[str, ...]:
    """The ChainID of every prefix of an image's layers, bottom first (OCI image spec,
    config.md: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " +
    DiffID(Ln))). Digests are "sha256:<hex>"."""
    out: list[str] = []
    for diff in diff_ids:
        diff = _digest(diff, "diff ID")
        if not out:
            out.append(diff)
        else:
            joined = f"{out[-1]} {diff}".encode()
            out.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return tuple(out)


# --- what the engine holds (a receipt records it; the install side reads it live) ----------

@dataclass(frozen=True)
class HeldImage:
    image_id: str                # "sha256:<hex>"
    diff_ids: tuple[str, ...]    # "sha256:<hex>", bottom layer first


@dataclass(frozen=True)
class HostLayers:
    """The images in an engine and the store that holds them. Only a classic store's layers
    can be left out of an archive (`chains` is empty otherwise)."""

    store: str                   # CLASSIC | CONTAINERD
    images: tuple[HeldImage, ...]

    def chains(self) -> frozenset[str]:
        """Every layer chain the engine provably holds: each prefix of each image's layers
        (an image keeps its whole chain in the layer store)."""
        if self.store != CLASSIC:
            return frozenset()
        return frozenset(c for img in self.images for c in chain_ids(img.diff_ids))

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store,
                "images": [{"id": i.image_id, "diff_ids": list(i.diff_ids)}
                           for i in sorted(self.images, key=lambda i: i.image_id)]}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> HostLayers:
        """The inverse of to_dict; ValueError (with what is wrong) on anything malformed."""
        if not isinstance(doc, Mapping):
            raise ValueError("the engine's layers are not an object")
        store = doc.get("store")
        if store not in STORES:
            raise ValueError(f"unknown image store {store!r} (known: {', '.join(STORES)})")
        raw = doc.get("images")
        if not isinstance(raw, list):
            raise ValueError("`images` is not a list")
        images = []
        for entry in raw:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("diff_ids"), list):
                raise ValueError("an image entry is not {id, diff_ids: [...]}")
            images.append(HeldImage(
                _digest(entry.get("id"), "image ID"),
                tuple(_digest(d, "diff ID") for d in entry["diff_ids"])))
        return cls(str(store), tuple(images))


# --- what a thin archive carries -------------------------------------------------------------

@dataclass(frozen=True)
class LayerUse:
    """Layer i of an image: its diff ID, the chain ID of layers 0..i, its bytes in the
    (uncompressed) archive."""

    diff_id: str
    chain_id: str
    size: int


@dataclass(frozen=True)
class ImageDelta:
    image_id: str                    # "sha256:<hex>" (the config's digest)
    tags: tuple[str, ...]
    travels: tuple[LayerUse, ...]    # in the thin archive
    omitted: tuple[LayerUse, ...]    # the engine must hold these chains

    @property
    def travel_bytes(self) -> int:
        return sum(layer.size for layer in self.travels)

    @property
    def omitted_bytes(self) -> int:
        return sum(layer.size for layer in self.omitted)


@dataclass(frozen=True)
class ThinResult:
    images: tuple[ImageDelta, ...]
    travel_bytes: int          # layer bytes the thin archive carries (a shared layer once)
    omitted_bytes: int         # layer bytes left for the engine to supply (each once)
    uncompressed_size: int     # of the thin tar
    size: int                  # of the zstd file written
    sha256: str                # of the zstd file written (hex)

    @property
    def omitted_chains(self) -> tuple[str, ...]:
        """The chain IDs the target engine must hold (sorted): what the install checks with
        bundler.install.images.require_layers before anything changes."""
        return tuple(sorted({u.chain_id for img in self.images for u in img.omitted}))


def _plan(scan: Scan, sizes: Mapping[str, int], held: frozenset[str]
          ) -> tuple[tuple[ImageDelta, ...], frozenset[str]]:
    """Per image, which layers travel; and the layer members to leave out: those whose every
    use (image, position) is a held chain."""
    uses: dict[str, list[bool]] = {}
    deltas: list[tuple[str, LayoutImage, list[tuple[str, LayerUse]]]] = []
    for img in scan.layout():
        config = scan.docs.get(img.config)
        if config is None:
            raise ValueError(f"image config {img.config} is missing")
        diffs = tuple(f"sha256:{d}" for d in config_facts(config)[0])
        if len(diffs) != len(img.layers):
            raise ValueError(f"{img.config} lists {len(diffs)} layers, manifest.json "
                             f"{len(img.layers)}")
        rows = []
        for member, diff, chain in zip_strict(img.layers, diffs, chain_ids(diffs)):
            if member not in sizes:
                raise ValueError(f"layer {member} is not in the archive")
            uses.setdefault(member, []).append(chain in held)
            rows.append((member, LayerUse(diff, chain, sizes[member])))
        image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        deltas.append((image_id, img, rows))
    omit = frozenset(m for m, held_uses in uses.items() if all(held_uses))
    images = tuple(
        ImageDelta(image_id, img.tags,
                   travels=tuple(u for m, u in rows if m not in omit),
                   omitted=tuple(u for m, u in rows if m in omit))
        for image_id, img, rows in deltas)
    return images, omit


def _first_pass(src: Path) -> tuple[Scan, dict[str, int]]:
    """The archive's JSON documents, links and regular members' sizes (layers skipped)."""
    scan = Scan()
    sizes: dict[str, int] = {}
    with tar_stream(src) as tf:
        for member in tf:
            if member.issym() or member.islnk():
                scan.note_link(member)
            elif member.isreg():
                name = norm_member(member.name)
                sizes[name] = member.size
                if member.size <= SMALL:
                    for _ in scan.read(tf, member, hash_all=False):
                        pass
    resolved = {link: sizes[scan.resolve(link)] for link in scan.links
                if scan.resolve(link) in sizes}
    return scan, {**sizes, **resolved}


@contextlib.contextmanager
def tar_stream(path: Path) -> Iterator[tarfile.TarFile]:
    """The zstd-compressed tar at `path`, read as a stream."""
    with open(path, "rb") as fh, \
            zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as raw, \
            tarfile.open(fileobj=cast(IO[bytes], raw), mode="r|", bufsize=CHUNK) as tf:
        yield tf


class _Sink:
    """Counts and hashes what is written to the file."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.size += len(data)
        self.digest.update(data)
        return len(data)


class _Count:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.out.write(data)


def _copy(src: Path, out: tarfile.TarFile, skip: frozenset[str], scan: Scan) -> None:
    """Every member of `src` in order, headers as read, except the layer members in `skip`
    (and links to them)."""
    with tar_stream(src) as tf:
        for member in tf:
            name = norm_member(member.name)
            if member.isreg() and name in skip:
                continue
            if (member.issym() or member.islnk()) and scan.resolve(name) in skip:
                continue
            out.addfile(member, tf.extractfile(member) if member.isreg() else None)


def thin(src: Path, dest: Path, held: Collection[str]) -> ThinResult:
    """Write to `dest` the zstd docker-save archive `src` (the bundle's, as the build made
    it) without every layer whose chain ID is in `held` for each image that uses it.
    Two streaming passes over `src`, no layer in memory; the same inputs give the same bytes.
    BuildError if `src` is not such an archive; `dest` is then not left behind."""
    held_set = frozenset(_digest(c, "chain ID") for c in held)
    part = dest.with_name(dest.name + ".part")
    try:
        scan, sizes = _first_pass(src)
        images, omit = _plan(scan, sizes, held_set)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with open(fd, "wb") as fh:
            sink = _Sink(fh)
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True)
            with cctx.stream_writer(cast(IO[bytes], sink), closefd=False) as zw:
                counter = _Count(cast(IO[bytes], zw))
                with tarfile.open(fileobj=cast(IO[bytes], counter), mode="w|",
                                  format=tarfile.PAX_FORMAT, bufsize=CHUNK) as out:
                    _copy(src, out, omit, scan)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, dest)
    except (tarfile.TarError, ValueError, KeyError, TypeError, EOFError,
            zstandard.ZstdError) as exc:
        part.unlink(missing_ok=True)
        raise BuildError(f"image archive {src.name} cannot be thinned: {exc}",
                         hint="rebuild the full bundle's images (`bundle build`) and retry"
                         ) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return ThinResult(images=images,
                      travel_bytes=sum(sizes[m] for m in _layer_members(scan) - omit),
                      omitted_bytes=sum(sizes[m] for m in omit),
                      uncompressed_size=counter.count, size=sink.size,
                      sha256=sink.digest.hexdigest())


def _layer_members(scan: Scan) -> set[str]:
    return {m for img in scan.layout() for m in img.layers}


def missing_layers(images: Sequence[LayoutImage], configs: Mapping[str, bytes],
                   present: Collection[str]) -> tuple[tuple[str, str, str], ...]:
    """(tag or config, diff ID, chain ID) of every layer an archive names but does not carry:
    the chains an engine must hold for it to load. `configs`: config member -> its bytes;
    `present`: the regular members the archive holds. ValueError/KeyError if malformed."""
    out = []
    for img in images:
        diffs = tuple(f"sha256:{d}" for d in config_facts(configs[img.config])[0])
        if len(diffs) != len(img.layers):
            raise ValueError(f"{img.config} lists {len(diffs)} layers, the index "
                             f"{len(img.layers)}")
        label = img.tags[0] if img.tags else img.config
        for member, diff, chain in zip_strict(img.layers, diffs, chain_ids(diffs)):
            if member not in present:
                out.append((label, diff, chain))
    return tuple(out)
