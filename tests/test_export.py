"""`bundle export` (the USB step) onto a real FAT32 filesystem, and the kit-version policy."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.errors import ExportError, PolicyError
from bundler.export import find_kit, mount_type
from bundler.install.policy import check_bundler_version
from bundler.manifest import required_version
from tests.bundles import manifest_for, write_bundle
from tests.helpers import bundle, unavailable
from tests.test_transport import files_profile

PLATFORM = "manylinux_2_28_x86_64"
KIT = f"bundler-kit-0.1.0-{PLATFORM}.pyz"
MiB = 1024 * 1024


# ---- the target refuses a bundle built by a newer bundler --------------------------------------

def test_required_version_and_comparison() -> None:
    assert required_version(manifest_for({}, builder="bundler 0.3.1")) == "0.3.1"
    assert required_version(manifest_for({})) is None  # hand-made: names no bundler
    for builder, own in (("bundler 0.1.0", "0.1.0"), ("bundler 0.1.0", "0.2.0"),
                         ("bundler 0.9.0", "0.10.0"), ("bundler 1.0.0rc1", "1.0.0"), ("", "0.1")):
        check_bundler_version(manifest_for({}, builder=builder), own=own)
    for builder, own in (("bundler 0.2.0", "0.1.0"), ("bundler 0.10.0", "0.9.0"),
                         ("bundler 1.0.0", "1.0.0rc1")):
        with pytest.raises(PolicyError) as err:
            check_bundler_version(manifest_for({}, builder=builder), own=own)
        assert builder.split()[1] in err.value.message and own in err.value.message
        assert "kit that came with the bundle" in err.value.hint


def test_manifest_without_builder_requirement_is_byte_identical() -> None:
    plain = manifest_for({"files/a": b"a"})
    assert b'"builder":""' in plain.to_bytes() and b"requires" not in plain.to_bytes()


def test_verify_and_install_refuse_a_bundle_from_a_newer_bundler(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "shop-1.0.0.bundle"
    write_bundle(path, key, {"files/a.txt": b"hello"}, builder="bundler 99.0.0")
    pub = tmp_path / "k.pub"
    from cryptography.hazmat.primitives import serialization
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    for cmd in (["verify", path, "--trust", pub],
                ["install", path, "--trust", pub, "--root", tmp_path / "root"]):
        result = bundle(*cmd)
        assert result.rc == 8, result.err
        assert "needs bundler 99.0.0 or newer; this is bundler 0.1.0" in result.err
        assert "hint: use the kit that came with the bundle" in result.err
    assert not (tmp_path / "root" / "releases").exists()


# ---- kit finding and mount detection (units) ------------------------------------------------

def test_find_kit_takes_the_newest_for_the_platform(tmp_path: Path) -> None:
    for name in (f"bundler-kit-0.9.0-{PLATFORM}.pyz", f"bundler-kit-0.10.0-{PLATFORM}.pyz",
                 "bundler-kit-0.11.0-manylinux_2_28_aarch64.pyz", "bundler-kit-x-y.pyz"):
        (tmp_path / name).write_bytes(b"kit")
    assert find_kit(tmp_path, PLATFORM).name == f"bundler-kit-0.10.0-{PLATFORM}.pyz"
    with pytest.raises(ExportError) as err:
        find_kit(tmp_path, "musllinux_1_2_x86_64")
    assert "build with --with-kit or run `bundle kit --out DIR`" in err.value.hint


def test_mount_type_longest_prefix(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text("/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 /media/my\\040stick vfat rw 0 0\n"
                     "tmpfs /media tmpfs rw 0 0\n")
    assert mount_type(Path("/media/my stick/x"), str(table)) == "vfat"
    assert mount_type(Path("/media/other"), str(table)) == "tmpfs"
    assert mount_type(Path("/srv"), str(table)) == "ext4"


# ---- the real thing: a FAT32 image ------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 3 MiB bundle with a (stand-in) kit and its public key beside it in dist/."""
    base = tmp_path_factory.mktemp("export")
    assert bundle("keygen", base / "release").rc == 0
    dist = base / "dist"
    result = bundle("build", files_profile(base), "--key", base / "release.key", "--out", dist,
                    "--cache-dir", base / "cache", "--json")
    assert result.rc == 0, result.err
    (dist / KIT).write_bytes(b"PK stand-in kit " * 1000)
    shutil.copy(base / "release.pub", dist / "release.pub")
    return {"bundle": Path(json.loads(result.out)["bundle"]), "key": base / "release.key",
            "pub": base / "release.pub", "dist": dist, "base": base}


@pytest.fixture
def fat32(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB FAT32 image made by mkfs.vfat, mounted read-write: with the kernel's vfat
    driver through a loop device where the kernel has one, else with fusefat (FUSE: this
    machine's kernel has loop devices but no vfat driver). Unmounted and fsck'ed after."""
    for tool in ("mkfs.vfat", "fsck.vfat", "fusefat"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (dosfstools, fusefat)")
    image, mnt = tmp_path / "stick.img", tmp_path / "stick"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(64 * MiB)
    subprocess.run(["mkfs.vfat", "-F", "32", str(image)], check=True, capture_output=True)
    fuse: subprocess.Popen[bytes] | None = None
    loop = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True,
                          check=False)
    if loop.returncode != 0:
        log = tmp_path / "fusefat.log"  # it is chatty: a pipe would fill and stall it
        with open(log, "wb") as out:
            fuse = subprocess.Popen(["fusefat", "-f", "-o", "rw+", str(image), str(mnt)],
                                    stdout=out, stderr=out)
        for _ in range(100):
            if mount_type(mnt) == "fuse.fusefat" or fuse.poll() is not None:
                break
            time.sleep(0.05)
        if mount_type(mnt) != "fuse.fusefat":
            fuse.kill()
            fuse.wait()
            unavailable(f"cannot mount a FAT32 image: loop: {loop.stderr!r}; fusefat: "
                        f"{log.read_text(errors='replace')[-500:]!r}")
    try:
        assert mount_type(mnt) in ("vfat", "fuse.fusefat")
        yield mnt
    finally:
        if fuse is None:
            subprocess.run(["umount", str(mnt)], check=False)
        else:
            subprocess.run(["fusermount", "-u", str(mnt)], check=False)
            try:
                fuse.wait(timeout=30)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
    check = subprocess.run(["fsck.vfat", "-n", str(image)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr  # the image is a sound FAT32


def export(src: Path, dest: Path, *args: str | Path, env: dict[str, str] | None = None
           ) -> tuple[int, dict[str, object], str]:
    result = bundle("export", src, dest, "--json", *args, env=env)
    return result.rc, json.loads(result.out) if result.out else {}, result.err


def test_export_splits_for_fat32_and_the_parts_verify(built: dict[str, Path],
                                                      fat32: Path) -> None:
    env = {"BUNDLER_TEST_MAX_FILE": str(MiB)}  # test hook: FAT's 4 GiB - 1, scaled down
    rc, doc, err = export(built["bundle"], fat32, env=env)
    assert rc == 5, err  # a split needs the key to sign the part index
    assert "pass --key NAME.key" in str(doc["message"]) and list(fat32.iterdir()) == []

    rc, doc, err = export(built["bundle"], fat32, "--key", built["key"], env=env)
    assert rc == 0, err
    assert doc["split"] is True and doc["max_file_size"] == MiB
    files = {f["name"]: f for f in doc["files"]}  # type: ignore[attr-defined]
    parts = sorted(n for n in files if n.startswith("vault-1.0.0.bundle.0"))
    assert len(parts) == 4 and all(files[p]["size"] <= MiB for p in parts)
    assert {"vault-1.0.0.bundle.parts", KIT, KIT + ".sha256", "release.pub",
            "INSTALL.txt"} <= set(files)
    assert all(f["status"] == "written" for f in files.values())
    on_stick = sorted(p.name for p in fat32.iterdir())
    assert on_stick == sorted(files)  # no temp file left
    ok = bundle("verify", fat32 / "vault-1.0.0.bundle.parts", "--trust", fat32 / "release.pub")
    assert ok.rc == 0, ok.err
    text = (fat32 / "INSTALL.txt").read_text()
    assert f"python3 -I -S {KIT} trust add release.pub --root /srv/vault" in text
    assert f"python3 -I -S {KIT} verify vault-1.0.0.bundle.parts --root /srv/vault" in text
    assert f"python3 -I -S {KIT} install vault-1.0.0.bundle.parts --root /srv/vault" in text
    for name, f in files.items():
        if name != "INSTALL.txt":
            assert f"{f['sha256']}  {name}\n" in text
    sums = subprocess.run("grep -E '^[0-9a-f]{64}  ' INSTALL.txt | sha256sum -c",
                          shell=True, cwd=fat32, capture_output=True, text=True, check=False)
    assert sums.returncode == 0, sums.stdout + sums.stderr

    # Idempotent: the same export again writes nothing and says so.
    rc, again, err = export(built["bundle"], fat32, "--key", built["key"], env=env)
    assert rc == 0, err
    assert {f["status"] for f in again["files"]} == {"unchanged"}  # type: ignore[attr-defined]
    assert "identical: skipped" in err


def test_export_refuses_to_overwrite_a_different_file(built: dict[str, Path],
                                                      fat32: Path) -> None:
    (fat32 / "release.pub").write_text("someone else's key\n")
    rc, doc, err = export(built["bundle"], fat32)
    assert rc == 21, err
    assert f"{fat32 / 'release.pub'} already exists and is not the file" in str(doc["message"])
    assert sorted(p.name for p in fat32.iterdir()) == ["release.pub"]
    assert (fat32 / "release.pub").read_text() == "someone else's key\n"


def test_export_read_back_catches_a_changed_byte(built: dict[str, Path], fat32: Path) -> None:
    rc, doc, err = export(built["bundle"], fat32, env={
        "BUNDLER_FAULT": "corrupt:export-readback"})
    assert rc == 7, err
    assert str(doc["message"]).startswith(f"vault-1.0.0.bundle on {fat32} reads back "
                                          "differently")
    assert list(fat32.iterdir()) == []  # nothing half-written, not even under a temp name


def test_export_bundle_larger_than_the_stick(built: dict[str, Path], fat32: Path,
                                             tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    assert bundle("build", files_profile(big, size=72 * MiB), "--key", built["key"], "--out",
                  big / "dist", "--cache-dir", big / "cache").rc == 0
    shutil.copy(built["dist"] / KIT, big / "dist" / KIT)
    rc, doc, err = export(big / "dist" / "vault-1.0.0.bundle", fat32, "--pub", built["pub"])
    if "fusefat" in mount_type(fat32):
        # fusefat reports no capacity (f_blocks 0): the check cannot run up front, so the write
        # fails when the stick is full (fusefat says EPERM) and what was written is removed.
        assert "does not report its free space" in err
        assert rc == 21 and "cannot write vault-1.0.0.bundle" in str(doc["message"])
    else:  # the kernel's vfat reports its size: refused before anything is written
        assert rc == 9 and "nothing was written" in str(doc["message"])
    assert list(fat32.iterdir()) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {done.stderr!r}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_export_refuses_up_front_when_space_is_short(built: dict[str, Path],
                                                     small_fs: Path) -> None:
    rc, doc, err = export(built["bundle"], small_fs)
    assert rc == 9, err
    message = str(doc["message"])
    assert f"on {small_fs} but only" in message and "nothing was written" in message
    assert doc["exit_code"] == 9 and list(small_fs.iterdir()) == []


def test_export_refuses_a_kit_older_than_the_bundle(built: dict[str, Path],
                                                    tmp_path: Path) -> None:
    old = tmp_path / f"bundler-kit-0.0.9-{PLATFORM}.pyz"
    old.write_bytes(b"old kit")
    out = tmp_path / "out"
    out.mkdir()
    rc, doc, err = export(built["bundle"], out, "--kit", old)
    assert rc == 8, err
    assert "is bundler 0.0.9" in str(doc["message"])
    assert "needs bundler 0.1.0 or newer" in str(doc["message"])


def test_export_builds_the_kit_when_none_is_next_to_the_bundle(built: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """No kit beside the bundle: export builds one for the bundle's target into the cache (here
    from this environment, as the target is this host's: no network), copies it like any file,
    and reuses it on the next export. --kit still overrides."""
    import platform as host_platform

    glibc = host_platform.libc_ver()[1]
    if host_platform.machine() != "x86_64" or not glibc:
        unavailable("the target below is this host's: needs x86_64 with glibc")
    major, minor = glibc.split(".")[:2]
    native = f"manylinux_{major}_{minor}_x86_64"
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    profile = files_profile(lonely, size=64 * 1024, extra="target:\n  python: \"3.11\"\n"
                            f"  platform: {native}\n")
    made = bundle("build", profile, "--key", built["key"], "--out", lonely / "dist",
                  "--cache-dir", lonely / "cache", "--json")
    assert made.rc == 0, made.err
    src = Path(json.loads(made.out)["bundle"])
    assert not list(src.parent.glob("*.pyz"))
    cache = tmp_path / "kitcache"
    kit_name = f"bundler-kit-0.1.0-{native}.pyz"

    out = tmp_path / "out"
    out.mkdir()
    rc, doc, err = export(src, out, "--pub", built["pub"], "--cache-dir", cache,
                          "--kit-from-installed")
    assert rc == 0, err
    assert doc["kit_source"] == "built" and "making one for CPython 3.11" in err
    files = {f["name"]: f for f in doc["files"]}  # type: ignore[attr-defined]
    assert files[kit_name]["status"] == "written" and files[kit_name + ".sha256"]
    kept = Path(str(doc["kit"]))
    assert kept.parent.parent == cache / "kits" and kept.name == kit_name
    assert (out / kit_name).read_bytes() == kept.read_bytes()
    sums = subprocess.run(["sha256sum", "-c", kit_name + ".sha256"], cwd=out,
                          capture_output=True, text=True, check=False)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    text = (out / "INSTALL.txt").read_text()
    assert f"python3 -I -S {kit_name} install vault-1.0.0.bundle --root /srv/vault" in text
    assert "Use /srv/vault/bin/bundle for every later command" in text  # no stick after it
    # the kit runs: it is a real one, for this target
    ran = subprocess.run(["python3", "-I", "-S", str(out / kit_name), "--version"],
                         capture_output=True, text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                              "BUNDLER_KIT_CACHE": str(tmp_path / "unpacked")})
    assert ran.returncode == 0 and "0.1.0" in ran.stdout, ran.stderr

    # A second export (another stick) reuses the kit built for this target: nothing is built.
    again = tmp_path / "again"
    again.mkdir()
    rc, doc, err = export(src, again, "--pub", built["pub"], "--cache-dir", cache,
                          "--kit-from-installed")
    assert rc == 0, err
    assert doc["kit_source"] == "cached" and "making one" not in err
    assert (again / kit_name).read_bytes() == kept.read_bytes()

    # --kit wins over building; a kit next to the bundle wins over the cache.
    given = tmp_path / "given"
    given.mkdir()
    rc, doc, err = export(src, given, "--pub", built["pub"], "--cache-dir", cache,
                          "--kit", kept)
    assert rc == 0 and doc["kit_source"] == "given", err
    shutil.copy(kept, src.parent / kit_name)
    beside = tmp_path / "beside"
    beside.mkdir()
    rc, doc, err = export(src, beside, "--pub", built["pub"], "--cache-dir", cache)
    assert rc == 0 and doc["kit_source"] == "found", err
    assert doc["kit"] == str(src.parent / kit_name)


def test_export_cannot_build_the_kit_from_an_unfit_environment(built: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """--kit-from-installed for a target this environment's wheels do not fit: refused with the
    wheel named, before anything is written."""
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(built["bundle"], lonely)
    out = tmp_path / "out"
    out.mkdir()
    rc, doc, err = export(lonely / built["bundle"].name, out, "--pub", built["pub"],
                          "--cache-dir", tmp_path / "cache", "--kit-from-installed")
    if rc == 0:  # this environment's wheels all fit manylinux_2_28: nothing to refuse here
        unavailable("every installed wheel fits manylinux_2_28_x86_64: nothing to refuse")
    assert "--from-installed only serves a target like this host" in str(doc["hint"]), err
    assert list(out.iterdir()) == []
