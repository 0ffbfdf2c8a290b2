"""`bundle export` (the USB step) onto a real FAT32 filesystem, and the kit-version policy."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bundler.build.export import KitName, find_kit, kit_name_fields, mount_type
from bundler.bundle.manifest import required_version
from bundler.bundle.models import (
    ComposeSpec,
    DatabaseSpec,
    EnvSpec,
    HealthCheck,
    ImageRef,
    NodeRuntime,
    NpmProject,
    NpmRef,
    Runtime,
    Service,
    Target,
)
from bundler.errors import ExportError, IntegrityError, PolicyError, SigningKeyError, SpaceError
from bundler.install.policy import check_bundler_version
from tests.bundles import manifest_for, write_bundle
from tests.helpers import REPO, bundle, bundle_argv, unavailable
from tests.test_transport import files_profile

PLATFORM = "manylinux_2_28_x86_64"
KIT = f"bundler-kit-0.1.0-cp311-{PLATFORM}.pyz"
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
        assert result.rc == PolicyError.exit_code, result.err
        assert "needs bundler 99.0.0 or newer; this is bundler 0.1.0" in result.err
        assert "hint: use the kit that came with the bundle" in result.err
    assert not (tmp_path / "root" / "releases").exists()


# ---- kit finding and mount detection (units) ------------------------------------------------

def test_find_kit_takes_the_newest_for_the_python_and_platform(tmp_path: Path) -> None:
    for name in (f"bundler-kit-0.9.0-cp311-{PLATFORM}.pyz",
                 f"bundler-kit-0.10.0-cp311-{PLATFORM}.pyz",
                 f"bundler-kit-0.12.0-cp312-{PLATFORM}.pyz",   # another Python
                 f"bundler-kit-0.13.0-{PLATFORM}.pyz",         # an old name: its Python unknown
                 "bundler-kit-0.11.0-cp311-manylinux_2_28_aarch64.pyz", "bundler-kit-x-y.pyz"):
        (tmp_path / name).write_bytes(b"kit")
    assert find_kit(tmp_path, Target("3.11", PLATFORM)).name == \
        f"bundler-kit-0.10.0-cp311-{PLATFORM}.pyz"
    assert find_kit(tmp_path, Target("3.12", PLATFORM)).name == \
        f"bundler-kit-0.12.0-cp312-{PLATFORM}.pyz"
    for target in (Target("3.13", PLATFORM), Target("3.11", "musllinux_1_2_x86_64")):
        with pytest.raises(ExportError) as err:
            find_kit(tmp_path, target)
        assert f"no kit for CPython {target.python} on {target.platform}" in err.value.message
        assert "build with --with-kit or run `bundle kit --out DIR`" in err.value.hint
    assert kit_name_fields(f"bundler-kit-0.1.0-cp313-{PLATFORM}.pyz") == KitName(
        "0.1.0", "3.13", PLATFORM)
    assert kit_name_fields(f"bundler-kit-0.1.0-{PLATFORM}.pyz") == KitName(
        "0.1.0", None, PLATFORM)


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
    assert rc == SigningKeyError.exit_code, err  # a split needs the key to sign the part index
    assert "pass --key NAME.key" in str(doc["message"]) and list(fat32.iterdir()) == []

    rc, doc, err = export(built["bundle"], fat32, "--key", built["key"], env=env)
    assert rc == 0, err
    assert doc["split"] is True and doc["max_file_size"] == MiB
    files = {f["name"]: f for f in doc["files"]}  # type: ignore[attr-defined]
    parts = sorted(n for n in files if n.startswith("vault-1.0.0.bundle.0"))
    # The head (.000: the signed envelope alone, which `bundle sign` rewrites), then 4 parts.
    assert len(parts) == 5 and all(files[p]["size"] <= MiB for p in parts)
    assert files[parts[0]]["role"] == "head" and files[parts[0]]["size"] < 64 * 1024
    assert {files[p]["role"] for p in parts[1:]} == {"part"}
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
    assert rc == ExportError.exit_code, err
    assert f"{fat32 / 'release.pub'} already exists and is not the file" in str(doc["message"])
    assert sorted(p.name for p in fat32.iterdir()) == ["release.pub"]
    assert (fat32 / "release.pub").read_text() == "someone else's key\n"


def test_export_read_back_catches_a_changed_byte(built: dict[str, Path], fat32: Path) -> None:
    rc, doc, err = export(built["bundle"], fat32, env={
        "BUNDLER_FAULT": "corrupt:export-readback"})
    assert rc == IntegrityError.exit_code, err
    assert str(doc["message"]).startswith(f"vault-1.0.0.bundle on {fat32} reads back "
                                          "differently")
    assert list(fat32.iterdir()) == []  # nothing half-written, not even under a temp name


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
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
        assert rc == ExportError.exit_code \
            and "cannot write vault-1.0.0.bundle" in str(doc["message"])
    else:  # the kernel's vfat reports its size: refused before anything is written
        assert rc == SpaceError.exit_code and "nothing was written" in str(doc["message"])
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
    assert rc == SpaceError.exit_code, err
    message = str(doc["message"])
    assert f"on {small_fs} but only" in message and "nothing was written" in message
    assert doc["exit_code"] == SpaceError.exit_code and list(small_fs.iterdir()) == []


def test_export_refuses_a_kit_older_than_the_bundle(built: dict[str, Path],
                                                    tmp_path: Path) -> None:
    old = tmp_path / f"bundler-kit-0.0.9-{PLATFORM}.pyz"
    old.write_bytes(b"old kit")
    out = tmp_path / "out"
    out.mkdir()
    rc, doc, err = export(built["bundle"], out, "--kit", old)
    assert rc == PolicyError.exit_code, err
    assert "is bundler 0.0.9" in str(doc["message"])
    assert "needs bundler 0.1.0 or newer" in str(doc["message"])


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
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
    kit_name = f"bundler-kit-0.1.0-cp311-{native}.pyz"

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


# ---- the kit's Python (issue 17) ----------------------------------------------------------

def test_export_refuses_a_kit_for_another_python(built: dict[str, Path], tmp_path: Path) -> None:
    """By its name, and by the kit.json inside when the name says otherwise (renamed)."""
    right = f"bundler-kit-0.1.0-cp311-{PLATFORM}.pyz"
    named = tmp_path / f"bundler-kit-0.1.0-cp312-{PLATFORM}.pyz"
    named.write_bytes(b"PK stand-in kit")
    renamed = tmp_path / "renamed" / right
    renamed.parent.mkdir()
    with zipfile.ZipFile(renamed, "w") as zf:
        zf.writestr("kit.json", json.dumps({"bundler": "0.1.0", "python": "3.12",
                                            "platform": PLATFORM}))
    out = tmp_path / "out"
    out.mkdir()
    for kit in (named, renamed):
        rc, doc, err = export(built["bundle"], out, "--kit", kit)
        assert rc == PolicyError.exit_code, err
        assert f"kit {kit.name} is for CPython 3.12; bundle vault 1.0.0 is for CPython 3.11" \
            in str(doc["message"])
        assert f"use {right} (`bundle kit --python 3.11 --platform {PLATFORM}" in str(doc["hint"])
        assert list(out.iterdir()) == []


# ---- the public key, found as the Quick start lays files out (issue 17) --------------------

def export_in(cwd: Path, src: Path, dest: Path, *args: str | Path) -> tuple[int, dict[str, Any],
                                                                           str]:
    done = subprocess.run(bundle_argv("export", src, dest, "--json", *args), cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


@pytest.fixture
def lonely_bundle(built: dict[str, Path], tmp_path: Path) -> Path:
    """The bundle and its kit in a dist/ of their own, no public key beside them."""
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copy(built["bundle"], dist)
    shutil.copy(built["dist"] / KIT, dist)
    return dist / built["bundle"].name


def test_export_finds_the_key_of_the_quick_start(built: dict[str, Path], tmp_path: Path) -> None:
    """`bundle keygen release` in the current directory, `bundle build --out dist/`, then
    `bundle export dist/NAME.bundle STICK`: export finds ./release.pub, says so, and puts it on
    the stick. An ssh key there is skipped."""
    cwd = tmp_path / "work"
    (cwd / "dist").mkdir(parents=True)
    shutil.copy(built["pub"], cwd / "release.pub")
    shutil.copy(built["key"], cwd / "release.key")
    shutil.copy(built["bundle"], cwd / "dist")
    shutil.copy(built["dist"] / KIT, cwd / "dist")
    (cwd / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI me@host\n")
    stick = tmp_path / "stick"
    stick.mkdir()
    rc, doc, err = export_in(cwd, Path("dist") / built["bundle"].name, stick)
    assert rc == 0, err
    assert doc["pub"] == str(cwd / "release.pub")
    assert f"public key: {cwd / 'release.pub'} (key id {doc['keyid']}: it verifies" in err
    assert f"skipping {cwd / 'id_ed25519.pub'}: " in err
    assert (stick / "release.pub").read_bytes() == built["pub"].read_bytes()


def test_export_finds_the_key_beside_the_signing_key(built: dict[str, Path],
                                                     lonely_bundle: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(built["pub"], keys / "release.pub")
    shutil.copy(built["key"], keys / "release.key")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stick = tmp_path / "stick"
    stick.mkdir()
    rc, doc, err = export_in(elsewhere, lonely_bundle, stick, "--key", keys / "release.key")
    assert rc == 0, err
    assert doc["pub"] == str(keys / "release.pub")


def test_export_says_when_no_key_found_verifies(built: dict[str, Path], lonely_bundle: Path,
                                                tmp_path: Path) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    stick = tmp_path / "stick"
    stick.mkdir()
    rc, doc, err = export_in(cwd, lonely_bundle, stick)
    assert rc == SigningKeyError.exit_code, err
    assert str(doc["message"]).startswith(
        f"no public key given and no *.pub found to verify {lonely_bundle} (looked in "
        f"{lonely_bundle.parent}, {cwd})")
    assert "pass --pub NAME.pub" in str(doc["hint"])

    assert bundle("keygen", cwd / "other").rc == 0  # someone else's key: it does not verify
    rc, doc, err = export_in(cwd, lonely_bundle, stick)
    assert rc == SigningKeyError.exit_code, err
    assert str(doc["message"]).startswith(
        f"none of the public keys found verifies {lonely_bundle}'s signature (tried "
        f"{cwd / 'other.pub'}): ")
    assert "which is not trusted" in str(doc["message"])
    assert list(stick.iterdir()) == []


# ---- INSTALL.txt: what the host needs first (issue 17) -------------------------------------

def test_install_txt_lists_the_host_steps(built: dict[str, Path], tmp_path: Path) -> None:
    key = load_pem_private_key(built["key"].read_bytes(), password=None)
    runtime = Runtime(
        user="webapp",
        services=(Service("api", ("run",)), Service("worker", ("run",), user="jobs")),
        databases=(DatabaseSpec("${DATABASE_URL}", name="main", kind="postgres"),
                   DatabaseSpec("${CHAT_URL}", name="chat", kind="mysql"),
                   DatabaseSpec("sqlite:////srv/shop/shared/cache.db", name="cache",
                                kind="sqlite"),
                   DatabaseSpec("${IN_COMPOSE}", compose_service="db", name="side",
                                kind="postgres")),
        env=EnvSpec(required=("DATABASE_URL", "CHAT_URL")))
    src = tmp_path / "src"
    src.mkdir()
    write_bundle(src / "shop-1.0.0.bundle", key,  # type: ignore[arg-type]
                 {"files/app.txt": b"hello\n", "python/requirements.lock": b"# empty\n"},
                 runtime=runtime, python_lock="python/requirements.lock")
    stick = tmp_path / "stick"
    stick.mkdir()
    rc, _doc, err = export(src / "shop-1.0.0.bundle", stick, "--pub", built["pub"],
                          "--kit", built["dist"] / KIT)
    assert rc == 0, err
    text = (stick / "INSTALL.txt").read_text()
    step0 = text[text.index("\n0. Prepare the host"):text.index("\n1. Check")]
    assert step0.index("useradd --system webapp") < step0.index("useradd --system jobs")
    assert ("   - the account webapp, which the release runs as:\n"
            "       useradd --system webapp\n") in step0, step0
    flat = " ".join(step0.split())
    for words in ("CPython 3.11 (python3.11 or python3 on PATH)",
                  "(Debian: postgresql-client-<server major version>), to back up database main",
                  "(Debian: mariadb-client), to back up database chat"):
        assert words in flat, step0
    assert "cache" not in step0 and "side" not in step0  # SQLite; a compose service's tools
    assert "DATABASE_URL, CHAT_URL" in text  # the shared .env variables, as before
    assert text.index("0. Prepare the host") < text.index(" install shop-1.0.0.bundle")
    assert all(len(line) <= 100 for line in step0.splitlines())


def test_host_needs_by_kind_of_bundle() -> None:
    """bundler.bundle.hostneeds: one home for what a host needs (docs/target.md's table names the
    same)."""
    from bundler.bundle import hostneeds

    def needs(**over: object) -> list[str]:
        return [n.what for n in hostneeds.host_needs(manifest_for({}, **over))]

    assert needs() == []
    compose = ComposeSpec(files=("compose/docker-compose.yml",))
    assert needs(runtime=Runtime(compose=compose)) == [
        "a running Docker engine (Debian: docker.io), for its compose project"]
    assert needs(images=(ImageRef("app:1", "sha256:" + "0" * 64),)) == [
        "a running Docker engine (Debian: docker.io), for its images"]
    npm = NpmProject("web", True, (), ())
    assert needs(npm=(npm,), target=Target(node=">=18")) == [
        "Node.js and npm on PATH (Node.js >=18; Debian: nodejs npm), for its npm projects"]
    carried = NodeRuntime(NpmRef("node", "20.0.0", "", ""), NpmRef("npm", "10.0.0", "", ""))
    assert needs(npm=(npm,), runtimes=carried) == []
    mysql_check = HealthCheck("db", kind="mysql", target="${CHAT_URL}")
    assert needs(runtime=Runtime(health=(mysql_check,))) == [
        "the MariaDB/MySQL client tools (Debian: mariadb-client), for its mysql health check"]
    unknown = needs(runtime=Runtime(database=DatabaseSpec("${DATABASE_URL}")))
    assert len(unknown) == 1 and "if it is PostgreSQL" in unknown[0] \
        and "if it is MariaDB/MySQL" in unknown[0]
    literal = needs(runtime=Runtime(database=DatabaseSpec("mariadb://app@db/shop")))
    assert literal[0].startswith("the MariaDB/MySQL client tools")
    doc = (REPO / "docs" / "target.md").read_text()
    table = doc[doc.index("## What the target needs, per kind of bundle"):]
    table = table[:table.index("\n## ")]
    for fact in ("mariadb-client", "postgresql-client", "useradd --system"):
        assert fact in table, fact
    for fact in (hostneeds.MARIADB_CLIENT, hostneeds.DOCKER_ENGINE, hostneeds.useradd("NAME"),
                 hostneeds.postgres_client().split("<")[0]):
        assert fact in table, fact
    # A single `database:` whose kind only a health check of its URL tells (seed 001's).
    pg_check = HealthCheck("db", kind="postgres", target="${DATABASE_URL}")
    told = needs(runtime=Runtime(database=DatabaseSpec("${DATABASE_URL}"), health=(pg_check,)))
    assert len(told) == 1 and told[0].startswith("the PostgreSQL client tools")


def test_a_bundle_under_a_root_of_trust_exports_its_root_not_a_key(
        built: dict[str, Path], tmp_path: Path) -> None:
    """Such a host takes a root document (`trust init`), never a loose key (`trust add` is
    refused there): the stick gets the latest root the bundle carries, and INSTALL.txt's
    step 2 names its version, threshold and keys to confirm."""
    k = tmp_path / "keys"
    k.mkdir()
    for name in ("root1", "root2"):
        assert bundle("keygen", k / name).rc == 0
    tdir = tmp_path / "trust"
    for args in (("init", tdir, "--key", k / "root1.pub", "--key", k / "root2.pub",
                  "--threshold", "2"),
                 ("sign", tdir, "--key", k / "root1.key"), ("sign", tdir, "--key", k / "root2.key"),
                 ("rotate-root", tdir, "--key", k / "root1.pub", "--key", k / "root2.pub",
                  "--threshold", "1"),
                 ("sign", tdir, "--key", k / "root1.key"), ("sign", tdir, "--key", k / "root2.key"),
                 ("delegate", tdir, "--role", "release", "--product", "vault", "--key",
                  built["pub"]), ("sign", tdir, "--targets", "--key", k / "root1.key")):
        done = bundle("keys", *args)
        assert done.rc == 0, done.err
    src = tmp_path / "src"
    src.mkdir()
    signed = src / built["bundle"].name
    shutil.copy(built["bundle"], signed)
    assert bundle("sign", signed, "--trust-metadata", tdir).rc == 0
    stick = tmp_path / "stick"
    stick.mkdir()
    rc, doc, err = export(signed, stick, "--pub", built["pub"], "--kit", built["dist"] / KIT)
    assert rc == 0, err
    assert doc["root_metadata"] == "2.root.json"
    roles = {f["name"]: f["role"] for f in doc["files"]}  # type: ignore[attr-defined]
    assert roles["2.root.json"] == "root" and "key" not in roles.values()
    assert sorted(p.name for p in stick.iterdir()) == sorted(roles)
    assert (stick / "2.root.json").read_bytes() == (tdir / "2.root.json").read_bytes()
    text = (stick / "INSTALL.txt").read_text()
    flat = " ".join(text.split())
    ids = sorted(json.loads(bundle("keys", "show", tdir, "--json").out)["root"]["keys"])
    assert f"root version 2: 1 of the root keys {', '.join(ids)})" in flat
    assert "trust init --root-metadata 2.root.json --root /srv/vault" in text
    assert " trust add " not in text
    host = tmp_path / "host"
    init = bundle("trust", "init", "--root-metadata", stick / "2.root.json", "--root", host)
    assert init.rc == 0, init.err
    done = bundle("verify", stick / signed.name, "--root", host)
    assert done.rc == 0, done.err


def test_a_stick_used_again_gets_the_new_install_txt(built: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """The next month's export onto the same stick: the INSTALL.txt an earlier export wrote
    is replaced (last, once everything else is written and read back); one a person wrote
    is still refused."""
    stick = tmp_path / "stick"
    stick.mkdir()
    rc, _doc, err = export(built["bundle"], stick, "--pub", built["pub"], "--kit",
                           built["dist"] / KIT)
    assert rc == 0, err
    key = load_pem_private_key(built["key"].read_bytes(), password=None)
    src = tmp_path / "src"
    src.mkdir()
    write_bundle(src / "vault-1.1.0.bundle", key,  # type: ignore[arg-type]
                 {"files/app.txt": b"v1.1\n"}, name="vault", version="1.1.0")
    rc, doc, err = export(src / "vault-1.1.0.bundle", stick, "--pub", built["pub"], "--kit",
                          built["dist"] / KIT)
    assert rc == 0, err
    status = {f["name"]: f["status"] for f in doc["files"]}  # type: ignore[attr-defined]
    assert status["INSTALL.txt"] == "replaced" and status["vault-1.1.0.bundle"] == "written"
    assert status[KIT] == "unchanged"
    assert " install vault-1.1.0.bundle " in (stick / "INSTALL.txt").read_text()

    (stick / "INSTALL.txt").write_text("my own notes about this stick\n")
    rc, doc, err = export(built["bundle"], stick, "--pub", built["pub"], "--kit",
                          built["dist"] / KIT)
    assert rc == ExportError.exit_code, err
    assert "INSTALL.txt already exists and is not the file this export writes" in str(
        doc["message"])
    assert (stick / "INSTALL.txt").read_text() == "my own notes about this stick\n"
