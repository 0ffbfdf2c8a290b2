"""The vulnerability gate with a real Debian 12 image and from the kit on the bare Debian 12
host (tests/bare_image.py, tests/bare_target.py; docs/vulns.md): an image's Debian packages
are matched by their source package in `Debian:12` records (not `Debian:11` ones, not at the
fixed version), and the kit re-scans a release it installed with no network against a
snapshot signed on the connected side."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from bundler.bundle.manifest import VULNS_PATH
from bundler.errors import VulnerableError
from tests.bare_target import SRV, STICK, BareTargets, Images, run_kit
from tests.docker_fixtures import remove_images, unique
from tests.helpers import Project, bundle
from tests.osv_data import CRITICAL, record, write_zip
from tests.test_bare_host import (  # noqa: F401 - the session's kit
    kit,
    kits,
    ok,
    stick_with_release,
)

# network: the bare images are debootstrapped from a Debian mirror on a cold cache
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]


def _build(project: Project, keys: tuple[Path, Path], cache: Path, ref: str,
           *more: str | Path) -> Any:
    profile = project.profile(extra=f"images:\n  - ref: {ref}\n")
    done = bundle("build", profile, "--key", keys[0], "--out", project.dir / "dist",
                  "--cache-dir", cache, *more, "--json")
    return done.rc, json.loads(done.out or "{}"), done.err


def test_an_images_debian_package_is_matched_by_its_source(
        engine: Any, bare_images: Images, project: Project, keys: tuple[Path, Path],
        cache_dir: Path, tmp_path: Path) -> None:
    ref = f"bundler-test/vulns-{unique()}:1"
    engine.images.get(bare_images.ref("bare")).tag(ref)
    try:
        rc, doc, err = _build(project, keys, cache_dir, ref)
        assert rc == 0, err
        sbom = json.loads(ok(bundle("sbom", doc["bundle"], "--trust", keys[1])).out)
        libc = next(c for c in sbom["components"] if c["name"] == "libc6")
        quals = dict(parse_qsl(libc["purl"].partition("?")[2]))
        assert quals["distro"] == "debian-12" and quals["upstream"] == "glibc", libc["purl"]
        have = libc["version"]  # e.g. 2.36-9+deb12u10
        snap = write_zip(tmp_path / "debian.zip", [
            record("DEB-T-1", "Debian:12", "glibc", fixed=f"{have}+1"),  # no severity given
            record("DEB-T-2", "Debian:11", "glibc", fixed=f"{have}+1"),  # another release
            record("DEB-T-3", "Debian:12", "glibc", fixed=have),  # fixed at this version
            record("DEB-T-4", "Debian:12", "libc6", fixed=f"{have}+1")])  # a binary's name
        rc, refused, err = _build(project, keys, cache_dir, ref, "--vulns", snap,
                                  "--fail-on", "any")
        assert rc == VulnerableError.exit_code, err
        message = str(refused["message"])
        assert message.startswith(f"{refused['message'].split(' ')[0]} vulnerabilities at or "
                                  "above any in the bundle: DEB-T-1 ")
        assert f"(source glibc) {have} (Debian:12, fixed in {have}+1, UNKNOWN)" in message
        for other in ("DEB-T-2", "DEB-T-3", "DEB-T-4"):
            assert other not in message
        # UNKNOWN is below LOW: `--fail-on low` passes and records the findings
        rc, passed, err = _build(project, keys, cache_dir, ref, "--vulns", snap,
                                 "--fail-on", "low")
        assert rc == 0, err
        with tarfile.open(passed["bundle"]) as tf:
            recorded = json.load(tf.extractfile(VULNS_PATH))  # type: ignore[arg-type]
        hits = {(f["id"], f["component"], f["package"], f["ecosystem"])
                for f in recorded["findings"]}
        assert {("DEB-T-1", "libc6", "glibc", "Debian:12"),
                ("DEB-T-1", "libc-bin", "glibc", "Debian:12")} <= hits, hits
        assert {h[0] for h in hits} == {"DEB-T-1"}
    finally:
        remove_images(engine, ref)


def test_the_kit_rescans_a_release_on_a_bare_host_with_no_network(
        bare_target: BareTargets, kit: Path, keys: tuple[Path, Path],  # noqa: F811
        tmp_path: Path) -> None:
    stick, kit_file, bundle_file = stick_with_release(tmp_path, kit, keys)
    write_zip(stick / "all.zip", [record("PYSEC-K-1", "PyPI", "tinygreet", fixed="1.1",
                                         cvss=CRITICAL)])
    ok(bundle("vulns", "sign", stick / "all.zip", "--key", keys[0]))

    host = bare_target(stick=stick)
    root = f"{SRV}/shop"
    ok(run_kit(host, kit_file, "trust", "add", f"{STICK}/release.pub", "--root", root))
    ok(run_kit(host, kit_file, "install", bundle_file, "--root", root))
    found = ok(run_kit(host, kit_file, "vulns", "--root", root, "--snapshot",
                       f"{STICK}/all.zip", "--json"))
    doc = json.loads(found.out)
    assert [(r["version"], r["current"], [(f["id"], f["severity"], f["fixed"])
                                          for f in r["findings"]])
            for r in doc["releases"]] == [("1.0.0", True, [("PYSEC-K-1", "CRITICAL", ["1.1"])])]
    gate = run_kit(host, kit_file, "vulns", "--root", root, "--snapshot", f"{STICK}/all.zip",
                   "--fail-on", "critical")
    assert gate.rc == VulnerableError.exit_code, gate.out + gate.err
    assert "PYSEC-K-1 tinygreet 1.0 (PyPI, fixed in 1.1, CRITICAL)" in gate.err
