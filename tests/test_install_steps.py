"""The install as a stack of reversible steps (bundler.install.steps), on a fake runtime and a
fake database engine (tests/fakes.py): every step's undo, in reverse order, at every failure
point; the previous release restarted and checked; a failing undo left for recovery (exit 13);
a full disk freeing the release's payloads first; recovery after a kill unwinding the same
undo from the journal. No engine, database or subprocess: milliseconds each.

The same sequences run for real in tests/test_fault_matrix.py (kill -9 at every step),
tests/test_disk_full.py and the end-to-end tests."""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bundler.bundle.manifest import Manifest
from bundler.bundle.models import (
    ComposeSpec,
    DatabaseSpec,
    HealthCheck,
    ImageRef,
    MigrationSpec,
    Runtime,
    Service,
    Target,
)
from bundler.bundle.signing import Verified
from bundler.errors import (
    InstallError,
    MigrationError,
    RollbackFailedError,
    RolledBackError,
    SpaceError,
)
from bundler.install import environ, hostpolicy, installer, recovery, runtimes, steps
from bundler.install.journal import Journal
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.policy import Decision
from bundler.install.release import Release
from bundler.install.state import ReleaseRow, State, new_txn, now
from bundler.install.undo import UndoStack
from tests import fakes

PRODUCT = "shop"


def manifest(version: str, sequence: int, *, migrates: bool = True) -> Manifest:
    runtime = Runtime(
        services=(Service("web", ("sleep", "1")),),
        health=(HealthCheck("up", "tcp", "127.0.0.1:1"),),
        database=DatabaseSpec("postgresql://app@127.0.0.1:1/app"),
        migrations=(MigrationSpec("schema", "sql", "db"),) if migrates else ())
    return Manifest(name=PRODUCT, version=version, sequence=sequence,
                    created="2026-01-01T00:00:00Z", target=Target(), files=(), runtime=runtime)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> fakes.World:
    return fakes.install(monkeypatch)


@pytest.fixture
def layout(tmp_path: Path, world: fakes.World) -> Layout:
    """A root whose current release 1.0.0 serves (healthy), its database at "v1"."""
    layout = Layout(tmp_path / "root")
    layout.root.mkdir(mode=0o755)
    m = manifest("1.0.0", 1)
    rel = ReleaseDir(layout.release("1.0.0"))
    rel.meta.mkdir(parents=True)
    rel.files.mkdir()
    rel.manifest_file.write_bytes(m.to_bytes())
    layout.switch("1.0.0")
    state = State.open(layout.db)
    with state.tx():
        state.bind_product(PRODUCT)
        state.upsert_release(ReleaseRow("1.0.0", PRODUCT, 1, _digest(m), "k", "active", now(),
                                        txn="t0"))
    state.close()
    world.running.add("1.0.0")
    world.data[None] = "v1"
    return layout


def _digest(m: Manifest) -> str:
    return hashlib.sha256(m.to_bytes()).hexdigest()


def _plan(m: Manifest) -> steps.Plan:
    data = m.to_bytes()
    return steps.Plan(Verified(m, data, "k", hashlib.sha256(data).hexdigest()),
                      Decision(already_current=False, downgrade=False, python=None),
                      hostpolicy.Outcome((), ()), ())


def _staging(layout: Layout, payloads: bool = False) -> Path:
    staging = layout.new_staging()
    (staging / "files").mkdir()
    if payloads:  # what a full disk gives back first
        for part in ("venv", "python", "images"):
            (staging / part).mkdir()
            (staging / part / "blob").write_bytes(b"x" * 1024)
    return staging


def _install(layout: Layout, m: Manifest | None = None,
             payloads: bool = False) -> installer.InstallResult:
    """`bundle install` from the verified bundle on: recovery first, then the steps."""
    m = m or manifest("2.0.0", 2)
    new = Release.of(layout, m, "production")
    env = environ.release_env(layout, m.runtime.env, "production", version=m.version)
    return installer._install_staged(new, env, _staging(layout, payloads), _plan(m), None)


class Recording(UndoStack):
    """An UndoStack that says which undo ran, in which order."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[str] = []

    def push(self, name: str, undo: Callable[[], None]) -> None:
        def logged() -> None:
            self.ran.append(name)
            undo()
        super().push(name, logged)


def _attempt(layout: Layout, state: State, m: Manifest) -> steps.Attempt:
    """What installer._install_staged builds, with a recording undo stack."""
    new = Release.of(layout, m, "production")
    env = new.env()
    previous = layout.current_version()
    return steps.Attempt(layout, state, Journal(state, new_txn(), m.version), _plan(m), new,
                         env, _staging(layout), previous,
                         Release.load(layout, previous) if previous else None,
                         new.databases(env), undo=Recording())


def _journal(layout: Layout, version: str = "2.0.0") -> list[tuple[str, str]]:
    state = State.open(layout.db)
    try:
        return [(e.step, e.status) for e in state.events() if e.version == version]
    finally:
        state.close()


def _status(layout: Layout, version: str = "2.0.0") -> str:
    state = State.open(layout.db)
    try:
        row = state.release(version)
        assert row is not None
        return row.status
    finally:
        state.close()


# --- the runtime is picked once ---------------------------------------------------------------

def test_the_runtime_kind_is_picked_in_one_place(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    plain = manifest("1.0.0", 1)
    composed = Manifest(name=PRODUCT, version="1.0.0", sequence=1,
                        created="2026-01-01T00:00:00Z", target=Target(), files=(),
                        runtime=Runtime(compose=ComposeSpec(("compose.yml",))))
    assert runtimes.pick(layout, plain) is runtimes.ProcessRuntime
    assert runtimes.pick(layout, composed) is runtimes.ComposeRuntime
    layout.swarm_file.write_text("nodes: {n1: unix:///var/run/docker.sock}\n")
    assert runtimes.pick(layout, composed) is runtimes.SwarmRuntime
    assert runtimes.pick(layout, plain) is runtimes.ProcessRuntime
    kinds = [(k.kind, k.containers, k.rolling, k.boot_unit) for k in
             (runtimes.ProcessRuntime, runtimes.ComposeRuntime, runtimes.SwarmRuntime)]
    assert kinds == [("process", False, False, True), ("compose", True, False, True),
                     ("swarm", True, True, False)]


def test_the_fake_runtime_is_a_runtime(tmp_path: Path, world: fakes.World) -> None:
    m = manifest("1.0.0", 1)
    bound: runtimes.Runtime = fakes.FakeRuntime(Layout(tmp_path), ReleaseDir(tmp_path), m,
                                                "production")
    assert Release.of(Layout(tmp_path), m, "production").runtime.kind == bound.kind == "fake"


# --- the whole sequence -----------------------------------------------------------------------

def test_a_healthy_upgrade_runs_each_step_once_in_order(layout: Layout,
                                                        world: fakes.World) -> None:
    result = _install(layout)
    assert (result.version, result.previous, result.status) == ("2.0.0", "1.0.0", "installed")
    assert world.calls == ["quiesce:1.0.0", "backup:None", "fingerprint:None",
                           "migrate:None", "start:2.0.0", "check:2.0.0"]
    assert world.data[None] == "v2" and layout.current_version() == "2.0.0"
    assert [s for s, st in _journal(layout) if st in ("started", "done")] == [
        "verify", "stop-previous", "stop-previous", "backup", "backup", "migrate", "migrate",
        "start", "start", "health", "commit"]
    assert (_status(layout), _status(layout, "1.0.0")) == ("active", "superseded")
    report = json.loads((ReleaseDir(layout.release("2.0.0")).report_json).read_text())
    assert report["outcome"] == "installed" and report["backup"]["kind"] == "fake"


def _pushed_by_step(layout: Layout, m: Manifest) -> list[list[str]]:
    """Which undo each step of a healthy run pushes, step by step."""
    state = State.open(layout.db)
    a = _attempt(layout, state, m)
    out = []
    try:
        for step in steps.SEQUENCE:
            before = len(a.undo.names)
            step(a)
            out.append(a.undo.names[before:])
    finally:
        state.close()
    return out


@pytest.mark.parametrize("at", range(len(steps.SEQUENCE)),
                         ids=[s.__name__ for s in steps.SEQUENCE])
def test_a_failure_at_each_step_unwinds_the_steps_before_it_in_reverse(
        layout: Layout, world: fakes.World, tmp_path: Path, at: int) -> None:
    m = manifest("2.0.0", 2)
    state = State.open(layout.db)
    a = _attempt(layout, state, m)

    def broken(_: steps.Attempt) -> None:
        raise InstallError(f"{steps.SEQUENCE[at].__name__} broke")

    sequence = (*steps.SEQUENCE[:at], broken, *steps.SEQUENCE[at + 1:])
    with pytest.raises(InstallError, match="broke"):
        steps.run(a, sequence)
    state.close()
    assert isinstance(a.undo, Recording)
    ran = a.undo.ran
    assert a.undo.entries == []  # all of it unwound
    assert ran == [name for names in _pushes(at) for name in names][::-1]
    # Whatever ran, the host is as it was: 1.0.0 serves on the database as it was.
    assert world.data[None] == "v1"
    assert layout.current_version() == "1.0.0"
    assert "1.0.0" in world.running


# Which undo each step of the upgrade above pushes (checked by the next test).
_PUSHES = {"begin": ["begin"], "stop_writers": ["serve"], "migrate": ["migrate"],
           "start": ["start"], "commit": ["commit"]}


def _pushes(at: int) -> list[list[str]]:
    return [_PUSHES.get(s.__name__, []) for s in steps.SEQUENCE[:at]]


def test_each_step_pushes_its_own_undo(layout: Layout, world: fakes.World) -> None:
    pushed = _pushed_by_step(layout, manifest("2.0.0", 2))
    assert pushed == [_PUSHES.get(s.__name__, []) for s in steps.SEQUENCE]


def test_the_previous_release_is_restarted_and_checked(layout: Layout,
                                                       world: fakes.World) -> None:
    world.unhealthy.add("2.0.0")
    with pytest.raises(RolledBackError) as err:
        _install(layout)
    assert err.value.exit_code == 12
    assert "health check 'up' failed" in err.value.message
    after = world.calls[world.calls.index("check:2.0.0") + 1:]
    # the new release stops, the database comes back, then the previous release starts
    assert after == ["stop:2.0.0:keep", "restore:None", "start:1.0.0", "check:1.0.0"]
    assert world.data[None] == "v1" and world.running == {"1.0.0"}
    assert layout.current_version() == "1.0.0"
    assert _status(layout) == "rolled_back" and _status(layout, "1.0.0") == "active"
    assert ("rollback", "done") in _journal(layout)
    assert ReleaseDir(layout.release("2.0.0")).report_md.is_file()  # kept for inspection


def test_a_failed_migration_keeps_its_exit_code(layout: Layout, world: fakes.World) -> None:
    world.fail["migrate:None"] = MigrationError("002_note.sql failed")
    with pytest.raises(MigrationError) as err:
        _install(layout)
    assert err.value.exit_code == 17
    assert world.data[None] == "v1"  # the half-done migration was restored over
    assert world.only("restore") == ["restore:None"] and "start:2.0.0" not in world.calls


def test_nothing_is_restored_when_the_migrations_never_began(layout: Layout,
                                                             world: fakes.World) -> None:
    world.fail["backup:None"] = InstallError("pg_dump failed")
    with pytest.raises(RolledBackError):
        _install(layout)
    assert world.only("restore") == [] and world.only("migrate") == []
    assert world.calls[-2:] == ["start:1.0.0", "check:1.0.0"]


def test_a_first_install_that_fails_leaves_nothing_running(tmp_path: Path,
                                                           world: fakes.World) -> None:
    layout = Layout(tmp_path / "root")
    layout.root.mkdir()
    world.data[None] = "empty"
    world.unhealthy.add("1.0.0")
    with pytest.raises(RolledBackError):
        _install(layout, manifest("1.0.0", 1))
    assert world.running == set() and world.data[None] == "empty"
    assert layout.current_version() is None and _status(layout, "1.0.0") == "rolled_back"


def test_a_release_that_never_ran_is_removed(layout: Layout, world: fakes.World) -> None:
    world.fail["images:2.0.0"] = InstallError("docker load failed")
    m = manifest("2.0.0", 2)
    with_images = Manifest(name=m.name, version=m.version, sequence=m.sequence,
                           created=m.created, target=m.target, files=m.files,
                           runtime=m.runtime,
                           images=(ImageRef("shop/web:2", "sha256:" + "0" * 64),))
    with pytest.raises(InstallError, match="docker load failed"):
        _install(layout, with_images)
    assert not layout.release("2.0.0").exists()  # it never ran: nothing to keep
    assert _status(layout) == "failed" and world.only("start") == []


def test_a_failing_undo_leaves_the_attempt_pending_for_recovery(layout: Layout,
                                                                world: fakes.World) -> None:
    world.unhealthy.add("2.0.0")
    world.fail["restore:None"] = InstallError("pg_restore: connection refused")
    with pytest.raises(RollbackFailedError) as err:
        _install(layout)
    assert err.value.exit_code == 13
    assert "pg_restore: connection refused" in err.value.message
    # Never papered over: the previous release does not start on the migrated database.
    assert "start:1.0.0" not in world.calls and world.data[None] == "v2"
    assert _status(layout) == "rollback_failed"
    state = State.open(layout.db)
    try:
        p = recovery.pending(state)
    finally:
        state.close()
    assert p is not None and p.version == "2.0.0" and len(p.restores) == 1
    assert p.restores[0].after is not None  # what the database looked like, for recovery
    # recovery unwinds the rest, with the same undo
    world.calls.clear()
    message = recovery.recover(layout)
    assert message is not None and message.startswith("rolled back")
    # nothing wrote since its failed rollback (the fingerprint says): the restore runs, what
    # it discards (the migrated database) saved first
    assert world.calls == ["fingerprint:None", "stop:2.0.0", "backup:None", "restore:None",
                           "start:1.0.0", "check:1.0.0"]
    assert world.data[None] == "v1" and _status(layout) == "rolled_back"


def test_a_full_disk_frees_the_payloads_before_any_undo(layout: Layout, world: fakes.World,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    world.fail["migrate:None"] = OSError(errno.ENOSPC, "No space left on device")
    rel = ReleaseDir(layout.release("2.0.0"))
    freed = steps._free_payloads

    def free(r: ReleaseDir) -> None:
        world.calls.append("free")
        assert all(p.exists() for p in (r.venv, r.path / "python", r.path / "images"))
        freed(r)
        assert not any(p.exists() for p in r.payloads)

    monkeypatch.setattr(steps, "_free_payloads", free)
    with pytest.raises(SpaceError) as err:
        _install(layout, payloads=True)
    assert err.value.exit_code == 9
    undo = world.calls[world.calls.index("migrate:None") + 1:]
    assert undo == ["free", "stop:2.0.0:keep", "restore:None", "start:1.0.0", "check:1.0.0"]
    assert not rel.path.exists()  # a partial tree left by a full disk goes
    assert world.data[None] == "v1" and _status(layout) == "rolled_back"


def test_recovery_after_a_kill_unwinds_the_same_undo_from_the_journal(
        layout: Layout, world: fakes.World, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 mid-migration: no undo ran; recovery rebuilds it from the journal."""
    class Killed(BaseException):
        pass

    world.fail["migrate:None"] = Killed()

    def died(a: steps.Attempt, exc: BaseException) -> None:
        return None  # the process is gone: nothing of the attempt's own undo runs

    monkeypatch.setattr(steps, "roll_back", died)
    state = State.open(layout.db)
    with pytest.raises(Killed):
        steps.run(_attempt(layout, state, manifest("2.0.0", 2)))
    state.close()
    assert _status(layout) == "installing" and world.data[None] == "half-migrated"
    assert "1.0.0" not in world.running  # it was stopped for the migrations
    world.calls.clear()
    message = recovery.recover(layout)
    assert message == ("rolled back: the install of 2.0.0 was interrupted during migrate "
                       "(failed); 1.0.0 is running")
    assert world.calls == ["fingerprint:None", "stop:2.0.0", "backup:None", "restore:None",
                           "start:1.0.0", "check:1.0.0"]
    assert world.data[None] == "v1" and world.running == {"1.0.0"}
    assert _status(layout) == "rolled_back" and layout.current_version() == "1.0.0"
    assert ("recover", "rolled_back") in _journal(layout)
