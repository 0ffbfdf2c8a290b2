"""The release venv: made and filled by uv's static binary (no `venv` module, no pip needed on
the host), with the host's `python -m venv` + pip as the logged fallback when no uv is found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bundler import tools
from bundler.errors import InstallError
from bundler.install import python_env
from tests.helpers import REPO, make_wheel, unavailable


def _wheelset(base: Path) -> tuple[Path, Path]:
    wheels = base / "wheels"
    whl = make_wheel(wheels, "tinygreet", "1.0",
                     {"tinygreet/__init__.py": "def greet():\n    return 'hi'\n",
                      "tinygreet/testing.py": "T = 1\n",
                      "tinygreet/tests/test_greet.py": "def test():\n    pass\n",
                      "tinygreet/py2.py": "print 'a Python 2 file'\n"})
    lock = base / "requirements.lock"
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    lock.write_text(f"tinygreet==1.0 --hash=sha256:{sha}\n")
    return wheels, lock


def _host_python() -> Path:
    return Path(getattr(sys, "_base_executable", sys.executable))


def _assert_made_by_uv(venv: Path) -> None:
    cfg = (venv / "pyvenv.cfg").read_text()
    assert any(line.startswith("uv = ") for line in cfg.splitlines()), cfg
    assert not list(venv.glob("lib/python*/site-packages/pip")), "uv venv must not seed pip"
    assert not (venv / "bin" / "pip").exists()
    done = subprocess.run([venv / "bin" / "python", "-c",
                           "import tinygreet; print(tinygreet.greet())"],
                          capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "hi", done.stderr


def test_uv_finder_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "my-uv"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("BUNDLER_UV", str(fake))
    assert tools.find_uv() == fake
    monkeypatch.setenv("BUNDLER_UV", str(tmp_path / "missing"))
    with pytest.raises(InstallError, match=r"BUNDLER_UV=.* is not an executable file"):
        tools.find_uv()
    monkeypatch.delenv("BUNDLER_UV")
    import uv

    assert tools.find_uv() == Path(uv.find_uv_bin())  # the wheel's binary


def test_venv_is_made_and_filled_by_uv_with_host_config_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels, lock = _wheelset(tmp_path)
    # Host uv configuration that would break an offline install if it were read.
    monkeypatch.setenv("UV_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("UV_NO_BINARY", "1")
    conf = tmp_path / "xdg" / "uv"
    conf.mkdir(parents=True)
    (conf / "uv.toml").write_text('index-url = "http://127.0.0.1:9/simple"\nno-binary = true\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    notes: list[str] = []
    log = python_env.create_venv(_host_python(), tmp_path / "venv", wheels, lock,
                                 tmp_path / "logs", notes.append)
    assert log == tmp_path / "logs" / "uv-pip-install.log"
    assert "tinygreet" in log.read_text()
    assert notes == []
    _assert_made_by_uv(tmp_path / "venv")
    # uv's unpacking cache beside the venv is gone; the venv's files, hard-linked from it, stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "requirements.lock", "venv",
                                                          "wheels", "xdg"]
    module = next((tmp_path / "venv").glob("lib/python*/site-packages/tinygreet/__init__.py"))
    assert module.stat().st_nlink == 1 and "def greet" in module.read_text()
    # bytecode for what services import, not for the package's own test suite, and a file
    # that is not Python 3 left out as pip and uv do
    assert sorted(p.name.split(".")[0] for p in module.parent.glob("__pycache__/*.pyc")) == [
        "__init__", "testing"]
    assert not (module.parent / "tests" / "__pycache__").exists()
    assert "compiled 2 file(s); 1 not valid Python 3, left out" in log.read_text()


def test_pip_is_the_logged_fallback_without_uv(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    wheels, lock = _wheelset(tmp_path)
    monkeypatch.setattr(tools, "find_uv", lambda: None)
    notes: list[str] = []
    log = python_env.create_venv(_host_python(), tmp_path / "venv", wheels, lock,
                                 tmp_path / "logs", notes.append)
    assert log.name == "pip-install.log" and "tinygreet" in log.read_text()
    assert notes == [python_env.PIP_FALLBACK_NOTE]
    assert "uv = " not in (tmp_path / "venv" / "pyvenv.cfg").read_text()


def test_a_wheel_that_does_not_match_its_hash_fails_in_one_line(tmp_path: Path) -> None:
    wheels, lock = _wheelset(tmp_path)
    lock.write_text("tinygreet==1.0 --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(InstallError) as info:
        python_env.create_venv(_host_python(), tmp_path / "venv", wheels, lock,
                               tmp_path / "logs")
    err = info.value
    assert "\n" not in err.message, err.message
    assert err.message.startswith("installing Python packages failed: uv pip install exited")
    assert "hash" in err.message.lower(), err.message
    assert str(tmp_path / "logs" / "uv-pip-install.log") in (err.hint or "")
    assert not (tmp_path / ".uv-unpack").exists()


# A Debian host with python3 but without python3-venv and python3-pip: the host's real
# /usr/bin/python3.X, with its venv, ensurepip and pip packages replaced (bind mounts in a
# private mount namespace) by one whose import fails, as a bare server's would.
_BARE = textwrap.dedent("""\
    set -e
    mount --make-rprivate /
    for d in "$@"; do mount --bind "$EMPTY" "$d"; done
    exec "$PY" -c "$SCRIPT"
    """)
_RUN = textwrap.dedent("""\
    import json, subprocess, sys
    sys.path.insert(0, {repo!r})
    probe = subprocess.run([{host!r}, "-c", "import venv"], capture_output=True)
    pip = subprocess.run([{host!r}, "-m", "pip", "--version"], capture_output=True)
    from pathlib import Path
    from bundler.install import python_env
    log = python_env.create_venv(Path({host!r}), Path({venv!r}), Path({wheels!r}),
                                 Path({lock!r}), Path({logs!r}))
    print(json.dumps({{"venv_module": probe.returncode == 0, "pip": pip.returncode == 0,
                      "log": str(log)}}))
    """)


@pytest.mark.netns  # a mount namespace (unshare -m) hides venv and pip
def test_uv_makes_the_venv_for_a_python_without_venv_and_pip(tmp_path: Path) -> None:
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    host = Path(f"/usr/bin/python{minor}")
    stdlib = Path(f"/usr/lib/python{minor}")
    if os.geteuid() != 0 or shutil.which("unshare") is None or not host.exists():
        unavailable(f"needs root, unshare and a Debian /usr/bin/python{minor}")
    hide = [p for p in (stdlib / "venv", stdlib / "ensurepip",
                        Path("/usr/lib/python3/dist-packages/pip")) if p.is_dir()]
    wheels, lock = _wheelset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "__init__.py").write_text("raise ImportError('not installed on this host')\n")
    script = _RUN.format(repo=str(REPO), host=str(host), venv=str(tmp_path / "venv"),
                         wheels=str(wheels), lock=str(lock), logs=str(tmp_path / "logs"))
    done = subprocess.run(["unshare", "-m", "sh", "-c", _BARE, "bare", *map(str, hide)],
                          env={**os.environ, "EMPTY": str(empty), "PY": sys.executable,
                               "SCRIPT": script},
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"venv_module": False, "pip": False,
                   "log": str(tmp_path / "logs" / "uv-pip-install.log")}
    _assert_made_by_uv(tmp_path / "venv")
    assert f"home = {host.parent}" in (tmp_path / "venv" / "pyvenv.cfg").read_text()


def test_bytecode_that_cannot_be_written_fails_in_one_line(tmp_path: Path) -> None:
    # a regular file where the package's __pycache__ directory must go: the .pyc cannot be
    # written, as on a full disk; not a file to leave out like one that is not Python 3
    wheels = tmp_path / "wheels"
    whl = make_wheel(wheels, "tinygreet", "1.0",
                     {"tinygreet/__init__.py": "def greet():\n    return 'hi'\n",
                      "tinygreet/__pycache__": "not a directory\n"})
    lock = tmp_path / "requirements.lock"
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    lock.write_text(f"tinygreet==1.0 --hash=sha256:{sha}\n")
    with pytest.raises(InstallError) as info:
        python_env.create_venv(_host_python(), tmp_path / "venv", wheels, lock,
                               tmp_path / "logs")
    err = info.value
    assert "\n" not in err.message, err.message
    assert err.message.startswith("installing Python packages failed: compile bytecode exited "
                                  "1: NotADirectoryError"), err.message
    assert "free space in the install root" in (err.hint or ""), err.hint
    assert not (tmp_path / ".uv-unpack").exists()
