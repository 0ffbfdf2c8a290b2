"""Build small bundles in-process, and hand-craft malformed ones, for format tests."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle import archive, volumes
from bundler.bundle.manifest import PAYLOAD_TYPE, FileEntry, Manifest, canonical_json
from bundler.bundle.models import Target
from bundler.bundle.signing import key_id, pae, sign


def kind_of(path: str) -> str:
    """The kind a payload at `path` has (as the builder names them; see manifest.KIND_PREFIX)."""
    if path.startswith("python/"):
        return "wheel" if path.endswith(".whl") else "lock"
    for prefix, kind in (("npm/", "npm"), ("images/", "images"), ("runtimes/", "runtime")):
        if path.startswith(prefix):
            return kind
    return "file"


def manifest_for(files: dict[str, bytes], **over: object) -> Manifest:
    entries = tuple(FileEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest(),
                              kind=kind_of(p)) for p, d in sorted(files.items()))
    fields: dict[str, object] = {"name": "shop", "version": "1.0.0", "sequence": 10,
                                 "created": "2026-01-01T00:00:00Z", "target": Target(),
                                 "files": entries}
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


def _pack(path: Path, key: Ed25519PrivateKey, files: dict[str, bytes], part_size: int | None,
          over: dict[str, object]) -> tuple[Manifest, volumes.PartIndex | None]:
    manifest = manifest_for(files, **over)
    sources = {}
    for p, data in files.items():
        src = path.parent / ("src-" + hashlib.sha256(p.encode()).hexdigest()[:12])
        src.write_bytes(data)
        sources[p] = src
    index = archive.pack(path, sign(manifest, key),
                         [(e, sources[e.path]) for e in manifest.files],
                         mtime=1_700_000_000, part_size=part_size)
    return manifest, index


def write_bundle(path: Path, key: Ed25519PrivateKey, files: dict[str, bytes],
                 **over: object) -> Manifest:
    """A valid bundle, packed by the real packer."""
    return _pack(path, key, files, None, over)[0]


def write_volume_set(path: Path, key: Ed25519PrivateKey, files: dict[str, bytes],
                     part_size: int, **over: object) -> Path:
    """A valid volume set (head, parts, index signed by `key`), packed by the real packer;
    returns its index."""
    _, index = _pack(path, key, files, part_size, over)
    assert index is not None
    return volumes.write_index(path, index, key)


def envelope_raw(body: bytes, key: Ed25519PrivateKey, payload_type: str = PAYLOAD_TYPE,
                 signed_type: str | None = None) -> bytes:
    """An envelope over arbitrary manifest bytes (for malformed-but-signed manifests)."""
    sig = key.sign(pae(signed_type or payload_type, body))
    return canonical_json({"payloadType": payload_type,
                           "payload": base64.b64encode(body).decode(),
                           "signatures": [{"keyid": key_id(key.public_key()),
                                           "sig": base64.b64encode(sig).decode()}]})


def craft(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    """Write a tar with exactly these members (no checks): for malformed bundles."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def reg(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


def members_of(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(path, "r:") as tar:
        for m in tar.getmembers():
            fh = tar.extractfile(m)
            out.append((m, fh.read() if fh else None))
    return out


def data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its data in the file, size)."""
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
