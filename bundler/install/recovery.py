"""After the fact: finish or undo an install that died (kill -9, power cut), and roll back
on the operator's request. Both run under the root lock and journal what they did."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bundler import ui
from bundler.errors import (
    InstallError,
    PolicyError,
    RecoveryPendingError,
    RollbackFailedError,
    StateError,
)
from bundler.install import datadirs, hostpolicy, packages
from bundler.install import db as engines
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.release import Release
from bundler.install.state import ReleaseRow, State, new_txn
from bundler.install.undo import UndoStack, restore_database
from bundler.progname import cmd


def _stale_staging(layout: Layout, keep: Path | None) -> None:
    for leftover in layout.staging_dirs():
        if keep is None or leftover != keep:
            shutil.rmtree(layout.removable_staging(leftover), ignore_errors=True)


# An install that did not finish: killed mid-way, or its own rollback failed.
PENDING = ("installing", "rollback_failed")
DbChoice = Optional[str]  # None: restore only when provably nothing was written since; or
# "restore" / "keep" as the operator chose (--restore-db / --keep-db)


@dataclass(frozen=True)
class PendingRestore:
    """One database's backup still to be restored, with the fingerprints bundler recorded."""

    db_name: str | None  # its `databases[].name`; None: the single `database:`
    backup: engines.Backup
    before: str | None  # its fingerprint as the migrations began
    after: str | None   # ... and when the attempt's own rollback failed without restoring it


@dataclass(frozen=True)
class Pending:
    """What recovery will act on: ONE install transaction (never an older attempt of the same
    version), its last journaled step, and the database backups it must still restore (its
    migrations began and its own restore has not completed; per database) with each
    database's fingerprint bundler last recorded in that transaction."""

    version: str
    txn: str
    status: str
    step: str
    at: str
    restores: tuple[PendingRestore, ...] = ()
    data: tuple[datadirs.PendingData, ...] = ()  # its data directories still to restore

    @property
    def backup(self) -> engines.Backup | None:
        return self.restores[0].backup if self.restores else None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "version": self.version, "txn": self.txn, "status": self.status,
            "step": self.step, "at": self.at,
            "restore": self.backup.to_json() if self.backup else None}
        if any(r.db_name for r in self.restores):
            out["restores"] = [r.backup.to_json() | {"database": r.db_name}
                               for r in self.restores]
        if self.data:  # only then: the shape is unchanged for releases without data dirs
            out["data_restores"] = [d.to_json() for d in self.data]
        return out

    def describe(self) -> str:
        what = (f"the install of {self.version} was interrupted during {self.step}"
                if self.status == "installing" else
                f"the rollback of {self.version} failed (last step {self.step})")
        restore = "".join(
            f"; its database backup {r.backup.path.name}"
            + (f" of {r.db_name}" if r.db_name else "")
            + f" (taken {r.backup.created}) is still to be restored" for r in self.restores)
        restore += "".join(f"; the backup {d.backup.path.name} of its data directory "
                           f"{d.backup.name} is still to be restored" for d in self.data)
        return f"{what} at {self.at}{restore}"


def _txn_of(state: State, row: ReleaseRow) -> str:
    if row.txn:
        return row.txn
    found = state.conn.execute(  # a row written by schema 1: its latest attempt
        "SELECT txn FROM events WHERE version=? AND step='verify' ORDER BY id DESC LIMIT 1",
        (row.version,)).fetchone()
    return str(found[0]) if found else ""


def pending(state: State) -> Pending | None:
    stuck = [r for r in state.releases() if r.status in PENDING]
    if not stuck:
        return None
    row = stuck[-1]
    txn = _txn_of(state, row)
    events = state.conn.execute(
        "SELECT ts, step, status, detail FROM events WHERE txn=? ORDER BY id", (txn,)).fetchall()
    done = {(step, status) for _, step, status, _ in events}
    last = next(((ts, st, status) for ts, st, status, _ in reversed(events)
                 if st not in ("db-state", "backup", "data-backup") or status != "file"), None)
    seen = {status: d for _, st, status, d in events if st == "db-state"}
    restores: list[PendingRestore] = []
    if ("migrate", "started") in done and not done & {("restore", "done"),
                                                      ("restore", "skipped")}:
        latest: dict[str | None, engines.Backup] = {}  # per database, its last backup
        for _, st, status, d in events:
            if (st, status) == ("backup", "file"):
                doc = json.loads(d)
                name = doc.get("database")
                latest.pop(name, None)  # keep the journal's (profile) order of the last ones
                latest[name] = engines.Backup.from_json(doc)
        for name, backup in latest.items():
            if name is not None and ("restore", f"done:{name}") in done:
                continue  # restored already by the attempt's own rollback
            suffix = f":{name}" if name is not None else ""
            restores.append(PendingRestore(name, backup, seen.get("before-migrate" + suffix),
                                           seen.get("after-failed-rollback" + suffix)))
    return Pending(row.version, txn, row.status,
                   f"{last[1]} ({last[2]})" if last else "staging",
                   last[0] if last else row.installed_at, tuple(restores),
                   datadirs.pending_restores(events))


def _start(layout: Layout, version: str) -> list[CheckResult]:
    """Start release `version` (its on-disk manifest checked first) and health-check it."""
    release = Release.require(layout, version)
    check_recorded_manifest(layout, version)
    packages.repair(release, ui.note)  # a tree another release wrote into: installed again
    return release.restart()


def check_recorded_manifest(layout: Layout, version: str) -> None:
    """The release's on-disk manifest is the one the state database recorded (StateError)."""
    state = State.open_readonly(layout.db)
    if state is None:
        return
    try:
        row = state.release(version)
    finally:
        state.close()
    if row is not None:
        ReleaseDir(layout.release(version)).check_manifest(row.digest)


def _stop(layout: Layout, version: str) -> None:
    release = Release.load(layout, version)
    if release is not None:
        release.stop()


def recover(layout: Layout, keep: Path | None = None, db_choice: DbChoice = None) -> str | None:
    """Finish or undo an install that was interrupted; say which. None: nothing to do.

    `keep`: a staging directory of the caller's own, not a leftover. A pending database
    restore runs by itself only when the database is provably unchanged since bundler last
    saw it; otherwise RecoveryPendingError, before anything is touched, until the operator
    chooses with `db_choice`."""
    _stale_staging(layout, keep)
    probe = State.open_readonly(layout.db)
    if probe is None:
        return None
    try:
        if pending(probe) is None:
            return None
    finally:
        probe.close()
    state = State.open(layout.db)
    try:
        p = pending(state)
        if p is None:
            return None
        interrupted = Release.load(layout, p.version)
        if p.status == "installing" and layout.current_version() == p.version \
                and interrupted is not None:
            resumed = _resume(state, interrupted, p)
            if resumed is not None:
                return resumed
        return _undo(state, layout, p, interrupted, db_choice)
    finally:
        state.close()


def _resume(state: State, release: Release, p: Pending) -> str | None:
    """Killed after the switch: the release serves; finish its commit if it is healthy."""
    checks = release.check(release.watch())
    if checks and not all(c.ok for c in checks):
        return None
    row = state.release(p.version)
    assert row is not None
    with state.tx():
        _activate(state, row)
        state.event(p.txn, p.version, "recover", "resumed",
                    f"interrupted during {p.step} after the switch; healthy")
    message = (f"resumed: the interrupted install of {p.version} had already switched and is "
               "healthy; its commit was completed")
    ui.step(message)
    return message


def _undo(state: State, layout: Layout, p: Pending, interrupted: Release | None,
          db_choice: DbChoice) -> str:
    """The undo of the interrupted install's steps, rebuilt from its journal (the install's
    own undo died with it) and unwound in reverse: stop it, restore its databases and data
    directories, return to the last good release, record the outcome. What could discard
    writes is checked first (RecoveryPendingError): nothing is touched before."""
    plans = _plan_restore(interrupted, p, db_choice)
    data_plans = datadirs.plan_restores(layout, p.data, db_choice, p.describe(),
                                        lambda: _running(layout, p.version, None))
    current = layout.current_version()
    good = current if current and current != p.version else _last_good(state, layout,
                                                                       p.version)

    def record(step: str, status: str, detail: str) -> None:
        state.event(p.txn, p.version, step, status, detail)

    def restore_data() -> None:
        if db_choice == "keep":
            datadirs.skip_restores(p.data, record)
        datadirs.run_restores(layout, data_plans, record)

    def restore_databases() -> None:
        if plans:
            assert interrupted is not None  # plans come from its manifest
            _restore(state, interrupted, p, plans, db_choice)
        elif p.backup is not None and db_choice == "keep":
            record("restore", "skipped", "the database was kept as it is (--keep-db)")

    stack = UndoStack()  # in the order the install's steps pushed them
    stack.push("outcome", lambda: _rolled_back(state, p, good))
    if good is not None:
        stack.push("previous", lambda: _return_to(state, layout, p, good))
    stack.push("data-backup", restore_data)
    stack.push("migrate", restore_databases)
    stack.push("start", lambda: interrupted.stop() if interrupted is not None else None)
    stack.unwind()
    message = (f"rolled back: the install of {p.version} was interrupted during {p.step}; "
               f"{good or 'no release'} is running")
    ui.step(message)
    return message


def _return_to(state: State, layout: Layout, p: Pending, good: str) -> None:
    """`current` back to the last good release, started and healthy (RollbackFailedError)."""
    if layout.current_version() != good:
        layout.switch(good)
    bad = [c for c in _start(layout, good) if not c.ok]
    if bad:
        with state.tx():
            state.set_status(p.version, "rollback_failed", f"{good} unhealthy")
            state.event(p.txn, p.version, "recover", "failed",
                        f"{good} is unhealthy: {bad[0].detail}")
        raise RollbackFailedError(f"after an interrupted install of {p.version}, "
                                  f"{good} is unhealthy: {bad[0].detail}")


def _rolled_back(state: State, p: Pending, good: str | None) -> None:
    with state.tx():
        state.set_status(p.version, "rolled_back", f"interrupted during {p.step}")
        state.event(p.txn, p.version, "recover", "rolled_back",
                    f"interrupted during {p.step}; {good or 'nothing'} running")


def _running(layout: Layout, version: str, db_service: str | None) -> list[str]:
    """The services (of the interrupted release, or the current one) that are running now,
    but for the database's own compose service."""
    names: list[str] = []
    for v in dict.fromkeys(x for x in (version, layout.current_version()) if x):
        release = Release.load(layout, v)
        if release is None:
            continue
        names += [f"{u.name} ({v})" for u in release.runtime.states()
                  if u.running and u.name != f"compose:{db_service}"]
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class _Restore:
    db: engines.Database
    env: dict[str, str]
    backup: engines.Backup
    changed: bool  # the database was written to since bundler last saw it


def _plan_restore(release: Release | None, p: Pending, db_choice: DbChoice) -> list[_Restore]:
    """The pending restores (one per database still to restore), if due and they may run;
    RecoveryPendingError if restoring any of them would discard writes made since the
    interrupted attempt and the operator has not chosen. Nothing is changed before all are
    checked."""
    if not p.restores or release is None or not release.manifest.runtime.all_databases():
        return []
    if db_choice == "keep":
        return []
    env = release.env()
    specs = {spec.name: spec for spec in release.manifest.runtime.all_databases()}
    plans: list[_Restore] = []
    for pr in p.restores:
        spec = specs.get(pr.db_name)
        if spec is None:
            continue
        db = release.database_for(spec, env)
        if db.compose_service:
            # The interrupted release's project was taken down: its database comes back alone.
            release.ensure_database(db, env.as_dict())
        now = engines.fingerprint(db, env.as_dict(), exec_in_service=release.service_exec(db))
        # Writes made AFTER the failed attempt: exactly known when its failed rollback recorded
        # the database; after a kill -9 only the attempt's own (half-done) migration wrote,
        # unless something has run since — then the restore would discard that too.
        if pr.after is not None:
            later = "it was written to since the failed rollback" if now != pr.after else ""
        else:
            running = _running(release.layout, p.version, db.compose_service)
            later = (f"{', '.join(running)} ran since the interruption and may have written "
                     "to it" if running else "")
        if later and db_choice != "restore":
            raise RecoveryPendingError(
                f"{p.describe()}; {db.label}: {later}, and restoring the backup would discard "
                f"every change made since {pr.backup.created}; nothing was changed")
        plans.append(_Restore(db, env.as_dict(), pr.backup,
                              pr.before is None or now != pr.before))
    return plans


def _restore(state: State, release: Release, p: Pending, plans: list[_Restore],
             db_choice: DbChoice) -> None:
    """Put the pending backups back; what one discards is saved first when anything changed."""
    why = " (" + ("--restore-db" if db_choice == "restore"
                  else "migrations were interrupted") + ")"
    for r in plans:
        def keep_current(run_in: engines.ServiceExec | None, r: _Restore = r) -> None:
            if not r.changed:
                return
            saved = engines.backup(r.db, release.layout.backups, r.env, ui.note,
                                    exec_in_service=run_in)
            ui.note(f"the database's current contents were saved to {saved.path} first")
            state.event(p.txn, p.version, "restore", "saved", json.dumps(saved.to_json()))

        try:
            restore_database(release, r.db, r.backup, r.env, why, keep_current)
        finally:
            if r.db.compose_service:
                release.stop()
        if r.db.name and len(plans) > 1:
            state.event(p.txn, p.version, "restore", f"done:{r.db.name}", r.backup.path.name)
    state.event(p.txn, p.version, "restore", "done",
                ", ".join(r.backup.path.name for r in plans))


def _activate(state: State, row: ReleaseRow) -> None:
    for other in state.releases():
        if other.status == "active" and other.version != row.version:
            state.set_status(other.version, "superseded")
    state.set_status(row.version, "active")
    state.accept_sequence(row.product, row.sequence)


def _last_good(state: State, layout: Layout, exclude: str) -> str | None:
    candidates = [r for r in state.releases()
                  if r.version != exclude and r.status in ("active", "superseded")
                  and layout.release(r.version).is_dir()]
    return candidates[-1].version if candidates else None


@dataclass(frozen=True)
class RollbackResult:
    from_version: str
    to_version: str
    checks: tuple[CheckResult, ...]

    def to_json(self) -> dict[str, object]:
        return {"from": self.from_version, "to": self.to_version,
                "checks": [c.to_json() for c in self.checks]}


def rollback(layout: Layout, to: str | None = None, db_choice: DbChoice = None,
             allow: tuple[str, ...] = (), *, force: bool = False) -> RollbackResult:
    """Switch back to an earlier release (default: the one before the current), health-checked.
    Call under the root lock.

    The database is not restored: data written since would be lost. Restoring is automatic
    only when an install fails; see the install report for the backup file. With an
    interrupted install pending, a plain rollback finishes that install's rollback and stops
    there: the healthy current release is not rolled back as well. `to` a release that never
    passed its checks (its own install rolled it back): PolicyError unless `force`.

    The release returned to is checked against the root's host policy (and `allow`) as an
    install would be: a release installed under a looser policy is not restarted silently.
    """
    probe = State.open_readonly(layout.db)
    if probe is None:
        raise StateError(f"no bundler state under {layout.root}",
                         hint="nothing was installed under this --root yet")
    try:  # arguments first: a bad --to must not touch anything, a pending restore included
        if to is not None and (probe.release(to) is None or not layout.release(to).is_dir()):
            raise StateError(f"release {to} is not on disk under {layout.root}",
                             hint="only the releases kept by install.keep can be rolled back "
                                  f"to; `{cmd('status', '--root', layout.root)}` lists them")
        if to is not None and not force and not probe.passed_checks(to):
            row = probe.release(to)
            raise PolicyError(
                f"release {to} never passed its health checks"
                + (f" ({row.status}: {row.detail})" if row and row.detail else "")
                + "; nothing was changed",
                hint=f"`{cmd('history', '--root', layout.root)}` shows why it failed; "
                     f"`{cmd('rollback', '--root', layout.root, '--to', to, '--force')}` tries "
                     "it anyway (its checks must pass, or the current release stays)")
        stuck = pending(probe)
    finally:
        probe.close()
    if stuck is not None:
        recover(layout, db_choice=db_choice)
        if to is None:
            now_current = layout.current_version() or "nothing"
            return RollbackResult(stuck.version, now_current, ())
    state = State.open(layout.db, create=False)
    try:
        current = layout.current_version()
        if current is None:
            raise StateError(f"no current release under {layout.root}",
                             hint="install one with "
                                  f"`{cmd('install', 'BUNDLE', '--root', layout.root)}`")
        target = to or _last_good(state, layout, current)
        if target is None or target == current:
            raise StateError(f"no earlier release to roll back to under {layout.root}",
                             hint=f"`{cmd('status', '--root', layout.root)}` lists the releases "
                                  "kept on disk")
        txn = new_txn()
        asked = hostpolicy.check_release(layout, target, hostpolicy.flag_grants(allow),
                                         ReleaseDir(layout.release(current)).manifest())
        ui.step(f"Rolling back from {current} to {target}")
        _stop(layout, current)
        checks = _start(layout, target)
        bad = [c for c in checks if not c.ok]
        if bad:
            _stop(layout, target)
            restored = [c for c in _start(layout, current) if not c.ok]
            with state.tx():
                state.event(txn, target, "rollback", "failed", bad[0].detail)
            if restored:
                raise RollbackFailedError(f"{target} is unhealthy ({bad[0].detail}) and "
                                          f"{current} did not come back: {restored[0].detail}")
            raise InstallError(f"{target} is unhealthy: {bad[0].detail}; stayed on {current}",
                               hint="check the release's logs in releases/<version>/logs/")
        layout.switch(target)
        with state.tx():
            state.set_status(current, "rolled_back", f"manual rollback to {target}")
            state.set_status(target, "active")
            # it passed its checks now (a release forced back after a failed install too)
            state.event(txn, target, "health", "done", "; ".join(c.detail for c in checks))
            if asked.allowed:
                state.event(txn, target, "host-policy", "allowed", asked.journal())
            state.event(txn, target, "rollback", "done", f"from {current} (manual)")
        return RollbackResult(current, target, tuple(checks))
    finally:
        state.close()
