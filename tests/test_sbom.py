"""The bundle's SBOM (issue 21, docs/sbom.md). Unit tests: the package database parsers
(dpkg status, apk, METADATA, package.json), a whiteout hiding an earlier layer's database, a
wheel's purl and license, npm components with their lock integrity, the diff of two
component sets; and, with real bundles built by the real CLI, `bundle sbom`, the summary in
`inspect`, and `bundle diff` of two bundles that differ in one wheel."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from bundler.build.sbom import layers, pkgdb
from bundler.build.sbom.make import Release, make
from bundler.bundle import sbom
from bundler.bundle.manifest import FileEntry
from bundler.bundle.models import NpmProject, NpmRef
from tests.helpers import Project, bundle, make_wheel

DPKG = b"""Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u4
Description: GNU C Library
 continuation line

Package: gone
Status: deinstall ok config-files
Version: 1.0

Package: python3
Status: install ok installed
Architecture: amd64
Version: 3.11.2-1+b1
"""

APK = b"""C:Q1abc=
P:musl
V:1.2.4-r2
A:x86_64
L:MIT

P:busybox
V:1.36.1-r15
A:x86_64
L:GPL-2.0-only
"""


def test_dpkg_status_lists_installed_packages_only() -> None:
    got = pkgdb.dpkg_status(DPKG)
    assert [(p.name, p.version, p.arch) for p in got] == [
        ("libc6", "2.36-9+deb12u4", "amd64"), ("python3", "3.11.2-1+b1", "amd64")]
    assert {p.type for p in got} == {"deb"}


def test_apk_database() -> None:
    got = pkgdb.apk_installed(APK)
    assert [(p.name, p.version, p.license, p.arch) for p in got] == [
        ("musl", "1.2.4-r2", "MIT", "x86_64"),
        ("busybox", "1.36.1-r15", "GPL-2.0-only", "x86_64")]


def test_python_metadata_license_order() -> None:
    head = b"Metadata-Version: 2.4\nName: Foo_Bar\nVersion: 1.2\n"
    assert pkgdb.python_metadata(head + b"License-Expression: MIT OR Apache-2.0\n"
                                 b"License: BSD\n\nbody") == \
        pkgdb.Package("pypi", "Foo_Bar", "1.2", "MIT OR Apache-2.0")
    assert pkgdb.python_metadata(head + b"License: BSD-3-Clause\n").license == "BSD-3-Clause"
    classified = pkgdb.python_metadata(
        head + b"License: a very long\n  multi-line text\nClassifier: License :: OSI Approved "
        b":: MIT License\nClassifier: Programming Language :: Python\n")
    assert classified is not None and classified.license == "MIT License"
    assert pkgdb.python_metadata(b"Name: x\n") is None


def test_npm_package_json() -> None:
    assert pkgdb.npm_package_json(b'{"name":"@s/a","version":"1.0.0","license":"ISC"}') == \
        pkgdb.Package("npm", "@s/a", "1.0.0", "ISC")
    old = pkgdb.npm_package_json(
        b'{"name":"b","version":"2.0.0","licenses":[{"type":"MIT"},{"type":"Apache-2.0"}]}')
    assert old is not None and old.license == "MIT OR Apache-2.0"
    assert pkgdb.npm_package_json(b"[]") is None and pkgdb.npm_package_json(b"{") is None


def test_which_files_are_package_databases() -> None:
    assert layers.classify("var/lib/dpkg/status") == "dpkg"
    assert layers.classify("var/lib/dpkg/status.d/libc6") == "dpkg"
    assert layers.classify("var/lib/dpkg/status.d/libc6.md5sums") is None
    assert layers.classify("lib/apk/db/installed") == "apk"
    assert layers.classify("usr/lib/python3/dist-packages/a-1.dist-info/METADATA") == "pypi"
    assert layers.classify("app/node_modules/a/package.json") == "npm"
    assert layers.classify("app/node_modules/@s/a/package.json") == "npm"
    assert layers.classify("app/node_modules/a/node_modules/b/package.json") == "npm"
    assert layers.classify("app/node_modules/a/lib/package.json") is None
    assert layers.classify("app/package.json") is None


def _layer(files: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_whiteout_removes_an_earlier_layers_package_database() -> None:
    meta = b"Name: gone\nVersion: 1.0\n"
    bottom = layers.scan_layer(io.BytesIO(_layer({
        "./var/lib/dpkg/status": DPKG, "etc/os-release": b'ID=debian\nVERSION_ID="12"\n',
        "usr/lib/python3/dist-packages/gone-1.0.dist-info/METADATA": meta,
        "opt/app/node_modules/kept/package.json": b'{"name":"kept","version":"1.0.0"}'})))
    top = layers.scan_layer(io.BytesIO(_layer({
        "usr/lib/python3/dist-packages/.wh.gone-1.0.dist-info": b"",
        "var/lib/dpkg/.wh.status": b""}, gz=True)))
    assert top.removed == ["usr/lib/python3/dist-packages/gone-1.0.dist-info",
                           "var/lib/dpkg/status"]
    got = layers.compose("sha256:" + "1" * 64, ("x:1",), [("sha256:aa", bottom),
                                                        ("sha256:bb", top)])
    assert [(x.package.type, x.package.name, x.layer) for x in got.packages] == [
        ("npm", "kept", "sha256:aa")]
    assert got.os == ("debian", "12")
    # without the top layer, all of them, each from the bottom layer
    alone = layers.compose("sha256:" + "1" * 64, (), [("sha256:aa", bottom)])
    assert sorted(x.package.name for x in alone.packages) == ["gone", "kept", "libc6",
                                                               "python3"]


def test_what_an_archive_holds_is_scanned_once_per_archive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    facts = layers.scan_layer(io.BytesIO(_layer({"var/lib/dpkg/status": DPKG})))
    image = layers.compose("sha256:" + "1" * 64, ("x:1",), [("sha256:aa", facts)])
    scans: list[Path] = []

    def scan(path: Path) -> list[layers.ImageContents]:
        scans.append(path)
        return [image]
    monkeypatch.setattr(layers, "scan_archive", scan)
    archive, cache = tmp_path / "images.tar.zst", tmp_path / "sbom-scan"
    first = layers.scan_cached(archive, "a" * 64, cache)
    assert layers.scan_cached(archive, "a" * 64, cache) == first == [image]
    assert len(scans) == 1  # an upgrade that changed no image reads no layer again
    layers.scan_cached(archive, "b" * 64, cache)  # another archive
    assert len(scans) == 2
    for entry in cache.iterdir():
        entry.write_text("{not json")
    assert layers.scan_cached(archive, "a" * 64, cache) == [image] and len(scans) == 3


def test_an_opaque_directory_and_a_later_status_name_the_layer_a_package_came_from() -> None:
    one = layers.scan_layer(io.BytesIO(_layer({"var/lib/dpkg/status": DPKG,
                                               "srv/node_modules/a/package.json":
                                               b'{"name":"a","version":"1.0.0"}'})))
    more = DPKG + b"\nPackage: curl\nStatus: install ok installed\nVersion: 7.88\n"
    two = layers.scan_layer(io.BytesIO(_layer({"var/lib/dpkg/status": more,
                                               "srv/.wh..wh..opq": b""})))
    got = layers.compose("sha256:" + "2" * 64, (), [("sha256:l1", one), ("sha256:l2", two)])
    assert {x.package.name: x.layer for x in got.packages} == {
        "libc6": "sha256:l1", "python3": "sha256:l1", "curl": "sha256:l2"}


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _npm_tgz(path: Path, name: str, version: str, license: str) -> bytes:
    doc = json.dumps({"name": name, "version": version, "license": license}).encode()
    data = _layer({"package/package.json": doc, "package/index.js": b"1\n"}, gz=True)
    path.write_bytes(data)
    return data


def test_sbom_components_wheels_npm_with_purl_hash_license(tmp_path: Path) -> None:
    whl = make_wheel(tmp_path, "Tiny_Greet", "1.0", {"tiny_greet/__init__.py": ""})
    data = whl.read_bytes()
    entry = FileEntry(f"python/wheels/{whl.name}", len(data),
                      hashlib.sha256(data).hexdigest(), "wheel")
    tgz = _npm_tgz(tmp_path / "a.tgz", "@scope/left", "1.2.3", "MIT")
    ref = NpmRef("@scope/left", "1.2.3", _sri(tgz), "npm/tarballs/left-1.2.3.tgz")
    project = NpmProject("web", True, (), (ref,))
    release = Release("shop", "1.0.0", 7, 1_700_000_000, [entry],
                      {entry.path: whl, ref.tarball: tmp_path / "a.tgz"}, [project, project])
    text = make(release)
    assert make(release) == text  # the same inputs, the same bytes
    doc = json.loads(text)
    assert doc["specVersion"] == "1.7" and doc["metadata"]["timestamp"].startswith("2023-11-14")
    comps = {c["bom-ref"]: c for c in doc["components"]}
    wheel = comps[f"wheel/{whl.name}"]
    assert wheel["purl"] == "pkg:pypi/tiny-greet@1.0"
    assert wheel["hashes"] == [{"alg": "SHA-256", "content": entry.sha256}]
    npm = comps["npm/@scope/left@1.2.3"]
    assert npm["purl"] == "pkg:npm/%40scope/left@1.2.3"
    assert npm["hashes"] == [{"alg": "SHA-512", "content": hashlib.sha512(tgz).hexdigest()}]
    assert npm["licenses"] == [{"license": {"id": "MIT"}}]
    assert len(comps) == 2  # one npm component although two projects list it
    deps = {d["ref"]: d.get("dependsOn", []) for d in doc["dependencies"]}
    assert sorted(deps["bundle"]) == sorted(comps)


def test_wheel_license_from_its_metadata(tmp_path: Path) -> None:
    import zipfile

    from bundler.build.sbom.sources import wheel_license

    assert wheel_license(make_wheel(tmp_path, "plain", "1.0", {"plain.py": ""})) == ""
    whl = tmp_path / "lic-2.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("lic.py", "")
        zf.writestr("lic-2.0.dist-info/METADATA", "Metadata-Version: 2.4\nName: lic\n"
                    "Version: 2.0\nLicense-Expression: Apache-2.0\n\nlong text\n")
    assert wheel_license(whl) == "Apache-2.0"
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    assert wheel_license(tmp_path / "broken.whl") == ""


def _doc(*rows: tuple[str, str, str, str]) -> dict[str, object]:
    return {"bomFormat": "CycloneDX", "components": [
        {"name": n, "version": v, "properties": [{"name": sbom.KIND, "value": k},
                                                 {"name": sbom.WHERE, "value": w}]}
        for k, w, n, v in rows]}


def test_the_diff_of_two_component_sets() -> None:
    old = _doc(("wheel", "bundle", "a", "1"), ("wheel", "bundle", "b", "1"),
               ("npm", "bundle", "x", "1.0.0"), ("npm", "bundle", "x", "2.0.0"),
               ("image-deb", "app:1", "libc6", "2.36"))
    new = _doc(("wheel", "bundle", "a", "2"), ("wheel", "bundle", "c", "1"),
               ("npm", "bundle", "x", "2.0.0"), ("npm", "bundle", "x", "1.0.0"),
               ("image-deb", "app:1", "libc6", "2.36"), ("image-deb", "app:1", "curl", "7"))
    assert sbom.diff(old, new) == {
        "added": [{"kind": "image-deb", "where": "app:1", "name": "curl", "from": None,
                   "to": "7"},
                  {"kind": "wheel", "where": "bundle", "name": "c", "from": None, "to": "1"}],
        "removed": [{"kind": "wheel", "where": "bundle", "name": "b", "from": "1",
                     "to": None}],
        "changed": [{"kind": "wheel", "where": "bundle", "name": "a", "from": "1",
                     "to": "2"}]}
    assert sbom.summary(new) == {"spec_version": None, "components": 6,
                                 "by_kind": {"image-deb": 2, "npm": 2, "wheel": 2}}


def _build(project: Project, keys: tuple[Path, Path], cache: Path, version: str) -> Path:
    done = bundle("build", project.profile(version), "--key", keys[0], "--out",
                  project.dir / f"dist-{version}", "--cache-dir", cache, "--json")
    assert done.rc == 0, done.err
    return Path(json.loads(done.out)["bundle"])


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_bundle_sbom_inspect_and_a_diff_of_one_wheel_changed(
        project: Project, keys: tuple[Path, Path], cache_dir: Path) -> None:
    old = _build(project, keys, cache_dir, "1.0.0")
    whl = make_wheel(project.wheelhouse, "tinygreet", "1.1",
                     {"tinygreet/__init__.py": "def greet():\n    return 'hello 1.1'\n"})
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    (project.dir / "requirements.txt").write_text(f"tinygreet==1.1 --hash=sha256:{sha}\n")
    new = _build(project, keys, cache_dir, "1.1.0")

    shown = bundle("sbom", new, "--trust", keys[1])
    assert shown.rc == 0, shown.err
    doc = json.loads(shown.out)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.7"
    assert [c["purl"] for c in doc["components"]] == ["pkg:pypi/tinygreet@1.1"]
    out = project.dir / "out" / "bom.json"
    written = bundle("sbom", new, "--trust", keys[1], "--out", out, "--json")
    assert written.rc == 0, written.err
    assert out.read_text() == shown.out and out.stat().st_mode & 0o777 == 0o644
    assert json.loads(written.out)["by_kind"] == {"wheel": 1}
    inspected = bundle("inspect", new, "--trust", keys[1])
    assert "sbom    CycloneDX 1.7, 1 components: 1 wheel" in inspected.out

    diffed = bundle("diff", old, new, "--trust", keys[1], "--json")
    assert diffed.rc == 0, diffed.err
    assert json.loads(diffed.out)["components"] == {
        "added": [], "removed": [],
        "changed": [{"kind": "wheel", "where": "bundle", "name": "tinygreet", "from": "1.0",
                     "to": "1.1"}]}
    text = bundle("diff", old, new, "--trust", keys[1])
    assert "components: 0 added, 0 removed, 1 changed" in text.out
    assert "~ wheel tinygreet 1.0 → 1.1" in text.out
