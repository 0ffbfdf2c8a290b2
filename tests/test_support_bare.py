"""`bundle support` from the kit on the bare Debian 12 host (python3 only, no network, no
engine): the demo installed from a stick, a secret in the shared .env and planted in its
service log; the archive collects every section it can (the engine's records its error), with
the secret masked, and `--show` reads it back on the connected side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundler.bundle import supportfile
from tests.bare_target import BareTargets
from tests.helpers import bundle
from tests.test_usb_to_bare_host import PROFILES, build, export, kit_on

# network: the bare images and the kit's wheels come from the registries on a cold cache
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]

SECRET = "bare-Sh4red-S3cret-in-env"


def test_the_kit_collects_a_support_archive_on_the_bare_host(
        bare_target: BareTargets, keys: tuple[Path, Path], tmp_path: Path) -> None:
    v1 = build(PROFILES / "demo.yaml", keys[0], tmp_path / "dist", sequence=1)
    stick = tmp_path / "stick"
    stick.mkdir()
    export(v1, stick, keys[1])
    host = bare_target(stick=stick)
    kit = f"/stick/{kit_on(stick)}"
    root = "/srv/demo"

    def kit_run(*args: str) -> str:
        done = host.run("python3", "-I", "-S", kit, *args)
        assert done.rc == 0, done.out + done.err
        return done.out

    kit_run("trust", "add", "/stick/release.pub", "--root", root)
    host.sh(f"umask 077 && mkdir -p {root}/shared && printf 'DEMO_TOKEN={SECRET}\\n' "
            f"> {root}/shared/.env")
    kit_run("install", f"/stick/{v1.name}", "--root", root)
    log = host.srv / "demo" / "releases" / "1.0.0" / "logs" / "web.log"
    with log.open("a") as fh:  # as if the service had printed it
        fh.write(f"startup: DEMO_TOKEN is {SECRET}\n")

    doc = json.loads(kit_run("support", "--root", root, "--out", "/srv/support.tar.gz",
                             "--json"))
    out = host.srv / "support.tar.gz"
    assert doc["path"] == "/srv/support.tar.gz" and oct(out.stat().st_mode & 0o777) == "0o600"
    archive = supportfile.read(out)
    assert SECRET.encode() not in out.read_bytes()
    assert all(SECRET.encode() not in data for data in archive.members.values())
    assert "startup: DEMO_TOKEN is ****" in archive.members["logs/1.0.0/web.log"].decode()
    outcome = {s["section"]: s for s in archive.manifest["sections"]}
    assert outcome["engine"]["status"] == "error"  # a bare host has no engine: said, not fatal
    for section in ("versions", "host", "status", "doctor", "history", "trust", "reports",
                    "logs"):
        assert outcome[section]["status"] == "ok", outcome[section]
    assert archive.json("status.json")["healthy"] is True
    versions = archive.json("versions.json")
    assert versions["os_release"]["VERSION_CODENAME"] == "bookworm"
    assert versions["python"]["version"].startswith("3.11")
    shown = bundle("support", "--show", out)
    assert shown.rc == 0 and "airgapped" in shown.out and "engine:" in shown.out
