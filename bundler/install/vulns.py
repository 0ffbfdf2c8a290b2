"""`bundle vulns`: re-scan what a root has installed against a newer OSV snapshot, brought
after the release and signed by a trusted key, with no rebuild and no network
(docs/vulns.md). Every kept release's SBOM (`sbom/bom.cdx.json` in its directory, checked
against the release's manifest) is matched in one pass over the snapshot. Changes nothing:
the snapshot is read from a private copy (hashed while copied) that is removed after."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import ui
from bundler.bundle import osv, sbom
from bundler.bundle.manifest import SBOM_PATH, VULNS_PATH
from bundler.bundle.signing import Trust, verify_payload
from bundler.errors import IntegrityError, SignatureError
from bundler.install.layout import Layout, ReleaseDir


@dataclass(frozen=True)
class Snapshot:
    statement: osv.Statement
    keyid: str

    def to_json(self) -> dict[str, Any]:
        s = self.statement
        return {"name": s.name, "sha256": s.sha256, "size": s.size, "signed": s.signed,
                "keyid": self.keyid}


@dataclass(frozen=True)
class ReleaseScan:
    version: str
    current: bool
    sbom: str  # "ok", or why it was not scanned
    findings: tuple[osv.Finding, ...]
    notes: tuple[str, ...] = ()
    at_build: dict[str, Any] | None = None  # the build's gate: its snapshot, bar, count

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "current": self.current, "sbom": self.sbom,
                "findings": [f.to_json() for f in self.findings], "not_matched": list(self.notes),
                "at_build": self.at_build}


@dataclass(frozen=True)
class Report:
    snapshot: Snapshot
    records: int
    modified: str
    releases: tuple[ReleaseScan, ...]

    @property
    def findings(self) -> tuple[osv.Finding, ...]:
        return tuple(f for r in self.releases for f in r.findings)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in osv.SEVERITIES}
        for f in self.findings:
            out[f.severity] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"snapshot": {**self.snapshot.to_json(), "records": self.records,
                             "modified": self.modified},
                "counts": self.counts(), "releases": [r.to_json() for r in self.releases]}

    def refusing(self, fail_on: str) -> tuple[osv.Finding, ...]:
        scan = osv.Scan(self.findings, self.records, self.modified, 0)
        return osv.refusing(scan, fail_on)


def verify_snapshot(snapshot: Path, signature: Path, trusted: Trust,
                    into: Path) -> tuple[Path, Snapshot]:
    """The snapshot's signature checked against the trusted keys, then the file copied into
    `into` while hashed and compared with what was signed: the copy is what gets read."""
    try:
        envelope = signature.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read the snapshot's signature {signature}: {exc.strerror}",
                             hint="sign the snapshot on the connected side: `bundle vulns sign "
                                  "SNAPSHOT --key NAME.key`, and bring SNAPSHOT.sig with it"
                             ) from None
    body, keyid = verify_payload(envelope, trusted, osv.SIG_PAYLOAD_TYPE, str(signature))
    try:
        statement = osv.parse_statement(body)
    except ValueError as exc:
        raise SignatureError(f"{signature} is malformed: {exc}") from None
    copy = into / "snapshot"
    try:
        sha, size = osv.copy_hashed(snapshot, copy, statement.size)
    except (OSError, osv.SnapshotError) as exc:
        raise IntegrityError(f"cannot read the snapshot {snapshot}: {exc}") from None
    if (sha, size) != (statement.sha256, statement.size):
        raise IntegrityError(f"the snapshot {snapshot} is not the one signed in {signature} "
                             f"(sha256 {sha[:16]}..., signed {statement.sha256[:16]}...)",
                             hint="the snapshot was altered or damaged: copy it and its .sig "
                                  "again from the connected side")
    return copy, Snapshot(statement, keyid)


def _release_sbom(rel: ReleaseDir) -> tuple[dict[str, Any] | None, str]:
    """A release's SBOM, checked against the manifest it was installed from."""
    manifest = rel.manifest()
    entry = next((f for f in manifest.files if f.path == SBOM_PATH), None) if manifest else None
    if entry is None:
        return None, "none (built before bundles carried an SBOM)"
    try:
        data = (rel.path / SBOM_PATH).read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        return None, "changed since install (not the signed one): see `bundle audit`"
    try:
        return sbom.parse(data), "ok"
    except ValueError as exc:
        return None, f"unreadable ({exc})"


def _at_build(rel: ReleaseDir) -> dict[str, Any] | None:
    """What the build's gate recorded (sbom/vulns.json, if the signed manifest lists it and
    the file is still that one): the snapshot it used, its bar and how many findings."""
    manifest = rel.manifest()
    entry = next((f for f in manifest.files if f.path == VULNS_PATH), None) if manifest else None
    try:
        data = (rel.path / VULNS_PATH).read_bytes() if entry else b""
        if entry is None or hashlib.sha256(data).hexdigest() != entry.sha256:
            return None
        doc = json.loads(data)
        return {"snapshot": doc["snapshot"], "fail_on": doc["fail_on"],
                "findings": len(doc["findings"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run(layout: Layout, snapshot: Path, signature: Path,
        trusted: Trust) -> Report:
    current = layout.current_version()
    versions = sorted(p.name for p in layout.releases.iterdir() if p.is_dir()) \
        if layout.releases.is_dir() else []
    per_release: dict[str, tuple[set[osv.Component], list[str], str]] = {}
    everything: set[osv.Component] = set()
    for version in versions:
        doc, state = _release_sbom(ReleaseDir(layout.release(version)))
        comps, notes = osv.sbom_components(doc) if doc is not None else ([], [])
        per_release[version] = (set(comps), notes, state)
        everything.update(comps)
    work = Path(tempfile.mkdtemp(prefix=".vulns-", dir=layout.state_dir))
    try:
        copy, snap = verify_snapshot(snapshot, signature, trusted, work)
        ui.step(f"Matching {len(everything)} component(s) of {len(versions)} release(s) "
                f"against {snapshot.name} (signed by {snap.keyid}, {snap.statement.signed})")
        try:
            scan = osv.scan(copy, everything)
        except osv.SnapshotError as exc:
            raise IntegrityError(f"the snapshot {snapshot} cannot be read: {exc}",
                                 hint="sign osv.dev's all.zip or a tar of <ID>.json records"
                                 ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    releases = []
    for version in versions:
        held, notes, state = per_release[version]
        found = tuple(f for f in scan.findings if f.component in held)
        releases.append(ReleaseScan(version, version == current, state, found, tuple(notes),
                                    _at_build(ReleaseDir(layout.release(version)))))
    releases.sort(key=lambda r: (not r.current, r.version))
    return Report(snap, scan.records, scan.modified, tuple(releases))
