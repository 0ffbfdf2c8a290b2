"""Locking for the TARGET (pip-tools on a matching host, uv for another Python), bundle.lock,
and builds that resolve nothing and fetch nothing when the lock and cache are current."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

from tests.helpers import bundle, bundle_argv, make_wheel, offline
from tests.pyindex_server import serve, write_index

HOST = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[str]:
    """A local index: `webapp` needs `helper`, and `backport` only below Python 3.12."""
    built = tmp_path / "built"
    wheels = [
        make_wheel(built, "webapp", "1.0", {"webapp/__init__.py": "import helper\n"},
                   requires=("helper>=2", 'backport; python_version < "3.12"')),
        make_wheel(built, "helper", "2.0", {"helper/__init__.py": ""}),
        make_wheel(built, "helper", "2.1", {"helper/__init__.py": ""}),
        make_wheel(built, "backport", "0.5", {"backport/__init__.py": ""}),
        _sdist(built, "srconly", "1.0"),
    ]
    write_index(wheels, tmp_path / "index")
    with serve(tmp_path / "index") as url:
        yield url


def _sdist(out: Path, name: str, version: str) -> Path:
    """A real (tiny) sdist: a project that publishes no wheels at all."""
    import io
    import tarfile

    path = out / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in {"PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n",
                          "setup.py": "from setuptools import setup\nsetup()\n"}.items():
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def profile(base: Path, url: str, python: str, version: str = "1.0.0") -> Path:
    base.mkdir(parents=True, exist_ok=True)
    (base / "requirements.in").write_text("webapp\n")
    path = base / "bundle.yaml"
    path.write_text(textwrap.dedent(f"""\
        schema: 1
        name: web
        version: {version}
        target:
          python: "{python}"
          platform: manylinux_2_28_x86_64
        python:
          requirements_in: requirements.in
          index_url: {url}
        """))
    return path


def lock(path: Path, cache: Path) -> dict[str, object]:
    result = bundle("lock", path, "--cache-dir", cache, "--json")
    assert result.rc == 0, result.err
    doc: dict[str, object] = json.loads(result.out)
    return doc


def test_marker_dependency_follows_the_target_python(tmp_path: Path, index: str) -> None:
    host = lock(profile(tmp_path / "host", index, HOST), tmp_path / "cache")
    newer = lock(profile(tmp_path / "py312", index, "3.12"), tmp_path / "cache")
    names_host = {w["name"] for w in host["wheels"]}  # type: ignore[attr-defined]
    names_312 = {w["name"] for w in newer["wheels"]}  # type: ignore[attr-defined]
    assert names_host == {"webapp", "helper", "backport"}  # 3.11 < 3.12: the backport is in
    assert names_312 == {"webapp", "helper"}                # ... and out for 3.12
    assert {w["version"] for w in host["wheels"] if w["name"] == "helper"} == {"2.1"}  # type: ignore[attr-defined]
    lock_file = json.loads((tmp_path / "host" / "bundle.lock").read_text())
    assert all(len(w["sha256"]) == 64 for w in lock_file["python"])


def test_second_build_resolves_and_fetches_nothing_offline(tmp_path: Path, index: str,
                                                           keys: tuple[Path, Path]) -> None:
    path = profile(tmp_path / "p", index, HOST)
    cache = tmp_path / "cache"
    args = ["build", path, "--key", keys[0], "--out", tmp_path / "out", "--cache-dir", cache,
            "--json"]
    first = bundle(*args)
    assert first.rc == 0, first.err
    doc = json.loads(first.out)
    assert doc["locked"] is True and doc["fetched"] == 3
    # Bump the version: the lock stays current (resolution does not depend on it) ...
    path.write_text(path.read_text().replace("version: 1.0.0", "version: 1.0.1"))
    (second,) = offline(bundle_argv(*args))  # ... and no network is needed at all.
    assert second.rc == 0, second.err
    doc2 = json.loads(second.out)
    assert doc2["locked"] is False and doc2["fetched"] == 0
    assert "nothing to resolve" in second.err


def test_lost_cache_entry_is_fetched_again_exactly(tmp_path: Path, index: str,
                                                  keys: tuple[Path, Path]) -> None:
    path = profile(tmp_path / "p", index, HOST)
    cache = tmp_path / "cache"
    args = ["build", path, "--key", keys[0], "--out", tmp_path / "out", "--cache-dir", cache,
            "--json"]
    assert bundle(*args).rc == 0
    locked = json.loads((tmp_path / "p" / "bundle.lock").read_text())["python"]
    victim = next(w for w in locked if w["name"] == "helper")
    (cache / "objects" / victim["sha256"][:2] / victim["sha256"]).unlink()
    again = bundle(*args)
    assert again.rc == 0, again.err
    assert json.loads(again.out)["fetched"] == 1


def test_frozen_build_refuses_a_stale_lock(tmp_path: Path, index: str,
                                           keys: tuple[Path, Path]) -> None:
    path = profile(tmp_path / "p", index, HOST)
    lock(path, tmp_path / "cache")
    (tmp_path / "p" / "requirements.in").write_text("webapp\nbackport\n")
    result = bundle("build", path, "--key", keys[0], "--out", tmp_path / "out",
                    "--cache-dir", tmp_path / "cache", "--frozen")
    assert result.rc == 4 and "missing or out of date" in result.err


def test_lock_for_a_target_without_wheels_names_the_package(tmp_path: Path, index: str) -> None:
    base = tmp_path / "p"
    path = profile(base, index, "3.12")
    (base / "requirements.in").write_text("webapp\nnosuchpkg\n")
    result = bundle("lock", path, "--cache-dir", tmp_path / "cache")
    assert result.rc == 4
    assert "nosuchpkg" in result.err


@pytest.mark.parametrize("python", [HOST, "3.12"])
def test_sdist_only_package_fails_the_lock_naming_it(tmp_path: Path, index: str,
                                                     python: str) -> None:
    """Host target (pip-tools) and foreign target (uv) alike: no wheel, no bundle."""
    base = tmp_path / "p"
    path = profile(base, index, python)
    (base / "requirements.in").write_text("webapp\nsrconly\n")
    result = bundle("lock", path, "--cache-dir", tmp_path / "cache")
    assert result.rc == 4, result.err
    assert "srconly" in result.err.split("error:", 1)[1]


@pytest.mark.network
@pytest.mark.parametrize("python,tag", [("3.11", "cp311"), ("3.12", "cp312")])
def test_pandas_is_locked_with_wheels_for_each_target(tmp_path: Path, python: str,
                                                      tag: str) -> None:
    base = tmp_path / python
    base.mkdir()
    (base / "requirements.in").write_text("pandas==2.1.3\n")
    path = base / "bundle.yaml"
    path.write_text(f'schema: 1\nname: data\nversion: "1"\ntarget:\n  python: "{python}"\n'
                    "  platform: manylinux_2_28_x86_64\npython:\n"
                    "  requirements_in: requirements.in\n")
    doc = lock(path, tmp_path / "cache")
    files = {w["name"]: w["file"] for w in doc["wheels"]}  # type: ignore[attr-defined]
    assert "pandas" in files and "numpy" in files
    for name in ("pandas", "numpy"):
        tags = parse_wheel_filename(files[name])[3]
        assert {t.interpreter for t in tags} == {tag}, files[name]
        assert all(t.platform.startswith("manylinux") for t in tags)


def test_a_patch_version_marker_the_host_passes_is_relocked_for_the_target(
        tmp_path: Path) -> None:
    """redis needs async-timeout before CPython 3.11.3; Debian 12 ships 3.11.2. pip-compile on
    a newer patch leaves it out; the target is any X.Y.z (taken as X.Y.0), so the lock is
    redone with uv, and has it."""
    # On an X.Y.0 host the marker is true here too: pip-compile's lock is already complete.
    host_full = ".".join(map(str, sys.version_info[:3] if sys.version_info[2] else
                             (*sys.version_info[:2], 1)))
    built = tmp_path / "built"
    write_index([
        make_wheel(built, "client", "1.0", {"client/__init__.py": ""},
                   requires=(f'timeouts; python_full_version < "{host_full}"',)),
        make_wheel(built, "timeouts", "4.0", {"timeouts/__init__.py": ""}),
    ], tmp_path / "index")
    with serve(tmp_path / "index") as url:
        path = profile(tmp_path / "p", url, HOST)
        (tmp_path / "p" / "requirements.in").write_text("client\n")
        result = bundle("lock", path, "--cache-dir", tmp_path / "cache", "--json")
    assert result.rc == 0, result.err
    assert ("re-locking with uv for the target" in result.err) == (sys.version_info[2] > 0)
    assert {w["name"] for w in json.loads(result.out)["wheels"]} == {"client", "timeouts"}
