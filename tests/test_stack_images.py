"""Container images end to end: saved from the build host's engine into one archive, rebuilt
offline from the warm cache, a locally rebuilt image detected, loaded on the target under
`unshare -n` with the Image IDs the signed manifest names."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests import docker_fixtures as dfx
from tests.helpers import bundle, bundle_argv, offline

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_images_build_offline_from_cache_and_load_on_the_target(
        tmp_path: Path, engine: Any, keys: tuple[Path, Path]) -> None:
    pair = dfx.make_pair(engine, "stack")
    try:
        profile = tmp_path / "bundle.yaml"
        profile.write_text(textwrap.dedent(f"""\
            schema: 1
            name: shop
            version: 1.0.0
            images:
              - ref: {pair.a}
              - ref: {pair.b}
            """))
        args = ["build", profile, "--key", keys[0], "--out", tmp_path / "out", "--cache-dir",
                tmp_path / "cache", "--json"]
        first = bundle(*args)
        assert first.rc == 0, first.err
        assert json.loads(first.out)["fetched"] == 1
        lock = json.loads((tmp_path / "bundle.lock").read_text())
        assert {i["ref"]: i["image_id"] for i in lock["images"]} == {pair.a: pair.ids[pair.a],
                                                                     pair.b: pair.ids[pair.b]}
        (again,) = offline(bundle_argv(*args))
        assert again.rc == 0, again.err
        assert json.loads(again.out)["fetched"] == 0

        info = json.loads(bundle("inspect", tmp_path / "out" / "shop-1.0.0.bundle",
                                 "--trust", keys[1], "--json").out)
        assert [f["path"] for f in info["files"]] == ["images/images.tar.zst",
                                                     "sbom/bom.cdx.json"]

        dfx.remove_images(engine, pair.a, pair.b, pair.base)
        root = tmp_path / "target"
        install_argv = bundle_argv("install", tmp_path / "out" / "shop-1.0.0.bundle",
                                   "--trust", keys[1], "--root", root)
        # Killed (-9) in the middle of the upload to the engine; the re-run rolls that back
        # and completes.
        crashed, install = offline(["env", "BUNDLER_FAULT=kill:images-stream", *install_argv],
                                   install_argv)
        assert crashed.rc == -9
        assert install.rc == 0, install.err
        assert "rolled back: the install of 1.0.0 was interrupted during images" in install.err
        assert str(engine.api.inspect_image(pair.a)["Id"]) == pair.ids[pair.a]
        assert str(engine.api.inspect_image(pair.b)["Id"]) == pair.ids[pair.b]
        run = subprocess.run(["docker", "run", "--rm", "--network", "none", pair.a, "busybox",
                              "cat", "/payload/a.txt"], capture_output=True, text=True,
                             check=False)
        assert run.returncode == 0 and run.stdout.startswith("a "), run.stderr
        events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
        assert ("images", "done") in [(e["step"], e["status"]) for e in events]

        # A local rebuild under the same tag is noticed: the lock is not blindly trusted.
        new_id = dfx.build_child(engine, pair.base if dfx.has_image(engine, pair.base)
                                 else pair.a, pair.b, {"b.txt": b"rebuilt\n"})
        rebuilt = bundle(*args)
        assert rebuilt.rc == 0, rebuilt.err
        assert json.loads(rebuilt.out)["fetched"] == 1
        lock = json.loads((tmp_path / "bundle.lock").read_text())
        assert {i["ref"]: i["image_id"] for i in lock["images"]}[pair.b] == new_id
    finally:
        dfx.remove_images(engine, pair.a, pair.b, pair.base)
