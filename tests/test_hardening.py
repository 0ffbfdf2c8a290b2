"""Smaller holes (issue 10, section 5), each through the real CLI where a user would meet it:
expiry and the host clock, volume parts that are not block-sized, unsigned input that used to
reach an internal error, a zstd bomb in the image archive, an oversized manifest refused at
build time, and a distinct exit code for "unhealthy"."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle import volumes
from bundler.bundle.manifest import canonical_json
from bundler.errors import (
    BuildError,
    IntegrityError,
    PolicyError,
    SignatureError,
    StateError,
    UnhealthyError,
)
from tests.bundles import craft, envelope_raw, manifest_for, reg, write_bundle
from tests.helpers import REPO, bundle

FILES = {"files/app/a.txt": b"alpha\n" * 100, "files/app/b.txt": bytes(range(256)) * 40}


def error_line(err: str) -> str:
    """The one `error:` line the CLI printed (there must be exactly one)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def signed_bundle(path: Path, key: Ed25519PrivateKey, doc: dict[str, object],
                  files: dict[str, bytes] = FILES) -> Path:
    """A bundle whose (signed) manifest is exactly `doc`, with the payload members."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (reg("envelope.json"), envelope_raw(canonical_json(doc), key))]
    craft(path, members + [(reg(name), data) for name, data in sorted(files.items())])
    return path


# --- 1. expiry and the host clock -----------------------------------------------------------


def test_verify_refuses_an_expired_bundle_like_install(tmp_path: Path, key: Ed25519PrivateKey,
                                                       pub: Path) -> None:
    path = tmp_path / "old.bundle"
    write_bundle(path, key, FILES, created="2020-01-01T00:00:00Z",
                 expires="2020-07-01T00:00:00Z")
    for args in (("verify", path), ("install", path, "--root", tmp_path / "root")):
        result = bundle(*args, "--trust", pub)
        assert result.rc == PolicyError.exit_code, (args, result.out, result.err)
        assert error_line(result.err) == ("error: bundle shop 1.0.0 expired at "
                                          "2020-07-01T00:00:00Z"), result.err
        assert "hint: build a fresh bundle" in result.err
    assert not (tmp_path / "root").exists()
    as_json = bundle("verify", path, "--trust", pub, "--json")
    assert as_json.rc == PolicyError.exit_code and json.loads(as_json.out)["error"] == "PolicyError"


def test_a_host_clock_before_the_bundle_was_created_is_refused(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    path = tmp_path / "future.bundle"
    write_bundle(path, key, FILES, created="2099-01-01T00:00:00Z",
                 expires="2099-07-01T00:00:00Z")
    for args in (("verify", path), ("install", path, "--root", tmp_path / "root")):
        result = bundle(*args, "--trust", pub)
        assert result.rc == PolicyError.exit_code, (args, result.out, result.err)
        line = error_line(result.err)
        assert line.startswith("error: this host's clock says 20"), line
        assert line.endswith(", before bundle shop 1.0.0 was created (2099-01-01T00:00:00Z): "
                             "the clock is wrong, so expiry cannot be checked"), line
        assert "hint: set this host's clock to the right UTC time" in result.err
    assert not (tmp_path / "root").exists()


def test_a_host_clock_set_back_before_the_last_install_is_refused(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    (tmp_path / "b1").mkdir()
    (tmp_path / "b2").mkdir()
    first = tmp_path / "b1" / "shop-1.0.0.bundle"
    write_bundle(first, key, FILES, sequence=10)
    second = tmp_path / "b2" / "shop-2.0.0.bundle"
    write_bundle(second, key, {**FILES, "files/app/c.txt": b"new\n"}, version="2.0.0",
                 sequence=20)
    root = tmp_path / "root"
    assert bundle("install", first, "--trust", pub, "--root", root).rc == 0
    # The journal says the last install happened in 2098: this host's clock was set back since.
    db = root / "state" / "state.db"
    if not db.exists():
        db = next(root.rglob("*.db"))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE events SET ts='2098-05-05T05:05:05Z' WHERE id=(SELECT max(id) "
                     "FROM events)")
    result = bundle("install", second, "--trust", pub, "--root", root)
    assert result.rc == PolicyError.exit_code, result.err
    line = error_line(result.err)
    assert line.startswith("error: this host's clock says 20"), line
    assert line.endswith(", before the last install recorded under this root "
                         "(2098-05-05T05:05:05Z): the clock was set back"), line
    assert "hint: set this host's clock" in result.err
    assert (root / "current").resolve().name == "1.0.0"


@pytest.mark.parametrize("field,value", [("expires", "soon"), ("expires", 1767225600),
                                         ("expires", "2026-13-01T00:00:00Z"),
                                         ("created", "yesterday")])
def test_a_malformed_time_in_a_signed_manifest_is_a_signature_error(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path, field: str, value: object) -> None:
    doc = json.loads(manifest_for(FILES).to_bytes())
    doc[field] = value
    path = signed_bundle(tmp_path / "odd.bundle", key, doc)
    what = "must be a string" if isinstance(value, int) else \
        f"{value!r} is not a UTC time like 2026-01-31T12:00:00Z"
    for args in (("verify", path), ("inspect", path),
                 ("install", path, "--root", tmp_path / "root")):
        result = bundle(*args, "--trust", pub)
        assert result.rc == SignatureError.exit_code, (args, result.out, result.err)
        assert error_line(result.err) == (f"error: signed manifest is malformed: {field} "
                                          f"{what}"), result.err
    assert not (tmp_path / "root").exists()


# --- 2. volume parts whose size is not a multiple of 512 ------------------------------------


def test_volume_parts_not_a_multiple_of_512_verify_and_install(tmp_path: Path,
                                                               keys: tuple[Path, Path]) -> None:
    """Empty files are header blocks only, so part boundaries (at k * (1 MiB + 13)) fall in
    the middle of a tar header: a read there must be completed from the next part."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2400):
        (data / f"f{i:05d}").write_bytes(b"")
    (data / "blob.bin").write_bytes(bytes((i * 7919) % 251 for i in range(65536)) * 20)
    profile = tmp_path / "p.yaml"
    profile.write_text("schema: 1\nname: vault\nversion: 1.0.0\n"
                       "files:\n  - {src: data, dest: data}\n")
    built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "usb", "--json",
                   "--cache-dir", tmp_path / "cache", "--volume-size", str(1024 * 1024 + 13))
    assert built.rc == 0, built.err
    parts = json.loads(built.out)["parts"]
    # parts[0] is the head (the envelope member: whole blocks); the rest cut blocks in two.
    assert len(parts) >= 3 and all(Path(p).stat().st_size % 512 for p in parts[1:-1])
    ok = bundle("verify", parts[0], "--trust", keys[1])
    assert ok.rc == 0, ok.err
    root = tmp_path / "root"
    installed = bundle("install", parts[-1], "--trust", keys[1], "--root", root)
    assert installed.rc == 0, installed.err
    assert (root / "current" / "files" / "data" / "f02399").is_file()


def test_tiny_odd_sized_parts_verify(tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    """Parts of 1000 bytes: nearly every header spans a boundary."""
    good = tmp_path / "good.bundle"
    write_bundle(good, key, FILES)
    out = tmp_path / "vol.bundle"
    writer = volumes.SplitWriter(out, 1000)
    writer.write(good.read_bytes())
    volumes.write_index(out, writer.commit(), key)
    result = bundle("verify", out, "--trust", pub)
    assert result.rc == 0, result.err
    assert "OK — shop 1.0.0" in result.out


# --- 3. unsigned input that reached an internal error ---------------------------------------


def _with_envelope(path: Path, envelope: bytes) -> Path:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(reg("envelope.json"), envelope)]
    craft(path, members + [(reg(name), data) for name, data in sorted(FILES.items())])
    return path


def test_a_deeply_nested_envelope_is_a_signature_error(tmp_path: Path, pub: Path) -> None:
    path = _with_envelope(tmp_path / "deep.bundle", b"[" * 200_000 + b"]" * 200_000)
    result = bundle("verify", path, "--trust", pub)
    assert result.rc == SignatureError.exit_code, result.err
    assert error_line(result.err) == "error: envelope.json is malformed: JSON nested too deeply"
    nested = b'{"payloadType":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}"
    result = bundle("verify", _with_envelope(tmp_path / "deep2.bundle", nested), "--trust", pub)
    assert result.rc == SignatureError.exit_code, result.err
    assert error_line(result.err) == "error: envelope.json is malformed: JSON nested too deeply"


def test_a_deeply_nested_part_index_is_a_signature_error(tmp_path: Path, pub: Path) -> None:
    (tmp_path / "vol.bundle.001").write_bytes(b"x")
    (tmp_path / "vol.bundle.parts").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    result = bundle("verify", tmp_path / "vol.bundle.parts", "--trust", pub)
    assert result.rc == SignatureError.exit_code, result.err
    assert error_line(result.err) == ("error: vol.bundle.parts is malformed: JSON nested too "
                                      "deeply")


@pytest.mark.parametrize("size", ["\u00b2", "\u0661\u0660", "1_0", " 10", "+10", "1e3"])
def test_a_pax_size_that_is_not_ascii_digits_is_an_integrity_error(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path, size: str) -> None:
    """"\u00b2" and Arabic-Indic digits pass str.isdigit(); int() took the latter, crashed on
    the former."""
    data = b"0123456789"
    files = {"files/app/a.txt": data}
    envelope = envelope_raw(manifest_for(files).to_bytes(), key)
    member = reg("files/app/a.txt")
    member.pax_headers = {"size": size}
    path = tmp_path / "pax.bundle"
    craft(path, [(reg("envelope.json"), envelope), (member, data)])
    result = bundle("verify", path, "--trust", pub)
    assert result.rc == IntegrityError.exit_code, result.err
    assert error_line(result.err).startswith("error: pax.bundle: bad pax size at offset "), \
        result.err


def test_a_pax_record_length_that_is_not_ascii_digits_is_an_integrity_error(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    good = tmp_path / "good.bundle"
    craft(good, [(reg("envelope.json"), envelope_raw(manifest_for({}).to_bytes(), key))])
    # A hand-made pax header whose record length is "+20" (int() takes it; the format does not).
    record = b"+20 path=files/a.tx\n"
    header = tarfile.TarInfo("pax")
    header.type = tarfile.XHDTYPE
    header.size = len(record)
    block = header.tobuf(tarfile.USTAR_FORMAT)
    raw = good.read_bytes()
    cut = raw.rstrip(b"\0")
    cut += b"\0" * (-len(cut) % 512)
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(cut + block + record + b"\0" * (-len(record) % 512) + b"\0" * 10240)
    result = bundle("verify", bad, "--trust", pub)
    assert result.rc == IntegrityError.exit_code, result.err
    assert error_line(result.err).startswith("error: bad.bundle: malformed pax header at "
                                             "offset "), result.err


def test_an_envelope_with_400k_signatures_is_refused_in_one_short_line(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    body = manifest_for(FILES).to_bytes()
    sigs = [{"keyid": f"{i:x}", "sig": "AA=="} for i in range(400_000)]
    envelope = canonical_json({"payloadType": "application/vnd.bundler.bundle.manifest+json",
                               "payload": base64.b64encode(body).decode(),
                               "signatures": sigs})
    path = _with_envelope(tmp_path / "many.bundle", envelope)
    result = bundle("verify", path, "--trust", pub)
    assert result.rc == SignatureError.exit_code, result.err
    assert error_line(result.err) == ("error: envelope.json has 400000 signatures; at most 16 "
                                      "are accepted")
    assert len(result.err) < 500


def test_untrusted_huge_key_ids_and_types_keep_the_message_short(
        tmp_path: Path, pub: Path) -> None:
    body = manifest_for(FILES).to_bytes()
    for doc, start in (
            ({"payloadType": "application/vnd.bundler.bundle.manifest+json",
              "payload": base64.b64encode(body).decode(),
              "signatures": [{"keyid": "k" * 1_000_000, "sig": "AAAA"}]},
             "error: envelope.json is signed by key kkkk"),
            ({"payloadType": "t" * 1_000_000, "payload": base64.b64encode(body).decode(),
              "signatures": [{"keyid": "k", "sig": "AAAA"}]},
             "error: envelope.json payloadType is 'tttt"),
            ({"payloadType": "x", "payload": "", "signatures": [],
              "d" * 1_000_000: 1, **{"d" * 1_000_000: 2}},
             "error: envelope.json")):
        raw = canonical_json(doc)
        if start == "error: envelope.json":  # a duplicate (huge) key, written by hand
            raw = raw[:-1] + b',"' + b"d" * 1_000_000 + b'":3}'
        result = bundle("verify", _with_envelope(tmp_path / "x.bundle", raw), "--trust", pub)
        assert result.rc == SignatureError.exit_code, result.err[:300]
        line = error_line(result.err)
        assert line.startswith(start) and len(line) < 400, line[:500]


# --- 4. the image archive's zstd stream: bounded output -------------------------------------

BOMB_CHECK = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from bundler.install import images
    try:
        for _chunk in images._upload(Path(sys.argv[1]), {}, {}):
            pass
    except images._Corrupt as exc:
        print("corrupt:", exc)
    # VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's (pytest's) peak
    # across exec, so it would measure the test runner rather than this process.
    status = Path("/proc/self/status").read_text()
    print("peak", next(int(ln.split()[1]) for ln in status.splitlines()
                        if ln.startswith("VmHWM:")))
""")


def _rle_bomb(out_bytes: int) -> bytes:
    """One zstd frame of RLE blocks: 4 bytes per 128 KiB of zeros (~32 KiB per GiB)."""
    block = 128 * 1024
    frame = bytearray((0xFD2FB528).to_bytes(4, "little"))
    frame += bytes([0x00, 7 << 3])  # no content size, no checksum; window 2**17
    count = out_bytes // block
    for i in range(count):
        last = 1 if i == count - 1 else 0
        frame += (last | 1 << 1 | block << 3).to_bytes(3, "little") + b"\0"
    return bytes(frame)


def test_a_zstd_bomb_in_the_image_archive_does_not_balloon_memory(tmp_path: Path) -> None:
    import zstandard

    bomb = _rle_bomb(1024**3)
    assert len(bomb) < 40_000
    reader = zstandard.ZstdDecompressor().stream_reader(bomb, read_across_frames=True)
    assert reader.read(10) == b"\0" * 10  # a valid zstd frame, really 1 GiB of zeros
    path = tmp_path / "images.tar.zst"
    path.write_bytes(bomb)
    done = subprocess.run([sys.executable, "-c", BOMB_CHECK, str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "corrupt: more than 1.0 MiB follow the tar's end-of-archive marker", \
        done.stdout
    peak_mib = int(lines[1].split()[1]) / 1024
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB decompressing a 1 GiB zstd bomb"


def _tar_zst(tmp_path: Path, cut: int = 0) -> Path:
    import io

    import zstandard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        doc = b"[]"
        info.size = len(doc)
        tar.addfile(info, io.BytesIO(doc))
    data = zstandard.ZstdCompressor(write_checksum=True).compress(buf.getvalue())
    path = tmp_path / "images.tar.zst"
    path.write_bytes(data[:len(data) - cut] if cut else data)
    return path


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-3]),
     "it ends in the middle of a zstd frame (truncated)"),
    (lambda p: p.write_bytes(p.read_bytes() + b"junk"),
     "it holds data that is not a zstd frame at offset"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])),
     "zstd: "),
    (lambda p: p.write_bytes(b""), "it is empty"),
])
def test_the_bounded_zstd_reader_still_refuses_damaged_archives(tmp_path: Path, damage: object,
                                                                message: str) -> None:
    from bundler.install import images

    path = _tar_zst(tmp_path)
    assert list(images._upload(path, {}, {}))  # intact: an (empty) archive, read to the end
    damage(path)  # type: ignore[operator]
    with pytest.raises(images._Corrupt) as caught:
        list(images._upload(path, {}, {}))
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_bounded_zstd_reader_reads_several_frames_in_small_chunks(tmp_path: Path) -> None:
    import zstandard

    from bundler.fsutil import CHUNK
    from bundler.install import images

    data = bytes(range(256)) * 40_000 + b"\0" * (5 * CHUNK)
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    raw = cctx.compress(data[:1000]) + b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + \
        b"abc" + cctx.compress(data[1000:])
    path = tmp_path / "frames.zst"
    path.write_bytes(raw)
    out = bytearray()
    with open(path, "rb") as fh:
        reader = images._ZstdReader(fh)
        while chunk := reader.read(-1):
            assert len(chunk) <= CHUNK
            out += chunk
        assert reader.read(7 * CHUNK) == b""
    assert bytes(out) == data


# --- 5. a manifest over the envelope limit is refused at build time -------------------------


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_a_manifest_over_the_envelope_limit_is_refused_at_build(tmp_path: Path,
                                                                keys: tuple[Path, Path]) -> None:
    from bundler.bundle.signing import MAX_ENVELOPE_BYTES

    data = tmp_path / "many"
    data.mkdir()
    count = 18_000  # each path ~620 characters: ~17 MB of base64 manifest
    for i in range(count):
        (data / f"{i:05d}").write_bytes(b"")
    deep = "/".join(c * 200 for c in "abc")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"schema: 1\nname: vault\nversion: 1.0.0\n"
                       f"files:\n  - {{src: many, dest: {deep}}}\n")
    result = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                    "--cache-dir", tmp_path / "cache")
    assert result.rc == BuildError.exit_code, result.err
    line = error_line(result.err)
    # the profile's files and the SBOM
    assert line.startswith(f"error: the signed manifest of {count + 1} files is "), line
    assert line.endswith(f" bytes, over the {MAX_ENVELOPE_BYTES} byte envelope limit"), line
    assert "hint: bundle fewer, larger files" in result.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- 6. "unhealthy" has its own exit code ---------------------------------------------------


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_status_and_start_of_an_unhealthy_release_exit_with_their_own_code(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    assert UnhealthyError.exit_code == 19
    flag = tmp_path / "healthy.flag"
    flag.write_text("ok\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.ini").write_text("x\n")
    profile = tmp_path / "p.yaml"
    profile.write_text("schema: 1\nname: api\nversion: 1.0.0\nfiles:\n  - {src: conf, dest: c}\n"
                       f"health:\n  - {{name: web, command: [test, -f, '{flag}'], "
                       "retries: 1}\n")
    built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                   "--cache-dir", tmp_path / "cache", "--json")
    assert built.rc == 0, built.err
    root = tmp_path / "root"
    installed = bundle("install", json.loads(built.out)["bundle"], "--trust", keys[1],
                       "--root", root)
    assert installed.rc == 0, installed.err
    healthy = bundle("status", "--root", root)
    assert healthy.rc == 0 and "healthy" in healthy.out, healthy.err
    flag.unlink()
    status = bundle("status", "--root", root)
    assert status.rc == UnhealthyError.exit_code, status.err
    assert "api 1.0.0 (sequence" in status.out and "UNHEALTHY" in status.out
    assert error_line(status.err) == "error: api 1.0.0 is unhealthy: check web failed"
    assert "hint: " in status.err
    as_json = bundle("status", "--root", root, "--json")
    assert as_json.rc == UnhealthyError.exit_code, as_json.err
    assert json.loads(as_json.out)["healthy"] is False  # the one JSON document: the report
    start = bundle("start", "--root", root)
    assert start.rc == UnhealthyError.exit_code, start.err
    assert "started 1.0.0" in start.out
    assert error_line(start.err) == ("error: 1.0.0 started but is unhealthy: check web "
                                     "failed")
    doctor = bundle("doctor", "--root", root)
    # the host itself may well be ready
    assert doctor.rc in (0, UnhealthyError.exit_code), doctor.err
    missing = bundle("status", "--root", tmp_path / "nothing")
    # not installed is a state error, not "unhealthy"
    assert missing.rc == StateError.exit_code, missing.err
