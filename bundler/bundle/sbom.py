"""Reading the bundle's CycloneDX SBOM (written by bundler.build.sbom, docs/sbom.md): its
components as (kind, where, name, version), a count by kind for `bundle inspect`, and the
component changes between two bundles for `bundle diff`. Plain JSON: the target side reads it
without the CycloneDX library."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

# The component properties bundler writes (CycloneDX properties, `bundler:` namespace).
# wheel | npm | runtime | image | image-deb | image-apk | image-pypi | image-npm
KIND = "bundler:kind"
WHERE = "bundler:where"  # "bundle", or the image (its first tag) the package sits in
LAYER = "bundler:layer"  # the image layer (diff ID) a package inside an image came from


@dataclass(frozen=True)
class Item:
    kind: str
    where: str
    name: str
    version: str


def parse(data: bytes) -> dict[str, Any]:
    """The SBOM document (ValueError if it is not a CycloneDX JSON object)."""
    doc = json.loads(data.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX":
        raise ValueError("not a CycloneDX JSON document")
    return doc


def items(doc: dict[str, Any]) -> list[Item]:
    out = []
    for c in doc.get("components") or ():
        props = {p.get("name"): p.get("value") for p in c.get("properties") or ()}
        out.append(Item(str(props.get(KIND, c.get("type", ""))), str(props.get(WHERE, "")),
                        str(c.get("name", "")), str(c.get("version", ""))))
    return out


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Spec version, component count and the count of each kind."""
    counts = Counter(i.kind for i in items(doc))
    return {"spec_version": doc.get("specVersion"), "components": sum(counts.values()),
            "by_kind": dict(sorted(counts.items()))}


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Components added, removed, and with another version, keyed by (kind, where, name):
    a name present in several versions (npm) compares as the set of them."""
    a, b = _versions(old), _versions(new)
    added = [_row(k, None, sorted(b[k])) for k in sorted(b.keys() - a.keys())]
    removed = [_row(k, sorted(a[k]), None) for k in sorted(a.keys() - b.keys())]
    changed = [_row(k, sorted(a[k]), sorted(b[k])) for k in sorted(a.keys() & b.keys())
               if a[k] != b[k]]
    return {"added": added, "removed": removed, "changed": changed}


def _versions(doc: dict[str, Any]) -> dict[tuple[str, str, str], set[str]]:
    out: dict[tuple[str, str, str], set[str]] = {}
    for i in items(doc):
        out.setdefault((i.kind, i.where, i.name), set()).add(i.version)
    return out


def _row(key: tuple[str, str, str], before: list[str] | None,
         after: list[str] | None) -> dict[str, Any]:
    kind, where, name = key
    return {"kind": kind, "where": where, "name": name,
            "from": ", ".join(before) if before is not None else None,
            "to": ", ".join(after) if after is not None else None}
