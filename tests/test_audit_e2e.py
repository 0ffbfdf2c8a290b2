"""`bundle audit` against the real engine (docs/audit.md): a compose stack installed under
`unshare -n`, audited clean (exit 0); then its image's tag re-pointed at another image in the
engine and its container replaced by one of another image, the way a hand-run `docker tag` and
`docker run` on the host would: both found (exit 25, --json names each), with a file of the
release changed beside them; the signed report verifies with the host's public key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import DriftFound
from bundler.install import compose_runtime as cr
from tests import docker_fixtures as dfx
from tests.helpers import bundle, bundle_argv, offline

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _profile(base: Path, image: str) -> Path:
    return dfx.compose_profile(base, "auditc", [image], textwrap.dedent(f"""\
        services:
          web:
            image: {image}
            command: ["busybox", "sleep", "3600"]
        """))


def test_a_retagged_image_and_a_replaced_container_are_drift(
        tmp_path: Path, engine: Any, keys: tuple[Path, Path]) -> None:
    pair = dfx.make_pair(engine, "audit")
    root = tmp_path / "target"
    intruder = dfx.unique("bundler-audit-intruder-")
    try:
        built = bundle("build", _profile(tmp_path, pair.a), "--key", keys[0], "--out",
                       tmp_path / "out", "--cache-dir", tmp_path / "cache", "--json")
        assert built.rc == 0, built.err
        audit = bundle_argv("audit", "--root", root, "--json")
        install, clean = offline(
            bundle_argv("install", json.loads(built.out)["bundle"], "--trust", keys[1],
                        "--root", root), audit)
        assert install.rc == 0, install.err
        assert clean.rc == 0, clean.out + clean.err
        doc = json.loads(clean.out)
        assert doc["clean"] is True and doc["images"] == 1 and doc["containers"] == 1, doc

        # the same tag, another image; the stack's container replaced by one of that image
        repo, tag = pair.a.rsplit(":", 1)
        engine.images.get(pair.b).tag(repo, tag)
        project = cr.project_name("auditc", root)
        (web,) = engine.containers.list(filters={"label": f"com.docker.compose.project="
                                                          f"{project}"})
        labels = dict(web.labels)
        web.remove(force=True)
        engine.containers.run(pair.ids[pair.b], ["busybox", "sleep", "3600"], detach=True,
                              name=intruder, labels=labels, network_mode="none")
        compose_file = root / "current" / "files" / "stack" / "docker-compose.yml"
        compose_file.chmod(0o644)
        compose_file.write_text(compose_file.read_text().replace("3600", "36000"))

        (found,) = offline(audit)
        assert found.rc == DriftFound.exit_code == 25, found.out + found.err
        doc = json.loads(found.out)
        kinds = {(f["kind"], f["path"]) for f in doc["findings"]}
        assert kinds == {("image-replaced", pair.a), ("container-image", "service web"),
                         ("changed", "files/stack/docker-compose.yml")}, doc
        detail = {f["kind"]: f["detail"] for f in doc["findings"]}
        assert pair.ids[pair.b][:19] in detail["image-replaced"]
        assert pair.ids[pair.b][:19] in detail["container-image"]

        # an ID gone from the engine: the tag names nothing now
        report = tmp_path / "audit.report"
        dfx.remove_images(engine, pair.a)
        (gone,) = offline(bundle_argv("audit", "--root", root, "--report", report))
        assert gone.rc == 25, gone.out + gone.err
        assert "image-gone" in gone.out and pair.a in gone.out
        assert "drift found" in gone.err and "hint:" in gone.err
        verified = bundle("audit", "--verify-report", report, "--host-key",
                          root / "state" / "host.pub", "--json")
        assert verified.rc == 0, verified.err
        assert {f["kind"] for f in json.loads(verified.out)["findings"]} == {
            "image-gone", "container-image", "changed"}
    finally:
        with_intruder = engine.containers.list(all=True, filters={"name": intruder})
        for c in with_intruder:
            c.remove(force=True)
        bundle("stop", "--root", root)
        dfx.remove_images(engine, pair.a, pair.b, pair.base)
