"""Image deltas without an engine: chain IDs, the omit rule, the thin archive's bytes, the
receipt shape, and the target-side checks at the engine adapter boundary (a recorded
`docker info` payload and a fake client). The real engine: tests/test_image_delta_engine.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bundler.bundle.imagedelta import (
    CLASSIC,
    CONTAINERD,
    HeldImage,
    HostLayers,
    chain_ids,
    thin,
)
from bundler.errors import BuildError, DeltaError
from bundler.install import images
from bundler.install.images import held_layers, image_store, require_classic, require_layers
from tests.helpers import REPO

# --- chain IDs --------------------------------------------------------------------------------

A, B, C = ("sha256:" + ch * 64 for ch in "abc")


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def test_chain_ids_follow_the_oci_formula() -> None:
    assert chain_ids([]) == ()
    assert chain_ids([A]) == (A,)
    ab = _sha(f"{A} {B}")
    assert chain_ids([A, B, C]) == (A, ab, _sha(f"{ab} {C}"))
    # the same layer over another base is another chain
    assert chain_ids([B, A])[1] != chain_ids([A, B])[1]


def test_chain_ids_refuse_what_is_not_a_sha256_digest() -> None:
    for bad in ("a" * 64, "sha256:" + "A" * 64, "sha512:" + "a" * 64, "sha256:abc"):
        with pytest.raises(ValueError, match="diff ID"):
            chain_ids([bad])


def test_the_containerd_image_id_is_the_digest_of_the_manifest_its_importer_writes() -> None:
    # recorded on Docker 26.1.5 (containerd 1.7.24, containerd image store): a two-layer image
    # of this host's Docker 20.10 loaded from bundler's archive; `docker inspect` .Id there
    config = ("sha256:ee76aed90df36f267bc272d23340d94854400873f59c84e864f05b87d348358f", 1488)
    layers = [("sha256:b4858dda9e4d032c50aa4753f07ace1bfcfdf2abb930b72957ed2ea7b8fe758a",
               1986560),
              ("sha256:734f8baef840777b58d03bc4f758f34e57fbfd9a7d50bcf3a21d0e04fdb22886", 2560)]
    assert images.containerd_image_id(config, layers) == (
        "sha256:29ae326eff9a63a3b2ac05015e551cb05fba41fb99264393aa5c0041efa5e699")
    assert images.containerd_image_id(config, layers[:1]) != images.containerd_image_id(
        config, layers)
    assert images.containerd_image_id((config[0], 1489), layers) != images.containerd_image_id(
        config, layers)


# --- synthetic docker-save archives (the layout the build writes) -----------------------------

def _layer(seed: str, size: int = 4096) -> bytes:
    """A layer tar holding one file of `size` bytes derived from `seed`."""
    data = (hashlib.sha256(seed.encode()).hexdigest() * (size // 64 + 1)).encode()[:size]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(f"files/{seed}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class Img:
    tag: str
    layers: tuple[bytes, ...]

    @property
    def diffs(self) -> tuple[str, ...]:
        return tuple("sha256:" + hashlib.sha256(x).hexdigest() for x in self.layers)

    @property
    def config(self) -> bytes:
        return json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                           "rootfs": {"type": "layers", "diff_ids": list(self.diffs)}},
                          sort_keys=True).encode()

    @property
    def image_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()


def _archive(path: Path, imgs: list[Img]) -> Path:
    """A zstd docker-save tar as bundler/build/resolve/images.py writes it: each layer once as
    <diff>/layer.tar, configs as <id>.json, manifest.json last."""
    raw = io.BytesIO()
    written: set[str] = set()
    manifest = []
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes) -> None:
            if name not in written:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                written.add(name)
        for img in imgs:
            members = []
            for diff, data in zip(img.diffs, img.layers, strict=True):
                name = f"{diff.removeprefix('sha256:')}/layer.tar"
                add(name, data)
                members.append(name)
            config = f"{img.image_id.removeprefix('sha256:')}.json"
            add(config, img.config)
            manifest.append({"Config": config, "RepoTags": [img.tag], "Layers": members})
        add("manifest.json", json.dumps(manifest).encode())
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue()))
    return path


def _members(path: Path) -> dict[str, int]:
    with open(path, "rb") as fh, \
            zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as raw, \
            tarfile.open(fileobj=raw, mode="r|") as tf:
        return {m.name: m.size for m in tf}


BASE = _layer("base", 20_000)
MID = _layer("mid", 8_000)
TOP1 = _layer("top1")
TOP2 = _layer("top2")


def _layer_member(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() + "/layer.tar"


# --- the omit rule ---------------------------------------------------------------------------

def test_only_the_layers_whose_whole_chain_is_held_are_left_out(tmp_path: Path) -> None:
    old, new = Img("app:1", (BASE, MID, TOP1)), Img("app:2", (BASE, MID, TOP2))
    src = _archive(tmp_path / "full.tar.zst", [new])
    held = HostLayers(CLASSIC, (HeldImage(old.image_id, old.diffs),)).chains()

    got = thin(src, tmp_path / "thin.tar.zst", held)

    [img] = got.images
    assert (img.image_id, img.tags) == (new.image_id, ("app:2",))
    assert [u.diff_id for u in img.travels] == [new.diffs[2]]
    assert [u.diff_id for u in img.omitted] == list(new.diffs[:2])
    assert [u.chain_id for u in img.omitted] == list(chain_ids(new.diffs)[:2])
    assert got.omitted_chains == tuple(sorted(chain_ids(new.diffs)[:2]))
    assert (got.travel_bytes, got.omitted_bytes) == (len(TOP2), len(BASE) + len(MID))
    members = _members(tmp_path / "thin.tar.zst")
    assert _layer_member(TOP2) in members
    assert _layer_member(BASE) not in members and _layer_member(MID) not in members
    assert set(_members(src)) - set(members) == {_layer_member(BASE), _layer_member(MID)}
    assert (tmp_path / "thin.tar.zst").stat().st_size == got.size
    assert hashlib.sha256((tmp_path / "thin.tar.zst").read_bytes()).hexdigest() == got.sha256


def test_a_held_upper_layer_over_a_missing_lower_one_travels(tmp_path: Path) -> None:
    """The engine holds MID and TOP1, but over another base: their chains differ, so the
    engine would read both from the archive; nothing may be left out."""
    other = Img("other:1", (_layer("other-base"), MID, TOP1))
    img = Img("app:1", (BASE, MID, TOP1))
    held = HostLayers(CLASSIC, (HeldImage(other.image_id, other.diffs),)).chains()
    assert set(img.diffs) & {d for d in other.diffs} == {img.diffs[1], img.diffs[2]}

    got = thin(_archive(tmp_path / "full.tar.zst", [img]), tmp_path / "thin.tar.zst", held)

    assert got.images[0].omitted == () and got.omitted_chains == ()
    assert got.omitted_bytes == 0
    # a held diff ID alone (a base layer elsewhere, chain == diff) is not the chain here either
    got = thin(tmp_path / "full.tar.zst", tmp_path / "thin2.tar.zst", {img.diffs[2]})
    assert got.images[0].omitted == ()


def test_a_shared_member_stays_when_one_of_its_uses_is_not_held(tmp_path: Path) -> None:
    """TOP1 is stored once for two images; in one its chain is held, in the other not."""
    held_img = Img("a:1", (BASE, TOP1))
    fresh = Img("b:1", (MID, TOP1))
    src = _archive(tmp_path / "full.tar.zst", [held_img, fresh])
    assert list(_members(src)).count(_layer_member(TOP1)) == 1

    got = thin(src, tmp_path / "thin.tar.zst", chain_ids(held_img.diffs))

    by_tag = {i.tags[0]: i for i in got.images}
    assert [u.diff_id for u in by_tag["a:1"].omitted] == [held_img.diffs[0]]
    assert [u.diff_id for u in by_tag["a:1"].travels] == [held_img.diffs[1]]
    assert by_tag["b:1"].omitted == ()
    members = _members(tmp_path / "thin.tar.zst")
    assert _layer_member(TOP1) in members and _layer_member(BASE) not in members
    assert got.travel_bytes == len(TOP1) + len(MID)  # the shared member counted once


def test_nothing_held_gives_the_same_members_and_a_fully_held_image_keeps_its_config(
        tmp_path: Path) -> None:
    img = Img("app:1", (BASE, TOP1))
    src = _archive(tmp_path / "full.tar.zst", [img])
    none = thin(src, tmp_path / "none.tar.zst", ())
    assert _members(tmp_path / "none.tar.zst") == _members(src) and none.omitted_bytes == 0
    every = thin(src, tmp_path / "all.tar.zst", chain_ids(img.diffs))
    assert every.images[0].travels == () and every.travel_bytes == 0
    assert set(_members(tmp_path / "all.tar.zst")) == {
        f"{img.image_id.removeprefix('sha256:')}.json", "manifest.json"}


def test_same_inputs_give_the_same_bytes(tmp_path: Path) -> None:
    src = _archive(tmp_path / "full.tar.zst", [Img("app:2", (BASE, MID, TOP2))])
    held = list(chain_ids(Img("x", (BASE, MID)).diffs))
    one = thin(src, tmp_path / "one.tar.zst", held)
    two = thin(src, tmp_path / "two.tar.zst", list(reversed(held)))
    assert one == two
    assert (tmp_path / "one.tar.zst").read_bytes() == (tmp_path / "two.tar.zst").read_bytes()


def test_an_unreadable_archive_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(b"not a tar" * 1000))
    with pytest.raises(BuildError, match="cannot be thinned"):
        thin(bad, tmp_path / "out.tar.zst", ())
    img = Img("app:1", (BASE, TOP1))
    src = _archive(tmp_path / "lying.tar.zst", [img])  # manifest.json names a missing layer
    thinned = thin(src, tmp_path / "tmp.tar.zst", chain_ids(img.diffs[:1]))
    with pytest.raises(BuildError, match="is not in the archive"):
        thin(tmp_path / "tmp.tar.zst", tmp_path / "out.tar.zst", ())
    assert thinned.omitted_chains and sorted(os.listdir(tmp_path)) == [
        "bad.tar.zst", "lying.tar.zst", "tmp.tar.zst"]
    with pytest.raises(ValueError, match="chain ID"):
        thin(src, tmp_path / "out.tar.zst", {"nope"})


MEMORY_CHECK = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from bundler.bundle.imagedelta import thin
    got = thin(Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3:]))
    status = Path("/proc/self/status").read_text()
    print(got.travel_bytes, next(int(ln.split()[1]) for ln in status.splitlines()
                                 if ln.startswith("VmHWM:")))
""")


@pytest.mark.slow
def test_thin_streams_a_large_layer_in_flat_memory(tmp_path: Path) -> None:
    """A 256 MiB layer travels through two passes; the process's peak RSS stays far below it
    (VmHWM of a fresh interpreter, not the test runner's)."""
    size = 256 * 1024 * 1024
    big = tmp_path / "big.tar"
    with open(big, "wb") as fh:  # a layer tar of one incompressible file, written in chunks
        info = tarfile.TarInfo("blob")
        info.size = size - 3 * 512
        fh.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        digest_src = hashlib.sha256()
        for i in range(info.size // (1 << 20) + 1):
            chunk = os.urandom(min(1 << 20, info.size - i * (1 << 20)))
            fh.write(chunk)
            digest_src.update(chunk)
        fh.write(b"\0" * (512 - info.size % 512 if info.size % 512 else 0) + b"\0" * 1024)
    layer_sha = hashlib.sha256()
    with open(big, "rb") as fh:
        while chunk := fh.read(1 << 20):
            layer_sha.update(chunk)
    diffs = ("sha256:" + hashlib.sha256(BASE).hexdigest(), "sha256:" + layer_sha.hexdigest())
    config = json.dumps({"os": "linux", "architecture": "amd64",
                         "rootfs": {"type": "layers", "diff_ids": list(diffs)}}).encode()
    cfg = hashlib.sha256(config).hexdigest() + ".json"
    src = tmp_path / "full.tar.zst"
    with open(src, "wb") as out, \
            zstandard.ZstdCompressor(level=1).stream_writer(out) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        names = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diffs]
        base_info = tarfile.TarInfo(names[0])
        base_info.size = len(BASE)
        tf.addfile(base_info, io.BytesIO(BASE))
        with open(big, "rb") as fh:
            big_info = tarfile.TarInfo(names[1])
            big_info.size = big.stat().st_size
            tf.addfile(big_info, fh)
        for name, data in ((cfg, config), ("manifest.json", json.dumps(
                [{"Config": cfg, "RepoTags": ["big:1"], "Layers": names}]).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    big.unlink()
    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(src),
                           str(tmp_path / "thin.tar.zst"), diffs[0]],
                          capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    travel, peak_kib = map(int, done.stdout.split())
    assert travel == size
    assert peak_kib < 64 * 1024, f"peak RSS {peak_kib} KiB for a {size >> 20} MiB layer"


# --- the receipt's shape ---------------------------------------------------------------------

def test_host_layers_round_trip_and_refuse_malformed_input() -> None:
    host = HostLayers(CLASSIC, (HeldImage(C, (A, B)), HeldImage(A, (A,))))
    doc = json.loads(json.dumps(host.to_dict()))
    assert [i["id"] for i in doc["images"]] == [A, C]  # sorted: a receipt is reproducible
    back = HostLayers.from_dict(doc)
    assert back.chains() == host.chains() == {A, chain_ids([A, B])[1]}
    for bad, words in (([], "not an object"), ({"store": "zfs", "images": []}, "image store"),
                       ({"store": CLASSIC}, "not a list"),
                       ({"store": CLASSIC, "images": [{"id": A}]}, "diff_ids"),
                       ({"store": CLASSIC, "images": [{"id": "x", "diff_ids": []}]},
                        "image ID"),
                       ({"store": CLASSIC, "images": [{"id": A, "diff_ids": ["b"]}]},
                        "diff ID")):
        with pytest.raises(ValueError, match=words):
            HostLayers.from_dict(bad)  # type: ignore[arg-type]


def test_a_containerd_store_offers_no_layer_to_leave_out() -> None:
    host = HostLayers(CONTAINERD, (HeldImage(C, (A, B)),))
    assert host.chains() == frozenset()
    assert HostLayers.from_dict(host.to_dict()) == host


# --- the engine adapter: recorded `docker info` payloads, a fake client ------------------------

# GET /info of this machine's Docker 20.10.24 (classic store, overlay2), trimmed to the fields
# read here and a few neighbours.
INFO_CLASSIC: dict[str, Any] = {
    "ServerVersion": "20.10.24+dfsg1", "Driver": "overlay2",
    "DriverStatus": [["Backing Filesystem", "extfs"], ["Supports d_type", "true"],
                     ["Native Overlay Diff", "true"], ["userxattr", "false"]],
    "DockerRootDir": "/var/lib/docker", "OSType": "linux", "Architecture": "x86_64"}
# The containerd image store (Docker 24+, `"features": {"containerd-snapshotter": true}`, the
# default from 29): GET /info of Debian 13's Docker 26.1.5 run with it
# (tests/test_image_delta_containerd.py checks it live), trimmed the same way; it reports only
# the driver type, Driver is the snapshotter's name.
INFO_CONTAINERD: dict[str, Any] = {
    "ServerVersion": "26.1.5+dfsg1", "Driver": "overlayfs",
    "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
    "DockerRootDir": "/var/lib/docker", "OSType": "linux", "Architecture": "x86_64"}


def test_image_store_tells_the_containerd_store_from_a_graph_driver() -> None:
    assert image_store(INFO_CLASSIC) == CLASSIC
    assert image_store(INFO_CONTAINERD) == CONTAINERD
    assert image_store({**INFO_CONTAINERD, "Driver": "stargz"}) == CONTAINERD
    assert image_store({}) == CLASSIC and image_store({"DriverStatus": None}) == CLASSIC


class FakeApi:
    def __init__(self, images: dict[str, list[str]]) -> None:
        self.by_id = images

    def images(self, all: bool = False, quiet: bool = False) -> list[str]:
        assert all and quiet
        return list(self.by_id) + list(self.by_id)[:1]  # the engine may list one twice

    def inspect_image(self, ref: str) -> dict[str, Any]:
        return {"Id": ref, "RootFS": {"Type": "layers", "Layers": self.by_id[ref]}}


class FakeClient:
    """The two SDK calls held_layers makes, with a recorded /info payload."""

    def __init__(self, info: dict[str, Any], images: dict[str, list[str]]) -> None:
        self._info = info
        self.api = FakeApi(images)

    def info(self) -> dict[str, Any]:
        return self._info


def test_held_layers_reads_every_image_and_the_store() -> None:
    client = FakeClient(INFO_CLASSIC, {C: [A, B], B: [A]})
    host = held_layers(client)
    assert host == HostLayers(CLASSIC, (HeldImage(B, (A,)), HeldImage(C, (A, B))))
    assert held_layers(FakeClient(INFO_CONTAINERD, {C: [A, B]})).store == CONTAINERD


def test_require_layers_names_what_is_missing_and_the_fix() -> None:
    client = FakeClient(INFO_CLASSIC, {C: [A, B]})
    require_layers(client, chain_ids([A, B]))  # held: no error
    require_layers(FakeClient(INFO_CONTAINERD, {}), ())  # nothing needed: no question asked
    lacking = chain_ids([A, C])[1]
    with pytest.raises(DeltaError) as caught:
        require_layers(client, [A, lacking])
    assert caught.value.exit_code == DeltaError.exit_code == 24
    assert "lacks 1 image layer" in caught.value.message
    assert lacking.removeprefix("sha256:")[:12] in caught.value.message
    assert "full bundle" in caught.value.hint and "receipt" in caught.value.hint


def test_require_layers_refuses_the_containerd_store_up_front() -> None:
    client = FakeClient(INFO_CONTAINERD, {C: [A, B]})  # it even has the layers
    with pytest.raises(DeltaError) as caught:
        require_layers(client, [A])
    assert "containerd image store" in caught.value.message
    assert "full bundle" in caught.value.hint


def test_a_delta_leaving_whole_images_is_refused_by_the_containerd_store_with_why() -> None:
    require_classic(FakeClient(INFO_CLASSIC, {}), "its 2 image(s)")  # a classic store: checked
    with pytest.raises(DeltaError) as caught:  # by config digest later (install/delta.py)
        require_classic(FakeClient(INFO_CONTAINERD, {C: [A, B]}), "its 2 image(s)")
    assert caught.value.exit_code == 24
    assert "containerd image store" in caught.value.message
    assert "leaves its 2 image(s) to the engine" in caught.value.message
    assert "full bundle" in caught.value.hint


# --- the install stream accepts a thin archive only as the manifest describes it -----------

def test_the_stream_check_refuses_a_missing_layer_the_manifest_did_not_list(
        tmp_path: Path) -> None:
    img = Img("app:2", (BASE, TOP2))
    src = _archive(tmp_path / "full.tar.zst", [img])
    got = thin(src, tmp_path / "thin.tar.zst", chain_ids(img.diffs[:1]))
    want = {"app:2": img.image_id}

    with pytest.raises(images._Mismatch, match="not in the archive"):
        list(images._upload(tmp_path / "thin.tar.zst", want, {}))
    with pytest.raises(images._Mismatch, match="not in the archive"):
        list(images._upload(tmp_path / "thin.tar.zst", want, {}, {chain_ids(img.diffs)[1]}))
    stats: dict[str, int] = {}
    sent = b"".join(images._upload(tmp_path / "thin.tar.zst", want, stats,
                                   frozenset(got.omitted_chains)))
    assert len(sent) == stats["uncompressed"] == got.uncompressed_size
    full = b"".join(images._upload(src, want, {}))  # a full archive needs nothing listed
    assert len(full) > len(sent)


def test_the_stream_computes_each_tags_containerd_image_id_when_it_carries_every_layer(
        tmp_path: Path) -> None:
    app, base = Img("app:2", (BASE, TOP2)), Img("base:1", (BASE,))
    src = _archive(tmp_path / "full.tar.zst", [app, base])
    want = {"app:2": app.image_id, "base:1": base.image_id}
    ids: dict[str, str] = {}
    list(images._upload(src, want, {}, engine_ids=ids))
    sizes = _members(src)
    assert ids == {img.tag: images.containerd_image_id(
        (img.image_id, len(img.config)),
        [(d, sizes[_layer_member(x)]) for d, x in zip(img.diffs, img.layers, strict=True)])
        for img in (app, base)}
    got = thin(src, tmp_path / "thin.tar.zst", chain_ids(app.diffs[:1]))
    ids.clear()
    list(images._upload(tmp_path / "thin.tar.zst", want, {}, frozenset(got.omitted_chains),
                        engine_ids=ids))
    assert ids == {}  # no image of a thin archive can be named: it never loads there


def test_a_containerd_store_image_whose_id_is_not_the_signed_ones_is_refused() -> None:
    """After a load on the containerd store, each tag must name the manifest computed from the
    signed config and layers (images.containerd_image_id); another ID is refused, one line."""
    from bundler.errors import ImageLoadError
    from bundler.install.images import _check_loaded

    class Api:
        def __init__(self, ids: dict[str, str]) -> None:
            self.ids = ids

        def inspect_image(self, ref: str) -> dict[str, Any]:
            return {"Id": self.ids[ref]}

    class Client:
        def __init__(self, ids: dict[str, str]) -> None:
            self.api = Api(ids)

        def info(self) -> dict[str, Any]:
            return INFO_CONTAINERD

    want = {"app:1": "sha256:" + "c" * 64}  # the config digest the manifest signs
    computed = {"app:1": "sha256:" + "d" * 64}
    _check_loaded(Client(dict(computed)), want, computed)  # the engine names it as computed
    with pytest.raises(ImageLoadError) as caught:
        _check_loaded(Client({"app:1": "sha256:" + "e" * 64}), want, computed)
    assert "app:1 is sha256:eeee" in caught.value.message
    assert "containerd image store would name it sha256:dddd" in caught.value.message
    assert "compressed" in caught.value.hint
