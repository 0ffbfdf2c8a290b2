"""The install's independent steps (images, Python env, npm projects) run at the same time,
each journaled; the first failure stops the others and is the error raised."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bundler import proc
from bundler.bundle.models import NpmProject
from bundler.errors import Cancelled, InstallError
from bundler.install import packages, python_env
from bundler.install.journal import Journal
from bundler.install.layout import Layout
from bundler.install.state import State


def test_a_cancelled_scope_stops_its_running_command_at_once() -> None:
    scope = proc.CancelScope()
    outcome: list[BaseException] = []

    def worker() -> None:
        with proc.cancel_scope(scope):
            try:
                proc.run(["sleep", "30"], what="sleep")
            except BaseException as exc:
                outcome.append(exc)

    thread = threading.Thread(target=worker)
    started = time.monotonic()
    thread.start()
    time.sleep(0.3)
    scope.cancel("python failed")
    thread.join(10)
    assert time.monotonic() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert "python failed" in outcome[0].message
    with proc.cancel_scope(scope), pytest.raises(Cancelled):  # nothing new starts either
        proc.run(["true"])


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, python_fails: bool
           ) -> tuple[Journal, State, Any, Any, dict[str, float]]:
    state = State.open(tmp_path / "state" / "state.db")
    journal = Journal(state, "t1", "1.0.0")
    times: dict[str, float] = {}

    def fake_venv(*_args: object, **_kw: object) -> Path:
        times["python-start"] = time.monotonic()
        if python_fails:
            time.sleep(0.3)
            raise InstallError("uv: Hash mismatch for tinygreet==1.0")
        proc.run(["sleep", "1"])
        times["python-end"] = time.monotonic()
        return tmp_path / "log"

    def fake_npm(_rel: object, _m: object, project: NpmProject) -> None:
        times[f"{project.dest}-start"] = time.monotonic()
        proc.run(["sleep", "30" if python_fails else "1"])
        times[f"{project.dest}-end"] = time.monotonic()

    monkeypatch.setattr(python_env, "create_venv", fake_venv)
    monkeypatch.setattr(packages, "install_npm", fake_npm)
    m = SimpleNamespace(images=(), python_lock="python/requirements.lock", runtimes=None,
                        npm=(NpmProject("web", True, (), ()), NpmProject("admin", True, (), ())))
    rel = SimpleNamespace(venv=tmp_path / "venv", path=tmp_path, logs=tmp_path / "logs",
                          wheels=tmp_path / "python" / "wheels")
    release = SimpleNamespace(dir=rel, manifest=m, layout=Layout(tmp_path / "root"))
    decision = SimpleNamespace(python="/usr/bin/python3")
    return journal, state, release, decision, times


def _steps(state: State) -> list[tuple[str, str]]:
    return [(e.step, e.status) for e in state.events()]


def test_steps_run_at_the_same_time_each_journaled(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    journal, state, release, decision, times = _setup(tmp_path, monkeypatch, False)
    started = time.monotonic()
    packages.install(journal, release, decision)
    took = time.monotonic() - started
    assert took < 2.5, took  # three 1 s steps, not one after the other
    assert max(times["python-start"], times["web-start"], times["admin-start"]) \
        < min(times["python-end"], times["web-end"], times["admin-end"])  # they overlapped
    steps = _steps(state)
    for name in ("python", "npm:web", "npm:admin"):
        assert (name, "started") in steps and (name, "done") in steps
    state.close()


def test_the_first_failure_stops_the_others_and_is_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, state, release, decision, times = _setup(tmp_path, monkeypatch, True)
    started = time.monotonic()
    with pytest.raises(InstallError) as err:
        packages.install(journal, release, decision)
    assert time.monotonic() - started < 8  # npm's 30 s were not waited out
    assert not isinstance(err.value, Cancelled)
    assert "Hash mismatch" in err.value.message
    steps = _steps(state)
    assert ("python", "failed") in steps
    assert ("npm:web", "failed") in steps and ("npm:admin", "failed") in steps
    assert "web-end" not in times and "admin-end" not in times
    detail = [e.detail for e in state.events() if (e.step, e.status) == ("npm:web", "failed")]
    assert detail == ["stopped: python failed"]
    state.close()


# A worker pool whose parent dies, as the venv's bytecode compile did when another step's
# failure cancelled it on a full disk: the orphaned workers held the output pipe and the
# install hung with no output.
_ORPHANS = """
import os, sys, time
for _ in range(2):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print("parent done", flush=True)
"""


def test_a_command_that_leaves_workers_behind_returns_when_it_exits() -> None:
    started = time.monotonic()
    result = proc.run([sys.executable, "-c", _ORPHANS], what="pool")
    assert time.monotonic() - started < 10
    assert result.output.strip() == "parent done"


def test_cancelling_a_command_kills_the_workers_it_forked(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"""
import os, time
with open({str(pids)!r}, "w") as f:
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        f.write(f"{{pid}}\\n")
time.sleep(60)
"""
    scope = proc.CancelScope()
    outcome: list[BaseException] = []

    def worker() -> None:
        with proc.cancel_scope(scope):
            try:
                proc.run([sys.executable, "-c", script], what="compile")
            except BaseException as exc:
                outcome.append(exc)

    thread = threading.Thread(target=worker)
    started = time.monotonic()
    thread.start()
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        time.sleep(0.05)
    scope.cancel("npm failed")
    thread.join(20)
    assert not thread.is_alive() and time.monotonic() - started < 15
    assert isinstance(outcome[0], Cancelled)
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"worker {pid} outlived the cancelled command"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
