"""The build's vulnerability gate (`bundle build --vulns SNAPSHOT --fail-on SEVERITY`): the
SBOM just made is matched against an OSV snapshot; findings at or above the bar refuse the
bundle (VulnerableError, exit 26), the others are recorded with the snapshot's digest and
date in `sbom/vulns.json`, a payload the signed manifest lists (docs/vulns.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import ui
from bundler.bundle import osv, sbom
from bundler.bundle.manifest import canonical_json
from bundler.errors import BuildError, VulnerableError

SCHEMA = 1


@dataclass(frozen=True)
class Gate:
    snapshot: Path
    fail_on: str = osv.DEFAULT_FAIL_ON


def run(gate: Gate, sbom_bytes: bytes) -> tuple[bytes, osv.Scan]:
    """The vulns.json payload of a passing gate and the scan (VulnerableError if refused)."""
    ui.step(f"Matching the SBOM against the OSV snapshot {gate.snapshot}")
    components, notes = osv.sbom_components(sbom.parse(sbom_bytes))
    try:
        digest = osv.file_digest(gate.snapshot)
        scan = osv.scan(gate.snapshot, components)
    except (osv.SnapshotError, OSError) as exc:
        raise BuildError(f"the vulnerability snapshot cannot be read: {exc}",
                         hint="pass osv.dev's per-ecosystem all.zip, a tar of its <ID>.json "
                              "records, or a directory of them") from None
    ui.note(f"{scan.records} record(s) read (newest modified {scan.modified or 'unknown'}), "
            f"{scan.components} component(s), {len(scan.findings)} finding(s)")
    for note in notes:
        ui.note(f"not matched: {note}")
    refused = osv.refusing(scan, gate.fail_on)
    if refused:
        raise VulnerableError(osv.describe(refused, gate.fail_on, "the bundle") +
                              "; no bundle was written")
    return canonical_json(document(gate, digest, scan, notes)), scan


def document(gate: Gate, digest: str, scan: osv.Scan, notes: list[str]) -> dict[str, Any]:
    return {"schema": SCHEMA, "fail_on": gate.fail_on,
            "snapshot": {"name": gate.snapshot.name, "sha256": digest,
                         "modified": scan.modified, "records": scan.records},
            "components": scan.components, "not_matched": notes,
            "findings": [f.to_json() for f in scan.findings]}
