"""The Docker-image artifact kind, against a real engine, real skopeo and a real registry.

Build side: bundler.build.resolve.images.fetch; target side: bundler.install.images.load.
Images are tiny (a static busybox), made locally: see tests/docker_fixtures.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bundler.build.cache import Cache
from bundler.build.resolve.images import ImageRecord, ImageSpec, fetch
from bundler.errors import BuildError, ImageLoadError, InstallError
from bundler.install.images import load
from tests import docker_fixtures as dfx

pytestmark = pytest.mark.docker

LOG: list[str] = []


def log(line: str) -> None:
    LOG.append(line)


@pytest.fixture(scope="session")
def pair(engine: Any) -> Iterator[dfx.Pair]:
    """Two engine images sharing a base layer; read-only for the tests that use it."""
    p = dfx.make_pair(engine, "shared")
    yield p
    dfx.remove_images(engine, p.a, p.b, p.base)


@pytest.fixture(scope="session")
def local_registry(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dfx.registry(tmp_path_factory.mktemp("registry")) as addr:
        yield addr


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


def _ids(client: Any, *refs: str) -> dict[str, str]:
    return {r: str(client.api.inspect_image(r)["Id"]) for r in refs}


def _one_image_archive(client: Any, pair: dfx.Pair, tmp_path: Path, cache: Cache,
                       ref: str) -> tuple[Path, ImageRecord]:
    """A fetched bundle archive holding pair.a under a NEW tag `ref` (via source: archive),
    so loading it into this engine would create a tag that does not exist yet."""
    saved = tmp_path / "a.tar"
    dfx.save(client, pair.a, saved)
    got = fetch([ImageSpec(ref, source="archive", archive=saved)], cache, log)
    return got.path, got.images[0]


# --- (1) engine images sharing a layer: stored once, IDs recorded ------------------------------

def test_engine_images_share_their_base_layer_once(engine: Any, pair: dfx.Pair,
                                                   cache: Cache, tmp_path: Path) -> None:
    got = fetch([ImageSpec(pair.a), ImageSpec(pair.b)], cache, log)

    assert got.path == cache.path(got.sha256) and got.path.stat().st_size == got.size
    assert [(r.ref, r.image_id) for r in got.images] == [
        (pair.a, pair.ids[pair.a]), (pair.b, pair.ids[pair.b])]
    assert _ids(engine, pair.a, pair.b) == {pair.a: pair.ids[pair.a], pair.b: pair.ids[pair.b]}

    base_layer = pair.diff_ids(engine, pair.base)[0]
    assert pair.diff_ids(engine, pair.a)[0] == pair.diff_ids(engine, pair.b)[0] == base_layer
    members = dfx.zst_members(got.path)
    holders = [m.name for m in members if m.sha256 == base_layer]
    assert len(holders) == 1, holders  # the shared layer's bytes are in the archive ONCE
    for ref in (pair.a, pair.b):  # ...and each image's own layer is there too
        own = pair.diff_ids(engine, ref)[1]
        assert sum(m.sha256 == own for m in members) == 1
    manifest = dfx.zst_json(got.path, "manifest.json")
    assert sorted(t for e in manifest for t in e["RepoTags"]) == sorted([pair.a, pair.b])
    assert members[-1].name == "manifest.json"  # written last: a truncated tar has none

    # measurements for the report: one image per save vs one combined archive
    separate = sum(dfx.save(engine, r, tmp_path / f"{i}.tar") for i, r in enumerate(
        (pair.a, pair.b)))
    layer_size = next(m.size for m in members if m.sha256 == base_layer)
    assert got.uncompressed_size < separate - layer_size // 2
    print(f"\nMEASURE shared-layer: separate saves {separate} B, combined tar "
          f"{got.uncompressed_size} B, zstd {got.size} B "
          f"(x{got.uncompressed_size / got.size:.2f}); {LOG[-1]}")


def test_same_images_give_the_same_archive_bytes(pair: dfx.Pair, tmp_path: Path) -> None:
    first = fetch([ImageSpec(pair.a), ImageSpec(pair.b)], Cache(tmp_path / "c1"), log)
    second = fetch([ImageSpec(pair.a), ImageSpec(pair.b)], Cache(tmp_path / "c2"), log)
    assert first.sha256 == second.sha256


# --- (2) round trip: fetch, remove, load, run -------------------------------------------------

def test_round_trip_fetch_rmi_load_run(engine: Any, cache: Cache) -> None:
    p = dfx.make_pair(engine, "roundtrip")
    try:
        got = fetch([ImageSpec(p.a), ImageSpec(p.b)], cache, log)
        dfx.remove_images(engine, p.a, p.b, p.base)
        for ref in (p.a, p.b, p.ids[p.a], p.ids[p.b]):
            assert not dfx.has_image(engine, ref)  # gone, by tag and by ID

        started = time.monotonic()
        load(got.path, got.images, log)
        secs = time.monotonic() - started

        assert _ids(engine, p.a, p.b) == {p.a: p.ids[p.a], p.b: p.ids[p.b]}
        assert dfx.run_echo(engine, p.a) == b"ok\n"
        assert dfx.run_echo(engine, p.b) == b"ok\n"
        print(f"\nMEASURE load: {got.size} B zstd / {got.uncompressed_size} B tar loaded in "
              f"{secs:.2f}s")
    finally:
        dfx.remove_images(engine, p.a, p.b, p.base)


# --- (3) registry via skopeo, no engine needed ------------------------------------------------

def test_registry_images_via_skopeo_need_no_engine(
        engine: Any, pair: dfx.Pair, local_registry: str, cache: Cache,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tag = dfx.unique()
    remote_a = f"{local_registry}/bundler-test/a:{tag}"
    remote_b = f"{local_registry}/bundler-test/b:{tag}"
    dfx.push(engine, pair.a, remote_a)
    dfx.push(engine, pair.b, remote_b)
    dfx.remove_images(engine, remote_a, remote_b)  # only the registry has these tags now

    with monkeypatch.context() as m:  # prove the build side never talks to an engine
        m.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        got = fetch([ImageSpec(remote_a, source="registry", tls_verify=False),
                     ImageSpec(remote_b, source="registry", tls_verify=False)], cache, log)

    # the config digest survives push and pull: the same Image IDs as the engine's
    assert [r.image_id for r in got.images] == [pair.ids[pair.a], pair.ids[pair.b]]
    base_layer = pair.diff_ids(engine, pair.base)[0]
    assert sum(m.sha256 == base_layer for m in dfx.zst_members(got.path)) == 1

    load(got.path, got.images, log)
    try:
        assert _ids(engine, remote_a, remote_b) == {remote_a: pair.ids[pair.a],
                                                    remote_b: pair.ids[pair.b]}
    finally:
        dfx.remove_images(engine, remote_a, remote_b)


def test_engine_and_registry_sources_share_layers_too(
        engine: Any, pair: dfx.Pair, local_registry: str, cache: Cache) -> None:
    remote_b = f"{local_registry}/bundler-test/b:{dfx.unique()}"
    dfx.push(engine, pair.b, remote_b)
    dfx.remove_images(engine, remote_b)
    got = fetch([ImageSpec(pair.a), ImageSpec(remote_b, source="registry", tls_verify=False)],
                cache, log)
    assert [r.image_id for r in got.images] == [pair.ids[pair.a], pair.ids[pair.b]]
    base_layer = pair.diff_ids(engine, pair.base)[0]
    assert sum(m.sha256 == base_layer for m in dfx.zst_members(got.path)) == 1


def test_registry_image_that_does_not_exist(local_registry: str, cache: Cache) -> None:
    ref = f"{local_registry}/bundler-test/missing:1"
    with pytest.raises(BuildError) as err:
        fetch([ImageSpec(ref, source="registry", tls_verify=False)], cache, log)
    assert ref in err.value.message and "not in its registry" in err.value.message


# --- (4) existing archives: docker save (legacy), OCI, Docker 25+ ------------------------------

@pytest.mark.parametrize("kind", ["docker-save", "oci", "docker25"])
def test_archive_source(engine: Any, pair: dfx.Pair, cache: Cache, tmp_path: Path,
                        kind: str) -> None:
    path = tmp_path / f"{kind}.tar"
    if kind == "docker-save":
        dfx.save(engine, pair.a, path)  # Debian's 20.10: manifest.json + <id>/layer.tar
        want = pair.ids[pair.a]
    elif kind == "oci":
        want = dfx.oci_archive(pair.a, path)  # index.json + blobs, gzip layers
    else:
        want = dfx.docker25_archive(pair.a, path)
    target = f"bundler-test/from-{kind}:{dfx.unique()}"
    got = fetch([ImageSpec(target, source="archive", archive=path)], cache, log)
    assert got.images == (ImageRecord(target, want),)
    # layers are stored uncompressed (gzip ones inflated) under their diff_id
    diffs = set(pair.diff_ids(engine, pair.a))
    assert diffs <= {m.sha256 for m in dfx.zst_members(got.path)}

    try:
        load(got.path, got.images, log)
        assert _ids(engine, target) == {target: want}
        assert dfx.run_echo(engine, target) == b"ok\n"
    finally:
        dfx.remove_images(engine, target)


def test_archive_with_a_damaged_layer_fails_the_build(engine: Any, pair: dfx.Pair,
                                                      cache: Cache, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    dfx.save(engine, pair.a, good)
    manifest = json.loads(dfx.member_bytes(good, "manifest.json"))
    layer = manifest[0]["Layers"][-1]
    data = bytearray(dfx.member_bytes(good, layer))
    data[600] ^= 0x01  # same size, other bytes: only the diff_id check can notice
    dfx.rewrite_tar(good, bad, change={layer: bytes(data)})
    with pytest.raises(BuildError) as err:
        fetch([ImageSpec(pair.a, source="archive", archive=bad)], cache, log)
    assert "does not match its image config" in err.value.message


def test_oci_index_picks_the_target_platform(engine: Any, pair: dfx.Pair, cache: Cache,
                                             tmp_path: Path) -> None:
    oci, multi = tmp_path / "oci.tar", tmp_path / "multi.tar"
    want = dfx.oci_archive(pair.a, oci)
    dfx.oci_multiplatform(oci, multi)
    got = fetch([ImageSpec(pair.a, source="archive", archive=multi)], cache, log)
    assert got.images == (ImageRecord(pair.a, want),)
    with pytest.raises(BuildError) as err:  # the arm64 entry's config says amd64
        fetch([ImageSpec(pair.a, source="archive", archive=multi, platform="linux/arm64/v8")],
              cache, log)
    assert "is for linux/amd64, the target is linux/arm64/v8" in err.value.message


def test_archive_with_several_images_picks_by_tag(engine: Any, pair: dfx.Pair, cache: Cache,
                                                  tmp_path: Path) -> None:
    both = tmp_path / "both.tar"
    first = fetch([ImageSpec(pair.a), ImageSpec(pair.b)], Cache(tmp_path / "c0"), log)
    with open(first.path, "rb") as src, open(both, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    got = fetch([ImageSpec(pair.b, source="archive", archive=both)], cache, log)
    assert got.images == (ImageRecord(pair.b, pair.ids[pair.b]),)
    with pytest.raises(BuildError) as err:
        fetch([ImageSpec("bundler-test/nope:1", source="archive", archive=both)], cache, log)
    assert "holds no image tagged bundler-test/nope:1" in err.value.message
    assert pair.a in err.value.hint and pair.b in err.value.hint


# --- (5) the engine ends up with other Image IDs than the manifest says ------------------------

def test_load_refuses_a_wrong_image_id_and_loads_nothing(
        engine: Any, pair: dfx.Pair, cache: Cache, tmp_path: Path) -> None:
    ref = f"bundler-test/never-loaded:{dfx.unique()}"
    archive, record = _one_image_archive(engine, pair, tmp_path, cache, ref)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImageLoadError) as err:
        load(archive, [ImageRecord(ref, wrong)], log)
    assert isinstance(err.value, InstallError)
    assert ref in err.value.message
    assert record.image_id in err.value.message and wrong in err.value.message
    assert not dfx.has_image(engine, ref)  # the upload was aborted: no tag was created


def test_load_refuses_tags_the_manifest_does_not_list(
        engine: Any, pair: dfx.Pair, cache: Cache) -> None:
    got = fetch([ImageSpec(pair.a), ImageSpec(pair.b)], cache, log)
    with pytest.raises(ImageLoadError) as err:
        load(got.path, got.images[:1], log)
    assert pair.b in err.value.message and "not list" in err.value.message


# --- (6) build-side failures -----------------------------------------------------------------

def test_missing_local_image_fails_the_build(engine: Any, cache: Cache) -> None:
    ref = f"bundler-test/not-built:{dfx.unique()}"
    with pytest.raises(BuildError) as err:
        fetch([ImageSpec(ref)], cache, log)
    assert ref in err.value.message and "not in the local docker engine" in err.value.message
    assert "docker pull" in err.value.hint and "source: registry" in err.value.hint
    objects = cache.root / "objects"
    assert not objects.exists() or not any(objects.rglob("*"))  # nothing entered the cache


def test_unreachable_engine_fails_the_build(cache: Cache,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(BuildError) as err:
        fetch([ImageSpec("bundler-test/x:1")], cache, log)
    assert "not reachable" in err.value.message and "dockerd" in err.value.hint


def test_missing_skopeo_fails_the_build(cache: Cache, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError) as err:
        fetch([ImageSpec("127.0.0.1:1/x:1", source="registry")], cache, log)
    assert "skopeo" in err.value.message and "apt-get install skopeo" in err.value.hint


def test_image_for_another_platform_fails_the_build(pair: dfx.Pair, cache: Cache) -> None:
    with pytest.raises(BuildError) as err:
        fetch([ImageSpec(pair.a, platform="linux/arm64")], cache, log)
    assert pair.a in err.value.message and "linux/amd64" in err.value.message


# --- (7) a damaged archive fails load cleanly ---------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated-half", "truncated-tail", "bit-flip", "empty"])
def test_damaged_archive_fails_load_and_loads_nothing(
        engine: Any, pair: dfx.Pair, cache: Cache, tmp_path: Path, damage: str) -> None:
    ref = f"bundler-test/damaged:{dfx.unique()}"
    archive, record = _one_image_archive(engine, pair, tmp_path, cache, ref)
    data = archive.read_bytes()
    bad = tmp_path / "bad.tar.zst"
    if damage == "truncated-half":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "truncated-tail":
        bad.write_bytes(data[:-20])  # only the end of the frame (and its checksum) is missing
    elif damage == "bit-flip":
        mid = len(data) // 2
        bad.write_bytes(data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1:])
    else:
        bad.write_bytes(b"")
    with pytest.raises(ImageLoadError) as err:
        load(bad, [record], log)
    assert "damaged" in err.value.message and "nothing was loaded" in err.value.message
    assert not dfx.has_image(engine, ref)


def test_engine_unreachable_on_the_target(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(InstallError) as err:
        load(tmp_path / "x.tar.zst", [ImageRecord("x:1", "sha256:" + "1" * 64)], log)
    assert "not reachable" in err.value.message and "dockerd" in err.value.hint


def test_local_image_ids_are_the_sdks_answers(engine: Any, pair: dfx.Pair,
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A warm build asks the engine's socket directly (no SDK import): the same IDs as the
    SDK's inspect, None for an image the engine lacks; anything else than a reachable unix
    socket leaves the question to the SDK (None)."""
    from bundler.engine import local_image_ids

    missing = f"bundler-test/never-built:{dfx.unique()}"
    by_id = engine.api.inspect_image(pair.b)["Id"]
    refs = [pair.a, missing, pair.base, by_id]
    assert local_image_ids(refs) == {pair.a: engine.api.inspect_image(pair.a)["Id"],
                                     missing: None,
                                     pair.base: engine.api.inspect_image(pair.base)["Id"],
                                     by_id: by_id}
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no.sock'}")
    assert local_image_ids([pair.a]) is None
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    assert local_image_ids([pair.a]) is None


def test_a_rebuilt_engine_image_is_noticed_by_the_next_build(engine: Any,
                                                              tmp_path: Path) -> None:
    """The lock names an engine image's ID; a `docker build` since (same tag, new ID) makes
    `--frozen` refuse and a plain build save the image again; an unchanged one is reused."""
    from tests.helpers import bundle

    ref = f"bundler-test/rebuilt:{dfx.unique()}"
    first = dfx.import_base(engine, ref)
    profile = tmp_path / "bundle.yaml"
    profile.write_text(f"schema: 1\nname: app\nversion: 1.0.0\n"
                       f"images:\n  - ref: {ref}\n    source: engine\n")
    keys = tmp_path / "k"
    assert bundle("keygen", keys).rc == 0
    args = ("build", profile, "--key", f"{keys}.key", "--out", tmp_path / "out",
            "--cache-dir", tmp_path / "cache", "--json")
    try:
        built = bundle(*args)
        assert built.rc == 0, built.err
        again = bundle(*args)
        assert again.rc == 0 and "Saving" not in again.err, again.err
        second = dfx.import_base(engine, ref)
        assert second != first
        frozen = bundle(*args, "--frozen")
        assert frozen.rc == BuildError.exit_code \
            and "not the engine's current ones" in frozen.out, frozen.out
        rebuilt = bundle(*args)
        assert rebuilt.rc == 0 and "Saving 1 image(s)" in rebuilt.err, rebuilt.err
        info = json.loads(bundle("inspect", json.loads(rebuilt.out)["bundle"], "--trust",
                                 f"{keys}.pub", "--json").out)
        assert [i["image_id"] for i in info["images"]] == [second]
    finally:
        dfx.remove_images(engine, ref)
