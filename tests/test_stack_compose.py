"""A docker compose stack end to end: images and compose file in one bundle, installed under
`unshare -n` (never pulling), upgraded, and rolled back when a container turns unhealthy."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import BuildError, PolicyError, ProfileError, RolledBackError
from bundler.install import compose_runtime as cr
from tests import docker_fixtures as dfx
from tests.helpers import bundle, bundle_argv, offline

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def compose_profile(base: Path, version: str, image: str, healthy: bool, seq: int) -> Path:
    app = base / f"app-{version}"
    app.mkdir(parents=True)
    test = "busybox true" if healthy else "busybox false"
    (app / "docker-compose.yml").write_text(textwrap.dedent(f"""\
        version: "3.7"
        services:
          web:
            image: {image}
            command: ["busybox", "sleep", "3600"]
            environment:
              RELEASE: "{version}"
            healthcheck:
              test: ["CMD-SHELL", "{test}"]
              interval: 1s
              retries: 2
        """))
    profile = base / f"p-{version}.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: shopc
        version: {version}
        sequence: {seq}
        images:
          - ref: {image}
        files:
          - {{src: app-{version}, dest: stack}}
        compose:
          files: [stack/docker-compose.yml]
        """))
    return profile


def test_compose_stack_install_upgrade_and_rollback(tmp_path: Path, engine: Any,
                                                   keys: tuple[Path, Path]) -> None:
    pair = dfx.make_pair(engine, "cstack")
    root = tmp_path / "target"
    try:
        bundles = []
        for version, image, healthy, seq in (("1.0.0", pair.a, True, 1),
                                             ("2.0.0", pair.b, True, 2),
                                             ("3.0.0", pair.a, False, 3)):
            built = bundle("build", compose_profile(tmp_path, version, image, healthy, seq),
                           "--key", keys[0], "--out", tmp_path / "out", "--cache-dir",
                           tmp_path / "cache", "--json")
            assert built.rc == 0, built.err
            bundles.append(json.loads(built.out)["bundle"])
        trust = ["--trust", keys[1], "--root", root]
        r1, s1, r2, r3, s3 = offline(
            bundle_argv("install", bundles[0], *trust),
            bundle_argv("status", "--root", root, "--json"),
            bundle_argv("install", bundles[1], *trust),
            bundle_argv("install", bundles[2], *trust),
            bundle_argv("status", "--root", root, "--json"))
        assert r1.rc == 0, r1.err
        units = {u["name"]: u for u in json.loads(s1.out)["services"]}
        assert units["compose:web"]["running"] is True, s1.out
        assert r2.rc == 0, r2.err
        assert r3.rc == RolledBackError.exit_code, r3.err
        assert "compose service web is unhealthy" in r3.err
        after = json.loads(s3.out)
        assert after["current"]["version"] == "2.0.0" and after["healthy"] is True
        # the rollback brought 2.0.0's container back: it runs image b again
        project = cr.project_name("shopc", root)  # the default: per product and root
        containers = engine.containers.list(filters={"label": "com.docker.compose.project="
                                                               + project})
        assert [c.image.id for c in containers] == [pair.ids[pair.b]]
    finally:
        bundle("stop", "--root", root)
        dfx.remove_images(engine, pair.a, pair.b, pair.base)


def test_build_checks_the_compose_files_and_doctor_sees_their_ports(
        tmp_path: Path, engine: Any, keys: tuple[Path, Path]) -> None:
    """What the target would only find out late is refused at build time: an image the bundle
    does not carry, a `build:`-only service, a database service that does not exist. The
    published ports go into the manifest, and doctor checks them."""
    import socket

    pair = dfx.make_pair(engine, "cbuild")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        app = tmp_path / "app"
        app.mkdir()

        def build(services: str, extra: str = "", tool: str = "") -> Any:
            (app / "docker-compose.yml").write_text("services:\n"
                                                    + textwrap.indent(services, "  "))
            (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""\
                schema: 1
                name: cbuild
                version: 1.0.0
                images:
                  - ref: {pair.a}
                files:
                  - {{src: app, dest: stack}}
                compose:
                  files: [stack/docker-compose.yml]
                """) + (f"  tool: {tool}\n" if tool else "") + extra)
            return bundle("build", tmp_path / "p.yaml", "--key", keys[0], "--out",
                          tmp_path / "out", "--cache-dir", tmp_path / "cache")

        web = textwrap.dedent(f"""\
            web:
              image: {pair.a}
              ports: ["127.0.0.1:{port}:80", "9000", "${{EXTRA_PORT:-81}}:81",
                      {{target: 443, published: "18443"}}]
            """)
        missing = build(web + f"cache:\n  image: {pair.b}\n")
        assert missing.rc == BuildError.exit_code, missing.err
        assert f"use image(s) the bundle does not carry: {pair.b} (service cache)" in missing.err
        built_only = build(web + "worker:\n  build: ./worker\n")
        assert built_only.rc == BuildError.exit_code \
            and "worker have `build:` and no `image:`" in built_only.err
        broken = build("web: [unclosed\n")
        assert broken.rc == BuildError.exit_code \
            and "compose file stack/docker-compose.yml cannot be read" \
            in broken.err, broken.err
        typo = build(web, "database: {url: '${DATABASE_URL}', compose_service: postgress}\n")
        assert typo.rc == BuildError.exit_code, typo.err
        assert "database.compose_service names compose service 'postgress'" in typo.err
        assert "(they have: web)" in typo.err

        ok = build(web)
        assert ok.rc == 0, ok.err
        path = tmp_path / "out" / "cbuild-1.0.0.bundle"
        info = json.loads(bundle("inspect", path, "--trust", keys[1], "--json").out)
        assert info["compose"]["ports"] == sorted([port, 18443]), info
        doctor = bundle("doctor", path, "--trust", keys[1], "--root", tmp_path / "root",
                        "--json")
        rows = {r["check"]: r for r in json.loads(doctor.out)["checks"]}
        row = rows[f"port {port}"]
        assert row["status"] == "fail", rows
        assert row["detail"].startswith("held by pid ") and row["detail"].endswith(
            "not by this product (published by the compose files)"), rows

        # compose.tool names a compose, never a host path (the target would run it as root)
        path_tool = build(web, tool="/nonexistent/compose")
        assert path_tool.rc == ProfileError.exit_code \
            and "compose.tool: '/nonexistent/compose' is not valid" \
            in path_tool.err, path_tool.err
        # A target without the compose the bundle asks for is refused before anything exists
        assert build(web, tool="v1").rc == 0
        empty = tmp_path / "empty-path"
        empty.mkdir()
        (refused,) = offline(["env", f"PATH={empty}",
                              *bundle_argv("install", path, "--trust", keys[1], "--root",
                                           tmp_path / "root")])
        assert refused.rc == PolicyError.exit_code, refused.err
        assert "this bundle runs a compose project: no docker-compose 1.x found on PATH" \
            in refused.err
        assert not (tmp_path / "root").exists()
    finally:
        busy.close()
        dfx.remove_images(engine, pair.a, pair.b, pair.base)


def test_an_explicit_project_of_another_installation_is_refused(
        tmp_path: Path, engine: Any, keys: tuple[Path, Path]) -> None:
    """`compose.project` names a stack another root (or the operator) already runs: compose
    would recreate its containers and a rollback take them down. Refused (exit 8) before the
    root is created, the other stack's container untouched."""
    pair = dfx.make_pair(engine, "cforeign")
    project = f"shared-{dfx.unique()}"
    theirs = engine.containers.create(pair.a, ["busybox", "sleep", "3600"], labels={
        "com.docker.compose.project": project,
        "com.docker.compose.project.working_dir": "/srv/other-product/releases/1.0/files/x"})
    try:
        profile = compose_profile(tmp_path, "1.0.0", pair.a, True, 1)
        profile.write_text(profile.read_text() + f"  project: {project}\n")
        built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                       "--cache-dir", tmp_path / "cache", "--json")
        assert built.rc == 0, built.err
        root = tmp_path / "target"
        (result,) = offline(bundle_argv("install", json.loads(built.out)["bundle"],
                                        "--trust", keys[1], "--root", root))
        assert result.rc == PolicyError.exit_code, result.err
        assert (f"compose project '{project}' already runs containers started from "
                "/srv/other-product/releases/1.0/files/x") in result.err, result.err
        assert "own compose.project" in result.err
        assert not root.exists()
        theirs.reload()
        assert theirs.status == "created" and theirs.labels["com.docker.compose.project"] == project
    finally:
        theirs.remove(force=True)
        dfx.remove_images(engine, pair.a, pair.b, pair.base)
