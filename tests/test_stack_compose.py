"""A docker compose stack end to end: images and compose file in one bundle, installed under
`unshare -n` (never pulling), upgraded, and rolled back when a container turns unhealthy."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import docker_fixtures as dfx
from tests.helpers import bundle, bundle_argv, offline

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    eng = dfx.start_engine()
    yield eng.client
    eng.stop()


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
        assert r3.rc == 12, r3.err
        assert "compose service web is unhealthy" in r3.err
        after = json.loads(s3.out)
        assert after["current"]["version"] == "2.0.0" and after["healthy"] is True
        # the rollback brought 2.0.0's container back: it runs image b again
        containers = engine.containers.list(filters={"label": "com.docker.compose.project="
                                                               "bundler-shopc"})
        assert [c.image.id for c in containers] == [pair.ids[pair.b]]
    finally:
        bundle("stop", "--root", root)
        dfx.remove_images(engine, pair.a, pair.b, pair.base)
