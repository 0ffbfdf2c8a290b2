"""A host's receipt: what an install root holds and can prove, signed by the root's host key.

Written on the target (`bundle receipt`, bundler.install.receipts), read on the connected
side (`bundle build --against RECEIPT`), so both sides import this module. Emitted like the
manifest (canonical JSON) and parsed as strictly (duplicate keys, unknown keys, floats
refused): the connected side decides from it what a delta bundle leaves out. See
docs/delta.md for what it reveals about the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bundler.bundle.imagedelta import HostLayers
from bundler.bundle.manifest import SHA256_RE, canonical_json, strict_loads
from bundler.bundle.models import NAME_RE, VERSION_RE
from bundler.bundle.signing import TrustedKey, unverified_payload, verify_payload
from bundler.errors import DeltaError

SCHEMA = 1
PAYLOAD_TYPE = "application/vnd.bundler.receipt+json"
_IMAGE_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_KEYID_RE = re.compile(r"^[0-9a-f]{16}$")
_TIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_KEYS = {"schema", "product", "created", "host_key", "accepted_sequence", "current", "kept",
         "artifacts", "images"}
# Written by a host whose engine was asked (bundler 19-d on); an older receipt has none, and
# a delta built against it carries images whole.
_OPTIONAL = {"engine"}


@dataclass(frozen=True)
class HeldRelease:
    version: str
    sequence: int

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "sequence": self.sequence}


@dataclass(frozen=True)
class Artifact:
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Receipt:
    product: str
    created: str
    host_key: str  # the key id of the host key that signs it
    accepted_sequence: int  # the newest sequence the root accepted
    current: HeldRelease | None
    kept: tuple[HeldRelease, ...]  # every release directory the root keeps, current included
    artifacts: tuple[Artifact, ...]  # store objects, each re-hashed when the receipt was made
    images: tuple[str, ...]  # Image IDs of the releases' images present in the engine
    # Those images' layers and the engine's image store (classic: their layer chains can be
    # left out of a delta's image archive). None: the engine was not asked, or an old receipt.
    engine: HostLayers | None = None
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "product": self.product, "created": self.created,
                "host_key": self.host_key, "accepted_sequence": self.accepted_sequence,
                "current": self.current.to_json() if self.current else None,
                "kept": [r.to_json() for r in self.kept],
                "artifacts": [a.to_json() for a in sorted(self.artifacts,
                                                          key=lambda a: a.sha256)],
                "images": sorted(self.images)} \
            | ({"engine": self.engine.to_dict()} if self.engine is not None else {})

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(a.sha256 for a in self.artifacts)

    @property
    def newest_sequence(self) -> int:
        """The newest sequence the host knows: any build against it must be newer."""
        return max([self.accepted_sequence, *(r.sequence for r in self.kept)])


@dataclass(frozen=True)
class Read:
    receipt: Receipt
    keyid: str  # the key id the envelope names (verified only if `authenticated`)
    authenticated: bool  # its signature was checked against the operator's --host-key


def read_receipt(data: bytes, host_key: TrustedKey | None, what: str) -> Read:
    """A receipt envelope: its signature checked against `host_key` when one is given (a
    SignatureError if it fails), else only its form. The receipt must name the key that
    signed it."""
    if host_key is not None:
        body, keyid = verify_payload(data, [host_key], PAYLOAD_TYPE, what)
    else:
        body, keyid = unverified_payload(data, PAYLOAD_TYPE, what)
    receipt = parse_receipt(body, what)
    if receipt.host_key != keyid:
        raise DeltaError(f"{what} names host key {receipt.host_key} but is signed by {keyid}",
                         hint="pass the file `bundle receipt` wrote on the host, unchanged")
    return Read(receipt, keyid, host_key is not None)


def parse_receipt(data: bytes, what: str = "receipt") -> Receipt:
    """A receipt's payload bytes, parsed strictly; DeltaError (one line) if malformed."""
    try:
        return _from_json(strict_loads(data))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DeltaError(f"{what} is malformed: {str(exc)[:200]}",
                         hint="pass the file `bundle receipt` wrote on the host, unchanged"
                         ) from None


def _keys(doc: Any, keys: set[str], what: str, optional: frozenset[str] = frozenset()
          ) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ValueError(f"{what} must be an object")
    if set(doc) - optional != keys:
        extra = sorted(set(doc) - keys - optional)
        missing = sorted(keys - set(doc))
        raise ValueError(f"{what}: " + "; ".join(
            ([f"unknown keys {', '.join(extra)}"] if extra else [])
            + ([f"missing keys {', '.join(missing)}"] if missing else [])))
    return doc


def _int(value: Any, what: str, least: int = 0) -> int:
    if type(value) is not int or value < least:
        raise ValueError(f"{what} must be an integer of at least {least}")
    return value


def _text(value: Any, what: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} {str(value)[:40]!r} is not valid")
    return value


def _release(raw: Any, what: str) -> HeldRelease:
    doc = _keys(raw, {"version", "sequence"}, what)
    return HeldRelease(_text(doc["version"], f"{what}.version", VERSION_RE),
                       _int(doc["sequence"], f"{what}.sequence", 1))


def _list(raw: Any, what: str) -> list[Any]:
    if not isinstance(raw, list):
        raise ValueError(f"{what} must be a list")
    return raw


def _engine(raw: Any) -> HostLayers:
    """The engine's image store and its images' layers, as strictly as the rest: exact keys,
    each image once, digests sha256:<64 hex>."""
    doc = _keys(raw, {"store", "images"}, "engine")
    for i, item in enumerate(_list(doc["images"], "engine.images")):
        _keys(item, {"id", "diff_ids"}, f"engine.images[{i}]")
        for j, diff in enumerate(_list(item["diff_ids"], f"engine.images[{i}].diff_ids")):
            _text(diff, f"engine.images[{i}].diff_ids[{j}]", _IMAGE_ID_RE)
    layers = HostLayers.from_dict(doc)
    if len({img.image_id for img in layers.images}) != len(layers.images):
        raise ValueError("an engine image is listed twice")
    return layers


def _from_json(raw: Any) -> Receipt:
    doc = _keys(raw, _KEYS, "receipt", frozenset(_OPTIONAL))
    if _int(doc["schema"], "schema") != SCHEMA:
        raise ValueError(f"unsupported receipt schema {doc['schema']} (this bundler reads "
                         f"{SCHEMA})")
    artifacts = []
    for i, item in enumerate(_list(doc["artifacts"], "artifacts")):
        a = _keys(item, {"sha256", "size"}, f"artifacts[{i}]")
        artifacts.append(Artifact(_text(a["sha256"], f"artifacts[{i}].sha256", SHA256_RE),
                                  _int(a["size"], f"artifacts[{i}].size")))
    if len({a.sha256 for a in artifacts}) != len(artifacts):
        raise ValueError("an artifact is listed twice")
    images = [_text(x, f"images[{i}]", _IMAGE_ID_RE)
              for i, x in enumerate(_list(doc["images"], "images"))]
    if len(set(images)) != len(images):
        raise ValueError("an image is listed twice")
    kept = tuple(_release(r, f"kept[{i}]") for i, r in enumerate(_list(doc["kept"], "kept")))
    current = None if doc["current"] is None else _release(doc["current"], "current")
    if current is not None and current not in kept:
        raise ValueError("current is not among the kept releases")
    return Receipt(product=_text(doc["product"], "product", NAME_RE),
                   created=_text(doc["created"], "created", _TIME_RE),
                   host_key=_text(doc["host_key"], "host_key", _KEYID_RE),
                   accepted_sequence=_int(doc["accepted_sequence"], "accepted_sequence"),
                   current=current, kept=kept, artifacts=tuple(artifacts),
                   images=tuple(images),
                   engine=_engine(doc["engine"]) if "engine" in doc else None)
