"""Small OSV snapshots in the real format (osv.dev's per-ecosystem all.zip of <ID>.json
records, https://ossf.github.io/osv-schema/), made for the versions the tests install."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any


def record(vid: str, ecosystem: str, name: str, *, introduced: str = "0",
           fixed: str | None = None, last_affected: str | None = None,
           limit: str | None = None, versions: tuple[str, ...] = (),
           severity_word: str | None = None, cvss: str | None = None,
           withdrawn: str | None = None, modified: str = "2026-12-01T00:00:00Z",
           range_type: str = "ECOSYSTEM", summary: str = "") -> dict[str, Any]:
    events: list[dict[str, str]] = [{"introduced": introduced}]
    if fixed:
        events.append({"fixed": fixed})
    if last_affected:
        events.append({"last_affected": last_affected})
    if limit:
        events.append({"limit": limit})
    affected: dict[str, Any] = {"package": {"ecosystem": ecosystem, "name": name},
                                "ranges": [{"type": range_type, "events": events}]}
    if versions:
        affected["versions"] = list(versions)
    doc: dict[str, Any] = {"schema_version": "1.6.0", "id": vid, "modified": modified,
                           "published": "2026-11-01T00:00:00Z", "aliases": [f"CVE-{vid}"],
                           "summary": summary or f"test advisory {vid}",
                           "affected": [affected]}
    if severity_word:
        doc["database_specific"] = {"severity": severity_word}
    if cvss:  # the vector's own prefix says its version (a v2 vector has none)
        kind = {"CVSS:3": "CVSS_V3", "CVSS:4": "CVSS_V4"}.get(cvss[:6], "CVSS_V2")
        doc["severity"] = [{"type": kind, "score": cvss}]
    if withdrawn:
        doc["withdrawn"] = withdrawn
    return doc


def write_zip(path: Path, records: list[dict[str, Any]]) -> Path:
    """osv.dev's layout: one <ID>.json per record at the top of all.zip."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for r in records:
            zf.writestr(f"{r['id']}.json", json.dumps(r, indent=2))
    return path


def write_tar(path: Path, records: list[dict[str, Any]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for r in records:
            data = json.dumps(r).encode()
            info = tarfile.TarInfo(f"osv/{r['id']}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_dir(path: Path, records: list[dict[str, Any]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for r in records:
        (path / f"{r['id']}.json").write_text(json.dumps(r))
    return path


CRITICAL = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"  # 9.8
MEDIUM = "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N"  # 6.1
