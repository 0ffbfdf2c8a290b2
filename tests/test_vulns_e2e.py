"""The vulnerability gate end to end (docs/vulns.md), with small snapshots in osv.dev's format
made for the versions installed here: a vulnerable pinned wheel refuses the build (exit 26,
the finding named, no bundle) and the fixed one passes with its findings in the signed
bundle; a host that installed two releases with no network finds a vulnerability published
after them in a newer signed snapshot (no rebuild), and refuses an unsigned, tampered or
untrusted snapshot with the root unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from bundler.bundle.manifest import VULNS_PATH
from bundler.bundle.signing import load_trust, verify_envelope
from bundler.errors import IntegrityError, SignatureError, VulnerableError
from tests.helpers import (
    Project,
    bundle,
    bundle_argv,
    make_wheel,
    offline,
    tree_snapshot,
)
from tests.osv_data import CRITICAL, record, write_zip

pytestmark = [pytest.mark.slow]


def _pin(project: Project, version: str) -> None:
    """requirements.txt pins tinygreet==version (a real wheel in the wheelhouse)."""
    whl = make_wheel(project.wheelhouse, "tinygreet", version,
                     {"tinygreet/__init__.py": f"def greet():\n    return 'hello {version}'\n"})
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    (project.dir / "requirements.txt").write_text(f"tinygreet=={version} --hash=sha256:{sha}\n")


def _build(project: Project, keys: tuple[Path, Path], cache: Path, version: str, seq: int,
           *more: str | Path) -> tuple[int, dict[str, object], str]:
    done = bundle("build", project.profile(version, sequence=seq), "--key", keys[0], "--out",
                  project.dir / "dist", "--cache-dir", cache, *more, "--json")
    return done.rc, json.loads(done.out) if done.out.strip() else {}, done.err


# Published before 1.1: fixed there. Another, LOW, affects 1.1 only (last_affected).
BEFORE = [record("PYSEC-TG-1", "PyPI", "tinygreet", fixed="1.1", severity_word="HIGH",
                 modified="2026-11-20T08:00:00Z"),
          record("GHSA-TG-2", "PyPI", "tinygreet", introduced="1.1", last_affected="1.1",
                 severity_word="LOW", modified="2026-11-21T08:00:00Z"),
          record("PYSEC-TG-0", "PyPI", "tinygreet", fixed="1.1", severity_word="CRITICAL",
                 withdrawn="2026-11-19T00:00:00Z", modified="2026-11-19T00:00:00Z")]


def test_a_vulnerable_pin_fails_the_gate_and_the_fixed_one_passes_recorded(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path) -> None:
    snap = write_zip(tmp_path / "all.zip", BEFORE)
    rc, doc, err = _build(project, keys, cache_dir, "1.0.0", 1, "--vulns", snap,
                          "--fail-on", "high")
    assert rc == VulnerableError.exit_code, err
    assert doc["error"] == "VulnerableError"
    assert "PYSEC-TG-1 tinygreet 1.0 (PyPI, fixed in 1.1, HIGH)" in str(doc["message"])
    assert "PYSEC-TG-0" not in str(doc["message"])  # withdrawn
    assert not (project.dir / "dist" / "shop-1.0.0.bundle").exists()
    # as people see it: one line, and its hint
    text = bundle("build", project.profile("1.0.0", sequence=1), "--key", keys[0], "--out",
                  project.dir / "dist", "--cache-dir", cache_dir, "--vulns", snap)
    assert text.rc == 26
    line = next(x for x in text.err.splitlines() if x.startswith("error: "))
    assert "1 vulnerability at or above high in the bundle: PYSEC-TG-1" in line
    assert any(x.startswith("hint: upgrade the components") for x in text.err.splitlines())

    _pin(project, "1.1")
    rc, doc, err = _build(project, keys, cache_dir, "1.1.0", 2, "--vulns", snap,
                          "--fail-on", "high")
    assert rc == 0, err
    assert doc["vulns"] == {"path": VULNS_PATH, "findings": 1, "records": 3,
                            "modified": "2026-11-21T08:00:00Z", "fail_on": "high"}
    # The record is a payload the signature covers: its sha256 is in the verified manifest.
    path = Path(str(doc["bundle"]))
    with tarfile.open(path) as tf:
        envelope = tf.extractfile("envelope.json").read()  # type: ignore[union-attr]
        data = tf.extractfile(VULNS_PATH).read()  # type: ignore[union-attr]
    verified = verify_envelope(envelope, load_trust(keys[1]))
    entry = next(f for f in verified.manifest.files if f.path == VULNS_PATH)
    assert entry.kind == "sbom" and hashlib.sha256(data).hexdigest() == entry.sha256
    recorded = json.loads(data)
    assert recorded["snapshot"] == {"name": "all.zip", "records": 3,
                                    "modified": "2026-11-21T08:00:00Z",
                                    "sha256": hashlib.sha256(snap.read_bytes()).hexdigest()}
    assert [(f["id"], f["component"], f["version"], f["severity"])
            for f in recorded["findings"]] == [("GHSA-TG-2", "tinygreet", "1.1", "LOW")]
    # --fail-on low refuses that one too; a bad snapshot is a build error
    rc, doc, _ = _build(project, keys, cache_dir, "1.1.0", 2, "--vulns", snap, "--fail-on", "low")
    assert rc == 26 and "GHSA-TG-2 tinygreet 1.1 (PyPI, no fix, LOW)" in str(doc["message"])
    (tmp_path / "junk.zip").write_text("not a snapshot\n")
    rc, doc, _ = _build(project, keys, cache_dir, "1.1.0", 2, "--vulns", tmp_path / "junk.zip")
    assert rc == 4 and doc["error"] == "BuildError"


def _observable(root: Path) -> dict[str, str]:
    """The root minus what running services write (logs, pid files)."""
    return {k: v for k, v in tree_snapshot(root).items()
            if "/logs/" not in f"/{k}/" and "/run/" not in f"/{k}/"}


@pytest.mark.netns
def test_the_host_finds_a_newly_published_vulnerability_with_no_rebuild(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    root = tmp_path / "target"
    roots.append(root)
    rc, v1, err = _build(project, keys, cache_dir, "1.0.0", 1)
    assert rc == 0, err
    _pin(project, "1.1")
    rc, v2, err = _build(project, keys, cache_dir, "1.1.0", 2,
                         "--vulns", write_zip(tmp_path / "old.zip", BEFORE))
    assert rc == 0, err
    # (the scans below use the root's trust store, the key that installs its bundles)
    first, second, trusted = offline(
        bundle_argv("install", v1["bundle"], "--trust", keys[1], "--root", root),
        bundle_argv("install", v2["bundle"], "--trust", keys[1], "--root", root),
        bundle_argv("trust", "add", keys[1], "--root", root))
    assert first.rc == 0 and second.rc == 0 and trusted.rc == 0, \
        first.err + second.err + trusted.err

    # Published after the release: 1.1 is affected too (CRITICAL by its CVSS vector).
    news = tmp_path / "news"
    news.mkdir()
    snap = write_zip(news / "all.zip", [*BEFORE, record(
        "PYSEC-TG-9", "PyPI", "tinygreet", introduced="1.1", fixed="1.2", cvss=CRITICAL,
        modified="2026-12-05T12:00:00Z")])
    signed = bundle("vulns", "sign", snap, "--key", keys[0], "--json")
    assert signed.rc == 0, signed.err
    assert Path(json.loads(signed.out)["signature"]) == news / "all.zip.sig"
    before = _observable(root)
    scan = bundle_argv("vulns", "--root", root, "--snapshot", snap, "--json")
    report, gate, shown = offline(
        scan, [*scan, "--fail-on", "critical"],
        bundle_argv("vulns", "--root", root, "--snapshot", snap))
    assert report.rc == 0, report.err
    doc = json.loads(report.out)
    assert doc["snapshot"]["records"] == 4 and doc["snapshot"]["modified"] == \
        "2026-12-05T12:00:00Z"
    by_release = {r["version"]: (r["current"], [(f["id"], f["severity"], f["fixed"])
                                               for f in r["findings"]])
                  for r in doc["releases"]}
    assert by_release == {
        "1.1.0": (True, [("PYSEC-TG-9", "CRITICAL", ["1.2"]), ("GHSA-TG-2", "LOW", [])]),
        "1.0.0": (False, [("PYSEC-TG-1", "HIGH", ["1.1"])])}
    assert doc["counts"]["CRITICAL"] == 1 and doc["counts"]["HIGH"] == 1
    at_build = {r["version"]: r["at_build"] for r in doc["releases"]}
    assert at_build["1.0.0"] is None  # built with no gate
    assert at_build["1.1.0"]["findings"] == 1 and at_build["1.1.0"]["fail_on"] == "high"
    assert at_build["1.1.0"]["snapshot"]["modified"] == "2026-11-21T08:00:00Z"
    assert gate.rc == VulnerableError.exit_code, gate.err
    assert json.loads(gate.out)["ok"] is False
    assert shown.rc == 0, shown.err
    assert "PYSEC-TG-9" in shown.out and "release 1.1.0 (current): 2 finding(s) (at build: " \
        "1 below high, snapshot of 2026-11-21T08:00:00Z)" in shown.out, shown.out
    assert "3 finding(s): 1 critical, 1 high, 1 low" in shown.out

    # Refused, each with its own exit code: no signature, a changed byte, an untrusted key.
    unsigned = tmp_path / "unsigned"
    unsigned.mkdir()
    shutil.copy(snap, unsigned / "all.zip")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x20
    (tampered / "all.zip").write_bytes(bytes(data))
    shutil.copy(news / "all.zip.sig", tampered / "all.zip.sig")
    stranger = bundle("keygen", tmp_path / "stranger", "--json")
    assert stranger.rc == 0
    runs = offline(
        bundle_argv("vulns", "--root", root, "--snapshot", unsigned / "all.zip", "--json"),
        bundle_argv("vulns", "--root", root, "--snapshot", tampered / "all.zip", "--json"),
        bundle_argv("vulns", "--root", root, "--snapshot", snap, "--trust",
                    tmp_path / "stranger.pub", "--json"))
    assert [(r.rc, json.loads(r.out)["error"]) for r in runs] == [
        (SignatureError.exit_code, "SignatureError"), (IntegrityError.exit_code, "IntegrityError"),
        (SignatureError.exit_code, "SignatureError")], [r.err for r in runs]
    assert "not the one signed" in json.loads(runs[1].out)["message"]
    assert _observable(root) == before  # the scans changed nothing
