"""`bundle audit` from the target kit on the bare Debian 12 host (`--network none`, python3
only, the kit on a read-only stick; tests/bare_target.py): a release installed by the kit is
audited clean (exit 0), then a file of it is changed on the host and the audit names it
(exit 25); its signed report verifies on the connected side with the host's public key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundler.errors import DriftFound
from tests.bare_target import SRV, STICK, BareTargets, run_kit
from tests.helpers import bundle
from tests.test_bare_host import (  # noqa: F401 - the session's kit
    kit,
    kits,
    ok,
    stick_with_release,
)

# network: the bare images are debootstrapped from a Debian mirror on a cold cache
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]


def test_the_kit_audits_a_release_on_a_bare_host_with_no_network(
        bare_target: BareTargets, kit: Path, keys: tuple[Path, Path],  # noqa: F811
        tmp_path: Path) -> None:
    stick, kit_file, bundle_file = stick_with_release(tmp_path, kit, keys)

    host = bare_target(stick=stick)
    root = f"{SRV}/shop"
    ok(run_kit(host, kit_file, "trust", "add", f"{STICK}/release.pub", "--root", root))
    ok(run_kit(host, kit_file, "install", bundle_file, "--root", root))
    clean = ok(run_kit(host, kit_file, "audit", "--root", root, "--json"))
    doc = json.loads(clean.out)
    assert doc["clean"] is True and doc["entries"] > 20, doc  # the venv's files included

    ok(host.sh(f"echo '# changed on the host' >> {root}/current/files/app/server.py"))
    found = run_kit(host, kit_file, "audit", "--root", root, "--json",
                    "--report", f"{SRV}/audit.report")
    assert found.rc == DriftFound.exit_code, found.out + found.err
    doc = json.loads(found.out)
    assert [(f["kind"], f["path"]) for f in doc["findings"]] == [
        ("changed", "files/app/server.py")], doc
    verified = ok(bundle("audit", "--verify-report", host.srv / "audit.report", "--host-key",
                         host.srv / "shop" / "state" / "host.pub", "--json"))
    assert json.loads(verified.out)["findings"] == doc["findings"]
