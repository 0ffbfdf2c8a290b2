"""Streaming verification against tampered, truncated and malformed bundles."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle import archive, volumes
from bundler.bundle.signing import TrustedKey, load_public_key, sign
from bundler.errors import IntegrityError, SignatureError
from tests.bundles import craft, data_offsets, manifest_for, members_of, reg, write_bundle

FILES = {
    "files/app/a.txt": b"alpha\n" * 100,
    "files/app/b.txt": b"bravo\n" * 3000,
    "python/wheels/x-1.0-py3-none-any.whl": bytes(range(256)) * 40,
}


@pytest.fixture
def trust(key: Ed25519PrivateKey, tmp_path: Path) -> list[TrustedKey]:
    pub = tmp_path / "k.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return [load_public_key(pub)]


@pytest.fixture
def good(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "good.bundle"
    write_bundle(path, key, FILES)
    return path


def verify(path: Path, trust: list[TrustedKey], dest: Path | None = None) -> None:
    with archive.open_bundle(path, trust) as reader:
        reader.read_envelope()
        reader.extract(dest)


def test_roundtrip_writes_every_file_under_the_chosen_dir(good: Path, trust: list[TrustedKey],
                                                          tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    verify(good, trust, dest)
    for path, data in FILES.items():
        assert (dest / path).read_bytes() == data
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == \
        sorted(FILES)


def test_envelope_is_the_first_member_and_payloads_are_sorted(good: Path) -> None:
    names = [m.name for m, _ in members_of(good)]
    assert names == ["envelope.json", *sorted(FILES)]


def test_same_inputs_give_identical_bytes(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_bundle(tmp_path / "a" / "x.bundle", key, FILES)
    write_bundle(tmp_path / "b" / "x.bundle", key, FILES)
    assert (tmp_path / "a" / "x.bundle").read_bytes() == (tmp_path / "b" / "x.bundle").read_bytes()


@pytest.mark.parametrize("member", sorted(FILES))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_byte_in_any_payload_names_the_member(
        good: Path, trust: list[TrustedKey], member: str, where: str) -> None:
    offset, size = data_offsets(good)[member]
    pos = offset + {"first": 0, "middle": size // 2, "last": size - 1}[where]
    data = bytearray(good.read_bytes())
    data[pos] ^= 0x01
    good.write_bytes(bytes(data))
    pattern = rf"member '{re.escape(member)}' does not match its signed"
    with pytest.raises(IntegrityError, match=pattern):
        verify(good, trust)


def test_flipped_byte_in_the_envelope_is_a_signature_error(good: Path,
                                                           trust: list[TrustedKey]) -> None:
    offset, size = data_offsets(good)["envelope.json"]
    data = bytearray(good.read_bytes())
    # Flip a byte inside the base64 payload (well inside the JSON).
    data[offset + size // 2] ^= 0x01
    good.write_bytes(bytes(data))
    with pytest.raises(SignatureError):
        verify(good, trust)


def test_two_payloads_swapped(tmp_path: Path, good: Path, trust: list[TrustedKey]) -> None:
    members = members_of(good)
    a, b = members[1][1], members[2][1]
    members[1] = (members[1][0], b)
    members[2] = (members[2][0], a)
    craft(tmp_path / "bad.bundle", members)
    with pytest.raises(IntegrityError, match=r"is .* bytes, the manifest says"):
        verify(tmp_path / "bad.bundle", trust)


def test_payload_from_another_valid_bundle(tmp_path: Path, key: Ed25519PrivateKey, good: Path,
                                           trust: list[TrustedKey]) -> None:
    other = tmp_path / "other.bundle"
    other_files = dict(FILES)
    other_files["files/app/a.txt"] = b"ALPHA\n" * 100  # same size, other bytes
    write_bundle(other, key, other_files)
    members = members_of(good)
    donor = {m.name: d for m, d in members_of(other)}
    members = [(m, donor[m.name] if m.name == "files/app/a.txt" else d) for m, d in members]
    craft(tmp_path / "mixed.bundle", members)
    with pytest.raises(IntegrityError, match=r"'files/app/a\.txt' does not match"):
        verify(tmp_path / "mixed.bundle", trust)


def test_extra_unlisted_member(tmp_path: Path, good: Path, trust: list[TrustedKey]) -> None:
    craft(tmp_path / "bad.bundle", [*members_of(good), (reg("files/evil.sh"), b"rm -rf /")])
    with pytest.raises(IntegrityError, match=r"'files/evil\.sh' is not listed"):
        verify(tmp_path / "bad.bundle", trust)


def test_missing_member(tmp_path: Path, good: Path, trust: list[TrustedKey]) -> None:
    craft(tmp_path / "bad.bundle", members_of(good)[:-1])
    with pytest.raises(IntegrityError, match=r"missing from the bundle"):
        verify(tmp_path / "bad.bundle", trust)


def test_duplicate_member(tmp_path: Path, good: Path, trust: list[TrustedKey]) -> None:
    members = members_of(good)
    craft(tmp_path / "bad.bundle", [*members, members[1]])
    with pytest.raises(IntegrityError, match=r"appears twice"):
        verify(tmp_path / "bad.bundle", trust)


def test_second_envelope(tmp_path: Path, good: Path, trust: list[TrustedKey]) -> None:
    members = members_of(good)
    craft(tmp_path / "bad.bundle", [*members, members[0]])
    with pytest.raises(IntegrityError, match=r"'envelope\.json' appears twice"):
        verify(tmp_path / "bad.bundle", trust)


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize("info,what", [
    (_special("files/app/a.txt", tarfile.SYMTYPE, "/etc/passwd"), "a symlink"),
    (_special("files/app/a.txt", tarfile.LNKTYPE, "files/app/b.txt"), "a hard link"),
    (_special("files/app/a.txt", tarfile.DIRTYPE), "a directory"),
    (_special("files/app/a.txt", tarfile.FIFOTYPE), "a FIFO"),
    (_special("files/app/a.txt", tarfile.CHRTYPE), "a character device"),
    (_special("files/app/a.txt", tarfile.BLKTYPE), "a block device"),
])
def test_non_regular_members_are_refused(tmp_path: Path, good: Path, trust: list[TrustedKey],
                                         info: tarfile.TarInfo, what: str) -> None:
    members = [(m, d) for m, d in members_of(good) if m.name != "files/app/a.txt"]
    craft(tmp_path / "bad.bundle", [members[0], (info, None), *members[1:]])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError, match=rf"is {what}; bundles hold regular files only"):
        verify(tmp_path / "bad.bundle", trust, dest)
    assert not list(dest.iterdir())


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/cron.d/x", "files\\..\\x",
                                  "files/../../x", "./files/app/a.txt"])
def test_unsafe_member_paths_are_refused_and_nothing_escapes(
        tmp_path: Path, good: Path, trust: list[TrustedKey], name: str) -> None:
    craft(tmp_path / "bad.bundle", [*members_of(good)[:1], (reg(name), b"owned")])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError, match=r"is not listed in the signed manifest"):
        verify(tmp_path / "bad.bundle", trust, dest)
    assert not (tmp_path / "escape.txt").exists()
    assert not list(dest.iterdir())


@pytest.mark.parametrize("cut", ["in-envelope-header", "in-envelope", "in-payload-header",
                                 "in-last-payload", "before-end-marker", "in-end-marker"])
def test_truncated_bundle(tmp_path: Path, good: Path, trust: list[TrustedKey], cut: str) -> None:
    offsets = data_offsets(good)
    env_off, env_size = offsets["envelope.json"]
    last_off, last_size = offsets[sorted(FILES)[-1]]
    end_of_data = last_off + (last_size + 511) // 512 * 512
    at = {"in-envelope-header": 100, "in-envelope": env_off + env_size // 2,
          "in-payload-header": offsets[sorted(FILES)[0]][0] - 100,
          "in-last-payload": last_off + last_size - 1,
          "before-end-marker": end_of_data, "in-end-marker": end_of_data + 700}[cut]
    (tmp_path / "cut.bundle").write_bytes(good.read_bytes()[:at])
    with pytest.raises((IntegrityError, SignatureError), match=r"truncated|missing|not a bundle"):
        verify(tmp_path / "cut.bundle", trust)


def test_trailing_junk(tmp_path: Path, good: Path, trust: list[TrustedKey]) -> None:
    (tmp_path / "junk.bundle").write_bytes(good.read_bytes() + b"#!/bin/sh\necho pwned\n")
    with pytest.raises(IntegrityError, match=r"unexpected data after offset"):
        verify(tmp_path / "junk.bundle", trust)


def test_trailing_zero_padding_is_fine(tmp_path: Path, good: Path,
                                       trust: list[TrustedKey]) -> None:
    (tmp_path / "pad.bundle").write_bytes(good.read_bytes() + bytes(512))
    verify(tmp_path / "pad.bundle", trust)


def test_envelope_not_first(tmp_path: Path, good: Path, trust: list[TrustedKey]) -> None:
    members = members_of(good)
    craft(tmp_path / "bad.bundle", [members[1], members[0], *members[2:]])
    with pytest.raises(SignatureError, match=r"first member is 'files/app/a\.txt'"):
        verify(tmp_path / "bad.bundle", trust)


def test_oversized_envelope_is_refused_before_reading_it(tmp_path: Path,
                                                         trust: list[TrustedKey]) -> None:
    info = reg("envelope.json")
    info.size = 64 * 1024 * 1024
    path = tmp_path / "big.bundle"
    with open(path, "wb") as fh:
        fh.write(info.tobuf(tarfile.PAX_FORMAT))
        fh.write(b"{" * 4096)  # a header promising 64 MiB; the verifier must not read it all
    with pytest.raises(SignatureError, match=r"over the"):
        verify(path, trust)


def test_not_a_tar(tmp_path: Path, trust: list[TrustedKey]) -> None:
    (tmp_path / "x.bundle").write_bytes(b"hello" * 1000)
    with pytest.raises((IntegrityError, SignatureError)):
        verify(tmp_path / "x.bundle", trust)
    with pytest.raises(IntegrityError, match=r"cannot open bundle"):
        verify(tmp_path / "missing.bundle", trust)


def test_unsigned_envelope_member(tmp_path: Path, key: Ed25519PrivateKey,
                                  trust: list[TrustedKey]) -> None:
    import json

    envelope = json.loads(sign(manifest_for({}), key))
    envelope["signatures"] = []
    craft(tmp_path / "bad.bundle", [(reg("envelope.json"), json.dumps(envelope).encode())])
    with pytest.raises(SignatureError, match=r"not signed"):
        verify(tmp_path / "bad.bundle", trust)


def test_re_owned_member_header_is_refused(tmp_path: Path, good: Path,
                                           trust: list[TrustedKey]) -> None:
    members = members_of(good)
    members[2][0].uid = 1000  # a valid header (checksum fixed by tarfile), payload untouched
    craft(tmp_path / "bad.bundle", members)
    with pytest.raises(IntegrityError, match=r"header of 'files/app/b\.txt' is not in the form"):
        verify(tmp_path / "bad.bundle", trust)


def test_non_zero_block_padding_is_refused(good: Path, trust: list[TrustedKey]) -> None:
    offset, size = data_offsets(good)["files/app/a.txt"]
    assert size % 512
    data = bytearray(good.read_bytes())
    data[offset + size] = 0x41  # the first padding byte after the member's data
    good.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="non-zero block padding"):
        verify(good, trust)


def _headed_set(good: Path, key: Ed25519PrivateKey, part_size: int) -> tuple[list[Path], int]:
    """A volume set as bundler writes it now: the head (the envelope alone), then parts."""
    index = volumes.split_file(good, good, part_size)
    volumes.write_index(good, index, key)
    good.unlink()
    head = good.with_name(good.name + ".000")
    return [good.with_name(p.file) for p in index.parts], head.stat().st_size


def _volume_set(good: Path, key: Ed25519PrivateKey, part_size: int) -> list[Path]:
    """A set as bundlers before the head wrote it (index schema 1): still read."""
    with open(good, "rb", buffering=0) as raw:
        index = volumes.plan_parts(raw, good.name, part_size)
    data = good.read_bytes()
    parts = []
    for n, part in enumerate(index.parts):
        path = good.with_name(part.file)
        path.write_bytes(data[n * part_size:n * part_size + part.size])
        parts.append(path)
    volumes.index_path(good).write_bytes(volumes.index_bytes(index, key))
    good.unlink()
    return parts


@pytest.mark.parametrize("layout", ["head", "schema-1"])
@pytest.mark.parametrize("where", ["payload", "padding", "header"])
def test_volume_set_names_the_tampered_part_wherever_the_byte_is(
        good: Path, key: Ed25519PrivateKey, trust: list[TrustedKey], tmp_path: Path,
        where: str, layout: str) -> None:
    """Part hashes are computed only after a failure; a flipped byte in a payload, in block
    padding or in a tar header must still be refused, naming the part it is in."""
    offsets = data_offsets(good)
    a_off, a_size = offsets["files/app/a.txt"]
    b_off, _ = offsets["files/app/b.txt"]
    pos = {"payload": b_off + 100, "padding": a_off + a_size,
           "header": b_off - 512 + 100}[where]  # inside b.txt's header: its mode field
    part_size = 4096
    parts, skip = (_headed_set(good, key, part_size) if layout == "head"
                   else (_volume_set(good, key, part_size), 0))
    assert len(parts) >= 3
    n = (pos - skip) // part_size
    data = bytearray(parts[n].read_bytes())
    data[(pos - skip) % part_size] ^= 0x01
    parts[n].write_bytes(bytes(data))
    dest = tmp_path / "out"
    dest.mkdir()
    label = f"part {n + 1} of {len(parts)} ({parts[n].name}) is corrupt"
    with pytest.raises(IntegrityError, match=re.escape(label)):
        verify(parts[0], trust, dest)


def test_a_volume_sets_head_is_verified_first(good: Path, key: Ed25519PrivateKey,
                                              trust: list[TrustedKey]) -> None:
    """The head is the signed envelope: a changed byte in it is a bad signature, a cut one
    is named, and parts are not opened before it verified."""
    parts, _ = _headed_set(good, key, 4096)
    head = good.with_name(good.name + ".000")
    data = head.read_bytes()
    envelope_end = data.rstrip(b"\0")
    head.write_bytes(envelope_end[:-40] + bytes([envelope_end[-40] ^ 1]) + envelope_end[-39:]
                     + data[len(envelope_end):])
    with pytest.raises(SignatureError, match=r"was altered|malformed"):
        verify(parts[0], trust)
    head.write_bytes(data[:700])
    for part in parts:
        part.unlink()  # never reached: the head is refused first
    with pytest.raises(IntegrityError, match=r"truncated in 'envelope\.json'"):
        verify(head, trust)


def test_a_head_too_large_or_beside_an_index_without_one_is_refused(
        good: Path, key: Ed25519PrivateKey, trust: list[TrustedKey]) -> None:
    parts, _ = _headed_set(good, key, 4096)
    head = good.with_name(good.name + ".000")
    data = head.read_bytes()
    with open(head, "ab") as fh:  # sparse: past the largest envelope a head can hold
        fh.truncate(volumes.MAX_HEAD_BYTES + 1)
    with pytest.raises(SignatureError, match=r"good\.bundle\.000 is \d+ bytes: too large to "
                                             "be a head"):
        verify(parts[0], trust)
    head.write_bytes(data)
    # an index of the layout without a head (schema 1) beside a head: one set, two layouts
    index = volumes.index_path(good)
    old = volumes.PartIndex(good.name, 1, (volumes.Part(good.name + ".001", 1, "0" * 64),))
    index.write_bytes(volumes.index_bytes(old, key))
    with pytest.raises(SignatureError, match="the index of a set without a head, but "
                                             r"good\.bundle\.000 is there"):
        verify(parts[0], trust)


def test_volume_set_verifies_without_hashing_parts(good: Path, key: Ed25519PrivateKey,
                                                   trust: list[TrustedKey],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _volume_set(good, key, 4096)
    monkeypatch.setattr(volumes.PartsReader, "diagnose",
                        lambda self: pytest.fail("diagnosed a good volume set"))
    hashed: list[int] = []
    real = volumes._Hasher.submit
    monkeypatch.setattr(volumes._Hasher, "submit",
                        lambda self, d, v: (hashed.append(len(v)), real(self, d, v)))
    verify(parts[1], trust)
    assert hashed == []  # each byte hashed once: by the member check only


# ------------------------------------------------------------------------------------------
# The packer: tarfile's bytes, and every payload checked against its digest as it is copied

_PACK_FILES = {
    "files/empty.txt": b"",
    "files/" + "long-dir/" * 14 + "name.txt": b"needs a pax header\n",  # > 100 characters
    "files/exact.bin": bytes(512 * 3),
    "images/images.tar": bytes(range(256)) * 4097 + b"tail",  # > CHUNK: several reads
    "npm/tarballs/x-1.0.0.tgz": b"z" * 10239,  # ends just short of a tar record
}


def _sources(tmp_path: Path, files: dict[str, bytes]) -> dict[str, Path]:
    out = {}
    for i, (name, data) in enumerate(sorted(files.items())):
        out[name] = tmp_path / f"src{i}"
        out[name].write_bytes(data)
    return out


def test_pack_writes_the_bytes_tarfile_writes(tmp_path: Path, key: Ed25519PrivateKey,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Bundles stay byte for byte what they were when tarfile's stream writer made them."""
    monkeypatch.setattr(archive, "CHUNK", 64 * 1024)  # many reads per member, and partial ones
    monkeypatch.setattr(archive._Writeback, "STEP", 100_000)  # writeback while packing
    manifest = manifest_for(_PACK_FILES)
    envelope = sign(manifest, key)
    sources = _sources(tmp_path, _PACK_FILES)
    archive.pack(tmp_path / "new.bundle", envelope,
                 [(e, sources[e.path]) for e in manifest.files], mtime=1_700_000_000)
    with open(tmp_path / "old.bundle", "wb") as raw, \
            tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(archive._tarinfo(archive.ENVELOPE, len(envelope), 1_700_000_000),
                    io.BytesIO(envelope))
        for entry in sorted(manifest.files, key=lambda e: e.path):
            with open(sources[entry.path], "rb") as fh:
                tar.addfile(archive._tarinfo(entry.path, entry.size, 1_700_000_000), fh)
    assert (tmp_path / "new.bundle").read_bytes() == (tmp_path / "old.bundle").read_bytes()


@pytest.mark.parametrize("part_size", [None, 4096])
@pytest.mark.parametrize("where", ["first", "last"])
def test_pack_refuses_a_source_that_does_not_hash_to_its_entry(
        tmp_path: Path, key: Ed25519PrivateKey, part_size: int | None, where: str) -> None:
    """A damaged cache object of the right size never reaches a signed bundle: the build
    fails, writes nothing, and hands the object to `corrupt` (the cache evicts it)."""
    manifest = manifest_for(FILES)
    sources = _sources(tmp_path, FILES)
    bad = sources["files/app/b.txt"]
    data = bytearray(bad.read_bytes())
    data[0 if where == "first" else -1] ^= 0x01
    bad.write_bytes(bytes(data))
    damaged: list[Path] = []
    out = tmp_path / "out" / "x.bundle"
    out.parent.mkdir()
    with pytest.raises(IntegrityError, match=re.escape(f"{bad} (for files/app/b.txt) does not "
                                                       "hash to its sha256")):
        archive.pack(out, sign(manifest, key), [(e, sources[e.path]) for e in manifest.files],
                     mtime=1_700_000_000, part_size=part_size, corrupt=damaged.append)
    assert damaged == [bad]
    assert list(out.parent.iterdir()) == []  # no bundle, no part, no temp file


def test_pack_refuses_a_source_of_another_size(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    manifest = manifest_for(FILES)
    sources = _sources(tmp_path, FILES)
    sources["files/app/a.txt"].write_bytes(FILES["files/app/a.txt"] + b"!")
    with pytest.raises(IntegrityError, match="changed size while packing"):
        archive.pack(tmp_path / "x.bundle", sign(manifest, key),
                     [(e, sources[e.path]) for e in manifest.files], mtime=1_700_000_000)
    assert not (tmp_path / "x.bundle").exists()


def test_a_failed_writeback_while_packing_fails_the_pack(tmp_path: Path, key: Ed25519PrivateKey,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reports a writeback error once per open file: the background fdatasync's
    error is the pack's, not lost before the final fsync."""
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(archive._Writeback, "STEP", 4096)
    monkeypatch.setattr(archive.os, "fdatasync", failing)
    manifest = manifest_for(_PACK_FILES)
    sources = _sources(tmp_path, _PACK_FILES)
    out = tmp_path / "out" / "x.bundle"
    out.parent.mkdir()
    with pytest.raises(OSError, match="Input/output error"):
        archive.pack(out, sign(manifest, key), [(e, sources[e.path]) for e in manifest.files],
                     mtime=1_700_000_000)
    assert list(out.parent.iterdir()) == []
