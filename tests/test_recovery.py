"""Crashes, interruptions and rollbacks: kill -9 at a journaled step, Ctrl+C, a second
concurrent install, and `bundle rollback`. Install side under `unshare -n`."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from bundler.errors import LockedError
from tests.helpers import Project, bundle, bundle_argv, offline

pytestmark = pytest.mark.slow


def build(project: Project, keys: tuple[Path, Path], cache: Path, version: str,
          sequence: int, **kw: object) -> Path:
    result = bundle("build", project.profile(version, sequence=sequence, **kw),  # type: ignore[arg-type]
                    "--key", keys[0], "--out", project.dir / "dist", "--cache-dir", cache,
                    "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


def crashing(step: str, *args: object) -> list[str]:
    """`bundle ...` that dies with SIGKILL right after the journal records STEP as started."""
    return ["env", f"BUNDLER_FAULT=kill:{step}", *bundle_argv(*map(str, args))]


def events(root: Path) -> list[tuple[str, str, str]]:
    doc = json.loads(bundle("history", "--root", root, "--json").out)
    return [(e["version"], e["step"], e["status"]) for e in doc["events"]]


@pytest.mark.parametrize("step", ["python", "start"])
def test_kill_9_mid_upgrade_then_rerun_rolls_back_and_completes(
        step: str, project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    v2 = build(project, keys, cache_dir, "2.0.0", 2)
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    first, crashed, after_crash, rerun, final = offline(
        bundle_argv("install", v1, *trust),
        crashing(step, "install", v2, *trust),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("install", v2, *trust),
        bundle_argv("status", "--root", root, "--json"))
    assert first.rc == 0, first.err
    assert crashed.rc == -signal.SIGKILL
    st = json.loads(after_crash.out)
    assert st["current"]["version"] == "1.0.0"
    assert {r["version"]: r["status"] for r in st["releases"]}["2.0.0"] == "installing"
    assert rerun.rc == 0, rerun.err
    assert f"rolled back: the install of 2.0.0 was interrupted during {step} (started)" in rerun.err
    done = json.loads(final.out)
    assert done["current"]["version"] == "2.0.0" and done["healthy"] is True
    assert ("2.0.0", "recover", "rolled_back") in events(root)
    assert not list(root.glob(".staging-*"))


def test_kill_9_after_the_switch_is_resumed(project: Project, keys: tuple[Path, Path],
                                            cache_dir: Path, tmp_path: Path,
                                            roots: list[Path]) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    crashed, rerun, final = offline(
        crashing("commit", "install", v1, *trust),
        bundle_argv("install", v1, *trust),
        bundle_argv("status", "--root", root, "--json"))
    assert crashed.rc == -signal.SIGKILL
    assert rerun.rc == 0, rerun.err
    assert "resumed: the interrupted install of 1.0.0 had already switched" in rerun.err
    assert json.loads(final.out)["current"]["status"] == "active"


def test_second_concurrent_install_is_refused(project: Project, keys: tuple[Path, Path],
                                              cache_dir: Path, tmp_path: Path) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    root = tmp_path / "target"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a first installer holds the root
        result = bundle("install", v1, "--trust", keys[1], "--root", root)
    finally:
        os.close(fd)
    assert result.rc == LockedError.exit_code
    assert f"error: another bundler process is working on {root}" in result.err
    assert list(root.iterdir()) == []


def test_manual_rollback_and_forward_again(project: Project, keys: tuple[Path, Path],
                                           cache_dir: Path, tmp_path: Path,
                                           roots: list[Path]) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    v2 = build(project, keys, cache_dir, "2.0.0", 2)
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    r1, r2, back, st1, forward, st2 = offline(
        bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust),
        bundle_argv("rollback", "--root", root, "--json"),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("rollback", "--root", root, "--to", "2.0.0", "--json"),
        bundle_argv("status", "--root", root, "--json"))
    assert (r1.rc, r2.rc) == (0, 0)
    assert back.rc == 0, back.err
    assert json.loads(back.out)["to"] == "1.0.0"
    assert json.loads(st1.out)["current"]["version"] == "1.0.0"
    assert json.loads(st1.out)["healthy"] is True
    assert forward.rc == 0, forward.err
    assert json.loads(st2.out)["current"]["version"] == "2.0.0"
    assert ("1.0.0", "rollback", "done") in events(root)


def test_ctrl_c_during_health_checks_restores_the_previous_release(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    v2 = build(project, keys, cache_dir, "2.0.0", 2, healthy=False)
    root = tmp_path / "target"
    roots.append(root)
    driver = Path(__file__).parent / "interrupt_driver.py"
    first, interrupted, status = offline(
        bundle_argv("install", v1, "--trust", keys[1], "--root", root),
        [sys.executable, str(driver), "Health-checking",
         *bundle_argv("install", v2, "--trust", keys[1], "--root", root)],
        bundle_argv("status", "--root", root, "--json"))
    assert first.rc == 0, first.err
    result = json.loads(interrupted.out)
    assert result["rc"] == 130, result["err"]
    assert "error: interrupted; the new release was removed and the previous one restored" \
        in result["err"]
    st = json.loads(status.out)
    assert st["current"]["version"] == "1.0.0" and st["healthy"] is True
    assert {r["version"]: r["status"] for r in st["releases"]}["2.0.0"] == "rolled_back"
