"""build → install, end to end: real pip, real venvs, real processes; the install side runs
under `unshare -n` (no network at all)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from bundler.errors import (
    BuildError,
    IntegrityError,
    PolicyError,
    RolledBackError,
    SignatureError,
    SigningKeyError,
)
from tests.bundles import data_offsets
from tests.helpers import Project, bundle, bundle_argv, make_wheel, offline

pytestmark = pytest.mark.slow


def build(project: Project, keys: tuple[Path, Path], cache: Path, version: str = "1.0.0",
          **kw: object) -> Path:
    profile = project.profile(version, **kw)  # type: ignore[arg-type]
    result = bundle("build", profile, "--key", keys[0], "--out", project.dir / "dist",
                    "--cache-dir", cache, "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


def test_build_then_install_offline_serves_the_app(project: Project, keys: tuple[Path, Path],
                                                   cache_dir: Path, tmp_path: Path,
                                                   roots: list[Path]) -> None:
    path = build(project, keys, cache_dir)
    root = tmp_path / "target"
    roots.append(root)
    install, status, again = offline(
        bundle_argv("install", path, "--trust", keys[1], "--root", root, "--json"),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("install", path, "--trust", keys[1], "--root", root, "--json"),
    )
    assert install.rc == 0, install.err
    assert json.loads(install.out)["checks"][0]["ok"] is True
    st = json.loads(status.out)
    assert status.rc == 0 and st["healthy"] is True, status.out
    assert st["current"]["version"] == "1.0.0" and st["product"] == "shop"
    # The app answered with the greeting from the bundled wheel: the venv is real.
    assert "GET http://127.0.0.1:" in st["checks"][0]["detail"]
    assert (root / "current").resolve() == root / "releases" / "1.0.0"
    assert "tinygreet" in (root / "releases/1.0.0/logs/uv-pip-install.log").read_text()
    # Re-running the same bundle is a no-op that keeps it running.
    assert again.rc == 0 and json.loads(again.out)["status"] == "unchanged"


def test_status_names_the_release_and_history_lists_steps(project: Project, cache_dir: Path,
                                                          keys: tuple[Path, Path],
                                                          tmp_path: Path,
                                                          roots: list[Path]) -> None:
    path = build(project, keys, cache_dir)
    root = tmp_path / "target"
    roots.append(root)
    install, status = offline(
        bundle_argv("install", path, "--trust", keys[1], "--root", root),
        bundle_argv("status", "--root", root))
    assert install.rc == 0, install.err
    assert "shop 1.0.0" in status.out and "healthy" in status.out
    hist = bundle("history", "--root", root, "--json")
    steps = [(e["step"], e["status"]) for e in json.loads(hist.out)["events"]]
    assert steps == [("verify", "done"), ("store", "added"), ("python", "started"),
                     ("python", "installed"),
                     ("python", "done"), ("audit", "recorded"),
                     ("start", "started"), ("start", "done"), ("health", "done"),
                     ("commit", "done"), ("boot", "none")]  # no systemd here: docs/boot.md


def test_tampered_bundle_is_refused_and_root_stays_empty(project: Project, cache_dir: Path,
                                                         keys: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    path = build(project, keys, cache_dir)
    original = path.read_bytes()
    for member, (offset, size) in data_offsets(path).items():
        data = bytearray(original)
        data[offset + size // 2] ^= 0x20
        bad = tmp_path / "bad.bundle"
        bad.write_bytes(bytes(data))
        root = tmp_path / "root-never-created"
        verify, install = offline(
            bundle_argv("verify", bad, "--trust", keys[1]),
            bundle_argv("install", bad, "--trust", keys[1], "--root", root))
        for result in (verify, install):
            errors = [ln for ln in result.err.splitlines() if ln.startswith("error:")]
            if member == "envelope.json":
                assert result.rc == SignatureError.exit_code, result.err
            else:
                assert result.rc == IntegrityError.exit_code, result.err
                assert errors == [f"error: bad.bundle: member '{member}' does not match its "
                                  "signed sha256"]
            assert len(errors) == 1
        assert not root.exists(), f"{member}: install left {list(root.rglob('*'))}"


def test_root_that_exists_is_left_exactly_as_it_was(project: Project, cache_dir: Path,
                                                    keys: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    path = build(project, keys, cache_dir)
    data = bytearray(path.read_bytes())
    offset, size = data_offsets(path)["files/app/server.py"]
    data[offset + size - 1] ^= 1
    path.write_bytes(bytes(data))
    root = tmp_path / "existing"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    (install,) = offline(bundle_argv("install", path, "--trust", keys[1], "--root", root))
    assert install.rc == IntegrityError.exit_code
    assert sorted(p.name for p in root.iterdir()) == ["keep.txt"]


def test_upgrade_then_unhealthy_release_rolls_back(project: Project, cache_dir: Path,
                                                  keys: tuple[Path, Path], tmp_path: Path,
                                                  roots: list[Path]) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", sequence=1)
    v2 = build(project, keys, cache_dir, "2.0.0", sequence=2)
    v3 = build(project, keys, cache_dir, "3.0.0", sequence=3, healthy=False)
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    r1, r2, s2, r3, s3 = offline(
        bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("install", v3, *trust), bundle_argv("status", "--root", root, "--json"))
    assert (r1.rc, r2.rc) == (0, 0), r1.err + r2.err
    assert json.loads(s2.out)["current"]["version"] == "2.0.0"
    assert r3.rc == RolledBackError.exit_code, r3.err
    assert "error: 3.0.0 failed and was rolled back to 2.0.0: health check 'web' failed" in r3.err
    after = json.loads(s3.out)
    assert after["current"]["version"] == "2.0.0" and after["healthy"] is True
    statuses = {r["version"]: r["status"] for r in after["releases"]}
    assert statuses == {"1.0.0": "superseded", "2.0.0": "active", "3.0.0": "rolled_back"}
    report = json.loads((root / "releases/3.0.0/report.json").read_text())
    assert report["outcome"] == "rolled back" and report["checks"][0]["ok"] is False
    assert "health check 'web' failed" in report["reason"]
    checklist = (root / "releases/3.0.0/REPORT.md").read_text()
    assert "# shop 3.0.0: rolled back" in checklist
    assert "- [ ] web (http): GET http://127.0.0.1:" in checklist
    assert "- [x] start: done" in checklist
    good = (root / "releases/2.0.0/REPORT.md").read_text()
    assert "# shop 2.0.0: installed" in good and "- [x] commit: done" in good


def test_replayed_older_bundle_is_refused_unless_allowed(project: Project, cache_dir: Path,
                                                        keys: tuple[Path, Path],
                                                        tmp_path: Path,
                                                        roots: list[Path]) -> None:
    old = build(project, keys, cache_dir, "1.0.0", sequence=5)
    new = build(project, keys, cache_dir, "1.1.0", sequence=6)
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    r_new, r_old, r_forced = offline(
        bundle_argv("install", new, *trust), bundle_argv("install", old, *trust),
        bundle_argv("install", old, *trust, "--allow-downgrade"))
    assert r_new.rc == 0, r_new.err
    assert r_old.rc == PolicyError.exit_code and "not newer than the last accepted (6)" in r_old.err
    assert r_forced.rc == 0, r_forced.err


def test_wrong_or_missing_key(project: Project, cache_dir: Path, keys: tuple[Path, Path],
                              tmp_path: Path) -> None:
    missing = bundle("build", project.profile(), "--key", tmp_path / "nope.key",
                     "--out", tmp_path / "out", "--cache-dir", cache_dir)
    assert missing.rc == SigningKeyError.exit_code and "cannot read signing key" in missing.err
    assert not (tmp_path / "out").exists()
    path = build(project, keys, cache_dir)
    other = tmp_path / "other"
    assert bundle("keygen", other).rc == 0
    root = tmp_path / "root"
    (result,) = offline(bundle_argv("install", path, "--trust", f"{other}.pub", "--root", root))
    assert result.rc == SignatureError.exit_code and "which is not trusted" in result.err
    assert not root.exists()


def test_supervisor_restarts_a_crashed_service(project: Project, cache_dir: Path,
                                               keys: tuple[Path, Path], tmp_path: Path,
                                               roots: list[Path]) -> None:
    path = build(project, keys, cache_dir)
    root = tmp_path / "target"
    roots.append(root)
    (install,) = offline(bundle_argv("install", path, "--trust", keys[1], "--root", root))
    assert install.rc == 0, install.err
    supervisor = int((root / "releases/1.0.0/run/web.pid").read_text().split()[0])
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 15
    new: list[str] = []
    while time.monotonic() < deadline:
        new = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        if new and new != children:
            break
        time.sleep(0.2)
    assert new and new != children, "the supervisor did not restart the service"
    assert "exited with -9; restarting" in (root / "releases/1.0.0/logs/web.log").read_text()
    stop = bundle("stop", "--root", root)
    assert stop.rc == 0
    assert not (root / "releases/1.0.0/run/web.pid").exists()


def test_wheel_only_for_another_python_fails_the_build(project: Project, cache_dir: Path,
                                                       keys: tuple[Path, Path]) -> None:
    whl = make_wheel(project.wheelhouse, "fastthing", "2.0",
                     {"fastthing/__init__.py": ""}, tag="cp399-cp399-manylinux_2_17_x86_64")
    del whl
    (project.dir / "requirements.txt").write_text("fastthing==2.0\n")
    result = bundle("build", project.profile(), "--key", keys[0], "--out", project.dir / "d",
                    "--cache-dir", cache_dir)
    assert result.rc == BuildError.exit_code, result.err
    assert ("error: no wheel for CPython 3.11 on manylinux_2_28_x86_64: fastthing 2.0 has no "
            "wheel for CPython 3.11 on manylinux_2_28_x86_64 (wheels exist for: "
            "cp399-cp399-manylinux_2_17_x86_64)") in result.err


def test_sdist_only_package_fails_the_build_naming_each(project: Project, cache_dir: Path,
                                                       keys: tuple[Path, Path]) -> None:
    (project.wheelhouse / "srconly-1.0.tar.gz").write_bytes(b"not really an sdist")
    make_wheel(project.wheelhouse, "winonly", "3.0", {"winonly/__init__.py": ""},
               tag="py3-none-win_amd64")
    (project.dir / "requirements.txt").write_text("srconly==1.0\nwinonly==3.0\ntinygreet==1.0\n")
    result = bundle("build", project.profile(), "--key", keys[0], "--out", project.dir / "d",
                    "--cache-dir", cache_dir)
    assert result.rc == BuildError.exit_code, result.err
    assert "srconly 1.0 has only an sdist" in result.err
    assert "winonly 3.0 has no wheel for CPython" in result.err and "win_amd64" in result.err
    assert "tinygreet" not in result.err.split("error:")[1]


def test_incomplete_pins_fail_the_build(project: Project, cache_dir: Path,
                                        keys: tuple[Path, Path]) -> None:
    make_wheel(project.wheelhouse, "needy", "1.0", {"needy/__init__.py": ""},
               requires=("tinygreet>=1.0", "missingdep>=2", 'winonly; sys_platform == "win32"'))
    (project.dir / "requirements.txt").write_text("needy==1.0\ntinygreet==1.0\n")
    result = bundle("build", project.profile(), "--key", keys[0], "--out", project.dir / "d",
                    "--cache-dir", cache_dir)
    assert result.rc == BuildError.exit_code, result.err
    assert "needy needs missingdep>=2, not pinned" in result.err
    assert "winonly" not in result.err  # marker evaluated for the (Linux) target


def test_host_pip_configuration_is_ignored(project: Project, cache_dir: Path,
                                           keys: tuple[Path, Path], tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = http://127.0.0.1:9/nowhere\nno-index = false\n"
                    "constraint = /nonexistent/constraints.txt\n")
    result = bundle("build", project.profile(), "--key", keys[0], "--out", project.dir / "d",
                    "--cache-dir", cache_dir,
                    env={"PIP_CONFIG_FILE": str(conf), "PIP_INDEX_URL": "http://127.0.0.1:9/x",
                         "PIP_CONSTRAINT": "/nonexistent/c.txt"})
    assert result.rc == 0, result.err


@pytest.mark.network
def test_demo_profile_builds_from_the_index_and_installs_offline(
        keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path, roots: list[Path]) -> None:
    demo = Path(__file__).resolve().parent.parent / "profiles" / "demo.yaml"
    built = bundle("build", demo, "--key", keys[0], "--out", tmp_path / "dist",
                   "--cache-dir", cache_dir, "--json")
    assert built.rc == 0, built.err
    root = tmp_path / "demo-target"
    roots.append(root)
    install, status = offline(
        bundle_argv("install", json.loads(built.out)["bundle"], "--trust", keys[1],
                    "--root", root),
        bundle_argv("status", "--root", root, "--json"))
    assert install.rc == 0, install.err
    assert json.loads(status.out)["healthy"] is True
