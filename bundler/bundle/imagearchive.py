"""Reading container image archives: `docker save` output (legacy manifest.json, and Docker
25+'s OCI index next to it) and OCI image-layout tars. Shared by the build side, which merges
archives into the bundle's one docker-save tar, and the install side, which checks that archive
while it streams it into the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bundler.bundle.imageref import canonical_tag
from bundler.fsutil import CHUNK

# JSON documents (manifest.json, index.json, OCI manifests, image configs) are read into memory
# up to this size; layers never are.
SMALL = 4 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_OCI_INDEX = ("application/vnd.oci.image.index.v1+json",
              "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class ImageRecord:
    ref: str       # "name:tag" as loaded on the target (":latest" added if the spec had none)
    image_id: str  # "sha256:<hex>": the config digest, as `docker inspect` .Id reports it



@dataclass(frozen=True)
class LayoutImage:
    """One image described by an archive: member paths (links resolved by the caller)."""

    config: str
    layers: tuple[str, ...]
    tags: tuple[str, ...]        # canonical name:tag
    platform: str | None = None  # from an OCI index descriptor, if any


def norm_member(name: str) -> str:
    """Archive member name in one spelling ("./a/b/" -> "a/b"); refuses escaping paths."""
    clean = posixpath.normpath(name.lstrip("/")) if name not in ("", ".", "./") else "."
    if clean == ".." or clean.startswith("../") or name.startswith("/"):
        raise ValueError(f"unsafe member path {name!r}")
    return clean


class Scan:
    """What one pass over an image tar learned: hashes, small JSON documents, links."""

    def __init__(self) -> None:
        self.hashes: dict[str, str] = {}  # regular member -> sha256 hex (small ones, or all)
        self.docs: dict[str, bytes] = {}  # small members that look like JSON
        self.links: dict[str, str] = {}   # link member -> target member (normalised)

    def resolve(self, name: str) -> str:
        for _ in range(16):
            target = self.links.get(name)
            if target is None:
                return name
            name = target
        raise ValueError(f"link loop at {name!r}")

    def note_link(self, member: tarfile.TarInfo) -> None:
        name = norm_member(member.name)
        if member.issym():
            target = norm_member(posixpath.join(posixpath.dirname(name), member.linkname))
        else:
            target = norm_member(member.linkname)
        self.links[name] = target

    def read(self, tf: tarfile.TarFile, member: tarfile.TarInfo, *,
             hash_all: bool) -> Iterator[str]:
        """Read a regular member, hashing it when small or `hash_all` and keeping it when it
        is a small JSON document; yields after every chunk, so a caller reading the tar from a
        stream it forwards (bundler.install.images) can pass data on as it goes."""
        name = norm_member(member.name)
        fh = tf.extractfile(member)
        if fh is None:
            return
        keep = member.size <= SMALL
        digest = hashlib.sha256() if keep or hash_all else None
        kept = bytearray()
        while chunk := fh.read(CHUNK):
            if digest is not None:
                digest.update(chunk)
            if keep:
                kept += chunk
            yield name
        if digest is not None:
            self.hashes[name] = digest.hexdigest()
        if keep and bytes(kept[:1]) in (b"{", b"["):
            self.docs[name] = bytes(kept)

    def layout(self) -> list[LayoutImage]:
        """The images the archive describes: legacy manifest.json (docker save; Docker 25+
        writes it too, next to its OCI index) first, else an OCI image layout (index.json)."""
        manifest = self.docs.get("manifest.json")
        if manifest is not None:
            return self._legacy(manifest)
        index = self.docs.get("index.json")
        if index is not None:
            return self._oci(index, depth=0)
        raise ValueError("no manifest.json or index.json: not a docker-save or OCI archive")

    def _legacy(self, raw: bytes) -> list[LayoutImage]:
        doc = json.loads(raw)
        if not isinstance(doc, list):
            raise ValueError("manifest.json is not a list")
        images = []
        for entry in doc:
            tags = tuple(canonical_tag(t) for t in entry.get("RepoTags") or ())
            images.append(LayoutImage(
                config=self.resolve(norm_member(str(entry["Config"]))),
                layers=tuple(self.resolve(norm_member(str(p))) for p in entry["Layers"]),
                tags=tags))
        return images

    def _oci(self, raw: bytes, depth: int, tags: tuple[str, ...] = (),
             platform: str | None = None) -> list[LayoutImage]:
        if depth > 4:
            raise ValueError("OCI index nesting too deep")
        doc = json.loads(raw)
        images: list[LayoutImage] = []
        for desc in doc.get("manifests") or ():
            here = tags or _oci_tags(desc.get("annotations") or {})
            plat = desc.get("platform")
            pstr = platform
            if isinstance(plat, dict) and plat.get("os") and plat.get("architecture"):
                pstr = "/".join(p for p in (plat["os"], plat["architecture"],
                                            plat.get("variant")) if p)
            blob = self.docs.get(self.resolve(_blob(str(desc["digest"]))))
            if blob is None:
                raise ValueError(f"OCI blob {desc['digest']} is missing")
            _check_digest(blob, str(desc["digest"]))
            kind = desc.get("mediaType") or json.loads(blob).get("mediaType")
            if kind in _OCI_INDEX:
                images += self._oci(blob, depth + 1, here, pstr)
                continue
            man = json.loads(blob)
            if "config" not in man:
                continue  # e.g. an attestation manifest
            images.append(LayoutImage(
                config=self.resolve(_blob(str(man["config"]["digest"]))),
                layers=tuple(self.resolve(_blob(str(layer["digest"])))
                             for layer in man.get("layers") or ()),
                tags=here, platform=pstr))
        return images


def _oci_tags(annotations: Mapping[str, Any]) -> tuple[str, ...]:
    tags = []
    for key in ("io.containerd.image.name", "org.opencontainers.image.ref.name"):
        value = annotations.get(key)
        if isinstance(value, str) and ("/" in value or ":" in value):
            with contextlib.suppress(ValueError):
                tags.append(canonical_tag(value))
    return tuple(dict.fromkeys(tags))


def _blob(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX64.match(hexpart):
        raise ValueError(f"unsupported digest {digest!r}")
    return f"blobs/sha256/{hexpart}"


def _check_digest(data: bytes, digest: str) -> None:
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"blob {digest} does not match its digest")


def config_facts(config: bytes) -> tuple[tuple[str, ...], str, str, str | None]:
    """(diff_ids as hex, os, architecture, variant) of an image config."""
    doc = json.loads(config)
    diff_ids = doc["rootfs"]["diff_ids"]
    hexes = []
    for d in diff_ids:
        algo, _, hexpart = str(d).partition(":")
        if algo != "sha256" or not _HEX64.match(hexpart):
            raise ValueError(f"unsupported diff_id {d!r}")
        hexes.append(hexpart)
    return tuple(hexes), str(doc.get("os", "")), str(doc.get("architecture", "")), \
        doc.get("variant")
