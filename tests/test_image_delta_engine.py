"""Image deltas against the real engine (this host's Docker, classic image store): a thin
archive of an image whose base the engine holds loads and runs with the signed Image ID; the
same archive on an engine without that base is refused before anything is loaded; the chain
IDs bundler computes are the engine's own. Images are tiny and unique (tests/docker_fixtures).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import zstandard

from bundler.build.cache import Cache
from bundler.build.resolve.images import ImagesFetched, ImageSpec, fetch
from bundler.bundle.imagedelta import CLASSIC, chain_ids, thin
from bundler.errors import DeltaError, ImageLoadError
from bundler.install.images import held_layers, load, require_layers
from tests import docker_fixtures as dfx
from tests.helpers import unavailable

pytestmark = pytest.mark.docker

LOG: list[str] = []
TOP_PAYLOAD = 3 * 1024 * 1024  # incompressible: the changed top layer is this big


def log(line: str) -> None:
    LOG.append(line)


@dataclass(frozen=True)
class Release:
    base: str
    old: str   # the release the host runs: base + its own top layer
    new: str   # the next one: the same base, a new 3 MiB top layer


@pytest.fixture
def release(engine: Any) -> Iterator[Release]:
    tag = dfx.unique()
    base, old, new = (f"bundler-test/delta-{n}:{tag}" for n in ("base", "old", "new"))
    dfx.import_base(engine, base)
    dfx.build_child(engine, base, old, {"v": b"1\n"})
    dfx.build_child(engine, base, new, {"v": b"2\n", "blob": os.urandom(TOP_PAYLOAD)})
    yield Release(base, old, new)
    dfx.remove_images(engine, new, old, base)


def _full(engine: Any, ref: str, tmp_path: Path) -> ImagesFetched:
    """The full bundle's image archive of `ref`, as `bundle build` makes it."""
    return fetch([ImageSpec(ref)], Cache(tmp_path / "cache"), log)


def _layers(engine: Any, ref: str) -> list[str]:
    return [str(d) for d in engine.api.inspect_image(ref)["RootFS"]["Layers"]]


def test_only_the_new_top_layer_travels_and_the_image_loads_and_runs(
        engine: Any, release: Release, tmp_path: Path) -> None:
    full = _full(engine, release.new, tmp_path)
    diffs = _layers(engine, release.new)
    dfx.remove_images(engine, release.new)  # the target: it runs `old`, so it holds the base
    host = held_layers(engine)  # what its receipt records
    assert host.store == CLASSIC
    assert chain_ids(_layers(engine, release.old))[0] in host.chains()

    got = thin(full.path, tmp_path / "thin.tar.zst", host.chains())

    [img] = got.images
    assert img.image_id == full.images[0].image_id
    assert [u.diff_id for u in img.omitted] == diffs[:1]
    assert [u.diff_id for u in img.travels] == diffs[1:]
    top = img.travels[0].size
    assert top > TOP_PAYLOAD and got.travel_bytes == top
    assert got.size <= top + 1024 * 1024, (got.size, top)
    assert got.size < full.size
    log(f"thin {got.size} B (top layer {top} B), full {full.size} B")
    assert not dfx.has_image(engine, release.new)

    load(tmp_path / "thin.tar.zst", full.images, log, omitted=got.omitted_chains)

    assert engine.api.inspect_image(release.new)["Id"] == full.images[0].image_id
    assert dfx.run_echo(engine, release.new) == b"ok\n"
    assert any("come from the engine" in line for line in LOG)


def _tar_of(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()


def test_an_engine_without_the_base_is_refused_before_anything_is_loaded(
        engine: Any, release: Release, tmp_path: Path) -> None:
    full = _full(engine, release.new, tmp_path)
    base_chain = chain_ids(_layers(engine, release.new))[0]
    dfx.remove_images(engine, release.new)
    receipt = held_layers(engine)  # taken while the host still had the base...
    got = thin(full.path, tmp_path / "thin.tar.zst", receipt.chains())
    assert got.omitted_chains == (base_chain,)
    dfx.remove_images(engine, release.old, release.base)  # ...then pruned
    assert got.omitted_chains[0] not in held_layers(engine).chains()
    repo = release.new.rsplit(":", 1)[0]

    with pytest.raises(DeltaError) as caught:
        load(tmp_path / "thin.tar.zst", full.images, log, omitted=got.omitted_chains)
    assert caught.value.exit_code == 24
    assert "lacks 1 image layer" in caught.value.message
    assert got.omitted_chains[0].removeprefix("sha256:")[:12] in caught.value.message
    assert engine.api.images(name=repo, all=True) == []
    with pytest.raises(DeltaError):
        require_layers(engine, got.omitted_chains)  # the same check, alone (install preflight)

    # a manifest that does not list the missing layer: the stream check aborts the upload
    with pytest.raises(ImageLoadError, match=r"not in the archive.*nothing was loaded"):
        load(tmp_path / "thin.tar.zst", full.images, log)
    assert engine.api.images(name=repo, all=True) == []
    with pytest.raises(docker.errors.ImageNotFound):
        engine.api.inspect_image(full.images[0].image_id)


def test_the_engine_alone_reads_a_missing_layer_file_only_when_it_lacks_the_chain(
        engine: Any, release: Release, tmp_path: Path) -> None:
    """What bundler's checks stand in front of, observed on the engine itself (docker load of
    the raw thin tar, no bundler check): it loads with the base held, and fails late, with a
    file-not-found from its temp dir, without it."""
    full = _full(engine, release.new, tmp_path)
    dfx.remove_images(engine, release.new)
    got = thin(full.path, tmp_path / "thin.tar.zst", held_layers(engine).chains())
    assert len(got.images[0].omitted) == 1
    raw = _tar_of(tmp_path / "thin.tar.zst")
    out = list(engine.api.load_image(raw))
    assert engine.api.inspect_image(release.new)["Id"] == full.images[0].image_id, out

    dfx.remove_images(engine, release.new, release.old, release.base)
    out = list(engine.api.load_image(raw))
    errors = [m["error"] for m in out if isinstance(m, dict) and m.get("error")]
    assert len(errors) == 1 and "no such file or directory" in errors[0], out
    assert "layer.tar" in errors[0] and not dfx.has_image(engine, release.new)


def test_chain_ids_are_the_engines_layer_store_keys(engine: Any, release: Release) -> None:
    info = engine.info()
    layerdb = Path(info["DockerRootDir"]) / "image" / info["Driver"] / "layerdb" / "sha256"
    if not os.access(layerdb, os.R_OK | os.X_OK):
        unavailable(f"{layerdb} is not readable here (needs root)")
    for ref in (release.base, release.old, release.new):
        chains = chain_ids(_layers(engine, ref))
        assert len(chains) == (1 if ref == release.base else 2)
        for chain in chains:
            entry = layerdb / chain.removeprefix("sha256:")
            assert (entry / "diff").read_text().strip() in _layers(engine, ref)


def test_held_layers_lists_every_image_with_its_diff_ids(engine: Any,
                                                         release: Release) -> None:
    host = held_layers(engine)
    by_id = {i.image_id: i.diff_ids for i in host.images}
    for ref in (release.base, release.old, release.new):
        image_id = engine.api.inspect_image(ref)["Id"]
        assert by_id[image_id] == tuple(_layers(engine, ref))
