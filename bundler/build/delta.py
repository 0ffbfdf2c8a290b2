"""`bundle build --against RECEIPT|OLD.bundle`: what the host already has, and so which of a
release's artifacts a delta bundle leaves out (docs/delta.md).

The signed manifest stays the release's complete description; a file the host has is only
marked `travels: false`. Nothing here is trusted on the target: it re-checks every file it
is to supply from its store (a forged or stale receipt yields a bundle that fails closed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bundler.bundle import archive
from bundler.bundle.manifest import FileEntry
from bundler.bundle.models import ImageRef
from bundler.bundle.receipt import read_receipt
from bundler.bundle.signing import MAX_ENVELOPE_BYTES, TrustedKey, load_public_key
from bundler.errors import DeltaError, SignatureError


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
                   frozenset(r.images), read.authenticated, note)


def _from_bundle(path: Path, own_key: TrustedKey) -> HostHas:
    """An older bundle of ours: its manifest is what the host has, ASSUMING it was installed
    there and is still kept (not pruned), its store intact and its images still loaded."""
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
    holds; the images' archive when the engine holds every image's exact Image ID (images
    travel whole or not at all)."""
    images_held = bool(images) and all(i.image_id in has.images for i in images)
    out = []
    for e in entries:
        held = images_held if e.kind == "images" else e.sha256 in has.digests
        out.append(dataclasses.replace(e, travels=not held))
    return out
