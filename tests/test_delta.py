"""Receipts, the content store and delta bundles (docs/delta.md).

Unit tests: the receipt parser (strict), the travel marker, the build's refusals. End to end
(the install side under `unshare -n`, real uv, real processes): a full install, its receipt,
a delta build where only the application code changed, the offline delta install; the same
release installed from the full bundle into a second root gives an identical release tree; a
corrupt and a missing store object, a receipt for another product or an older build are
refused with the root unchanged; a kill -9 during a delta install recovers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from bundler.build import delta as build_delta
from bundler.bundle import archive
from bundler.bundle.manifest import FileEntry, Manifest, parse_manifest
from bundler.bundle.models import Target
from bundler.bundle.receipt import (
    PAYLOAD_TYPE,
    Artifact,
    HeldRelease,
    Receipt,
    parse_receipt,
    read_receipt,
)
from bundler.bundle.signing import TrustedKey, key_id, sign, sign_payload
from bundler.errors import DeltaError, IntegrityError, SignatureError
from tests.helpers import Project, bundle, bundle_argv, make_project, offline, tree_snapshot

SHA = "a" * 64
RECEIPT = Receipt(product="shop", created="2026-01-01T00:00:00Z", host_key="0123456789abcdef",
                  accepted_sequence=5, current=HeldRelease("1.0.0", 5),
                  kept=(HeldRelease("1.0.0", 5),), artifacts=(Artifact(SHA, 3),),
                  images=("sha256:" + "b" * 64,))


# --- the receipt parser -----------------------------------------------------------------------

def test_a_receipt_round_trips() -> None:
    assert parse_receipt(RECEIPT.to_bytes()) == RECEIPT


@pytest.mark.parametrize("mangle", [
    lambda d: d.replace(b'"schema":1', b'"schema":1,"schema":1'),  # duplicate key
    lambda d: d.replace(b'"schema":1', b'"schema":1,"extra":1'),  # unknown key
    lambda d: d.replace(b'"size":3', b'"size":3.0'),  # a float
    lambda d: d.replace(b'"size":3', b'"size":3,"more":1'),  # unknown key in an artifact
    lambda d: d.replace(b'"accepted_sequence":5,', b""),  # missing key
    lambda d: d.replace(b'"current":{"sequence":5,"version":"1.0.0"}',
                        b'"current":{"sequence":6,"version":"1.0.0"}'),  # current not kept
    lambda d: d.replace(SHA.encode(), b"A" * 64),  # not a sha256
    lambda d: d.replace(b'"product":"shop"', b'"product":"../x"'),
    lambda d: d.replace(b'"schema":1', b'"schema":2'),
    lambda d: d.replace(b'"size":3', b'"size":true'),  # a bool is no integer
    lambda d: b"[]",
    lambda d: d[:-1],
], ids=["duplicate", "unknown", "float", "unknown-nested", "missing", "current-not-kept",
        "bad-sha", "bad-product", "schema", "bool", "not-object", "truncated"])
def test_the_receipt_parser_is_strict(mangle: object) -> None:
    data = mangle(RECEIPT.to_bytes())  # type: ignore[operator]
    assert data != RECEIPT.to_bytes()
    with pytest.raises(DeltaError) as err:
        parse_receipt(data)
    assert err.value.exit_code == 24 and "malformed" in err.value.message


def test_a_receipt_is_checked_against_the_host_key_when_given() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    host, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    receipt = dataclasses.replace(RECEIPT, host_key=key_id(host.public_key()))
    env = sign_payload(receipt.to_bytes(), PAYLOAD_TYPE, host)
    pub = TrustedKey(key_id(host.public_key()), host.public_key(), "host.pub")
    wrong = TrustedKey(key_id(other.public_key()), other.public_key(), "other.pub")
    assert read_receipt(env, pub, "r").authenticated is True
    unauth = read_receipt(env, None, "r")
    assert unauth.authenticated is False and unauth.receipt == receipt
    with pytest.raises(SignatureError):
        read_receipt(env, wrong, "r")
    # A receipt envelope is no manifest, and a manifest envelope no receipt.
    with pytest.raises(SignatureError):
        read_receipt(sign(_manifest(), host), None, "r")
    # It must name the key that signed it.
    forged = sign_payload(RECEIPT.to_bytes(), PAYLOAD_TYPE, host)
    with pytest.raises(DeltaError):
        read_receipt(forged, None, "r")


# --- the travel marker ------------------------------------------------------------------------

def _manifest(files: tuple[FileEntry, ...] | None = None) -> Manifest:
    return Manifest(name="shop", version="1.0.0", sequence=5, created="2026-01-01T00:00:00Z",
                    target=Target(), files=files or (
                        FileEntry("files/app/a.py", 3, SHA, "file"),
                        FileEntry("python/wheels/x-1-py3-none-any.whl", 4, "c" * 64, "wheel")))


def test_a_full_manifest_keeps_its_bytes_and_a_delta_marks_what_stays_home() -> None:
    full = _manifest()
    assert b"travels" not in full.to_bytes()
    marked = build_delta.mark(full.files, (), build_delta.HostHas(
        "r", "shop", 1, frozenset({"c" * 64}), frozenset(), True, ""))
    delta = dataclasses.replace(full, files=tuple(marked))
    data = delta.to_bytes()
    assert data.count(b'"travels":false') == 1
    back = parse_manifest(data)
    assert back == delta and [f.path for f in back.from_host] == [
        "python/wheels/x-1-py3-none-any.whl"]
    assert back.travel_size == 3 and back.payload_size == 7
    for bad in (b'"travels":true', b'"travels":0', b'"travels":null'):
        with pytest.raises(SignatureError):
            parse_manifest(data.replace(b'"travels":false', bad))
    with pytest.raises(SignatureError):  # unknown keys in a file entry
        parse_manifest(full.to_bytes().replace(b'"kind":"file"', b'"kind":"file","mode":1'))


def test_the_reader_refuses_a_member_the_manifest_leaves_to_the_host(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    src = tmp_path / "a.py"
    src.write_bytes(b"abc")
    entry = FileEntry("files/app/a.py", 3, hashlib.sha256(b"abc").hexdigest(), "file")
    m = _manifest((dataclasses.replace(entry, travels=False),))
    out = tmp_path / "x.bundle"
    archive.pack(out, sign(m, key), [(entry, src)], 0)  # carries it all the same
    trusted = [TrustedKey(key_id(key.public_key()), key.public_key(), "k")]
    with archive.open_bundle(out, trusted) as reader:
        reader.read_envelope()
        with pytest.raises(IntegrityError, match="leaves to the host"):
            reader.extract(None)
    # Without the member, it verifies: nothing is missing that should travel.
    archive.pack(out, sign(m, key), [], 0)
    with archive.open_bundle(out, trusted) as reader:
        reader.read_envelope()
        reader.extract(None)


def test_the_build_refuses_a_receipt_for_another_product_or_an_older_build() -> None:
    has = build_delta.HostHas("receipt r", "shop", 10, frozenset(), frozenset(), True, "")
    build_delta.check_fits(has, "shop", 11)
    with pytest.raises(DeltaError, match="for product 'shop'"):
        build_delta.check_fits(has, "other", 11)
    with pytest.raises(DeltaError, match="already knows sequence 10"):
        build_delta.check_fits(has, "shop", 10)


# --- end to end -------------------------------------------------------------------------------

EPOCH = {"SOURCE_DATE_EPOCH": "1767225600"}  # the full and the delta build: the same manifest
SERVER_V2_LINE = "# v2: only the application code changed\n"


@dataclasses.dataclass(frozen=True)
class World:
    project: Project
    key: Path
    pub: Path
    cache: Path
    full1: Path
    full2: Path  # 2.0.0, full
    base: Path


def _build(w_project: Project, key: Path, cache: Path, version: str, seq: int, out: Path,
           *extra: str | os.PathLike[str]) -> tuple[Path, dict[str, object]]:
    result = bundle("build", w_project.profile(version, sequence=seq), "--key", key, "--out",
                    out, "--cache-dir", cache, "--json", *extra, env=EPOCH)
    assert result.rc == 0, result.err
    doc = json.loads(result.out)
    return Path(doc["bundle"]), doc


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("delta")
    (base / "project").mkdir()
    project = make_project(base / "project")
    assert bundle("keygen", base / "release").rc == 0
    key, pub, cache = base / "release.key", base / "release.pub", base / "cache"
    full1, _ = _build(project, key, cache, "1.0.0", 1, base / "v1")
    server = project.dir / "app" / "server.py"
    server.write_text(server.read_text() + SERVER_V2_LINE)
    full2, _ = _build(project, key, cache, "2.0.0", 2, base / "v2-full")
    return World(project, key, pub, cache, full1, full2, base)


def _installed_v1(w: World, root: Path) -> None:
    """1.0.0 installed offline from the full bundle, then stopped (so that a later offline
    run, in another namespace, can start 2.0.0 on the same port)."""
    install, stop = offline(bundle_argv("install", w.full1, "--trust", w.pub, "--root", root),
                            bundle_argv("stop", "--root", root))
    assert install.rc == 0, install.err
    assert stop.rc == 0, stop.err


def _receipt(root: Path, out: Path) -> dict[str, object]:
    made = bundle("receipt", "--root", root, "--out", out, "--json")
    assert made.rc == 0, made.err
    return dict(json.loads(made.out))


def _delta(w: World, receipt: Path, out: Path, *extra: str | os.PathLike[str]
           ) -> tuple[Path, dict[str, object]]:
    return _build(w.project, w.key, w.cache, "2.0.0", 2, out, "--against", receipt, *extra)


# What uv writes per install: `uv_cache.json` records the source wheel file's modification
# time (the time this root's copy was written), and RECORD lists that file's hash.
PER_INSTALL = ("uv_cache.json", "RECORD")


def _release_tree(root: Path, version: str) -> dict[str, str]:
    """What the release directory holds, but for what is inherently this root's and this
    run's: logs/ and run/ (its processes' output and pids), report.json and REPORT.md (times,
    durations), the venv's compiled bytecode (__pycache__), PER_INSTALL in a dist-info, the
    reuse records (bundle/*.record.json: this install's own account of the trees it made, with
    their absolute paths; the trees themselves are compared), and the absolute root path uv
    writes into the venv's scripts and pyvenv.cfg (compared with the root's path replaced).
    The signed manifest is compared as what it describes: a delta's own bytes also mark what
    did not travel."""
    rel = root / "releases" / version
    out = {}
    for path, what in tree_snapshot(rel).items():
        top, name = path.split("/")[0], path.rsplit("/", 1)[-1]
        if top in ("logs", "run", "report.json", "REPORT.md") or "__pycache__" in path \
                or (".dist-info/" in path and name in PER_INSTALL) \
                or (top == "bundle" and name.endswith(".record.json")):
            continue
        if path == "bundle/manifest.json":
            m = parse_manifest((rel / path).read_bytes())
            full = dataclasses.replace(m, files=tuple(dataclasses.replace(f, travels=True)
                                                      for f in m.files))
            what = f"{what.split()[1]} {hashlib.sha256(full.to_bytes()).hexdigest()}"
        if what.startswith("file ") and path.startswith("venv/"):
            data = (rel / path).read_bytes().replace(os.fsencode(root), b"<root>")
            what = f"file {what.split()[1]} {hashlib.sha256(data).hexdigest()}"
        out[path] = what
    return out


@pytest.mark.slow
@pytest.mark.netns
def test_a_delta_upgrade_installs_offline_and_equals_the_full_one(
        world: World, tmp_path: Path, roots: list[Path]) -> None:
    w = world
    root, other = tmp_path / "a", tmp_path / "b"
    roots += [root, other]
    _installed_v1(w, root)
    assert (root / "state" / "host.key").stat().st_mode & 0o777 == 0o600
    assert (root / "state").stat().st_mode & 0o777 == 0o700
    assert (root / "store").stat().st_mode & 0o777 == 0o700
    objects = list((root / "store" / "sha256").iterdir())
    assert objects and all(p.stat().st_mode & 0o777 == 0o444 for p in objects)
    # Every payload of the release is a link to its store object: one copy.
    wheel = next((root / "releases/1.0.0/python/wheels").iterdir())
    assert wheel.stat().st_nlink == 2

    made = _receipt(root, tmp_path)
    receipt = Path(str(made["receipt"]))
    assert receipt.name == "shop.receipt" and made["artifacts"] == len(objects)
    assert made["engine"] is False and made["images"] == 0  # a process-only root
    assert "BEGIN PUBLIC KEY" in str(made["public_key"])
    (tmp_path / "host.pub").write_text(str(made["public_key"]))
    delta, doc = _delta(w, receipt, tmp_path / "v2-delta", "--host-key", tmp_path / "host.pub")
    split = doc["delta"]
    assert isinstance(split, dict) and split["authenticated"] is True
    full_size, delta_size = w.full2.stat().st_size, delta.stat().st_size
    print(f"full 2.0.0: {full_size} bytes; delta: {delta_size} bytes; "
          f"travels {split['travel_files']} file(s) {split['travel_bytes']} B, host supplies "
          f"{split['host_files']} ({split['host_bytes']} B)")
    # Only the changed server.py and the SBOM (which always travels) travel (the wheel, the
    # lock stay home).
    assert split["travel_files"] == 2 and split["host_files"] >= 2
    # (The tar rounds up to 10 KiB records: this small app's two bundles may be as large.)
    files = json.loads(bundle("inspect", delta, "--trust", w.pub, "--json").out)["files"]
    sbom = next(f["size"] for f in files if f["kind"] == "sbom")
    assert delta_size <= full_size and split["travel_bytes"] - sbom < split["host_bytes"]
    shown = bundle("inspect", delta, "--trust", w.pub)
    assert "the host must supply" in shown.out and "(from the host)" in shown.out
    diffed = bundle("diff", w.full1, delta, "--trust", w.pub, "--json")
    assert json.loads(diffed.out)["delta"]["travel_files"] == 2  # server.py, the SBOM

    up, status = offline(bundle_argv("install", delta, "--trust", w.pub, "--root", root, "--json"),
                         bundle_argv("status", "--root", root, "--json"))
    assert up.rc == 0, up.err
    assert json.loads(status.out)["healthy"] is True
    assert SERVER_V2_LINE in (root / "releases/2.0.0/files/app/server.py").read_text()

    # The same release from the full bundle, in a second root: the same tree.
    first, second = offline(
        bundle_argv("install", w.full1, "--trust", w.pub, "--root", other),
        bundle_argv("install", w.full2, "--trust", w.pub, "--root", other))
    assert first.rc == 0 and second.rc == 0, first.err + second.err
    assert _release_tree(root, "2.0.0") == _release_tree(other, "2.0.0")


@pytest.mark.slow
@pytest.mark.netns
def test_a_delta_is_refused_with_the_root_unchanged_when_the_store_lacks_an_object(
        world: World, tmp_path: Path, roots: list[Path]) -> None:
    w = world
    root = tmp_path / "root"
    roots.append(root)
    _installed_v1(w, root)
    receipt = Path(str(_receipt(root, tmp_path)["receipt"]))
    delta, _ = _delta(w, receipt, tmp_path / "out")
    m = archive.manifest_of(delta, [_trusted(w.pub)]).manifest
    wheel = next(f for f in m.from_host if f.kind == "wheel")
    obj = root / "store" / "sha256" / wheel.sha256
    # Corrupt: same size, other bytes (the store is re-hashed, never trusted).
    data = bytearray(obj.read_bytes())
    data[-1] ^= 1
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    before = tree_snapshot(root)
    corrupt, = offline(bundle_argv("install", delta, "--trust", w.pub, "--root", root))
    assert corrupt.rc == DeltaError.exit_code, corrupt.err
    assert "corrupt" in corrupt.err and wheel.path in corrupt.err and "hint:" in corrupt.err
    assert tree_snapshot(root) == before
    obj.unlink()  # missing
    before = tree_snapshot(root)
    missing, = offline(bundle_argv("install", delta, "--trust", w.pub, "--root", root))
    assert missing.rc == DeltaError.exit_code and "missing" in missing.err, missing.err
    assert tree_snapshot(root) == before
    # A root that never installed anything: refused, nothing created.
    fresh = tmp_path / "fresh"
    none, = offline(bundle_argv("install", delta, "--trust", w.pub, "--root", fresh))
    assert none.rc == DeltaError.exit_code, none.err
    assert not fresh.exists()


@pytest.mark.slow
@pytest.mark.netns
def test_a_receipt_for_another_product_or_newer_than_the_build_is_refused(
        world: World, tmp_path: Path, roots: list[Path]) -> None:
    w = world
    root = tmp_path / "root"
    roots.append(root)
    _installed_v1(w, root)
    receipt = Path(str(_receipt(root, tmp_path)["receipt"]))
    # The build's sequence (1) is not newer than what the host accepted (1).
    old = bundle("build", w.project.profile("1.0.1", sequence=1), "--key", w.key, "--out",
                 tmp_path / "o", "--cache-dir", w.cache, "--against", receipt)
    assert old.rc == DeltaError.exit_code and "already knows sequence 1" in old.err, old.err
    other = w.project.profile("2.0.0", sequence=2)
    other.write_text(other.read_text().replace("name: shop", "name: other"))
    wrong = bundle("build", other, "--key", w.key, "--out", tmp_path / "o", "--cache-dir",
                   w.cache, "--against", receipt)
    assert wrong.rc == DeltaError.exit_code and "for product 'shop'" in wrong.err, wrong.err
    (tmp_path / "bad.receipt").write_text('{"payloadType": 1}')
    bad = bundle("build", w.project.profile("2.0.0", sequence=2), "--key", w.key, "--out",
                 tmp_path / "o", "--cache-dir", w.cache, "--against", tmp_path / "bad.receipt")
    assert bad.rc == SignatureError.exit_code and "malformed" in bad.err, bad.err
    # Without --host-key the build says the receipt is unauthenticated, and goes on.
    unauth = bundle("build", w.project.profile("2.0.0", sequence=2), "--key", w.key, "--out",
                    tmp_path / "o", "--cache-dir", w.cache, "--against", receipt)
    assert unauth.rc == 0 and "UNAUTHENTICATED" in unauth.err, unauth.err
    assert not list((tmp_path / "o").glob("other-*"))


@pytest.mark.slow
@pytest.mark.netns
def test_against_an_old_bundle_and_a_kill_during_the_delta_install_recovers(
        world: World, tmp_path: Path, roots: list[Path]) -> None:
    w = world
    root = tmp_path / "root"
    roots.append(root)
    _installed_v1(w, root)
    delta, doc = _delta(w, w.full1, tmp_path / "out")  # --against OLD.bundle
    assert doc["delta"]["travel_files"] == 2  # server.py, the SBOM  # type: ignore[index]
    killed, recover, status, again, status2 = offline(
        ["env", "BUNDLER_FAULT=kill:python",
         *bundle_argv("install", delta, "--trust", w.pub, "--root", root)],
        bundle_argv("recover", "--root", root),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("install", delta, "--trust", w.pub, "--root", root),
        bundle_argv("status", "--root", root, "--json"))
    assert killed.rc == -9, killed.err
    assert recover.rc == 0 and "rolled back" in recover.out + recover.err, recover.err
    assert json.loads(status.out)["current"]["version"] == "1.0.0"
    assert again.rc == 0, again.err
    st = json.loads(status2.out)
    assert st["current"]["version"] == "2.0.0" and st["healthy"] is True
    # Every object is one some kept release names (no orphans), and each re-hashes.
    names = set()
    for rel in (root / "releases").iterdir():
        m = parse_manifest((rel / "bundle" / "manifest.json").read_bytes())
        names |= {f.sha256 for f in m.files if f.kind != "images"}
    for obj in (root / "store" / "sha256").iterdir():
        assert obj.name in names
        assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name


def _trusted(pub: Path) -> TrustedKey:
    from bundler.bundle.signing import load_public_key

    return load_public_key(pub)
