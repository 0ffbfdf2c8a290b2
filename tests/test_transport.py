"""Volume sets, reproducible builds, inspect/diff, the trust store and disk-space refusals,
through the real CLI."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bundler.bundle import volumes
from bundler.bundle.signing import load_private_key
from bundler.bundle.volumes import DEFAULT_PART_SIZE, parse_size
from bundler.errors import (
    BuildError,
    IntegrityError,
    PolicyError,
    SignatureError,
    SigningKeyError,
    SpaceError,
    StateError,
)
from tests.helpers import Project, bundle, unavailable


def files_profile(base: Path, version: str = "1.0.0", size: int = 3 * 1024 * 1024,
                  extra: str = "") -> Path:
    """A files-only profile (no Python, no services): fast to build and install."""
    data = base / "data"
    data.mkdir(exist_ok=True)
    # Incompressible-ish, deterministic content of `size` bytes.
    block = bytes((i * 7919) % 251 for i in range(65536))
    with open(data / "blob.bin", "wb") as fh:
        for _ in range(size // len(block)):
            fh.write(block)
    (data / "config.ini").write_text(f"version = {version}\n")
    profile = base / f"p-{version}.yaml"
    profile.write_text(f"schema: 1\nname: vault\nversion: {version}\n"
                       f"files:\n  - {{src: data, dest: data}}\n{extra}")
    return profile


def build(profile: Path, keys: tuple[Path, Path], out: Path, *args: str,
          env: dict[str, str] | None = None) -> dict[str, object]:
    result = bundle("build", profile, "--key", keys[0], "--out", out, "--json",
                    "--cache-dir", out.parent / "cache", *args, env=env)
    assert result.rc == 0, result.err
    doc: dict[str, object] = json.loads(result.out)
    return doc


def test_parse_size() -> None:
    assert parse_size("700M") == 700 * 1024**2
    assert parse_size("4G") == 4 * 1024**3
    assert parse_size("2097152") == 2 * 1024**2
    assert DEFAULT_PART_SIZE < 4 * 1024**3
    for bad in ("lots", "1.5G", "100"):
        with pytest.raises(BuildError):
            parse_size(bad)


def test_volume_set_build_verify_and_corrupt_part(tmp_path: Path,
                                                  keys: tuple[Path, Path]) -> None:
    out = tmp_path / "usb"
    built = build(files_profile(tmp_path), keys, out, "--volume-size", "1M")
    files = [Path(str(p)) for p in built["parts"]]  # type: ignore[union-attr]
    head, parts = files[0], files[1:]
    assert head.name == "vault-1.0.0.bundle.000" and head.stat().st_size < 64 * 1024
    assert len(parts) == 4 and all(p.stat().st_size <= 1024 * 1024 for p in parts)
    assert not (out / "vault-1.0.0.bundle").exists()
    for form in (out / "vault-1.0.0.bundle", out / "vault-1.0.0.bundle.parts", parts[2], head):
        ok = bundle("verify", form, "--trust", keys[1], "--json")
        assert ok.rc == 0, ok.err
    listed = json.loads(bundle("inspect", head, "--trust", keys[1], "--json").out)["parts"]
    assert [f["file"] for f in listed] == [p.name for p in files] and listed[0]["sha256"] is None
    data = bytearray(parts[1].read_bytes())
    data[1000] ^= 1
    parts[1].write_bytes(bytes(data))
    bad = bundle("verify", parts[0], "--trust", keys[1])
    assert bad.rc == IntegrityError.exit_code
    assert "error: part 2 of 4 (vault-1.0.0.bundle.002) is corrupt (sha256 mismatch)" in bad.err
    parts[3].unlink()
    gone = bundle("verify", parts[0], "--trust", keys[1])
    assert gone.rc == IntegrityError.exit_code \
        and "part 4 of 4 (vault-1.0.0.bundle.004) is missing" in gone.err


def test_part_index_is_signed_by_a_signer_of_the_bundle(tmp_path: Path,
                                                        keys: tuple[Path, Path]) -> None:
    """The head's envelope is verified first; then the index must verify, be signed by a key
    that signed the envelope, and name the same manifest."""
    out = tmp_path / "usb"
    build(files_profile(tmp_path), keys, out, "--volume-size", "1M")
    index, head = out / "vault-1.0.0.bundle.parts", out / "vault-1.0.0.bundle.000"
    good_index, good_head = index.read_bytes(), head.read_bytes()
    other = tmp_path / "other"
    assert bundle("keygen", other).rc == 0
    result = bundle("verify", index, "--trust", f"{other}.pub")
    assert result.rc == SignatureError.exit_code and "which is not trusted" in result.err

    doc = json.loads(good_index)
    doc["payload"] = doc["payload"][:-8] + "AAAAAAA="
    index.write_text(json.dumps(doc))
    result = bundle("verify", index, "--trust", keys[1])
    assert result.rc == SignatureError.exit_code
    assert "vault-1.0.0.bundle.parts" in result.err

    # Re-signed by a key the host also trusts, but which did not sign the bundle: refused.
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    shutil.copy(keys[1], trust_dir / "release.pub")
    shutil.copy(f"{other}.pub", trust_dir / "other.pub")
    parsed = volumes.PartIndex.parse(base64.b64decode(json.loads(good_index)["payload"]))
    index.write_bytes(volumes.index_bytes(parsed, load_private_key(Path(f"{other}.key"))))
    result = bundle("verify", index, "--trust", trust_dir)
    assert result.rc == SignatureError.exit_code
    assert "is not signed by any key that signed the bundle" in result.err

    # A head from another build of the same name (the index names another manifest).
    index.write_bytes(good_index)
    assert bundle("verify", index, "--trust", keys[1]).rc == 0
    (tmp_path / "b").mkdir()
    build(files_profile(tmp_path / "b", size=1024), keys, tmp_path / "b" / "usb",
          "--volume-size", "1M")
    head.write_bytes((tmp_path / "b" / "usb" / "vault-1.0.0.bundle.000").read_bytes())
    result = bundle("verify", index, "--trust", keys[1])
    assert result.rc == IntegrityError.exit_code
    assert "belong to different bundles" in result.err
    head.write_bytes(good_head + b"\0" * 512)
    result = bundle("verify", index, "--trust", keys[1])
    assert result.rc == IntegrityError.exit_code and "after the envelope" in result.err
    head.unlink()
    result = bundle("verify", index, "--trust", keys[1])
    assert result.rc == IntegrityError.exit_code
    assert "vault-1.0.0.bundle.000 (the volume set's head: its signed envelope) is missing" \
        in result.err


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_rebuild_replaces_stale_parts_and_single_file(tmp_path: Path,
                                                      keys: tuple[Path, Path]) -> None:
    out = tmp_path / "usb"
    profile = files_profile(tmp_path)
    build(profile, keys, out, "--volume-size", "1M")
    assert (out / "vault-1.0.0.bundle.004").exists()
    build(profile, keys, out, "--volume-size", "2M")
    assert not (out / "vault-1.0.0.bundle.003").exists()
    build(profile, keys, out)
    assert sorted(p.name for p in out.iterdir()) == ["vault-1.0.0.bundle"]
    assert bundle("verify", out / "vault-1.0.0.bundle", "--trust", keys[1]).rc == 0


def test_same_inputs_build_byte_identical_bundles(tmp_path: Path, project: Project,
                                                  keys: tuple[Path, Path]) -> None:
    env = {"SOURCE_DATE_EPOCH": "1760000000"}
    a = build(project.profile(), keys, tmp_path / "a" / "out", env=env)
    shutil.rmtree(tmp_path / "a" / "cache")  # a cold cache must not change the bytes
    b = build(project.profile(), keys, tmp_path / "b" / "out", env=env)
    assert Path(str(a["bundle"])).read_bytes() == Path(str(b["bundle"])).read_bytes()
    assert a["sequence"] == 1760000000


def test_inspect_json_names_sequence_and_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    built = build(files_profile(tmp_path, extra="expires: 30d\nsequence: 42\n"), keys,
                  tmp_path / "out")
    result = bundle("inspect", str(built["bundle"]), "--trust", keys[1], "--json")
    assert result.rc == 0, result.err
    info = json.loads(result.out)
    assert info["sequence"] == 42 and info["keyid"] == built["keyid"]
    assert info["expires"] is not None and info["parts"] is None
    assert {f["path"] for f in info["files"]} == {"files/data/blob.bin", "files/data/config.ini",
                                                  "sbom/bom.cdx.json"}
    human = bundle("inspect", str(built["bundle"]), "--trust", keys[1])
    assert "sequence 42" in human.out and "signature verified" in human.out


def test_diff_reports_changed_added_removed(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    old = build(files_profile(tmp_path / "v1", "1.0.0", size=65536), keys, tmp_path / "o1")
    p2 = files_profile(tmp_path / "v2", "1.1.0", size=65536)
    (tmp_path / "v2" / "data" / "new.txt").write_text("new\n")
    new = build(p2, keys, tmp_path / "o2")
    result = bundle("diff", str(old["bundle"]), str(new["bundle"]), "--trust", keys[1], "--json")
    assert result.rc == 0, result.err
    d = json.loads(result.out)
    assert d["version"] == ["1.0.0", "1.1.0"]
    assert [a["artifact"] for a in d["added"]] == ["files/data/new.txt"]
    assert [c["artifact"] for c in d["changed"]] == ["files/data/config.ini"]
    assert d["removed"] == []


def test_diff_shows_wheel_version_changes(tmp_path: Path, project: Project,
                                          keys: tuple[Path, Path]) -> None:
    import hashlib

    from tests.helpers import make_wheel

    old = build(project.profile("1.0.0"), keys, tmp_path / "o1")
    whl = make_wheel(project.wheelhouse, "tinygreet", "1.1",
                     {"tinygreet/__init__.py": "def greet():\n    return 'hi'\n"})
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    (project.dir / "requirements.txt").write_text(f"tinygreet==1.1 --hash=sha256:{sha}\n")
    new = build(project.profile("1.1.0"), keys, tmp_path / "o2")
    result = bundle("diff", str(old["bundle"]), str(new["bundle"]), "--trust", keys[1])
    assert result.rc == 0, result.err
    assert "~ wheel:tinygreet: 1.0 → 1.1" in result.out


def test_trust_store_is_used_when_no_trust_flag(tmp_path: Path,
                                                keys: tuple[Path, Path]) -> None:
    built = build(files_profile(tmp_path), keys, tmp_path / "out")
    root = tmp_path / "root"
    none = bundle("install", str(built["bundle"]), "--root", root)
    # No root yet and no --trust: the root is what is missing (a first install passes --trust)
    assert none.rc == StateError.exit_code and f"no install root at {root}" in none.err, none.err
    assert not root.exists()
    assert bundle("trust", "add", keys[1], "--root", root).rc == 0
    listed = json.loads(bundle("trust", "list", "--root", root, "--json").out)
    assert [k["keyid"] for k in listed["keys"]] == [built["keyid"]]
    assert bundle("verify", str(built["bundle"]), "--root", root).rc == 0
    installed = bundle("install", str(built["bundle"]), "--root", root)
    assert installed.rc == 0, installed.err
    assert bundle("trust", "remove", str(built["keyid"]), "--root", root).rc == 0
    assert bundle("trust", "remove", "feedfacefeedface", "--root", root).rc \
        == SigningKeyError.exit_code


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_allow_downgrade_is_recorded_in_history(tmp_path: Path,
                                                keys: tuple[Path, Path]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    new = build(files_profile(tmp_path / "a", "2.0.0", 65536, "sequence: 20\n"), keys,
                tmp_path / "o2")
    old = build(files_profile(tmp_path / "b", "1.0.0", 65536, "sequence: 10\n"), keys,
                tmp_path / "o1")
    root = tmp_path / "root"
    assert bundle("install", str(new["bundle"]), "--trust", keys[1], "--root", root).rc == 0
    refused = bundle("install", str(old["bundle"]), "--trust", keys[1], "--root", root)
    assert refused.rc == PolicyError.exit_code
    forced = bundle("install", str(old["bundle"]), "--trust", keys[1], "--root", root,
                    "--allow-downgrade")
    assert forced.rc == 0, forced.err
    events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
    assert ("downgrade", "allowed") in [(e["step"], e["status"]) for e in events]


@pytest.fixture
def small_fs(tmp_path: Path) -> object:
    """A real 2 MiB filesystem (tmpfs), to run out of space for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {done.stderr!r}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_install_refuses_up_front_when_space_is_short(tmp_path: Path, keys: tuple[Path, Path],
                                                      small_fs: Path) -> None:
    built = build(files_profile(tmp_path), keys, tmp_path / "out")
    root = small_fs / "root"
    result = bundle("install", str(built["bundle"]), "--trust", keys[1], "--root", root)
    assert result.rc == SpaceError.exit_code, result.err
    assert "needs 3.0 MiB" in result.err and "bytes)" in result.err
    assert list(small_fs.iterdir()) == []


def test_build_refuses_up_front_when_space_is_short(tmp_path: Path, keys: tuple[Path, Path],
                                                    small_fs: Path) -> None:
    result = bundle("build", files_profile(tmp_path), "--key", keys[0], "--out",
                    small_fs / "out", "--cache-dir", tmp_path / "cache")
    assert result.rc == SpaceError.exit_code, result.err
    assert "writing the bundle needs" in result.err
    assert not any(small_fs.rglob("*.bundle*"))
