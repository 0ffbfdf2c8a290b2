"""`bundle receipt`: what this root holds and can prove, signed by its host key, for the
connected side to build a delta bundle against (bundler.bundle.receipt, docs/delta.md).

The host key (Ed25519) is made by the first install (or the first receipt): `state/host.key`
0600 in `state/` 0700, its public half `state/host.pub`. Every store object is re-hashed
before it is listed: what the receipt claims, the host has."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle.imagedelta import HostLayers
from bundler.bundle.receipt import PAYLOAD_TYPE, Artifact, HeldRelease, Receipt
from bundler.bundle.signing import key_id, load_private_key, sign_payload
from bundler.compat import UTC
from bundler.engine import engine_client, local_image_ids
from bundler.errors import BundlerError, StateError
from bundler.fsutil import atomic_write_bytes, create_file, private_dir
from bundler.install import images as engine_images
from bundler.install import store
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.state import State
from bundler.ui import Log


def host_key(layout: Layout) -> Ed25519PrivateKey:
    """The root's host key, made on first use (0600 in state/ 0700)."""
    private_dir(layout.state_dir)
    if layout.host_key.exists():
        key = load_private_key(layout.host_key)
        if not layout.host_pub.exists():
            _write_pub(layout, key)
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(layout.host_key, pem, mode=0o600)
    create_file(layout.host_key, 0o600)
    _write_pub(layout, key)
    return key


def _write_pub(layout: Layout, key: Ed25519PrivateKey) -> None:
    atomic_write_bytes(layout.host_pub, public_pem(key))


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Made:
    path: Path
    receipt: Receipt
    keyid: str
    public_key: str  # PEM
    host_pub: Path
    unprovable: tuple[str, ...]  # store objects that did not re-hash to their name
    engine: bool  # the engine was asked for the images (False: none, or no engine)

    def to_json(self) -> dict[str, object]:
        r = self.receipt
        return {"receipt": str(self.path), "product": r.product, "keyid": self.keyid,
                "public_key": self.public_key, "host_pub": str(self.host_pub),
                "current": r.current.to_json() if r.current else None,
                "kept": [k.to_json() for k in r.kept], "artifacts": len(r.artifacts),
                "artifact_bytes": sum(a.size for a in r.artifacts), "images": len(r.images),
                "engine": self.engine,
                "image_store": r.engine.store if r.engine is not None else None,
                "layer_chains": len(r.engine.chains()) if r.engine is not None else 0,
                "unprovable": list(self.unprovable)}


def make(layout: Layout, out: Path, log: Log) -> Made:
    """Write the signed receipt to `out` (a file, or a directory to write it into). Call under
    the root lock: nothing may change the store while it is hashed."""
    state = State.open_readonly(layout.db)
    if state is None:
        raise StateError(f"nothing was installed under {layout.root}: no receipt to write",
                         hint="install a full bundle first")
    try:
        product = state.product()
        rows = state.releases()
    finally:
        state.close()
    if product is None:
        raise StateError(f"nothing was installed under {layout.root}: no receipt to write",
                         hint="install a full bundle first")
    current = layout.current_version()
    kept = [r for r in rows if layout.release(r.version).is_dir() and r.product == product[0]]
    held = tuple(HeldRelease(r.version, r.sequence) for r in sorted(kept,
                                                                    key=lambda r: r.sequence))
    good, bad = store.holdings(layout)
    for name in bad:
        log(f"store object {name[:16]}... does not re-hash to its name: not listed")
    images, engine = _images(layout, [r.version for r in kept], log)
    layers = _layers(images, log) if images else None
    key = host_key(layout)
    receipt = Receipt(
        product=product[0], created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        host_key=key_id(key.public_key()), accepted_sequence=product[1],
        current=next((h for h in held if h.version == current), None), kept=held,
        artifacts=tuple(Artifact(h.sha256, h.size) for h in good), images=images,
        engine=layers)
    path = out / f"{product[0]}.receipt" if out.is_dir() else out
    atomic_write_bytes(path, sign_payload(receipt.to_bytes(), PAYLOAD_TYPE, key))
    return Made(path, receipt, receipt.host_key, public_pem(key).decode(), layout.host_pub,
                tuple(bad), engine)


def _images(layout: Layout, versions: list[str], log: Log) -> tuple[tuple[str, ...], bool]:
    """The Image IDs of the kept releases' images that the engine holds now. No images: the
    engine is not asked (a process-only root may have none); no engine: none listed."""
    ids: set[str] = set()
    for version in versions:
        manifest = ReleaseDir(layout.release(version)).manifest()
        if manifest is not None:
            ids.update(i.image_id for i in manifest.images)
    if not ids:
        return (), False
    if layout.swarm_file.exists():  # each node loads the archive: a delta carries it whole
        log("a swarm root: no image listed (a delta will carry the images whole)")
        return (), False
    found = local_image_ids(sorted(ids))
    if found is None:
        log("the docker engine did not answer: no image listed (a delta will carry them)")
        return (), False
    return tuple(sorted(i for i, have in found.items() if have == i)), True


def _layers(held: tuple[str, ...], log: Log) -> HostLayers | None:
    """The image store and the layers of the images in `held` (the releases' own, which the
    engine holds): what lets a delta leave their layer chains out. Only the product's images
    are named, not everything else the engine holds (docs/delta.md: what a receipt reveals).
    None when the engine does not answer: a delta then carries images whole."""
    try:
        return engine_images.held_layers(engine_client(BundlerError), only=held)
    except BundlerError as exc:
        log(f"the docker engine did not list its layers ({exc.message.splitlines()[0]}): "
            "a delta will carry images whole")
        return None
