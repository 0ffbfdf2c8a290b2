"""`bundle build --against RECEIPT|OLD.bundle`: what the host already has, and so which of a
release's artifacts a delta bundle leaves out, down to the image layers its engine holds
(docs/delta.md).

The signed manifest stays the release's complete description; a file the host has is only
marked `travels: false`. Nothing here is trusted on the target: it re-checks every file it
is to supply from its store (a forged or stale receipt yields a bundle that fails closed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.bundle import archive
from bundler.bundle.imagedelta import CLASSIC, HostLayers, ThinResult, thin
from bundler.bundle.manifest import FileEntry, HostLayer
from bundler.bundle.models import ImageRef
from bundler.bundle.receipt import read_receipt
from bundler.bundle.signing import MAX_ENVELOPE_BYTES, TrustedKey, load_public_key
from bundler.errors import DeltaError, SignatureError
from bundler.fsutil import human_bytes


@dataclass(frozen=True)
class HostHas:
    """What the build may assume the host holds."""

    label: str  # how the build names its source
    product: str
    sequence: int  # the newest sequence the host knows: the build must be newer
    digests: frozenset[str]  # artifacts (sha256) in its store
    images: frozenset[str]  # Image IDs in its engine
    authenticated: bool  # a receipt verified with --host-key, or our own old bundle
    note: str  # what the build says about where this came from
    # The engine's store and its images' layers (a receipt that records them): the layer
    # chains a delta's image archive may leave out. None: unknown (an old bundle, an older
    # receipt, no engine answered), so images travel whole unless the engine holds them all.
    layers: HostLayers | None = None

    def to_json(self) -> dict[str, object]:
        return {"against": self.label, "authenticated": self.authenticated,
                "host_sequence": self.sequence}


def load(path: Path, host_key: Path | None, own_key: TrustedKey) -> HostHas:
    """A receipt (a DSSE envelope: JSON) or an old bundle (a tar), told apart by content."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1)
    except OSError as exc:
        raise DeltaError(f"cannot read {path}: {exc.strerror}",
                         hint="pass the receipt `bundle receipt` wrote, or an older bundle"
                         ) from None
    if head == b"{":
        return _from_receipt(path, host_key)
    if host_key is not None:
        raise DeltaError(f"{path} is not a receipt: --host-key only checks a receipt",
                         hint="drop --host-key, or pass the receipt instead of a bundle")
    return _from_bundle(path, own_key)


def _from_receipt(path: Path, host_key: Path | None) -> HostHas:
    data = path.read_bytes()[:MAX_ENVELOPE_BYTES + 1]
    key = load_public_key(host_key) if host_key is not None else None
    read = read_receipt(data, key, f"receipt {path.name}")
    r = read.receipt
    if read.authenticated:
        note = f"receipt {path.name} verified with host key {read.keyid}"
    else:
        note = (f"receipt {path.name} is UNAUTHENTICATED (no --host-key; it names host key "
                f"{read.keyid}): a forged one can only make a bundle that the host refuses, "
                "since it re-checks every file it is to supply")
    return HostHas(f"receipt {path.name}", r.product, r.newest_sequence, r.digests,
                   frozenset(r.images), read.authenticated, note, r.engine)


def _from_bundle(path: Path, own_key: TrustedKey) -> HostHas:
    """An older bundle of ours: its manifest is what the host has, ASSUMING it was installed
    there and is still kept (not pruned), its store intact and its images still loaded. No
    layers: a bundle does not say which image store the host's engine uses (the containerd
    store cannot load a thin archive), so images travel whole unless every ID is held."""
    try:
        verified = archive.manifest_of(path, [own_key])
    except SignatureError as exc:
        raise DeltaError(f"{path.name} is not a bundle signed by this build's key "
                         f"({exc.message.splitlines()[0]})",
                         hint="pass a bundle built with the same --key, or a receipt") from None
    m = verified.manifest
    return HostHas(f"bundle {path.name}", m.name, m.sequence,
                   frozenset(f.sha256 for f in m.files if f.kind != "images"),
                   frozenset(i.image_id for i in m.images), True,
                   f"against {path.name} ({m.version}, sequence {m.sequence}): assumes the host "
                   "installed it and still keeps it")


def check_fits(has: HostHas, name: str, sequence: int) -> None:
    """The receipt (or old bundle) is this product's and older than this build."""
    if has.product != name:
        raise DeltaError(f"{has.label} is for product {has.product!r}, this build is {name!r}",
                         hint="pass the receipt of a host that runs this product")
    if has.sequence >= sequence:
        raise DeltaError(f"{has.label}: the host already knows sequence {has.sequence}, not "
                         f"older than this build's {sequence}",
                         hint="the receipt is newer than this build: build a newer release "
                              "(a higher --sequence), or use the receipt of the host it is for")


def mark(entries: Sequence[FileEntry], images: Sequence[ImageRef],
         has: HostHas) -> list[FileEntry]:
    """`entries` with `travels` False for what the host has: a file whose sha256 its store
    holds; the images' archive when the engine holds every image's exact Image ID (else it
    travels, whole or thinned by `thin_images`)."""
    images_held = bool(images) and all(i.image_id in has.images for i in images)
    out = []
    for e in entries:
        # the SBOM always travels: `bundle sbom` reads it from the bundle itself
        held = images_held if e.kind == "images" else \
            e.kind != "sbom" and e.sha256 in has.digests
        out.append(dataclasses.replace(e, travels=not held))
    return out


@dataclass(frozen=True)
class ImagesPlan:
    """How a delta carries the release's images."""

    how: str  # "held" (the engine has every image: none travels) | "whole" | "thin"
    note: str  # one line for the build's output
    full_size: int = 0  # the full archive (compressed)
    thin: ThinResult | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"how": self.how, "note": self.note, "full_size": self.full_size}
        if self.thin is not None:
            t = self.thin
            doc |= {"size": t.size, "travel_layers": _count(t, travels=True),
                    "travel_layer_bytes": t.travel_bytes,
                    "host_layers": _count(t, travels=False),
                    "host_layer_bytes": t.omitted_bytes}
        return doc


def _count(t: ThinResult, travels: bool) -> int:
    """Distinct layers (by diff ID) that travel, or the chains the engine supplies."""
    if travels:
        return len({u.diff_id for img in t.images for u in img.travels})
    return len(t.omitted_chains)


def thin_images(entry: FileEntry, source: Path, has: HostHas, dest: Path
                ) -> tuple[FileEntry, Path, ImagesPlan]:
    """The images' archive of a delta: `entry`/`source` as they are (travelling whole, or
    not at all), or, when the host's engine keeps a classic image store holding some of
    their layer chains, a thin archive written to `dest` without them (its size and sha256
    in the entry, with the layers it leaves to the engine). Returns the entry, the file to
    pack, and what was done."""
    if not entry.travels:
        return entry, source, ImagesPlan("held", "images: the host's engine holds every "
                                                 "image (by its Image ID): none travels",
                                         entry.size)
    layers = has.layers
    if layers is None:
        why = ("an older bundle says nothing of the host's image store" if
               has.label.startswith("bundle ") else
               f"{has.label} does not record the engine's layers")
        return entry, source, ImagesPlan("whole", f"images travel whole: {why}", entry.size)
    if layers.store != CLASSIC:
        return entry, source, ImagesPlan(
            "whole", f"images travel whole: the host's engine uses the {layers.store} image "
                     "store, which loads only complete image archives", entry.size)
    got = thin(source, dest, layers.chains())
    if not got.omitted_chains:
        dest.unlink(missing_ok=True)
        return entry, source, ImagesPlan(
            "whole", "images travel whole: the host's engine holds none of their layers",
            entry.size)
    sizes = {u.chain_id: u.size for img in got.images for u in img.omitted}
    thin_entry = dataclasses.replace(
        entry, size=got.size, sha256=got.sha256,
        host_layers=tuple(HostLayer(c, sizes[c]) for c in got.omitted_chains))
    plan = ImagesPlan("thin", "", entry.size, got)
    note = (f"images: {_count(got, True)} layer(s) travel ({human_bytes(got.travel_bytes)}), "
            f"{_count(got, False)} the host's engine supplies ({human_bytes(got.omitted_bytes)}); "
            f"image archive {human_bytes(got.size)} instead of {human_bytes(entry.size)}")
    return thin_entry, dest, dataclasses.replace(plan, note=note)
