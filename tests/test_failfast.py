"""A failed upgrade fails fast and says why (unit level): the runtimes' crash evidence, the
health loop giving up on it, the one-line tail of a service's output, the periodic line in a
pipe, the keep slots of failed releases and the refused rollback to one. The same with real
processes, engine and CLI: tests/test_failfast_e2e.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bundler import ui
from bundler.bundle.models import HealthCheck, Service
from bundler.errors import CommandError, PolicyError
from bundler.install import compose_runtime as cr
from bundler.install import health, process_runtime, recovery, tails
from bundler.install import swarm_runtime as swarm
from bundler.install.installer import _prune
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.state import ReleaseRow, State, now
from bundler.install.supervise import start_time
from tests.helpers import free_port

CLICK_ERROR = ("Usage: app [OPTIONS]\nTry 'app --help' for help.\n\n"
               "Error: Invalid value for '--setting': 'fsat' is not one of 'fast', 'slow'.\n")


# --- the one-line tail ------------------------------------------------------------------------

def test_condense_keeps_the_last_non_empty_lines_cleaned_and_cut() -> None:
    text = "first\n\n\x1b[31mred\x1b[0m\tline\n" + "x" * 500 + "\n  last  \n\n"
    said = tails.condense(text)
    assert said == f"red line | {'x' * 159}… | last"
    assert "\n" not in tails.condense(CLICK_ERROR)
    assert tails.condense(CLICK_ERROR).endswith("Error: Invalid value for '--setting': 'fsat' "
                                               "is not one of 'fast', 'slow'.")
    assert tails.condense("\n \n") == ""


def test_read_log_reads_only_the_supervisors_own_regular_file(tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    log.write_bytes(b"a" * 100_000 + b"\nthe end\n")
    assert tails.read_log(log).endswith("the end\n")
    assert len(tails.read_log(log)) == tails.READ
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$hash\n")
    (tmp_path / "link.log").symlink_to(secret)
    assert tails.read_log(tmp_path / "link.log") == ""  # a symlink planted by the account
    os.link(secret, tmp_path / "hard.log")
    assert tails.read_log(tmp_path / "hard.log") == ""  # ... or a hard link
    os.mkfifo(tmp_path / "fifo.log")
    assert tails.read_log(tmp_path / "fifo.log") == ""  # ... or a FIFO (no hang)
    assert tails.read_log(tmp_path / "absent.log") == ""


# --- the process runtime's evidence ----------------------------------------------------------

def _release(tmp_path: Path) -> ReleaseDir:
    rel = ReleaseDir(tmp_path / "releases" / "1.0.0")
    rel.run.mkdir(parents=True)
    rel.logs.mkdir(parents=True)
    return rel


def _supervised(rel: ReleaseDir, name: str, state: dict[str, Any] | None, log: str = "") -> None:
    """What the supervisor leaves: a pidfile naming a live process (this one), its state
    file and its log."""
    me = os.getpid()
    (rel.run / f"{name}.pid").write_text(f"{me} {start_time(me)}\n")
    if state is not None:
        (rel.run / f"{name}.state").write_text(json.dumps(state))
    (rel.logs / f"{name}.log").write_text(log)


WEB = (Service("web", ("app",)),)


def test_a_service_that_exited_since_the_start_is_evidence_with_its_last_output(
        tmp_path: Path) -> None:
    rel = _release(tmp_path)
    since = time.time()
    _supervised(rel, "web", {"child": None, "restarts": 2, "last_exit": 2, "error": None,
                             "exited_at": since + 1},
                "starting\n" + CLICK_ERROR + "[supervisor] web exited with 2; restarting in 1s\n"
                "starting\n" + CLICK_ERROR + "[supervisor] web exited with 2; restarting in 2s\n"
                "starting\n")  # the third run, just begun
    (line,) = process_runtime.crashed(WEB, rel, since)
    assert line == ("service web exited with 2 before it was healthy (2 restarts): Usage: app "
                    "[OPTIONS] | Try 'app --help' for help. | Error: Invalid value for "
                    "'--setting': 'fsat' is not one of 'fast', 'slow'.")
    assert "[supervisor]" not in line and "\n" not in line


def test_what_is_not_evidence_and_what_else_is(tmp_path: Path) -> None:
    rel = _release(tmp_path)
    since = time.time()
    _supervised(rel, "web", {"child": os.getpid(), "restarts": 0, "last_exit": None,
                             "error": None, "exited_at": None})
    assert process_runtime.crashed(WEB, rel, since) == []  # running, never exited
    _supervised(rel, "web", {"child": os.getpid(), "restarts": 3, "last_exit": 1,
                             "error": None, "exited_at": since - 60})
    assert process_runtime.crashed(WEB, rel, since) == []  # crashed before this start
    assert process_runtime.crashed(WEB, rel, None) != []  # ... which counts when asked
    _supervised(rel, "web", {"child": None, "restarts": 1, "last_exit": None,
                             "error": "cannot start app: No such file or directory",
                             "exited_at": since + 1},
                "[supervisor] web: cannot start app: No such file or directory\n"
                "[supervisor] web did not start; restarting in 1s\n")
    (line,) = process_runtime.crashed(WEB, rel, since)
    assert line.startswith("service web could not start (cannot start app: No such file or "
                           "directory) before it was healthy (1 restart); see ")
    (rel.run / "web.pid").unlink()
    (gone,) = process_runtime.crashed(WEB, rel, since)
    assert gone.startswith("service web is not running (its supervisor is gone")


def test_a_state_file_planted_by_the_account_is_not_read(tmp_path: Path) -> None:
    rel = _release(tmp_path)
    _supervised(rel, "web", None)
    elsewhere = tmp_path / "planted.json"
    elsewhere.write_text(json.dumps({"restarts": 9, "last_exit": 1, "exited_at": 1e12}))
    (rel.run / "web.state").symlink_to(elsewhere)
    assert process_runtime.crashed(WEB, rel, time.time()) == []


# --- the compose and swarm runtimes' evidence (the engine faked at its API) ------------------

def _container(name: str, **kw: Any) -> cr.ServiceState:
    fields: dict[str, Any] = {"name": name, "running": False, "health": None,
                              "container": f"{name}0123456789abcdef", "status": "exited",
                              "finished_at": time.time(), "last_exit": 0, **kw}
    return cr.ServiceState(**fields)


def test_compose_evidence_per_the_engine(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    project = cr.ComposeProject("p1", (tmp_path / "c.yml",), tmp_path, None,
                                env=(("API_TOKEN", "s3cret-value-1"),))
    since = time.time() - 5
    states = [_container("job"),  # a one-shot that exited 0: fine
              _container("old", last_exit=1, finished_at=since - 100),  # before the start
              _container("web", last_exit=3),
              _container("loop", status="restarting", restarts=4, last_exit=1),
              _container("sick", running=True, status="running", health="unhealthy",
                         finished_at=0.0, last_exit=None, health_output="no\nbad gateway"),
              _container("ok", running=True, status="running", finished_at=0.0,
                         last_exit=None)]
    monkeypatch.setattr(cr, "ps", lambda project, tool=None: states)
    monkeypatch.setattr(cr, "_container_log", lambda cid, lines: (
        "boot\nError: Invalid value for '--setting' (token s3cret-value-1)"
        if cid.startswith("web") else ""))
    lines = cr.crashed(project, since)
    assert lines == [
        "compose service web exited with code 3 (container web012345678): boot | Error: "
        "Invalid value for '--setting' (token ****)",
        "compose service loop keeps restarting (exited with code 1, 4 restart(s)) (container "
        "loop01234567)",
        "compose service sick is unhealthy (healthcheck: bad gateway) (container "
        "sick01234567)"]
    assert any(x.startswith("compose service old exited") for x in cr.crashed(project, None))


def test_engine_timestamps() -> None:
    assert cr._epoch("1970-01-01T00:00:10.5Z") == 10.5
    assert cr._epoch("2024-01-02T03:04:05.123456789Z") == pytest.approx(1704164645.123456789)
    assert cr._epoch("0001-01-01T00:00:00Z") == 0.0
    assert cr._epoch(None) == 0.0 and cr._epoch("garbage") == 0.0


def test_swarm_evidence_is_the_failed_tasks_since_the_deploy(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    class Api:
        def services(self, filters: dict[str, str]) -> list[dict[str, Any]]:
            return [{"ID": "s1", "Spec": {"Name": "st_web"}}, {"ID": "s2",
                                                               "Spec": {"Name": "st_db"}}]

        def tasks(self, filters: dict[str, str]) -> list[dict[str, Any]]:
            if filters["service"] == "s2":  # failed once, replaced by a task that runs
                return [{"CreatedAt": "2030-01-01T00:00:00Z",
                         "Status": {"State": "failed", "Err": "node hiccup"}},
                        {"CreatedAt": "2030-01-01T00:00:02Z", "Status": {"State": "running"}}]
            return [{"CreatedAt": "2020-01-01T00:00:00Z",
                     "Status": {"State": "failed", "Err": "an old failure"}},
                    {"CreatedAt": "2030-01-01T00:00:00Z", "Status": {"State": "shutdown"}},
                    {"CreatedAt": "2030-01-01T00:00:01Z",
                     "Status": {"State": "failed", "Err": "task: non-zero exit (3)"}}]

    monkeypatch.setattr(swarm, "_manager", Api)
    stack = swarm.Stack("st", (tmp_path / "c.yml",), tmp_path, {})
    assert swarm.crashed(stack, time.time()) == [
        "swarm service web: 1 task(s) failed: task: non-zero exit (3)"]
    assert swarm.crashed(stack, None) == [  # the old failure counts when asked for any time
        "swarm service web: 2 task(s) failed: task: non-zero exit (3); an old failure"]


# --- the health loop ---------------------------------------------------------------------------

def _closed(retries: int = 200, interval_ms: int = 50) -> HealthCheck:
    return HealthCheck(name="web", kind="tcp", target=f"127.0.0.1:{free_port()}",
                       retries=retries, interval_ms=interval_ms, timeout_ms=500)


def test_a_check_gives_up_at_the_first_evidence_and_the_others_do_not_run() -> None:
    asked: list[float] = []

    def crashed() -> list[str]:
        asked.append(time.monotonic())
        return ["service web exited with 2: Error: bad"] if len(asked) >= 3 else []

    started = time.monotonic()
    results = health.run_all((_closed(), _closed()), crashed=crashed)
    assert time.monotonic() - started < 2  # not 200 x 50 ms
    (result,) = results
    assert not result.ok and result.attempts == 3
    assert result.evidence == ("service web exited with 2: Error: bad",)
    assert result.detail.startswith("service web exited with 2: Error: bad (gave up at attempt "
                                    "3 of 200; last probe: tcp 127.0.0.1:")
    assert result.to_json()["evidence"] == ["service web exited with 2: Error: bad"]


def test_without_evidence_every_retry_is_spent() -> None:
    calls = []

    def crashed() -> list[str]:
        calls.append(1)
        if len(calls) == 2:
            raise CommandError("the engine went away")  # no answer: no evidence
        return []

    (result,) = health.run_all((_closed(retries=4, interval_ms=20),), crashed=crashed)
    assert not result.ok and result.attempts == 4 and result.evidence == ()
    assert len(calls) == 3 and "evidence" not in result.to_json()


def test_a_long_interval_still_asks_the_runtime_every_second() -> None:
    answers = iter([[], [], ["service web exited with 1"]])
    started = time.monotonic()
    (result,) = health.run_all((_closed(retries=3, interval_ms=60_000),),
                               crashed=lambda: next(answers))
    assert 1.5 < time.monotonic() - started < 10
    assert result.evidence == ("service web exited with 1",)


def test_a_pipe_gets_a_line_every_few_seconds_while_a_check_retries(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ui, "PLAIN_EVERY", 0.3)
    assert not ui.live()
    (result,) = health.run_all((_closed(retries=12, interval_ms=100),))
    assert not result.ok
    lines = [x for x in capsys.readouterr().err.splitlines() if "health: web (tcp)" in x]
    assert 2 <= len(lines) <= 5, lines  # ~1.1 s of retries: every 0.3 s, not every attempt
    assert lines[0].startswith("    health: web (tcp): attempt ")
    assert "/12; last: tcp 127.0.0.1:" in lines[0] and "refused" in lines[0].lower()


# --- keep slots and the rollback to a failed release -------------------------------------------

def _history(root: Path, plan: list[tuple[str, bool]]) -> Layout:
    """Releases installed in order; each either went live (then superseded by the next live
    one) or was rolled back by its own install after failing its checks."""
    layout = Layout(root)
    layout.releases.mkdir(parents=True)
    state = State.open(layout.db)
    live = None
    for seq, (version, good) in enumerate(plan, 1):
        layout.release(version).mkdir()
        txn = f"t{seq}"
        with state.tx():
            state.upsert_release(ReleaseRow(version, "shop", seq, "d", "k", "installing",
                                            f"2026-01-01T00:00:{seq:02d}Z", txn=txn))
            state.event(txn, version, "start", "done")
            if good:
                state.event(txn, version, "health", "done", "ok")
                state.event(txn, version, "commit", "done")
                if live:
                    state.set_status(live, "superseded")
                state.set_status(version, "active")
                live = version
            else:
                state.event(txn, version, "health", "failed", "service web exited with 2")
                state.event(txn, version, "rollback", "done", "health check failed")
                state.set_status(version, "rolled_back", "health check 'web' failed")
    assert live is not None
    os.symlink(os.path.join("releases", live), layout.current)
    state.close()
    return layout


def _on_disk(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.releases.iterdir())


def test_a_failed_release_takes_no_keep_slot_and_only_the_newest_stays(tmp_path: Path) -> None:
    layout = _history(tmp_path / "r", [("1.0", True), ("2.0", True), ("3.0", False),
                                       ("4.0", True)])
    state = State.open(layout.db)
    try:
        assert [state.passed_checks(v) for v in ("1.0", "2.0", "3.0", "4.0")] == [
            True, True, False, True]
        _prune(layout, state, keep=2)
        # 4.0 current, 2.0 its rollback target, 3.0 kept for inspection (no slot of its own)
        assert _on_disk(layout) == ["2.0", "3.0", "4.0"]
        statuses = {r.version: r.status for r in state.releases()}
        assert statuses == {"1.0": "pruned", "2.0": "superseded", "3.0": "rolled_back",
                            "4.0": "active"}
    finally:
        state.close()


def test_older_failed_releases_go(tmp_path: Path) -> None:
    layout = _history(tmp_path / "r", [("1.0", True), ("2.0", False), ("3.0", True),
                                       ("4.0", False), ("5.0", True)])
    state = State.open(layout.db)
    try:
        _prune(layout, state, keep=2)
        assert _on_disk(layout) == ["3.0", "4.0", "5.0"]
    finally:
        state.close()


def test_rollback_to_a_release_that_never_passed_is_refused_before_anything(
        tmp_path: Path) -> None:
    layout = _history(tmp_path / "r", [("1.0", True), ("2.0", True), ("3.0", False)])
    before = layout.db.read_bytes()
    with pytest.raises(PolicyError) as info:
        recovery.rollback(layout, "3.0")
    assert info.value.exit_code == PolicyError.exit_code
    assert info.value.message == ("release 3.0 never passed its health checks (rolled_back: "
                                  "health check 'web' failed); nothing was changed")
    assert "--force" in info.value.hint
    assert layout.current_version() == "2.0" and layout.db.read_bytes() == before


def test_a_release_that_failed_once_and_passed_later_counts_as_passed(tmp_path: Path) -> None:
    layout = _history(tmp_path / "r", [("1.0", True), ("2.0", False)])
    state = State.open(layout.db)
    try:
        with state.tx():  # `rollback --to 2.0 --force`, whose checks passed, then away again
            state.event("m1", "2.0", "health", "done", "ok")
            state.event("m1", "2.0", "rollback", "done", "from 1.0 (manual)")
        assert state.passed_checks("2.0")
        with state.tx():  # installed again (a new attempt) and failed: not passed again
            state.upsert_release(ReleaseRow("2.0", "shop", 2, "d", "k", "rolled_back",
                                            now(), "failed", txn="t9"))
            state.event("t9", "2.0", "health", "failed", "no")
        assert not state.passed_checks("2.0")
    finally:
        state.close()
