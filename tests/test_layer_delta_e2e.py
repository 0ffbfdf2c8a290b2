"""A layer delta end to end, with the real engine (classic store) and the install side under
`unshare -n`: a process release with two images installed; its receipt (the engine's layers);
2.0.0 where one image's top layer changed; `bundle build --against RECEIPT` carries that one
layer (the bundle's image archive is at most that layer + 1 MB, the other layers and the
unchanged image's are not in it); the same delta on the root whose engine lost the base layer
is refused (exit 24) with the root and the engine's images unchanged; once the base is back,
the offline delta install is healthy and the images have their signed IDs and run."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bundler.bundle import archive
from bundler.bundle.imagearchive import ImageRecord
from bundler.bundle.imagedelta import chain_ids
from bundler.bundle.manifest import IMAGES_PATH, Manifest
from bundler.bundle.signing import load_public_key
from bundler.errors import DeltaError
from bundler.install import images as engine_images
from tests import docker_fixtures as dfx
from tests.helpers import bundle, bundle_argv, make_project, offline, tree_snapshot

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.netns]

TOP = 3 * 1024 * 1024  # incompressible: the changed top layer
MB = 1024 * 1024


def _images(refs: list[str]) -> str:
    return "images:\n" + "".join(f"  - ref: {r}\n" for r in refs)


def _build(profile: Path, keys: tuple[Path, Path], cache: Path, out: Path,
           *extra: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    done = bundle("build", profile, "--key", keys[0], "--out", out, "--cache-dir", cache,
                  "--json", *extra)
    assert done.rc == 0, done.err
    doc = json.loads(done.out)
    return Path(doc["bundle"]), doc


def _member(bundle_path: Path, name: str, dest: Path) -> Path:
    """One member of a (single-file) bundle tar, written to `dest`."""
    with tarfile.open(bundle_path) as tf:
        f = tf.extractfile(name)
        assert f is not None
        dest.write_bytes(f.read())
    return dest


def _engine_images(engine: Any) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((str(i["Id"]), tuple(i.get("RepoTags") or ()))
                  for i in engine.api.images(all=True))


def test_only_the_changed_top_layer_travels_and_a_host_without_the_base_is_refused(
        engine: Any, tmp_path: Path, keys: tuple[Path, Path], roots: list[Path]) -> None:
    tag = dfx.unique()
    base, app1, app2, side_base, side = (
        f"bundler-test/ld-{n}:{tag}" for n in ("base", "app1", "app2", "sidebase", "side"))
    try:
        dfx.import_base(engine, base)
        dfx.build_child(engine, base, app1, {"v": b"1\n"})
        dfx.build_child(engine, base, app2, {"v": b"2\n", "blob": os.urandom(TOP)})
        dfx.import_base(engine, side_base)
        dfx.build_child(engine, side_base, side, {"s": tag.encode()})
        layers = {r: [str(d) for d in engine.api.inspect_image(r)["RootFS"]["Layers"]]
                  for r in (app1, app2, side)}
        ids = {r: str(engine.api.inspect_image(r)["Id"]) for r in (app1, app2, side)}
        _run(engine, tmp_path, keys, roots, (base, app1, app2, side_base, side), layers, ids)
    finally:
        dfx.remove_images(engine, app2, app1, base, side, side_base)


def _run(engine: Any, tmp_path: Path, keys: tuple[Path, Path], roots: list[Path],
         refs: tuple[str, ...], layers: dict[str, list[str]], ids: dict[str, str]) -> None:
    base, app1, app2, _side_base, side = refs
    (tmp_path / "project").mkdir()
    project = make_project(tmp_path / "project")
    cache = tmp_path / "cache"
    full1, _ = _build(project.profile("1.0.0", sequence=1, extra=_images([app1, side])), keys,
                      cache, tmp_path / "v1")
    root = tmp_path / "root"
    roots.append(root)
    install, stop = offline(bundle_argv("install", full1, "--trust", keys[1], "--root", root),
                            bundle_argv("stop", "--root", root))
    assert install.rc == 0 and stop.rc == 0, install.err + stop.err

    made = bundle("receipt", "--root", root, "--out", tmp_path, "--json")
    assert made.rc == 0, made.err
    receipt = json.loads(made.out)
    assert receipt["image_store"] == "classic" and receipt["images"] == 2
    assert receipt["layer_chains"] == 4  # app1: base, base+v1; side: its base, base+child
    (tmp_path / "host.pub").write_text(receipt["public_key"])

    v2 = project.profile("2.0.0", sequence=2, extra=_images([app2, side]))
    full2, _ = _build(v2, keys, cache, tmp_path / "v2-full")
    delta, doc = _build(v2, keys, cache, tmp_path / "v2-delta", "--against",
                        receipt["receipt"], "--host-key", tmp_path / "host.pub")
    plan = doc["delta"]["images"]
    assert plan["how"] == "thin" and plan["travel_layers"] == 1, plan
    # app2's base chain, and side's two (its Image ID is held, but the archive travels)
    assert plan["host_layers"] == 3, plan

    # What travels: app2's top layer, the configs and manifest.json; nothing else.
    entry = _manifest(delta, keys).file(IMAGES_PATH)
    assert entry.travels and [x.chain_id for x in entry.host_layers] == sorted(
        [chain_ids(layers[app2])[0], *chain_ids(layers[side])])
    thin = _member(delta, IMAGES_PATH, tmp_path / "thin.tar.zst")
    members = dfx.zst_members(thin)
    carried = [x for x in members if x.name.endswith("layer.tar") and x.type == tarfile.REGTYPE]
    assert [f"sha256:{x.sha256}" for x in carried] == [layers[app2][1]], members
    top = carried[0].size
    assert top > TOP and entry.size <= top + MB, (entry.size, top)
    full_images = _manifest(full2, keys).file(IMAGES_PATH).size
    assert plan["full_size"] == full_images and entry.size < full_images
    print(f"images payload: full {full_images} B, thin {entry.size} B (top layer {top} B); "
          f"full bundle {full2.stat().st_size} B, delta {delta.stat().st_size} B")

    shown = bundle("inspect", delta, "--trust", keys[1])
    assert "thin: 3 layer(s) from the host's engine" in shown.out, shown.out
    diffed = json.loads(bundle("diff", full1, delta, "--trust", keys[1], "--json").out)
    assert diffed["delta"]["host_layers"] == 3

    # The engine loses the base layer (app1 and app2 and their base removed): refused up front.
    dfx.remove_images(engine, app2, app1, base)
    assert not dfx.has_image(engine, app1)
    before, images_before = tree_snapshot(root), _engine_images(engine)
    refused, = offline(bundle_argv("install", delta, "--trust", keys[1], "--root", root))
    assert refused.rc == DeltaError.exit_code == 24, refused.err
    assert "lacks 1 image layer" in refused.err and "hint:" in refused.err
    assert chain_ids(layers[app2])[0].removeprefix("sha256:")[:12] in refused.err
    assert tree_snapshot(root) == before and _engine_images(engine) == images_before

    # The base back (1.0.0's images, from its release directory): the delta installs offline.
    v1 = root / "releases" / "1.0.0"
    engine_images.load(v1 / IMAGES_PATH, [ImageRecord(app1, ids[app1]),
                                          ImageRecord(side, ids[side])], print)
    up, status = offline(
        bundle_argv("install", delta, "--trust", keys[1], "--root", root, "--json"),
        bundle_argv("status", "--root", root, "--json"))
    assert up.rc == 0, up.err
    assert "layer chain(s) come from the engine's own store" in up.err + up.out
    st = json.loads(status.out)
    assert st["current"]["version"] == "2.0.0" and st["healthy"] is True, st
    assert str(engine.api.inspect_image(app2)["Id"]) == ids[app2]
    assert str(engine.api.inspect_image(side)["Id"]) == ids[side]
    out = engine.containers.run(app2, ["busybox", "cat", "/payload/v"], remove=True,
                                network_mode="none")
    assert bytes(out) == b"2\n"


def _manifest(path: Path, keys: tuple[Path, Path]) -> Manifest:
    return archive.manifest_of(path, [load_public_key(keys[1])]).manifest

