"""The bad-input suite: every malformed, tampered or unwanted bundle is refused by `install`
with its exact error class, and the target (an already installed root) is left untouched."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle import volumes
from bundler.bundle.manifest import canonical_json
from bundler.bundle.models import Target
from bundler.bundle.signing import TrustedKey, load_public_key
from bundler.errors import BundlerError, IntegrityError, PolicyError, SignatureError
from bundler.install.installer import install
from tests.bundles import (
    craft,
    data_offsets,
    envelope_raw,
    manifest_for,
    members_of,
    reg,
    write_bundle,
)
from tests.helpers import tree_snapshot as snapshot

V1 = {"files/app/config.ini": b"[app]\nmode = 1\n", "files/app/run.sh": b"echo one\n"}
V2 = {"files/app/config.ini": b"[app]\nmode = 2\n", "files/app/run.sh": b"echo two\n",
      "files/app/data.bin": bytes(range(256)) * 64}


@pytest.fixture
def trust(key: Ed25519PrivateKey, tmp_path: Path) -> list[TrustedKey]:
    pub = tmp_path / "release.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return [load_public_key(pub)]


@pytest.fixture
def root(tmp_path: Path, key: Ed25519PrivateKey, trust: list[TrustedKey]) -> Path:
    """A root with release 1.0.0 (sequence 10) installed and current."""
    (tmp_path / "b1").mkdir()
    path = tmp_path / "b1" / "shop-1.0.0.bundle"
    write_bundle(path, key, V1, sequence=10)
    root = tmp_path / "target"
    result = install(path, trust, root)
    assert result.status == "installed"
    return root


@pytest.fixture
def good(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    """A valid 2.0.0 bundle (sequence 20) that the cases below damage."""
    (tmp_path / "b2").mkdir()
    path = tmp_path / "b2" / "shop-2.0.0.bundle"
    write_bundle(path, key, V2, version="2.0.0", sequence=20)
    return path


Maker = Callable[[Path, Path, Ed25519PrivateKey], Path]


def _flip(good: Path, out: Path, _key: Ed25519PrivateKey) -> Path:
    offset, size = data_offsets(good)["files/app/data.bin"]
    data = bytearray(good.read_bytes())
    data[offset + size // 3] ^= 0x04
    out.write_bytes(bytes(data))
    return out


def _rewrite(fn: Callable[[list[tuple[tarfile.TarInfo, bytes | None]]],
                          list[tuple[tarfile.TarInfo, bytes | None]]]) -> Maker:
    def make(good: Path, out: Path, _key: Ed25519PrivateKey) -> Path:
        craft(out, fn(members_of(good)))
        return out
    return make


def _swap(ms: list[tuple[tarfile.TarInfo, bytes | None]]
          ) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    by = {m.name: i for i, (m, _) in enumerate(ms)}
    a, b = by["files/app/config.ini"], by["files/app/run.sh"]
    ms[a], ms[b] = (ms[a][0], ms[b][1]), (ms[b][0], ms[a][1])
    return ms


def _from_other_bundle(good: Path, out: Path, key: Ed25519PrivateKey) -> Path:
    other = out.with_name("other.bundle")
    write_bundle(other, key, {**V2, "files/app/run.sh": b"echo TWO\n"}, version="2.0.0",
                 sequence=21)
    donor = dict((m.name, d) for m, d in members_of(other))
    craft(out, [(m, donor["files/app/run.sh"] if m.name == "files/app/run.sh" else d)
                for m, d in members_of(good)])
    return out


def _special(kind: bytes) -> Callable[[list[tuple[tarfile.TarInfo, bytes | None]]],
                                      list[tuple[tarfile.TarInfo, bytes | None]]]:
    def fn(ms: list[tuple[tarfile.TarInfo, bytes | None]]
           ) -> list[tuple[tarfile.TarInfo, bytes | None]]:
        info = tarfile.TarInfo("files/app/run.sh")
        info.type = kind
        info.linkname = "/etc/shadow" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        return [(info, None) if m.name == "files/app/run.sh" else (m, d) for m, d in ms]
    return fn


def _named(name: str) -> Callable[[list[tuple[tarfile.TarInfo, bytes | None]]],
                                  list[tuple[tarfile.TarInfo, bytes | None]]]:
    return lambda ms: [*ms, (reg(name), b"owned\n")]


def _resize(ms: list[tuple[tarfile.TarInfo, bytes | None]]
            ) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [(m, d + b"x" if m.name == "files/app/run.sh" and d else d) for m, d in ms]


def _envelope(make_env: Callable[[Ed25519PrivateKey], bytes]) -> Maker:
    def make(good: Path, out: Path, key: Ed25519PrivateKey) -> Path:
        ms = members_of(good)
        craft(out, [(ms[0][0], make_env(key)), *ms[1:]])
        return out
    return make


def _manifest_doc() -> dict[str, object]:
    doc: dict[str, object] = json.loads(manifest_for(V2, version="2.0.0", sequence=20).to_bytes())
    return doc


def _signed(over: dict[str, object]) -> Maker:
    """A validly signed bundle whose manifest differs in `over` (policy cases)."""
    def make(good: Path, out: Path, key: Ed25519PrivateKey) -> Path:
        fields = {"version": "2.0.0", "sequence": 20, **over}
        write_bundle(out, key, V2, **fields)
        return out
    return make


def _truncate(good: Path, out: Path, _key: Ed25519PrivateKey) -> Path:
    out.write_bytes(good.read_bytes()[: data_offsets(good)["files/app/data.bin"][0] + 100])
    return out


def _junk(good: Path, out: Path, _key: Ed25519PrivateKey) -> Path:
    out.write_bytes(good.read_bytes() + b"\n#!/bin/sh\nrm -rf /\n")
    return out


def _oversized_envelope(good: Path, out: Path, _key: Ed25519PrivateKey) -> Path:
    info = reg("envelope.json")
    info.size = 1 << 30
    out.write_bytes(info.tobuf(tarfile.PAX_FORMAT) + b"{" * 8192)
    return out


def _dup_keys(key: Ed25519PrivateKey) -> bytes:
    body = canonical_json(_manifest_doc()).replace(b'{"builder"', b'{"name":"x","builder"', 1)
    return envelope_raw(body, key)


def _floats(key: Ed25519PrivateKey) -> bytes:
    body = canonical_json(_manifest_doc()).replace(b'"sequence":20', b'"sequence":20.0')
    return envelope_raw(body, key)


CASES: list[tuple[str, Maker, type[BundlerError], str]] = [
    ("flipped byte in a payload", _flip, IntegrityError, "'files/app/data.bin' does not match"),
    ("two payloads swapped", _rewrite(_swap), IntegrityError, "bytes, the manifest says"),
    ("payload from another signed bundle", _from_other_bundle, IntegrityError,
     "'files/app/run.sh' does not match"),
    ("extra unlisted member", _rewrite(_named("files/app/extra.sh")), IntegrityError,
     "is not listed in the signed manifest"),
    ("missing member", _rewrite(lambda ms: [x for x in ms if x[0].name != "files/app/run.sh"]),
     IntegrityError, "'files/app/run.sh' listed in the manifest is missing"),
    ("duplicate member", _rewrite(lambda ms: [*ms, ms[1]]), IntegrityError, "appears twice"),
    ("member size differs", _rewrite(_resize), IntegrityError, "bytes, the manifest says"),
    ("truncated tar", _truncate, IntegrityError, "truncated"),
    ("trailing junk", _junk, IntegrityError, "unexpected data after offset"),
    ("symlink member", _rewrite(_special(tarfile.SYMTYPE)), IntegrityError, "is a symlink"),
    ("hardlink member", _rewrite(_special(tarfile.LNKTYPE)), IntegrityError, "is a hard link"),
    ("device member", _rewrite(_special(tarfile.CHRTYPE)), IntegrityError, "character device"),
    ("FIFO member", _rewrite(_special(tarfile.FIFOTYPE)), IntegrityError, "is a FIFO"),
    ("directory member", _rewrite(_special(tarfile.DIRTYPE)), IntegrityError, "a directory"),
    ("dot-dot path", _rewrite(_named("../../escaped")), IntegrityError, "is not listed"),
    ("absolute path", _rewrite(_named("/tmp/escaped")), IntegrityError, "is not listed"),
    ("backslash path", _rewrite(_named("files\\..\\..\\escaped")), IntegrityError,
     "is not listed"),
    ("oversized envelope", _oversized_envelope, SignatureError, "over the"),
    ("no signature", _envelope(lambda k: canonical_json(
        {**json.loads(envelope_raw(b"{}", k)), "signatures": []})), SignatureError, "not signed"),
    ("wrong key", _envelope(lambda _k: envelope_raw(
        canonical_json(_manifest_doc()), Ed25519PrivateKey.generate())), SignatureError,
     "not trusted"),
    ("valid signature, other payloadType", _envelope(lambda k: envelope_raw(
        canonical_json(_manifest_doc()), k, payload_type="application/vnd.in-toto+json")),
     SignatureError, "payloadType"),
    ("manifest with duplicate JSON keys", _envelope(_dup_keys), SignatureError,
     "duplicate key"),
    ("manifest with floats", _envelope(_floats), SignatureError, "float"),
    ("expired", _signed({"expires": "2021-01-01T00:00:00Z"}), PolicyError, "expired"),
    ("replayed older sequence", _signed({"version": "0.9.0", "sequence": 9}), PolicyError,
     "not newer than the last accepted (10)"),
    ("equal sequence, other bytes", _signed({"version": "1.0.1", "sequence": 10}), PolicyError,
     "not newer"),
    ("wrong product", _signed({"name": "bank"}), PolicyError, "this root holds product 'shop'"),
    ("wrong target arch", _signed({"target": Target(platform="manylinux_2_28_aarch64")}),
     PolicyError, "this host is x86_64"),
    ("wrong target libc", _signed({"target": Target(platform="musllinux_1_2_x86_64")}),
     PolicyError, "musl"),
]


@pytest.mark.parametrize("name,make,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_bundle_is_refused_and_target_untouched(
        name: str, make: Maker, error: type[BundlerError], message: str, good: Path,
        root: Path, key: Ed25519PrivateKey, trust: list[TrustedKey], tmp_path: Path) -> None:
    bad = make(good, tmp_path / "b2" / "bad.bundle", key)
    before = snapshot(root)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        install(bad, trust, root)
    assert snapshot(root) == before, name


def test_the_good_bundle_does_install(good: Path, root: Path,
                                      trust: list[TrustedKey]) -> None:
    """The control case: the suite's bundles are refused for their damage, not by accident."""
    assert install(good, trust, root).status == "installed"
    assert (root / "current").resolve().name == "2.0.0"


def _volume_set(good: Path, key: Ed25519PrivateKey) -> tuple[Path, list[Path]]:
    """Re-pack the good bundle's bytes into a 3-part volume set."""
    out = good.with_name("vol.bundle")
    data = good.read_bytes()
    part = len(data) // 3 + 1
    writer = volumes.SplitWriter(out, part)
    writer.write(data)
    index = writer.commit()
    volumes.write_index(out, index, key)
    return out, [out.with_name(p.file) for p in index.parts]


def test_volume_set_installs(good: Path, root: Path, key: Ed25519PrivateKey,
                             trust: list[TrustedKey]) -> None:
    _base, parts = _volume_set(good, key)
    assert len(parts) == 3
    assert install(parts[0], trust, root).status == "installed"


def test_volume_set_with_a_missing_part(good: Path, root: Path, key: Ed25519PrivateKey,
                                        trust: list[TrustedKey]) -> None:
    base, parts = _volume_set(good, key)
    parts[2].unlink()
    before = snapshot(root)
    with pytest.raises(IntegrityError, match=r"part 3 of 3 \(vol.bundle.003\) is missing"):
        install(base, trust, root)
    assert snapshot(root) == before


def test_volume_set_with_a_corrupt_part(good: Path, root: Path, key: Ed25519PrivateKey,
                                        trust: list[TrustedKey]) -> None:
    base, parts = _volume_set(good, key)
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    before = snapshot(root)
    with pytest.raises(IntegrityError, match=r"part 2 of 3 \(vol.bundle.002\) is corrupt"):
        install(base.with_name("vol.bundle.parts"), trust, root)
    assert snapshot(root) == before
