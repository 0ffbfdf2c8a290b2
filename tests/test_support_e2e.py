"""`bundle support` end to end: a real compose install (busybox image, offline) whose service
prints the shared .env's secret and a database URL's password into its container log; the
archive, collected offline, holds that log's tail with both masked, and the engine's facts."""

from __future__ import annotations

import json
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bundler.bundle import supportfile
from tests import docker_fixtures as dfx
from tests.helpers import bundle, bundle_argv, offline

pytestmark = [pytest.mark.docker, pytest.mark.netns]

SECRET = "e2e-Sh4red-S3cret-from-env"
DB_PASSWORD = "pgPassw0rd-in-a-url"


def _profile(base: Path, image: str) -> Path:
    app = base / "app"
    app.mkdir()
    (app / "docker-compose.yml").write_text(textwrap.dedent(f"""\
        version: "3.7"
        services:
          talker:
            image: {image}
            command: ["busybox", "sh", "-c",
                      "echo token=$$API_TOKEN_VALUE db=$$DB_URL; exec busybox sleep 3600"]
            environment:
              API_TOKEN_VALUE: ${{API_TOKEN_VALUE}}
              DB_URL: ${{DB_URL}}
            healthcheck:
              test: ["CMD-SHELL", "busybox true"]
              interval: 1s
              retries: 2
        """))
    profile = base / "talk.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: talk{dfx.unique()}
        version: 1.0.0
        sequence: 1
        images:
          - ref: {image}
        files:
          - {{src: app, dest: stack}}
        compose:
          files: [stack/docker-compose.yml]
        """))
    return profile


def test_support_archive_of_a_compose_install_masks_what_the_service_printed(
        tmp_path: Path, engine: Any, keys: tuple[Path, Path]) -> None:
    image = f"bundler-test/support-{dfx.unique()}:1"
    dfx.import_base(engine, image)
    root = tmp_path / "target"
    try:
        built = bundle("build", _profile(tmp_path, image), "--key", keys[0], "--out",
                       tmp_path / "out", "--cache-dir", tmp_path / "cache", "--json")
        assert built.rc == 0, built.err
        assert bundle("trust", "add", keys[1], "--root", root).rc == 0
        (root / "shared").mkdir(mode=0o700)
        env = root / "shared" / ".env"
        env.write_text(f"API_TOKEN_VALUE={SECRET}\n"
                       f"DB_URL=postgresql://app:{DB_PASSWORD}@db.internal:5432/app\n")
        env.chmod(0o600)
        out = tmp_path / "carry" / "support.tar.gz"
        installed, collected = offline(
            bundle_argv("install", json.loads(built.out)["bundle"], "--root", root),
            bundle_argv("support", "--root", root, "--out", out, "--json"))
        assert installed.rc == 0, installed.err
        assert collected.rc == 0, collected.err
        assert json.loads(collected.out)["section_errors"] == []
        # the service really printed the secret: the engine's own log has it
        (container,) = engine.containers.list(filters={"ancestor": image})
        assert SECRET in container.logs().decode()
        raw = out.read_bytes()
        with tarfile.open(out, "r:gz") as tar:
            blobs = [tar.extractfile(i).read() for i in tar if i.isreg()]  # type: ignore[union-attr]
        for secret in (SECRET, DB_PASSWORD):
            assert all(secret.encode() not in b for b in [raw, *blobs]), secret
        archive = supportfile.read(out)
        log = archive.members["logs/compose/talker.log"].decode()
        assert "token=**** db=postgresql://app:****@db.internal:5432/app" in log
        eng = archive.json("engine.json")
        assert eng["version"]["Version"] and eng["info"]["ServerVersion"]
        assert archive.json("compose.json")["found"] is True
        assert archive.json("status.json")["healthy"] is True
        # the SBOM's summary where the bundle has one (bundle build writes one since issue
        # 21's SBOM), and the drift audit where this bundler has it: clean, right after install
        manifest = json.loads((root / "releases" / "1.0.0" / "bundle" / "manifest.json")
                              .read_text())
        if any(f["kind"] == "sbom" for f in manifest["files"]):
            assert archive.json("sbom/1.0.0.json")["format"] == "CycloneDX"
        else:
            assert not [n for n in archive.members if n.startswith("sbom/")]
        audit = archive.json("audit.json")
        assert audit.get("clean") is True or audit["note"].startswith("this bundler has no")
        shown = bundle("support", "--show", out, "--json")
        assert shown.rc == 0 and json.loads(shown.out)["current"] == "1.0.0"
    finally:
        bundle("stop", "--root", root)
        dfx.remove_images(engine, image)
