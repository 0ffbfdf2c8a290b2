"""Layer deltas wired into delta bundles, without an engine: the receipt's `engine` record
(strict, optional for older receipts), the manifest's `host_layers` on a thin images archive
(a full manifest keeps its bytes; one form only), and what `bundle build --against` decides
for the images (thin with a classic store, whole with containerd, an old receipt or an old
bundle). End to end with the real engine: tests/test_layer_delta_e2e.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from bundler.build import delta as build_delta
from bundler.bundle.imagedelta import CLASSIC, CONTAINERD, HeldImage, HostLayers, chain_ids
from bundler.bundle.inspect import split
from bundler.bundle.manifest import (
    IMAGES_PATH,
    FileEntry,
    HostLayer,
    Manifest,
    canonical_json,
    parse_manifest,
)
from bundler.bundle.models import ImageRef, Target
from bundler.bundle.receipt import Artifact, HeldRelease, Receipt, parse_receipt
from bundler.errors import DeltaError, SignatureError
from tests.test_imagedelta import BASE, MID, TOP1, TOP2, Img, _archive, _layer_member, _members

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64
ENGINE = HostLayers(CLASSIC, (HeldImage(B, (A,)),))
RECEIPT = Receipt(product="shop", created="2026-01-01T00:00:00Z", host_key="0123456789abcdef",
                  accepted_sequence=5, current=HeldRelease("1.0.0", 5),
                  kept=(HeldRelease("1.0.0", 5),), artifacts=(Artifact("c" * 64, 3),),
                  images=(B,), engine=ENGINE)


# --- the receipt records the engine's layers ---------------------------------------------------

def test_a_receipt_with_the_engine_round_trips_and_an_old_one_still_reads() -> None:
    data = RECEIPT.to_bytes()
    assert b'"engine":{"images":[{"diff_ids":["' + A.encode() in data
    assert parse_receipt(data) == RECEIPT
    old = dataclasses.replace(RECEIPT, engine=None)
    assert b"engine" not in old.to_bytes()  # an older receipt's exact shape
    assert parse_receipt(old.to_bytes()).engine is None


@pytest.mark.parametrize("mangle", [
    lambda d: d.replace(b'"store":"classic"', b'"store":"zfs"'),
    lambda d: d.replace(b'"store":"classic"', b'"store":"classic","x":1'),
    lambda d: d.replace(b'"diff_ids":[', b'"extra":1,"diff_ids":['),
    lambda d: d.replace(b'"diff_ids":["sha256:' + b"a" * 64, b'"diff_ids":["sha256:' + b"A" * 64),
    lambda d: d.replace(b'"diff_ids":["sha256:' + b"a" * 64, b'"diff_ids":["' + b"a" * 64),
    lambda d: d.replace(b'"diff_ids":["sha256:' + b"a" * 64, b'"diff_ids":[1'),
    lambda d: d.replace(b'"id":"sha256:' + b"b" * 64 + b'"', b'"id":"sha256:b"'),
    lambda d: _engine(d, {"images": [], "store": "classic", "x": {}}),
    lambda d: _engine(d, {"images": {}, "store": "classic"}),
    lambda d: _engine(d, {"store": "classic"}),
    lambda d: _engine(d, None),
    lambda d: d.replace(b'{"diff_ids"', b'{"diff_ids":["' + A.encode() + b'"],"id":"'
                        + B.encode() + b'"},{"diff_ids"'),  # the same image twice
], ids=["store", "unknown-key", "unknown-image-key", "upper-hex", "no-prefix", "not-text",
        "short-id", "unknown-engine-key", "images-not-list", "no-images", "null", "twice"])
def test_the_receipts_engine_record_is_parsed_strictly(mangle: object) -> None:
    data = mangle(RECEIPT.to_bytes())  # type: ignore[operator]
    assert data != RECEIPT.to_bytes()
    with pytest.raises(DeltaError) as err:
        parse_receipt(data)
    assert err.value.exit_code == 24 and "malformed" in err.value.message


def _engine(data: bytes, value: object) -> bytes:
    doc = json.loads(data)
    doc["engine"] = value
    return canonical_json(doc)


# --- the manifest's host_layers -------------------------------------------------------------

IMAGES = FileEntry(IMAGES_PATH, 900, "d" * 64, "images")
LAYERS = (HostLayer(chain_ids([A])[0], 20_000), HostLayer(chain_ids([A, B])[1], 8_000))


def _manifest(images: FileEntry = IMAGES) -> Manifest:
    return Manifest(name="shop", version="2.0.0", sequence=6, created="2026-01-01T00:00:00Z",
                    target=Target(), files=(images,),
                    images=(ImageRef("example.org/app:2", B),))


def test_a_full_manifest_keeps_its_bytes_and_a_thin_archive_lists_its_host_layers() -> None:
    full = _manifest()
    assert b"host_layers" not in full.to_bytes() and not full.is_delta
    thin = _manifest(dataclasses.replace(IMAGES, host_layers=tuple(sorted(
        LAYERS, key=lambda x: x.chain_id))))
    data = thin.to_bytes()
    assert data.count(b'"host_layers":[{"chain_id":"sha256:') == 1
    back = parse_manifest(data)
    assert back == thin and back.is_delta and not back.from_host
    assert set(back.host_chains) == {x.chain_id for x in LAYERS}
    d = split(back)
    assert (d["travel_files"], d["travel_bytes"], d["host_files"]) == (1, 900, 0)
    assert (d["host_layers"], d["host_layer_bytes"]) == (2, 28_000)


def _thin_bytes() -> bytes:
    layers = tuple(sorted(LAYERS, key=lambda x: x.chain_id))
    return _manifest(dataclasses.replace(IMAGES, host_layers=layers)).to_bytes()


@pytest.mark.parametrize("mangle", [
    lambda d: d.replace(b'"host_layers":[', b'"host_layers":[{"chain_id":"sha256:'
                        + b"0" * 64 + b'","size":1,"x":2},'),  # unknown key in a layer
    lambda d: d.replace(b'"chain_id":"sha256:', b'"chain_id":"sha256:X', 1),  # not hex
    lambda d: d.replace(b'"chain_id":"sha256:', b'"chain_id":"md5:', 1),
    lambda d: d.replace(b'"size":20000', b'"size":-1'),
    lambda d: d.replace(b'"size":20000', b'"size":true'),
    lambda d: d.replace(b'"size":20000', b'"size":20000.0'),
    lambda d: _with_layers(d, []),  # empty: absent is the one form of "none"
    lambda d: _with_layers(d, {"sha256:" + "0" * 64: 1}),  # not a list
    lambda d: _reverse_layers(d),  # not sorted: one form only
    lambda d: d.replace(b'"kind":"images"', b'"kind":"images","travels":false'),
], ids=["unknown-key", "bad-hex", "not-sha256", "negative", "bool", "float", "empty",
        "not-list", "unsorted", "with-travels-false"])
def test_host_layers_are_parsed_strictly(mangle: object) -> None:
    data = mangle(_thin_bytes())  # type: ignore[operator]
    assert data != _thin_bytes()
    with pytest.raises(SignatureError, match="malformed"):
        parse_manifest(data)


def _with_layers(data: bytes, value: object) -> bytes:
    doc = json.loads(data)
    doc["files"][0]["host_layers"] = value
    return canonical_json(doc)


def _reverse_layers(data: bytes) -> bytes:
    layers = tuple(sorted(LAYERS, key=lambda x: x.chain_id, reverse=True))
    return _manifest(dataclasses.replace(IMAGES, host_layers=layers)).to_bytes()


def test_host_layers_belong_to_the_images_archive_only() -> None:
    entry = FileEntry("files/app/a.py", 3, "e" * 64, "file", host_layers=LAYERS[:1])
    m = dataclasses.replace(_manifest(), files=(IMAGES, entry))
    with pytest.raises(SignatureError, match="host_layers belong to"):
        parse_manifest(m.to_bytes())


# --- what the build does with the images ---------------------------------------------------

def _has(layers: HostLayers | None, label: str = "receipt r") -> build_delta.HostHas:
    return build_delta.HostHas(label, "shop", 1, frozenset(), frozenset(), True, "", layers)


def _entry(path: Path) -> FileEntry:
    data = path.read_bytes()
    return FileEntry(IMAGES_PATH, len(data), hashlib.sha256(data).hexdigest(), "images")


def test_the_build_thins_the_archive_against_a_classic_store(tmp_path: Path) -> None:
    old, new = Img("app:1", (BASE, MID, TOP1)), Img("app:2", (BASE, MID, TOP2))
    src = _archive(tmp_path / "full.tar.zst", [new])
    held = HostLayers(CLASSIC, (HeldImage(old.image_id, old.diffs),))
    entry = _entry(src)

    got, path, plan = build_delta.thin_images(entry, src, _has(held), tmp_path / "thin")

    assert path == tmp_path / "thin" and plan.how == "thin" and plan.thin is not None
    assert (got.size, got.sha256) == (plan.thin.size, plan.thin.sha256)
    assert got.travels and got.size < entry.size
    assert [x.chain_id for x in got.host_layers] == sorted(chain_ids(new.diffs)[:2])
    assert sum(x.size for x in got.host_layers) == len(BASE) + len(MID)
    assert set(_members(path)) == set(_members(src)) - {_layer_member(BASE),
                                                        _layer_member(MID)}
    doc = plan.to_json()
    assert (doc["travel_layers"], doc["host_layers"]) == (1, 2)
    assert doc["travel_layer_bytes"] == len(TOP2) and doc["full_size"] == entry.size
    assert "1 layer(s) travel" in plan.note and "2 the host's engine supplies" in plan.note


@pytest.mark.parametrize(("layers", "label", "why"), [
    (HostLayers(CONTAINERD, (HeldImage(B, (A,)),)), "receipt r", "containerd image store"),
    (None, "receipt r", "does not record the engine's layers"),
    (None, "bundle old.bundle", "an older bundle says nothing of the host's image store"),
    (HostLayers(CLASSIC, ()), "receipt r", "holds none of their layers"),
])
def test_the_build_carries_images_whole_and_says_why(
        tmp_path: Path, layers: HostLayers | None, label: str, why: str) -> None:
    src = _archive(tmp_path / "full.tar.zst", [Img("app:2", (BASE, TOP2))])
    entry = _entry(src)
    got, path, plan = build_delta.thin_images(entry, src, _has(layers, label),
                                              tmp_path / "thin")
    assert (got, path, plan.how) == (entry, src, "whole")
    assert why in plan.note and "images travel whole" in plan.note
    assert not (tmp_path / "thin").exists() and not (tmp_path / "thin.part").exists()


# --- swarm roots ---------------------------------------------------------------------------

def test_a_swarm_root_refuses_a_layer_delta_before_asking_the_engine(tmp_path: Path) -> None:
    from bundler.install import delta as install_delta
    from bundler.install.layout import Layout

    layout = Layout(tmp_path / "root")
    layout.root.mkdir()
    layout.swarm_file.write_text("nodes: []\n")
    before = sorted(p.name for p in layout.root.iterdir())
    thin = _manifest(dataclasses.replace(IMAGES, host_layers=LAYERS[:1]))
    with pytest.raises(DeltaError) as err:  # DOCKER_HOST is never asked: refused first
        install_delta.preflight(layout, thin)
    assert err.value.exit_code == 24
    assert "some image layers" in err.value.message and "runs a swarm" in err.value.message
    assert "full bundle" in err.value.hint
    assert sorted(p.name for p in layout.root.iterdir()) == before


def test_a_swarm_roots_receipt_lists_no_image(tmp_path: Path) -> None:
    """So a delta built against it carries the images whole, which the swarm install takes."""
    from bundler.install import receipts
    from bundler.install.layout import Layout

    layout = Layout(tmp_path / "root")
    meta = layout.release("1.0.0") / "bundle"
    meta.mkdir(parents=True)
    (meta / "manifest.json").write_bytes(_manifest().to_bytes())
    layout.swarm_file.write_text("nodes: []\n")
    said: list[str] = []
    assert receipts._images(layout, ["1.0.0"], said.append) == ((), False)
    assert "a swarm root" in said[0]
