"""Image deltas against an engine with the containerd image store, run for real: Debian 13's
Docker 26 in a container of this host's engine (tests.inner_engine). The images are built on
this host's classic engine, as on a connected build machine, and `bundle build` makes their
archive (bundler.build.resolve.images.fetch); the containerd engine is the target.

What it shows (docs/design/image-delta.md): `docker info` there reports the containerd store as
bundler detects it; a full archive loads, named by the manifest containerd writes for it, which
bundler computes and checks; a thin archive does not load there even with its base held (the
engine's own error, recorded); bundler refuses it up front (exit 24) and the engine is left as
it was; a receipt from that engine holds no layer chain, so a delta built against it carries
every layer, and that archive installs there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bundler.build.cache import Cache
from bundler.build.resolve.images import ImagesFetched, ImageSpec, fetch
from bundler.bundle.imagedelta import CONTAINERD, HostLayers, chain_ids, thin
from bundler.errors import DeltaError
from bundler.install.images import (
    containerd_image_id,
    held_layers,
    image_store,
    load,
    require_layers,
)
from tests import docker_fixtures as dfx
from tests.inner_engine import InnerEngine, containerd_engine

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LOG: list[str] = []
TOP_PAYLOAD = 1024 * 1024  # incompressible: the new release's top layer is this big


def log(line: str) -> None:
    LOG.append(line)


@pytest.fixture(scope="module")
def inner(engine: Any) -> Iterator[InnerEngine]:
    with containerd_engine(engine) as eng:
        yield eng


@dataclass(frozen=True)
class Release:
    base: str
    old: str   # what the target runs: base + its own top layer
    new: str   # the next release: the same base, a new top layer
    old_full: ImagesFetched
    new_full: ImagesFetched


@pytest.fixture
def release(engine: Any, inner: InnerEngine, tmp_path: Path) -> Iterator[Release]:
    """Built on this host's (classic) engine, as the connected side builds; both bundles'
    archives made as `bundle build` makes them; the target engine starts without them."""
    tag = dfx.unique()
    base, old, new = (f"bundler-test/ctrd-{n}:{tag}" for n in ("base", "old", "new"))
    dfx.import_base(engine, base)
    dfx.build_child(engine, base, old, {"v": b"1\n"})
    dfx.build_child(engine, base, new, {"v": b"2\n", "blob": os.urandom(TOP_PAYLOAD)})
    cache = Cache(tmp_path / "cache")
    yield Release(base, old, new, fetch([ImageSpec(old)], cache, log),
                  fetch([ImageSpec(new)], cache, log))
    dfx.remove_images(engine, new, old, base)
    dfx.remove_images(inner.client, new, old, base)


def _ids(client: Any) -> list[str]:
    return sorted(str(i) for i in client.api.images(all=True, quiet=True))


def _layers(client: Any, ref: str) -> list[str]:
    return [str(d) for d in client.api.inspect_image(ref)["RootFS"]["Layers"]]


def _tar_of(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()


def test_the_engine_reports_the_containerd_image_store(inner: InnerEngine) -> None:
    info = inner.client.info()
    assert info["ServerVersion"].startswith("26."), info["ServerVersion"]
    assert info["DriverStatus"] == [["driver-type", "io.containerd.snapshotter.v1"]]
    assert info["Driver"] == "overlayfs"
    assert image_store(info) == CONTAINERD


def test_a_full_archive_loads_named_by_its_manifest_and_runs(
        engine: Any, inner: InnerEngine, release: Release) -> None:
    [rec] = release.old_full.images
    load(release.old_full.path, release.old_full.images, log, client=inner.client)

    found = inner.client.api.inspect_image(release.old)
    # not the config digest (the Image ID on a classic store) but the manifest's, which
    # bundler computed from the signed config and layers and `load` checked
    assert found["Id"] != rec.image_id
    assert found["RootFS"]["Layers"] == _layers(engine, release.old)
    assert any("Image IDs match the manifest" in line for line in LOG)
    assert dfx.run_echo(inner.client, release.old) == b"ok\n"


def test_a_thin_archive_does_not_load_even_with_its_base_held(
        engine: Any, inner: InnerEngine, release: Release, tmp_path: Path) -> None:
    """The engine alone (docker load of the raw thin tar, no bundler check): containerd's
    importer wants every layer file the archive's manifest.json names."""
    load(release.old_full.path, release.old_full.images, log, client=inner.client)
    base_chain = chain_ids(_layers(inner.client, release.old))[0]  # held there, and running
    assert dfx.run_echo(inner.client, release.old) == b"ok\n"
    got = thin(release.new_full.path, tmp_path / "thin.tar.zst", {base_chain})
    assert got.omitted_chains == (base_chain,)
    before = _ids(inner.client)

    out = list(inner.client.api.load_image(_tar_of(tmp_path / "thin.tar.zst")))

    errors = [str(m["error"]) for m in out if isinstance(m, dict) and m.get("error")]
    assert len(errors) == 1, out
    [entry] = dfx.zst_json(release.new_full.path, "manifest.json")
    member = entry["Layers"][0]  # the base layer's file, named as the build's engine named it
    assert errors[0] == f'failed to resolve layers: layer "{member}" not found', errors
    assert not dfx.has_image(inner.client, release.new)
    assert _ids(inner.client) == before


def test_bundler_refuses_a_thin_archive_up_front_and_the_engine_is_unchanged(
        engine: Any, inner: InnerEngine, release: Release, tmp_path: Path) -> None:
    load(release.old_full.path, release.old_full.images, log, client=inner.client)
    base_chain = chain_ids(_layers(inner.client, release.old))[0]
    got = thin(release.new_full.path, tmp_path / "thin.tar.zst", {base_chain})
    before = _ids(inner.client)

    with pytest.raises(DeltaError) as caught:  # the install preflight's check
        require_layers(inner.client, got.omitted_chains)
    assert caught.value.exit_code == 24
    assert "containerd image store" in caught.value.message
    assert "full bundle" in caught.value.hint and "receipt" in caught.value.hint
    with pytest.raises(DeltaError) as caught:  # and the images step's, before any upload
        load(tmp_path / "thin.tar.zst", release.new_full.images, log, client=inner.client,
             omitted=got.omitted_chains)
    assert caught.value.exit_code == 24
    assert _ids(inner.client) == before
    assert not dfx.has_image(inner.client, release.new)


def test_a_receipt_there_holds_no_chain_so_the_delta_carries_every_layer_and_installs(
        engine: Any, inner: InnerEngine, release: Release, tmp_path: Path) -> None:
    load(release.old_full.path, release.old_full.images, log, client=inner.client)
    host = HostLayers.from_dict(held_layers(inner.client).to_dict())  # as a receipt carries it
    assert host.store == CONTAINERD
    old_id = str(inner.client.api.inspect_image(release.old)["Id"])
    assert old_id in {i.image_id for i in host.images}  # it lists the image, and its layers...
    assert host.chains() == frozenset()  # ...but offers none to leave out

    got = thin(release.new_full.path, tmp_path / "delta.tar.zst", host.chains())

    [img] = got.images
    assert img.omitted == () and got.omitted_chains == () and got.omitted_bytes == 0
    assert [u.diff_id for u in img.travels] == _layers(engine, release.new)
    load(tmp_path / "delta.tar.zst", release.new_full.images, log, client=inner.client,
         omitted=got.omitted_chains)
    new = inner.client.api.inspect_image(release.new)
    assert new["RootFS"]["Layers"] == _layers(engine, release.new)
    assert dfx.run_echo(inner.client, release.new) == b"ok\n"
    assert inner.client.containers.run(release.new, ["busybox", "cat", "/payload/v"],
                                       remove=True, network_mode="none") == b"2\n"


def test_the_containerd_image_id_bundler_computes_is_the_engines(
        engine: Any, inner: InnerEngine, release: Release) -> None:
    """containerd_image_id from the archive's own config and layer sizes, against `docker
    inspect` on the engine (the check `load` makes, spelled out)."""
    load(release.new_full.path, release.new_full.images, log, client=inner.client)
    [rec] = release.new_full.images
    config = engine.api.inspect_image(release.new)  # the classic store: Id = config digest
    assert config["Id"] == rec.image_id
    sizes = {m.name: m.size for m in dfx.zst_members(release.new_full.path)}
    [entry] = dfx.zst_json(release.new_full.path, "manifest.json")
    layers = [(diff, sizes[member]) for diff, member in
              zip(_layers(engine, release.new), entry["Layers"], strict=True)]
    want = containerd_image_id((rec.image_id, sizes[entry["Config"]]), layers)
    assert inner.client.api.inspect_image(release.new)["Id"] == want
