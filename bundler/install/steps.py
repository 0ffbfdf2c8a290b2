"""The install sequence, as a stack of reversible steps (docs/design/install-sequence.md).

Each step acts on the install's context (`Attempt`: the release, the previous one, what has
been done so far) and pushes its undo on the attempt's `UndoStack` as it acts (before, when a
half-done action needs undoing too). Any failure unwinds the stack: the undo of every step that
ran, newest first. The steps journal as they go; after a kill -9, recovery rebuilds the same
undo from that journal (bundler.install.recovery).

Order matters for the data: nothing may write to a database between its backup and its
migrations (the previous release is stopped first when migrations will run), and nothing may
write while a backup is restored (every undo that restores quiets the release first).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bundler import ui
from bundler.bundle.models import MigrationSpec
from bundler.bundle.signing import Verified
from bundler.errors import BundlerError, InstallError, RollbackFailedError, disk_full
from bundler.faults import fault_point
from bundler.fsutil import atomic_write_bytes, make_dir, nearly_full, private_dir
from bundler.install import (
    audit,
    boot,
    datadirs,
    environ,
    health,
    hostpolicy,
    migrations,
    packages,
    policy,
    receipts,
    store,
)
from bundler.install import db as engines
from bundler.install.health import CheckResult
from bundler.install.journal import Journal, reason
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.release import Release
from bundler.install.runtimes import NodeDown
from bundler.install.state import ReleaseRow, State, now
from bundler.install.undo import UndoStack, restore_databases

Taken = tuple[engines.Database, engines.Backup]


@dataclass(frozen=True)
class Plan:
    """What was decided before the attempt began (verification, policy, host policy)."""

    verified: Verified
    decision: policy.Decision
    asked: hostpolicy.Outcome
    down: tuple[NodeDown, ...]  # swarm nodes down, accepted with --allow-degraded
    reuse: bool = True  # earlier releases' trees may be cloned (installer.Options)


@dataclass
class Attempt:
    """One install attempt: the context every step works in, and what the steps have done
    (what their undo reads)."""

    layout: Layout
    state: State
    journal: Journal
    plan: Plan
    new: Release
    env: environ.ReleaseEnv
    staging: Path  # the verified tree, placed as the release by `begin`
    previous_version: str | None
    previous: Release | None  # None also when its manifest is unreadable
    dbs: list[engines.Database]
    undo: UndoStack = field(default_factory=UndoStack)
    migrates: bool = False  # the migrations will run (decided by `plan_migrations`)
    # Flags the undo reads: the serving release was touched (stopped, or a first release
    # began to replace nothing), migrations began, a database service was started here.
    started: bool = False
    migrating: bool = False
    service_started: bool = False
    quiet: bool = False  # the new release was stopped by the undo already
    disk_full: bool = False
    root_full: bool = False
    reason: str = ""
    backups: list[Taken] = field(default_factory=list)
    restored_dbs: set[str | None] = field(default_factory=set)
    data: list[datadirs.DataBackup] = field(default_factory=list)
    data_restored: set[str] = field(default_factory=set)
    checks: list[CheckResult] = field(default_factory=list)
    crashed: health.Crashed | None = None

    @property
    def version(self) -> str:
        return self.new.version

    @property
    def services(self) -> tuple[str, ...]:
        """The databases' own container services: they stay up while the rest is stopped."""
        return tuple(d.compose_service for d in self.dbs if d.compose_service)

    @property
    def backup(self) -> engines.Backup | None:
        return self.backups[0][1] if self.backups else None

    @property
    def restored(self) -> bool:
        return bool(self.backups) and all(d.name in self.restored_dbs for d, _ in self.backups)

    def touch(self) -> None:
        """From here on what serves is touched: its undo brings it back."""
        self.started = True
        self.undo.once("serve", lambda: _serve_again(self))


Step = Callable[[Attempt], None]


# --- the steps, in order --------------------------------------------------------------------

def begin(a: Attempt) -> None:
    """Journal the attempt and place the verified tree as releases/<version>. Undo: journal the
    outcome, and remove the tree unless the release ran (kept for inspection) or the disk is
    full (it is what filled it)."""
    m, plan = a.new.manifest, a.plan
    a.undo.push("begin", lambda: _outcome(a))
    with a.state.tx():
        a.state.bind_product(m.name)  # at the first attempt, not the first success
        a.state.upsert_release(ReleaseRow(m.version, m.name, m.sequence, plan.verified.digest,
                                          plan.verified.keyid, "installing", now(),
                                          txn=a.journal.txn))
        a.journal.record("verify", "done", f"sequence {m.sequence}, key {plan.verified.keyid}")
        if plan.decision.downgrade:
            a.journal.record("downgrade", "allowed",
                             f"sequence {m.sequence} accepted with --allow-downgrade")
        if plan.asked.allowed:
            a.journal.record("host-policy", "allowed", plan.asked.journal())
            ui.note(f"host policy allows: {plan.asked.journal()}")
        if plan.down:
            a.journal.record("degraded", "allowed", "--allow-degraded with node(s) down: "
                             + "; ".join(f"{n.name} ({n.state})" for n in plan.down))
    _place(a)
    receipts.host_key(a.layout)  # made by the first install; it signs `bundle receipt`
    atomic_write_bytes(a.new.dir.environment_file, a.env.environment.encode())
    if plan.down:
        atomic_write_bytes(a.new.dir.degraded_marker,
                           ", ".join(n.name for n in plan.down).encode())


def install_packages(a: Attempt) -> None:
    """Images, Python, Node.js, npm (bundler.install.packages), then the record of what the
    release put on disk, before anything of it runs (`bundle audit`, bundler.install.audit):
    undone with the release directory (see `begin`)."""
    packages.install(a.journal, a.new, a.plan.decision, a.plan.reuse)
    m = a.new.manifest
    ids = None if a.new.runtime.kind == "swarm" else audit.image_ids(m)
    path = audit.record(a.new.dir, m, ids)
    a.journal.record("audit", "recorded", f"{path.name}: what the release put on disk")


def start_database_services(a: Attempt) -> None:
    """A database in a container service: the running release's project serves it; on a first
    install (or after `bundle stop`) it is started alone, so it can be backed up and migrated.
    Undo (when started here): the project put back the way it was found (`_serve_again`)."""
    prev = a.previous
    host = prev if prev is not None and prev.runtime.containers else a.new
    for db in a.dbs:
        if not db.compose_service:
            continue
        with a.journal.step("database-service",
                            f"Checking the database service {db.compose_service}"):
            if host.ensure_database(db, a.env.as_dict()):
                a.service_started = True
                a.undo.once("serve", lambda: _serve_again(a))


def plan_migrations(a: Attempt) -> None:
    """Will the migrations run? Not on a rolling runtime with nothing to migrate: the previous
    release serves throughout the update (its writes after the backup, a safety copy, are
    never restored over)."""
    a.migrates = bool(a.new.manifest.runtime.migrations) and bool(a.dbs)
    if a.migrates and a.previous is not None and a.previous.runtime.rolling \
            and not _work_pending(a):
        a.migrates = False


def stop_writers(a: Attempt) -> None:
    """Migrations will run: data first. Nothing may write between the backup and the
    migrations, or a restore would discard those writes: the previous release is quiesced
    (its database services stay up). Undo: it is started again (`_serve_again`)."""
    if not a.migrates or a.previous is None:
        return
    a.touch()
    with a.journal.step("stop-previous", f"Stopping {a.previous.version} (no writes during "
                                         "the backup and migrations)"):
        a.previous.quiesce(keep=a.services)


def back_up_databases(a: Attempt) -> None:
    """Every database before any migration: a failure in the last one restores them all. The
    backups are kept (no undo); the migrate step's undo restores them."""
    for db in a.dbs:
        with a.journal.step("backup", f"Backing up the database {db.label}"):
            taken = engines.backup(db, a.layout.backups, a.env.as_dict(), ui.note,
                                    exec_in_service=a.new.service_exec(db))
        a.backups.append((db, taken))
        a.journal.record("backup", "file", json.dumps(backup_json(db, taken)))


def stop_previous(a: Attempt) -> None:
    """The previous release stops (when not quiesced already; a container project is updated
    in place by the new release's start instead). From here on what serves is touched, even
    on a first install. Undo: the previous release is started again (`_serve_again`)."""
    if not a.started and a.previous is not None:
        a.touch()
        with a.journal.step("stop-previous", f"Stopping {a.previous.version}"):
            a.previous.stop(keep_containers=a.new.runtime.containers)
    a.touch()


def back_up_data(a: Attempt) -> None:
    """The data directories, with the previous release stopped: created and owned right, then
    backed up (before a migration, or always when asked). Undo: each put back unless
    unchanged."""
    datadirs.prepare(a.layout, a.new.manifest)
    due = datadirs.due(a.new.manifest, a.migrates)
    if due:
        a.undo.push("data-backup", lambda: _restore_data(a))
    for spec in due:
        with a.journal.step("data-backup", f"Backing up the data directory {spec.name}"):
            made = datadirs.backup(a.layout, spec)
        a.data.append(made)
        a.journal.record("data-backup", "file", json.dumps(made.to_json()))


def migrate(a: Attempt) -> None:
    """The migrations, database by database in profile order. What each database looks like
    as they begin is journaled first: a later recovery restores a backup by itself only if
    nothing has written to that database since. Undo: every database restored from its
    backup."""
    if not a.migrates:
        return
    m = a.new.manifest
    for db in a.dbs:
        a.journal.record("db-state", _state_key("before-migrate", db), engines.fingerprint(
            db, a.env.as_dict(), exec_in_service=a.new.service_exec(db)))
    a.migrating = True
    a.undo.push("migrate", lambda: _restore_databases(a))
    rel = a.new.dir
    with a.journal.step("migrate", f"Running {len(m.runtime.migrations)} migration(s)"):
        results: list[migrations.MigrationResult] = []
        for target_db, group in _migration_groups(a):
            results += migrations.run(
                _migration_steps(a, group), target_db, rel.files,
                rel.venv if rel.venv.is_dir() else None,
                packages.with_node(a.env.as_dict(), rel), ui.note,
                a.new.runtime.oneoff_runner(), db_exec=a.new.service_exec(target_db))
    a.journal.record("migrate", "applied", "; ".join(
        f"{r.name}: {', '.join(r.applied) or 'nothing new'}" for r in results))


def start(a: Attempt) -> None:
    """The new release starts. Undo: it stops (`_quiet`)."""
    a.crashed = a.new.watch()
    a.undo.push("start", lambda: _quiet(a))
    with a.journal.step("start", f"Starting {a.version}"):
        a.new.start()


def check_health(a: Attempt) -> None:
    """Its health checks; a failure says why: what the runtime says (with the service's last
    output), unless the check gave up on that very evidence and says it already."""
    m = a.new.manifest
    ui.step("Health-checking")
    fault_point("health")  # started, not yet checked
    a.checks = health.run_all(m.runtime.health, a.env, user=m.runtime.user, crashed=a.crashed)
    failed = [c for c in a.checks if not c.ok]
    if failed:
        a.journal.record("health", "failed", failed[0].detail)
        why = [] if failed[0].evidence else _cause(a)
        raise HealthFailed(f"health check {failed[0].name!r} failed: {failed[0].detail}"
                           + (f"; {'; '.join(why)}" if why else ""))
    a.journal.record("health", "done", "; ".join(c.detail for c in a.checks))


def commit(a: Attempt) -> None:
    """`current` switched to the new release, and recorded; bin/ and the boot unit go in with
    it (bundler.install.boot, which undoes its own part). Undo: `current` back."""
    m, state = a.new.manifest, a.state
    with boot.at_commit(a.layout, m, a.journal.record), state.tx():
        a.undo.push("commit", lambda: _switch_back(a))
        a.layout.switch(m.version)
        fault_point("commit")  # switched, not yet recorded: recovery must finish it
        if a.previous_version and a.previous_version != m.version:
            state.set_status(a.previous_version, "superseded")
        state.set_status(m.version, "active")
        state.accept_sequence(m.name, m.sequence)
        a.journal.record("commit", "done", f"current -> {m.version}")
    fault_point("committed")


SEQUENCE: tuple[Step, ...] = (begin, install_packages, start_database_services,
                              plan_migrations, stop_writers, back_up_databases, stop_previous,
                              back_up_data, migrate, start, check_health, commit)


def run(a: Attempt, sequence: tuple[Step, ...] = SEQUENCE) -> None:
    """Every step in order. On a failure, the undo of the steps that ran, newest first (see
    `roll_back`), then the failure is raised, or RollbackFailedError if the undo failed."""
    try:
        for step in sequence:
            step(a)
    except BaseException as exc:
        roll_back(a, exc)
        raise


def roll_back(a: Attempt, exc: BaseException) -> None:
    """Put the host back after `exc`. A full disk frees what the release unpacked first, the
    reserve in the state database too (room to journal the undo). If an undo fails, the
    attempt is left for recovery (`rollback_failed`, with what the databases and data
    directories look like now) and RollbackFailedError raised."""
    a.reason = reason(exc)
    a.root_full = nearly_full(a.layout.root)
    a.disk_full = disk_full(exc) or a.root_full
    if a.disk_full:
        a.state.release_reserve()
    ui.step(f"Rolling back: {a.reason}")
    try:
        if a.disk_full:
            _free_payloads(a.new.dir)
        a.undo.unwind()
    except RollbackFailedError:
        _left_pending(a)
        raise
    except BaseException as undo_exc:
        _left_pending(a)
        raise RollbackFailedError(f"rollback after '{a.reason}' failed: {reason(undo_exc)}"
                                  ) from undo_exc


# --- the undo -------------------------------------------------------------------------------

def _outcome(a: Attempt) -> None:
    status = "rolled_back" if a.started else "failed"
    with a.state.tx():
        a.state.set_status(a.version, status, a.reason)
        a.journal.record("rollback", "done", a.reason)
    if not a.started or a.disk_full:
        # Nothing to keep: it never ran, or it is a partial tree left by a full disk (the
        # journal holds what happened).
        shutil.rmtree(a.layout.removable_release(a.new.dir.path), ignore_errors=True)
        with contextlib.suppress(OSError):  # what only it brought into the store goes too
            store.collect(a.layout)


def _quiet(a: Attempt) -> None:
    """Nothing of the new release may write while backups are restored; the databases stay up.
    A stack with nothing to restore is left serving (the runtime may have rolled it back by
    itself already). Once: every undo that restores calls this first."""
    if a.quiet:
        return
    runtime = a.new.runtime
    touched = runtime.containers and (a.started or a.service_started)
    if touched and not (runtime.rolling and not a.migrating):
        a.new.quiesce(keep=a.services)
    else:
        a.new.stop(keep_containers=True)  # its processes, if any ran
    a.quiet = True


def _restore_databases(a: Attempt) -> None:
    _quiet(a)
    if a.backups:
        restore_databases(a.new, a.backups, a.env.as_dict(), a.journal.record, a.restored_dbs)


def _restore_data(a: Attempt) -> None:
    _quiet(a)
    datadirs.restore_taken(a.layout, a.data, a.journal.record, a.data_restored)


def _serve_again(a: Attempt) -> None:
    """What served before is back: the container project as it was found (the previous
    release's start brings back its own), then the previous release started and checked."""
    _quiet(a)
    prev = a.previous
    prev_containers = prev is not None and prev.runtime.containers
    touched = a.new.runtime.containers and (a.started or a.service_started)
    if touched and not (prev_containers and a.started):
        # Nobody else's: the previous release (if any) does not run containers, or is not
        # being restarted. Put the project back the way it was found.
        if prev_containers:
            a.new.quiesce()  # only the database service is left
        else:
            a.new.stop()
    if a.started and prev is not None:
        _rejoin(a, prev)
        bad = [c for c in prev.restart() if not c.ok]
        if bad:
            a.journal.record("rollback", "failed", bad[0].detail)
            raise RollbackFailedError(
                f"{a.version} failed ({a.reason}) and the previous release {prev.version} is "
                f"unhealthy after restart: {bad[0].detail}")


def _rejoin(a: Attempt, prev: Release) -> None:
    """The previous release's trees before it runs again: one sharing a file with the failed
    release's (a hard link) that the failed release wrote in place is installed again
    (packages.repair); a tree that cannot be is a failed rollback, said as such."""
    try:
        fixed = packages.repair(prev, ui.note)
    except BundlerError as exc:
        a.journal.record("rollback", "failed", exc.message)
        raise RollbackFailedError(
            f"{a.version} failed ({a.reason}) and the packages of the previous release "
            f"{prev.version} could not be installed again: {exc.message}",
            hint=exc.hint) from None
    for line in fixed:
        a.journal.record("rollback", "repaired", line)


def _switch_back(a: Attempt) -> None:
    """Failed between the switch and its record (a full disk at commit): `current` back
    before anything restarts."""
    if a.layout.current_version() == a.version and a.previous_version != a.version:
        a.layout.switch(a.previous_version)


def _free_payloads(rel: ReleaseDir) -> None:
    """The disk filled: give back the space of what this failed release unpacked (payloads,
    venv, caches) before anything else is written, the database restore first of all. Its
    manifest and files/ (compose files) stay until the undo is done."""
    for part in rel.payloads:
        shutil.rmtree(part, ignore_errors=True)


def _left_pending(a: Attempt) -> None:
    """The undo itself failed: leave this attempt for recovery (`bundle status` shows it), with
    what the databases look like now if their restore did not happen, so that a later
    recovery can tell whether anything wrote to them since. Best effort: the first failure is
    the news."""
    with contextlib.suppress(Exception), a.state.tx():
        a.state.set_status(a.version, "rollback_failed", a.reason)
    datadirs.record_left(a.layout, a.data, a.data_restored, a.journal.record)
    if not a.migrating or a.restored:
        return
    for db, _ in a.backups:
        if db.name in a.restored_dbs:
            continue
        with contextlib.suppress(Exception):
            a.journal.record("db-state", _state_key("after-failed-rollback", db),
                             engines.fingerprint(db, a.env.as_dict(),
                                                  exec_in_service=a.new.service_exec(db)))


# --- helpers --------------------------------------------------------------------------------

class HealthFailed(BundlerError):
    pass


def _place(a: Attempt) -> None:
    """Move the verified staging tree to releases/<version>, replacing a dead earlier try."""
    rel, staging = a.new.dir, a.staging
    make_dir(a.layout.releases, 0o755)
    private_dir(a.layout.shared)  # where the operator's .env goes: 0700
    if rel.path.exists():
        if a.previous_version == rel.path.name:
            raise InstallError(f"version {rel.path.name} is current and this bundle differs "
                               "from it", hint="bump the version in the profile and build again")
        shutil.rmtree(a.layout.removable_release(rel.path))
    staging.chmod(0o755)  # mkdtemp made it 0700
    staging.replace(rel.path)
    rel.meta.mkdir()
    rel.meta.chmod(0o755)
    atomic_write_bytes(rel.manifest_file, a.plan.verified.manifest_bytes)
    # Its payloads become the store's one copy (or links to it): journaled, so that what the
    # store gained is accounted for; the undo of `begin` collects what only this release named.
    added, size = store.adopt(a.layout, rel.path, a.new.manifest)
    fault_point("store")  # objects added, not yet journaled: recovery must cope
    a.journal.record("store", "added", f"{added} object(s), {size} bytes")


def _cause(a: Attempt) -> list[str]:
    """Why the release's units are not up, for the error line (best effort: [] if unknown)."""
    try:
        return (a.crashed() if a.crashed else []) or a.new.runtime.failures()
    except BundlerError:
        return []


def backup_json(db: engines.Database, made: engines.Backup) -> dict[str, object]:
    """The journaled `backup`/`file` detail: the Backup, plus the database's name if named."""
    return made.to_json() | ({"database": db.name} if db.name else {})


def _state_key(what: str, db: engines.Database) -> str:
    """The `db-state` status a fingerprint is journaled under: per database when named."""
    return f"{what}:{db.name}" if db.name else what


def _migration_groups(a: Attempt) -> list[tuple[engines.Database, list[MigrationSpec]]]:
    """The release's migrations in profile order, cut into runs against one database each."""
    m = a.new.manifest
    by_name = {d.name: d for d in a.dbs}
    groups: list[tuple[engines.Database, list[MigrationSpec]]] = []
    for x in m.runtime.migrations:
        spec = m.runtime.database_of(x)
        assert spec is not None
        db = by_name[spec.name]
        if groups and groups[-1][0] is db:
            groups[-1][1].append(x)
        else:
            groups.append((db, [x]))
    return groups


def _migration_steps(a: Attempt, group: list[MigrationSpec]) -> list[migrations.Migration]:
    env, user = a.env, a.new.manifest.runtime.user
    return [migrations.Migration(x.name, x.kind, x.path, tuple(env.expand(v) for v in x.command),
                                 tuple((k, env.expand(v)) for k, v in x.env), x.service,
                                 user=user)
            for x in group]


def _work_pending(a: Attempt) -> bool:
    """Will the release's migrations change anything? SQL files not in the ledger, alembic
    heads not current; a command migration always may. Unknown (the database cannot be read
    from here): yes, the safe answer."""
    rel = a.new.dir
    venv = rel.venv if rel.venv.is_dir() else None
    try:
        for target_db, group in _migration_groups(a):
            steps = _migration_steps(a, group)
            if any(x.kind == "command" for x in steps):
                return True
            for r in migrations.pending(steps, target_db, rel.files, venv,
                                        packages.with_node(a.env.as_dict(), rel)):
                if r.applied:
                    return True
    except Exception:  # any doubt means: stop the writers
        return True
    return False
