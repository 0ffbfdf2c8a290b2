"""The kit on Debian 11's own python3, CPython 3.9 (issue 22): a bare bullseye container
(`tests.bare_image` "bullseye": minbase plus python3, nothing else) with `--network none` and
only the stick mounted.

- every module the kit carries imports there, from the tree the kit unpacked;
- a process bundle whose `target.python` is 3.9, exported by `bundle export` (which builds the
  kit for the bundle's Python: `cp39` in its name), verifies, installs, upgrades and rolls back
  through that kit, its service answering on the host's own python3.9 — on the bare host plus
  `python3-distutils` (uv refuses a 3.9 without it); on the bare host itself preflight refuses
  it first, naming that package;
- a bundle for a Python the host lacks is refused before anything is written, naming the
  package Debian installs for it (read from the host's /etc/os-release);
- the same lifecycle on Debian 13's bare host (`trixie`: python3 3.13, nothing else) with the
  cp313 kit `bundle export` makes for a 3.13 bundle.

The kit's wheels for CPython 3.9 come from the package index on the first run (network), into
the persistent bundler cache beside the bare images; `bundle export` reuses that kit while
bundler's target-side code is the same. The images come from the Debian mirror, cached.
"""

from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bundler.build.kit import target_modules
from bundler.errors import PolicyError
from tests import bare_image
from tests.bare_target import STICK, BareHost, BareTargets, run_kit
from tests.helpers import Project, Run, bundle, make_project

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]

VARIANT = "bullseye"
WITH_DISTUTILS = "bullseye-distutils"  # plus python3-distutils: uv's need for a 3.9 venv
PYTHON = "3.9"  # Debian 11's python3
TRIXIE, TRIXIE_PYTHON = "trixie", "3.13"  # Debian 13 and its python3 (tests.bare_image)
KIT_CACHE = "/var/cache/bundler-kit"  # where the kit unpacks as root (docs/kit.md)


def ok(result: Run) -> Run:
    assert result.rc == 0, result.out + result.err
    return result


def bundler_cache() -> Path:
    """The bundler cache shared across runs (content-addressed), beside the bare images."""
    path = bare_image.cache_dir() / "bundler-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def profile_for(project: Project, version: str, python: str, sequence: int) -> Path:
    """The test app's profile, for CPython `python` (its wheel is pure: py3-none-any)."""
    path = project.profile(version, sequence=sequence)
    host = f'python: "{sys.version_info[0]}.{sys.version_info[1]}"'
    text = path.read_text()
    assert host in text
    path.write_text(text.replace(host, f'python: "{python}"'))
    return path


@dataclass(frozen=True)
class Sticks:
    root: Path          # mounted read-only at /stick
    kit: Path           # the kit export wrote (the same file on both sticks)
    v1: str             # the bundles, as the host sees them
    v2: str
    project: Project


def _build(project: Project, version: str, sequence: int, key: Path, out: Path,
           python: str = PYTHON) -> Path:
    done = ok(bundle("build", profile_for(project, version, python, sequence), "--key", key,
                     "--out", out, "--cache-dir", out.parent / "build-cache", "--json"))
    return Path(json.loads(done.out)["bundle"])


def _export(bundle_path: Path, stick: Path, pub: Path) -> dict[str, object]:
    done = ok(bundle("export", bundle_path, stick, "--pub", pub, "--cache-dir",
                     bundler_cache(), "--json", timeout=1200))
    doc: dict[str, object] = json.loads(done.out)
    return doc


def _sticks(base: Path, keys: tuple[Path, Path], python: str) -> Sticks:
    """Two releases of a process bundle for CPython `python`, each exported onto its own stick
    (both under one mount point); the kit `bundle export` made for them."""
    project = make_project(base / "project")
    key, pub = keys
    root = base / "sticks"
    docs = {}
    for seq, version in enumerate(("1.0.0", "1.1.0"), start=1):
        built = _build(project, version, seq, key, base / f"dist{seq}", python)
        (root / f"v{seq}").mkdir(parents=True)
        docs[version] = _export(built, root / f"v{seq}", pub)
    kits = {Path(str(d["kit"])).name for d in docs.values()}
    assert len(kits) == 1, kits  # the second export took the kit the first one made
    (name,) = kits
    return Sticks(root, root / "v1" / name, f"{STICK}/v1/shop-1.0.0.bundle",
                  f"{STICK}/v2/shop-1.1.0.bundle", project)


@pytest.fixture(scope="module")
def sticks(tmp_path_factory: pytest.TempPathFactory,
           keys_module: tuple[Path, Path]) -> Sticks:
    """The 3.9 bundles for Debian 11."""
    return _sticks(tmp_path_factory.mktemp("bullseye"), keys_module, PYTHON)


@pytest.fixture(scope="module")
def sticks_313(tmp_path_factory: pytest.TempPathFactory,
               keys_module: tuple[Path, Path]) -> Sticks:
    """The same app for Debian 13's python3, CPython 3.13."""
    return _sticks(tmp_path_factory.mktemp("trixie"), keys_module, TRIXIE_PYTHON)


@pytest.fixture(scope="module")
def keys_module(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("keys")
    ok(bundle("keygen", out / "release"))
    return out / "release.key", out / "release.pub"


def test_the_bare_host_is_debian_11_with_python_39(bare_target: BareTargets) -> None:
    host = bare_target(VARIANT)
    assert ok(host.run("python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"
                       )).out.strip() == PYTHON
    assert 'VERSION_ID="11"' in ok(host.run("cat", "/etc/os-release")).out
    for absent in ("pip3", "node", "docker", "psql"):
        assert host.sh(f"command -v {absent}").rc != 0, absent
    assert host.run("python3", "-c", "import venv, ensurepip").rc != 0  # no python3-venv


def test_export_builds_the_kit_for_the_bundles_python(sticks: Sticks) -> None:
    assert sticks.kit.name == "bundler-kit-0.1.0-cp39-manylinux_2_28_x86_64.pyz"
    with zipfile.ZipFile(sticks.kit) as zf:
        meta = json.loads(zf.read("kit.json"))
        sos = [n for n in zf.namelist() if n.endswith(".so")]
    assert meta["python"] == PYTHON
    # its compiled wheels are 3.9's (cffi's backend, zstandard), or abi3 (cryptography)
    assert any("cpython-39-" in n for n in sos), sos
    assert not [n for n in sos if "cpython-3" in n and "cpython-39-" not in n], sos
    packages = {p.split("==")[0].lower(): p.split("==")[1] for p in meta["packages"]}
    assert packages["click"].startswith("8.1."), packages  # click 8.2+ needs 3.10


def _kit_modules(kit: Path) -> list[str]:
    with zipfile.ZipFile(kit) as zf:
        files = [n[len("site/"):] for n in zf.namelist()
                 if n.startswith("site/bundler/") and n.endswith(".py")]
    return sorted(f[:-3].replace("/", ".").removesuffix(".__init__") for f in files)


def test_every_kit_module_imports_on_python_39(bare_target: BareTargets,
                                               sticks: Sticks) -> None:
    modules = _kit_modules(sticks.kit)
    assert modules == sorted(target_modules())  # what the kit carries, all of it
    host = bare_target(VARIANT, stick=sticks.root)
    ok(run_kit(host, sticks.kit, "--version"))
    (tree,) = ok(host.run("ls", KIT_CACHE)).out.split()
    script = ("import importlib, sys\n"
              f"sys.path[:0] = [{KIT_CACHE + '/' + tree!r}]\n"
              "failed = []\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except BaseException as exc:\n"
              "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
              "print(sys.version_info[:2], len(sys.argv) - 1, 'imported')\n"
              "sys.exit('\\n'.join(failed) or None)\n")
    done = ok(host.run("python3", "-I", "-S", "-c", script, *modules))
    assert done.out.strip() == f"(3, 9) {len(modules)} imported"


def _health(host: BareHost, port: int) -> dict[str, object]:
    done = ok(host.run("python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                       f"'http://127.0.0.1:{port}/health', timeout=10).read().decode())"))
    doc: dict[str, object] = json.loads(done.out)
    return doc


def _current(host: BareHost, kit: Path, root: str) -> str:
    doc = json.loads(ok(run_kit(host, kit, "status", "--root", root, "--json")).out)
    return str(doc["current"]["version"])


def _install_upgrade_roll_back(host: BareHost, sticks: Sticks, python: str) -> None:
    """Through the exported kit, offline: trust, verify, install 1.0.0, upgrade to 1.1.0, roll
    back; the service answers on the host's own python`python`."""
    kit, app, port = sticks.kit, "/srv/shop", sticks.project.port
    ok(run_kit(host, kit, "trust", "add", f"{STICK}/v1/release.pub", "--root", app))
    verified = json.loads(ok(run_kit(host, kit, "verify", sticks.v1, "--root", app,
                                     "--json")).out)
    assert verified["ok"] is True
    ok(run_kit(host, kit, "install", sticks.v1, "--root", app))
    assert _health(host, port) == {"greeting": "hello from a wheel", "version": "1.0.0"}
    venv_python = ok(host.sh(f"readlink -f {app}/current/venv/bin/python")).out.strip()
    assert venv_python.endswith(f"python{python}"), venv_python

    ok(run_kit(host, kit, "install", sticks.v2, "--root", app))
    assert _health(host, port)["version"] == "1.1.0"
    assert _current(host, kit, app) == "1.1.0"

    rolled = ok(run_kit(host, kit, "rollback", "--root", app))
    assert "rolled back from 1.1.0 to 1.0.0" in rolled.out + rolled.err
    assert _health(host, port)["version"] == "1.0.0"
    assert _current(host, kit, app) == "1.0.0"


def test_a_39_process_bundle_installs_upgrades_and_rolls_back(
        bare_target: BareTargets, sticks: Sticks) -> None:
    _install_upgrade_roll_back(bare_target(WITH_DISTUTILS, stick=sticks.root), sticks, PYTHON)


def test_a_313_process_bundle_installs_upgrades_and_rolls_back_on_debian_13(
        bare_target: BareTargets, sticks_313: Sticks) -> None:
    """Debian 13's bare host (python3 3.13, nothing else), with the cp313 kit export made."""
    assert "cp313" in sticks_313.kit.name, sticks_313.kit.name
    host = bare_target(TRIXIE, stick=sticks_313.root)
    assert 'VERSION_ID="13"' in ok(host.run("cat", "/etc/os-release")).out
    _install_upgrade_roll_back(host, sticks_313, TRIXIE_PYTHON)


def test_a_bundle_for_a_python_the_host_lacks_names_debians_package(
        bare_target: BareTargets, sticks: Sticks, keys_module: tuple[Path, Path],
        tmp_path: Path) -> None:
    """Preflight, on the host's own 3.9 kit: the bundle wants CPython 3.12, which Debian 11's
    host does not have: refused before the root is touched, naming `python3.12`."""
    stick = tmp_path / "stick"
    built = _build(sticks.project, "2.0.0", 3, keys_module[0], stick, python="3.12")
    (stick / "release.pub").write_bytes(keys_module[1].read_bytes())
    kit = stick / sticks.kit.name
    kit.write_bytes(sticks.kit.read_bytes())
    host = bare_target(VARIANT, stick=stick)
    app = "/srv/shop"
    ok(run_kit(host, kit, "trust", "add", f"{STICK}/release.pub", "--root", app))
    before = ok(host.sh(f"find {app} | sort")).out
    refused = run_kit(host, kit, "install", f"{STICK}/{built.name}", "--root", app, "--json")
    assert refused.rc == PolicyError.exit_code, refused.out + refused.err
    doc = json.loads(refused.out)
    assert "needs Python 3.12 on the host" in doc["message"], doc
    assert "apt-get install python3.12" in doc["hint"] and "Debian" in doc["hint"], doc
    assert ok(host.sh(f"find {app} | sort")).out == before


def test_without_distutils_preflight_names_debians_package(bare_target: BareTargets,
                                                           sticks: Sticks) -> None:
    """The bare Debian 11 host has python3 but not its distutils, without which uv cannot make
    the release's 3.9 venv: refused before the root is touched, naming the package."""
    host = bare_target(VARIANT, stick=sticks.root)
    app = "/srv/shop"
    ok(run_kit(host, sticks.kit, "trust", "add", f"{STICK}/v1/release.pub", "--root", app))
    before = ok(host.sh(f"find {app} | sort")).out
    refused = run_kit(host, sticks.kit, "install", sticks.v1, "--root", app, "--json")
    assert refused.rc == PolicyError.exit_code, refused.out + refused.err
    doc = json.loads(refused.out)
    assert "has no distutils, which uv needs" in doc["message"], doc
    assert doc["hint"] == ("install it (`apt-get install python3-distutils` on Debian GNU/Linux "
                           "11 (bullseye))"), doc
    assert ok(host.sh(f"find {app} | sort")).out == before
