"""Locking for the TARGET (uv by default, pip-tools when the profile asks for it on a matching
host), bundle.lock and its staleness digest, and builds that resolve nothing and fetch nothing
when the lock and cache are current."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

from bundler.build import lockfile
from bundler.build.profile import load_profile
from bundler.errors import BuildError, ProfileError
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


def profile(base: Path, url: str, python: str, version: str = "1.0.0",
            extra: str = "") -> Path:
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
        """) + extra)
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


@pytest.mark.netns  # the second build runs under unshare -n
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
    assert result.rc == BuildError.exit_code and "missing or out of date" in result.err


def test_lock_for_a_target_without_wheels_names_the_package(tmp_path: Path, index: str) -> None:
    base = tmp_path / "p"
    path = profile(base, index, "3.12")
    (base / "requirements.in").write_text("webapp\nnosuchpkg\n")
    result = bundle("lock", path, "--cache-dir", tmp_path / "cache")
    assert result.rc == BuildError.exit_code
    assert "nosuchpkg" in result.err


@pytest.mark.parametrize("python,resolver", [(HOST, "uv"), ("3.12", "uv"), (HOST, "pip-tools")])
def test_sdist_only_package_fails_the_lock_naming_it(tmp_path: Path, index: str,
                                                     python: str, resolver: str) -> None:
    """uv (any target) and pip-tools (this host) alike: no wheel, no bundle."""
    base = tmp_path / "p"
    path = profile(base, index, python, extra=f"  resolver: {resolver}\n")
    (base / "requirements.in").write_text("webapp\nsrconly\n")
    result = bundle("lock", path, "--cache-dir", tmp_path / "cache")
    assert result.rc == BuildError.exit_code, result.err
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


@pytest.mark.parametrize("resolver", ["uv", "pip-tools"])
def test_a_patch_version_marker_the_host_passes_is_relocked_for_the_target(
        tmp_path: Path, resolver: str) -> None:
    """redis needs async-timeout before CPython 3.11.3; Debian 12 ships 3.11.2. pip-compile on
    a newer patch leaves it out; the target is any X.Y.z (taken as X.Y.0), so the completeness
    check finds the gap and the lock is redone with uv, and has it. uv (the default) gets it
    right the first time."""
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
        path = profile(tmp_path / "p", url, HOST, extra=f"  resolver: {resolver}\n")
        (tmp_path / "p" / "requirements.in").write_text("client\n")
        result = bundle("lock", path, "--cache-dir", tmp_path / "cache", "--json")
    assert result.rc == 0, result.err
    relocked = "re-locking with uv for the target" in result.err
    assert relocked == (resolver == "pip-tools" and sys.version_info[2] > 0)
    assert ("with pip-tools" in result.err) == (resolver == "pip-tools")
    assert {w["name"] for w in json.loads(result.out)["wheels"]} == {"client", "timeouts"}


def test_uv_is_the_default_and_pip_tools_is_refused_for_a_foreign_target(
        tmp_path: Path, index: str) -> None:
    host = bundle("lock", profile(tmp_path / "h", index, HOST), "--cache-dir", tmp_path / "c")
    assert host.rc == 0, host.err
    assert "with uv for CPython" in host.err and "pip-tools" not in host.err
    foreign = bundle("lock", profile(tmp_path / "f", index, "3.12",
                                     extra="  resolver: pip-tools\n"),
                     "--cache-dir", tmp_path / "c")
    assert foreign.rc == BuildError.exit_code
    assert "pip-tools resolves for this host only" in foreign.err


def test_resolver_is_validated_with_file_and_line(tmp_path: Path) -> None:
    path = profile(tmp_path / "p", "http://127.0.0.1:9/simple/", HOST,
                   extra="  resolver: poetry\n")
    result = bundle("validate", path)
    assert result.rc == ProfileError.exit_code
    assert f"{path}:10" in result.err and "python.resolver" in result.err
    assert "uv, pip-tools" in result.err


# ------------------------------------------------------------------- the staleness digest

_SPEC_PROFILE = """\
schema: 1
name: web
version: 1.0.0
target:
  python: "3.11"
  platform: manylinux_2_28_x86_64
python:
  requirements_in: requirements.in
  index_url: http://127.0.0.1:9/simple/
  find_links: [wheels]
npm:
  - project: web
    registry: http://127.0.0.1:9/npm/
images:
  - ref: local/app:1
    source: archive
    archive: app.tar
runtimes:
  node: "20"
"""


def _different(value: object, type_name: str, tmp: Path, n: int) -> object:
    """Another value of a spec field's type (the test fails for a type it does not know, so
    a new kind of field gets looked at)."""
    def new_file() -> Path:
        f = tmp / f"other-{n}.txt"
        f.write_text(f"other {n}\n")
        return f

    match type_name:
        case "bool":
            return not value
        case "int":
            assert isinstance(value, int)
            return value + 1
        case "str":
            return f"{value}-changed"
        case "str | None":
            return "http://127.0.0.1:9/other/" if value is None else None
        case "Path" | "Path | None":
            return new_file()
        case "tuple[str, ...]":
            assert isinstance(value, tuple)
            return (*value, "http://127.0.0.1:9/more/")
        case "tuple[tuple[str, str], ...]":
            assert isinstance(value, tuple)
            return (*value, ("CHANGED", "1"))
    raise AssertionError(f"teach this test to change a field of type {type_name}")


def test_changing_any_field_of_any_spec_makes_the_lock_stale(tmp_path: Path) -> None:
    base = tmp_path / "p"
    (base / "web").mkdir(parents=True)
    (base / "wheels").mkdir()
    (base / "requirements.in").write_text("webapp\n")
    (base / "app.tar").write_bytes(b"not really an image")
    path = base / "bundle.yaml"
    path.write_text(_SPEC_PROFILE)
    prof = load_profile(path, check_files=False)
    assert prof.python is not None and prof.npm and prof.images and prof.runtimes
    digest = lockfile.inputs_digest(prof)
    assert lockfile.inputs_digest(load_profile(path, check_files=False)) == digest  # stable
    # What is not resolved does not matter: a new version keeps the lock.
    assert lockfile.inputs_digest(dataclasses.replace(prof, version="9")) == digest
    specs: dict[str, object] = {"target": prof.target, "python": prof.python,
                                "npm": prof.npm[0], "images": prof.images[0],
                                "runtimes": prof.runtimes}
    changed = []
    n = 0
    for where, spec in specs.items():
        assert dataclasses.is_dataclass(spec) and not isinstance(spec, type)
        for field in dataclasses.fields(spec):
            n += 1
            other = dataclasses.replace(  # type: ignore[type-var]
                spec, **{field.name: _different(getattr(spec, field.name), str(field.type),
                                                tmp_path, n)})
            if where in ("npm", "images"):
                variant = dataclasses.replace(prof, **{where: (other,)})
            else:
                variant = dataclasses.replace(prof, **{where: other})
            assert lockfile.inputs_digest(variant) != digest, f"{where}.{field.name}"
            changed.append(f"{where}.{field.name}")
    assert "python.find_links" in changed and "python.resolver" in changed
    # The content of a requirements file counts, not only its name.
    (base / "requirements.in").write_text("webapp\nhelper\n")
    assert lockfile.inputs_digest(load_profile(path, check_files=False)) != digest


def test_frozen_build_refuses_a_lock_made_with_other_find_links(
        tmp_path: Path, index: str, keys: tuple[Path, Path]) -> None:
    (tmp_path / "p" / "more").mkdir(parents=True)
    path = profile(tmp_path / "p", index, HOST)
    lock(path, tmp_path / "cache")
    path.write_text(path.read_text() + "  find_links: [more]\n")
    result = bundle("build", path, "--key", keys[0], "--out", tmp_path / "out",
                    "--cache-dir", tmp_path / "cache", "--frozen")
    assert result.rc == BuildError.exit_code and "missing or out of date" in result.err


# --------------------------------------------------------------- progress stays out of pipes

_CONTROL = set(range(0x00, 0x20)) - {0x0A, 0x09}  # anything but newline and tab


def _controls(text: str) -> list[str]:
    return sorted({repr(ch) for ch in text if ord(ch) in _CONTROL or ch == "\x7f"})


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_lock_and_build_print_plain_lines_in_a_pipe_and_with_json(
        tmp_path: Path, index: str, keys: tuple[Path, Path]) -> None:
    """No spinner, bar, colour or carriage return where a program reads the output: in a pipe
    (with or without --json), and with --json even on a terminal."""
    import os
    import pty
    import subprocess

    path = profile(tmp_path / "p", index, HOST)
    piped = bundle("lock", path, "--cache-dir", tmp_path / "c1")
    assert piped.rc == 0, piped.err
    assert "==> Resolving Python requirements" in piped.err
    assert _controls(piped.out + piped.err) == []
    built = bundle("build", path, "--key", keys[0], "--out", tmp_path / "out", "--cache-dir",
                   tmp_path / "c1", "--json")
    assert built.rc == 0, built.err
    assert _controls(built.out + built.err) == []
    # --json on a terminal: stdout and stderr are a pty here
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    child = subprocess.Popen(bundle_argv("lock", path, "--cache-dir", tmp_path / "c2",
                                         "--json"), stdin=subprocess.DEVNULL, stdout=terminal,
                             stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert child.wait(timeout=120) == 0
    os.close(controller)
    seen = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")  # the tty's
    assert '"wheels"' in seen and "==> Resolving" in seen
    assert _controls(seen) == []
