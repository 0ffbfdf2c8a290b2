"""Load the bundle's container images into the engine, and prove they are the signed ones.

One streaming pass: the zstd archive is decompressed chunk by chunk and uploaded to the
engine's `POST /images/load` (the SDK's `load_image`, fed by a generator; no decompressed temp
file). While the bytes flow we parse the same tar stream ourselves, hashing every image config
and reading manifest.json (legacy docker-save layout) or index.json (OCI layout).

The last HOLD bytes (which hold the tar's end-of-archive marker) are only sent once the whole
zstd frame checked out (its content checksum) and every expected tag names exactly the
expected Image ID. Otherwise the upload is aborted: the engine sees a truncated request body,
its untar fails, and nothing is loaded or re-tagged (docker load unpacks the whole tar before
it registers anything). After a load, every tag is checked once more with `docker inspect`
(a containerd image store names an image by the manifest its importer writes, not by its
config digest: containerd_image_id).

A thin archive (bundler.bundle.imagedelta: a delta bundle's, without the layers the host's
engine holds) loads the same way: the engine takes a layer whose chain it holds from its own
store. `require_layers` checks, before anything changes, that the engine holds every chain the
signed manifest says it must supply (DeltaError, exit 24), and refuses the containerd image
store, which cannot load such an archive; the stream check then refuses a layer missing from
the archive that the manifest did not list. Why: docs/design/image-delta.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from bundler import progname
from bundler.bundle.imagearchive import ImageRecord, Scan, config_facts, norm_member
from bundler.bundle.imagedelta import CLASSIC, CONTAINERD, HeldImage, HostLayers, missing_layers
from bundler.bundle.imageref import canonical_tag
from bundler.compat import zip_strict
from bundler.engine import docker_sdk, engine_client, transport_errors
from bundler.errors import DeltaError, ImageLoadError, InstallError
from bundler.faults import fault_point
from bundler.fsutil import CHUNK, human_bytes
from bundler.ui import Log

HOLD = 1024 * 1024  # > the tar's end-of-archive marker plus record padding (at most 11 KiB)
_IN_CHUNK = 128 * 1024  # compressed bytes per decompress call: bounds the memory per step


class _Corrupt(Exception):
    """The archive is damaged (bad zstd frame, truncated, not a tar)."""


class _Mismatch(Exception):
    """The archive is intact but does not hold the images the manifest names."""


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # 0x184D2A50 to 0x184D2A5F


def _check_frames(fh: BinaryIO) -> None:
    """Walk the file's zstd frame structure (frame and block headers only, contents skipped)
    and raise _Corrupt unless it is whole frames and nothing else. zstandard's bounded
    stream_reader reports a file that ends inside a frame as a clean (short) end, so that is
    found here, before a byte is decompressed or uploaded."""
    fd = fh.fileno()
    size = os.fstat(fd).st_size
    pos = frames = 0

    def take(n: int) -> int:
        nonlocal pos
        data = os.pread(fd, n, pos)
        if len(data) < n:
            raise _Corrupt("it ends in the middle of a zstd frame (truncated)")
        pos += n
        return int.from_bytes(data, "little")

    while pos < size:
        magic = take(4)
        if magic & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
            length = take(4)  # (not `pos += take(4)`: take() moves pos)
            pos += length
        elif magic != _ZSTD_MAGIC:
            raise _Corrupt(f"it holds data that is not a zstd frame at offset {pos - 4}")
        else:
            fhd = take(1)
            single = fhd >> 5 & 1
            pos += (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
            last = 0
            while not last:
                block = take(3)
                last, kind = block & 1, block >> 1 & 3
                if kind == 3:
                    raise _Corrupt(f"zstd: reserved block type at offset {pos - 3}")
                pos += 1 if kind == 1 else block >> 3  # RLE: one byte, repeated
            pos += 4 * (fhd >> 2 & 1)  # content checksum
            frames += 1
        if pos > size:
            raise _Corrupt("it ends in the middle of a zstd frame (truncated)")
    if frames == 0:
        raise _Corrupt("it is empty")


class _ZstdReader:
    """Decompresses a file of one or more zstd frames; read(n) returns at most
    min(n, CHUNK) bytes, never more, so memory stays flat whatever the compression ratio
    (a few KiB of zstd can expand to GiBs).

    The frame structure is checked first (_check_frames: a file that ends inside a frame is
    refused); a frame whose content checksum is wrong raises _Corrupt when it ends."""

    def __init__(self, fh: BinaryIO) -> None:
        _check_frames(fh)
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            fh, read_size=_IN_CHUNK, read_across_frames=True)

    def read(self, n: int = -1) -> bytes:
        try:
            return self.reader.read(CHUNK if n < 0 else min(n, CHUNK))
        except zstandard.ZstdError as exc:
            raise _Corrupt(f"zstd: {exc}") from None


class _Tee:
    """Whatever the tar parser reads is also queued for the engine."""

    def __init__(self, src: _ZstdReader) -> None:
        self.src = src
        self.pending = bytearray()
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.pending += data
        self.total += len(data)
        return data

    def drain(self, keep: int) -> Iterator[bytes]:
        """Chunks of what is queued, except the last `keep` bytes (all of it when keep=0)."""
        while len(self.pending) > keep and (keep == 0 or len(self.pending) - keep >= CHUNK):
            size = min(CHUNK, len(self.pending) - keep)
            chunk = bytes(self.pending[:size])
            del self.pending[:size]
            yield chunk


def _expected(expected: Sequence[ImageRecord]) -> dict[str, str]:
    want: dict[str, str] = {}
    for rec in expected:
        tag = canonical_tag(rec.ref)
        if not rec.image_id.startswith("sha256:"):
            raise ImageLoadError(f"image {rec.ref}: expected Image ID {rec.image_id!r} is not "
                                 "sha256:<hex>")
        if tag in want and want[tag] != rec.image_id:
            raise ImageLoadError(f"image {rec.ref} is expected twice with different IDs")
        want[tag] = rec.image_id
    return want


def _check_archive(scan: Scan, want: dict[str, str]) -> None:
    """Every expected tag must name exactly the expected config digest; no other tag may be
    in the archive (it would move a tag on this host that nobody signed for)."""
    try:
        images = scan.layout()
    except (ValueError, KeyError, TypeError) as exc:
        raise _Corrupt(f"its image index is unreadable: {exc}") from None
    found: dict[str, str] = {}
    for img in images:
        sha = scan.hashes.get(img.config)
        if sha is None:
            raise _Corrupt(f"config {img.config} is missing or too large")
        for tag in img.tags:
            found[tag] = f"sha256:{sha}"
    for tag, image_id in want.items():
        have = found.get(tag)
        if have is None:
            raise _Mismatch(f"image {tag} is not in the archive (the manifest expects "
                            f"{image_id})")
        if have != image_id:
            raise _Mismatch(f"image {tag}: the archive holds {have}, the manifest expects "
                            f"{image_id}")
    extra = sorted(set(found) - set(want))
    if extra:
        raise _Mismatch(f"the archive also tags {', '.join(extra)}, which the manifest does "
                        "not list")


def _check_layers(scan: Scan, present: set[str], omitted: Collection[str]) -> None:
    """Every layer the archive does not carry must be one the signed manifest leaves to the
    engine (and require_layers found there): else the engine would fail half-way, after it
    loaded the images before it."""
    try:
        missing = missing_layers(scan.layout(), scan.docs, present)
    except (ValueError, KeyError, TypeError) as exc:
        raise _Corrupt(f"its image index is unreadable: {exc}") from None
    unlisted = [(label, diff) for label, diff, chain in missing if chain not in omitted]
    if unlisted:
        label, diff = unlisted[0]
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise _Mismatch(f"image {label}: layer {diff[:19]} is not in the archive and the "
                        f"manifest does not say the engine supplies it{more}")


# What containerd's importer (core/images/archive/importer.go) writes for each image of a
# docker-save archive, and the image store then names it by: a Docker schema 2 manifest, compact
# JSON in this field order (observed on Docker 26.1.5, containerd 1.7.24: docs/design/
# image-delta.md). An uncompressed layer's blob digest is its diff ID.
_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
_CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


def containerd_image_id(config: tuple[str, int], layers: Sequence[tuple[str, int]]) -> str:
    """The Image ID a containerd image store gives an image loaded from a docker-save archive:
    the digest of the manifest its importer writes from the config ((digest, size)) and the
    layers ((diff ID, size of the uncompressed layer member), bottom first). It names the
    signed config and every layer by digest, so it proves the image as the config digest does
    in a classic store; a compressed layer member gives another digest, and is refused."""
    doc = {"schemaVersion": 2, "mediaType": _MANIFEST_V2,
           "config": {"mediaType": _CONFIG_V1, "digest": config[0], "size": config[1]},
           "layers": [{"mediaType": _LAYER_TAR, "digest": diff, "size": size}
                      for diff, size in layers]}
    data = json.dumps(doc, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _containerd_ids(scan: Scan, present: Mapping[str, int]) -> dict[str, str]:
    """Tag -> containerd_image_id, for every image of a docker-save archive (manifest.json)
    whose layers it all carries (a thin archive never loads there: require_layers)."""
    if "manifest.json" not in scan.docs:
        return {}
    out: dict[str, str] = {}
    try:
        for img in scan.layout():
            if not all(m in present for m in img.layers):
                continue
            config = scan.docs[img.config]
            diffs = (f"sha256:{d}" for d in config_facts(config)[0])
            image_id = containerd_image_id(
                ("sha256:" + hashlib.sha256(config).hexdigest(), len(config)),
                [(d, present[m]) for d, m in zip_strict(diffs, img.layers)])
            out.update(dict.fromkeys(img.tags, image_id))
    except (ValueError, KeyError, TypeError) as exc:
        raise _Corrupt(f"its image index is unreadable: {exc}") from None
    return out


def _upload(archive: Path, want: dict[str, str], stats: dict[str, int],
            omitted: Collection[str] = frozenset(), *,
            engine_ids: dict[str, str] | None = None) -> Iterator[bytes]:
    """The decompressed archive, as chunks for the engine; raises before the final HOLD
    bytes when the archive is damaged, holds other images than expected, or lacks a layer
    that `omitted` (the chain IDs the engine supplies) does not name. `engine_ids` is filled
    with the Image ID each tag gets in a containerd image store (containerd_image_id)."""
    with open(archive, "rb") as fh:
        src = _ZstdReader(fh)
        tee = _Tee(src)
        scan = Scan()
        present: dict[str, int] = {}  # regular member -> its size
        try:
            with tarfile.open(fileobj=cast(IO[bytes], tee), mode="r|", bufsize=CHUNK) as tf:
                for member in tf:
                    if member.issym() or member.islnk():
                        scan.note_link(member)
                    elif member.isreg():
                        present[scan.resolve(norm_member(member.name))] = member.size
                        for _ in scan.read(tf, member, hash_all=False):
                            yield from tee.drain(HOLD)
                    yield from tee.drain(HOLD)
                    if tee.total > HOLD:
                        fault_point("images-stream")
        except (tarfile.TarError, ValueError, EOFError) as exc:
            raise _Corrupt(f"it is not a valid tar: {exc}") from None
        trailing = 0
        while chunk := tee.read(CHUNK):  # the padding after the end-of-archive marker
            trailing += len(chunk)
            if trailing > HOLD:  # not padding: a stream of zeros is an "empty tar" too
                raise _Corrupt(f"more than {human_bytes(HOLD)} follow the tar's "
                               "end-of-archive marker")
        _check_archive(scan, want)
        _check_layers(scan, set(present), omitted)
        if engine_ids is not None:
            engine_ids.update(_containerd_ids(scan, present))
        stats["uncompressed"] = tee.total
        yield from tee.drain(0)


def load(archive: Path, expected: Sequence[ImageRecord], log: Log,
         client: Any | None = None, *, omitted: Collection[str] = ()) -> None:
    """Load the combined image archive (zstd docker-save tar) and check every Image ID, into
    the engine of `client` (default: DOCKER_HOST's; a swarm loads into every node's).
    `omitted`: the chain IDs of the layers a thin archive leaves to the engine, as the signed
    manifest lists them; checked with require_layers before the upload starts."""
    want = _expected(expected)
    client = client if client is not None else engine_client(InstallError)
    errors = docker_sdk().errors
    started = time.monotonic()
    stats: dict[str, int] = {}
    engine_ids: dict[str, str] = {}
    if omitted:
        require_layers(client, omitted)
        log(f"{len(set(omitted))} layer chain(s) come from the engine's own store")
    log(f"loading {len(want)} image(s) from {archive.name}")
    try:
        upload = _upload(archive, want, stats, frozenset(omitted), engine_ids=engine_ids)
        for msg in client.api.load_image(upload, quiet=True):
            if isinstance(msg, dict) and msg.get("error"):
                raise ImageLoadError(f"docker load failed: {_line(msg['error'])}",
                                     hint="see the engine's log (journalctl -u docker)")
    except _Corrupt as exc:
        raise ImageLoadError(f"image archive {archive.name} is damaged: {exc}; nothing was "
                             "loaded") from None
    except _Mismatch as exc:
        raise ImageLoadError(f"{exc}; nothing was loaded") from None
    except errors.APIError as exc:
        raise ImageLoadError(f"docker load failed: {_line(str(exc.explanation or exc))}",
                             hint="see the engine's log; is /var/lib/docker full?") from None
    except (OSError, errors.DockerException, *transport_errors()) as exc:
        raise ImageLoadError(f"the docker engine dropped the image upload: {_line(str(exc))}",
                             hint="see the engine's log; is /var/lib/docker full?") from None
    _check_loaded(client, want, engine_ids)
    secs = time.monotonic() - started
    log(f"loaded {len(want)} image(s), {human_bytes(stats.get('uncompressed', 0))} in "
        f"{secs:.1f}s; Image IDs match the manifest")


def _check_loaded(client: Any, want: Mapping[str, str], engine_ids: Mapping[str, str]) -> None:
    """Every tag names the signed image: its config digest in a classic store; in a containerd
    store, the digest of the manifest made of that config and the signed layers."""
    errors = docker_sdk().errors
    containerd = _store(client) == CONTAINERD
    for tag, image_id in want.items():
        try:
            have = str(client.api.inspect_image(tag)["Id"])
        except errors.ImageNotFound:
            raise ImageLoadError(f"image {tag} is missing after docker load (the manifest "
                                 f"expects {image_id})") from None
        if not containerd and have != image_id:
            raise ImageLoadError(f"image {tag} is {have} after docker load, the manifest "
                                 f"expects {image_id}")
        if containerd and have != engine_ids.get(tag):
            raise ImageLoadError(
                f"image {tag} is {have} after docker load; for the config {image_id} and the "
                f"layers the manifest signs, this engine's containerd image store would name it "
                f"{engine_ids.get(tag, '(unknown)')}",
                hint="was a layer stored compressed? see docs/design/image-delta.md")


def _store(client: Any, error: type[InstallError] = ImageLoadError) -> str:
    """CLASSIC or CONTAINERD, asked of the engine; `error` if it does not answer."""
    errors = docker_sdk().errors
    try:
        return image_store(client.info())
    except (errors.DockerException, *transport_errors()) as exc:
        raise error(f"the docker engine did not answer `docker info`: {_line(str(exc))}",
                    hint="check the engine's log") from None


# --- what the engine holds: for the receipt, and before a thin archive is loaded ------------

_SNAPSHOTTER = "io.containerd.snapshotter.v1"
_FIX = ("carry a full bundle (`bundle build` without --against), or build the delta against "
        "a fresh receipt of this host (`{bundle} receipt`)")


def image_store(info: Mapping[str, Any]) -> str:
    """CLASSIC or CONTAINERD, from the engine's `docker info` (GET /info). The containerd
    image store reports its snapshotter as DriverStatus [["driver-type",
    "io.containerd.snapshotter.v1"]] (moby daemon/containerd/service.go, LayerStoreStatus);
    a graph driver reports its own facts there (overlay2: "Backing Filesystem", ...)."""
    for row in info.get("DriverStatus") or ():
        if isinstance(row, (list, tuple)) and len(row) == 2 and tuple(row) == (
                "driver-type", _SNAPSHOTTER):
            return CONTAINERD
    return CLASSIC


def held_layers(client: Any, only: Collection[str] | None = None) -> HostLayers:
    """The engine's image store and every image in it (dangling and intermediate ones too;
    `only`: just these Image IDs, those it holds) with its diff IDs: what a receipt records.
    An image removed while we look is skipped."""
    errors = docker_sdk().errors
    try:
        store = image_store(client.info())
        ids = sorted({str(i) for i in client.api.images(all=True, quiet=True)} if only is None
                     else set(only))
        images = []
        for image_id in ids:
            try:
                found = client.api.inspect_image(image_id)
            except errors.ImageNotFound:
                continue
            if str(found["Id"]) != image_id:  # `only` names IDs; never a tag's other image
                continue
            layers = found["RootFS"].get("Layers") or []
            images.append(HeldImage(image_id, tuple(str(d) for d in layers)))
    except (errors.DockerException, *transport_errors()) as exc:
        raise InstallError(f"the docker engine did not list its images: {_line(str(exc))}",
                           hint="check `docker info` and the engine's log") from None
    return HostLayers(store, tuple(images))


def require_layers(client: Any, needed: Collection[str]) -> None:
    """Refuse (DeltaError, exit 24, before anything changes) unless the engine can supply
    every layer chain in `needed`: a classic image store holding each one. The error lists
    what is missing and the fix."""
    if not needed:
        return
    host = held_layers(client)
    if host.store != CLASSIC:
        raise _containerd_refusal("which loads only complete image archives",
                                  f"{len(set(needed))} layer(s)")
    missing = sorted(set(needed) - host.chains())
    if missing:
        shown = ", ".join(c.removeprefix("sha256:")[:12] for c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DeltaError(
            f"the docker engine lacks {len(missing)} image layer(s) this delta bundle leaves to "
            f"it (chain IDs {shown}{more}): were images removed since the receipt?",
            hint=_FIX.replace("{bundle}", progname.prog()))


def require_classic(client: Any, what: str) -> None:
    """Refuse (DeltaError, before anything changes) a delta that leaves `what` (whole images)
    to an engine keeping the containerd image store: there an image is named by the manifest
    its importer wrote, which the signed manifest does not record, so what the engine holds
    cannot be proved to be the release's images."""
    if _store(client, InstallError) != CLASSIC:
        raise _containerd_refusal("which names an image by the manifest it imported, not by "
                                  "the config digest the signed manifest records", what)


def _containerd_refusal(why: str, what: str) -> DeltaError:
    return DeltaError(f"this engine keeps images in the containerd image store, {why}; this "
                      f"delta bundle leaves {what} to the engine",
                      hint=_FIX.replace("{bundle}", progname.prog()))


def _line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else "unknown error"
