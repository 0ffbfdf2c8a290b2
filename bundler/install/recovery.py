"""After the fact: finish or undo an install that died (kill -9, power cut), and roll back
on the operator's request. Both run under the root lock and journal what they did."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bundler import ui
from bundler.errors import InstallError, RollbackFailedError, StateError
from bundler.fsutil import atomic_symlink
from bundler.install import environ, health, runtime
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.state import ReleaseRow, State, new_txn


def _stale_staging(layout: Layout, keep: Path | None) -> None:
    for leftover in layout.root.glob(".staging-*"):
        if keep is None or leftover != keep:
            shutil.rmtree(leftover, ignore_errors=True)


def _last_step(state: State, version: str) -> str:
    row = state.conn.execute(
        "SELECT step, status FROM events WHERE version=? ORDER BY id DESC LIMIT 1",
        (version,)).fetchone()
    return f"{row[0]} ({row[1]})" if row else "staging"


def _checks(layout: Layout, rel: ReleaseDir) -> list[CheckResult]:
    manifest = rel.manifest()
    if manifest is None:
        return []
    env = environ.release_env(layout, manifest.runtime.env, rel.environment())
    return health.run_all(manifest.runtime.health, env)


def _start(layout: Layout, version: str) -> list[CheckResult]:
    rel = ReleaseDir(layout.release(version))
    manifest = rel.manifest()
    if manifest is None:
        raise StateError(f"release {version} has no manifest on disk")
    runtime.start(layout, version)
    return _checks(layout, rel)


def _stop(layout: Layout, version: str, keep_compose: bool = False) -> None:
    runtime.stop(layout, version, keep_compose)


def recover(layout: Layout, keep: Path | None = None) -> str | None:
    """Finish or undo an install that was interrupted; say which. None: nothing to do.

    `keep`: a staging directory of the caller's own, not a leftover."""
    _stale_staging(layout, keep)
    probe = State.open_readonly(layout.db)
    if probe is None:
        return None
    try:
        if not any(r.status == "installing" for r in probe.releases()):
            return None
    finally:
        probe.close()
    state = State.open(layout.db)
    try:
        stuck = [r for r in state.releases() if r.status == "installing"]
        if not stuck:
            return None
        row = stuck[-1]
        txn = new_txn()
        step = _last_step(state, row.version)
        current = layout.current_version()
        rel = ReleaseDir(layout.release(row.version))
        if current == row.version and rel.manifest() is not None:
            checks = _checks(layout, rel)
            if (checks and all(c.ok for c in checks)) or not checks:
                with state.tx():
                    _activate(state, row)
                    state.event(txn, row.version, "recover", "resumed",
                                f"interrupted during {step} after the switch; healthy")
                message = (f"resumed: the interrupted install of {row.version} had already "
                           "switched and is healthy; its commit was completed")
                ui.step(message)
                return message
        _stop(layout, row.version)
        _restore_if_migrating(state, layout, rel, row.version)
        good = current if current and current != row.version else _last_good(state, layout,
                                                                              row.version)
        if good is not None:
            if current != good:
                atomic_symlink(os.path.join("releases", good), layout.current)
            bad = [c for c in _start(layout, good) if not c.ok]
            if bad:
                raise RollbackFailedError(f"after an interrupted install of {row.version}, "
                                          f"{good} is unhealthy: {bad[0].detail}")
        with state.tx():
            state.set_status(row.version, "rolled_back", f"interrupted during {step}")
            state.event(txn, row.version, "recover", "rolled_back",
                        f"interrupted during {step}; {good or 'nothing'} running")
        message = (f"rolled back: the install of {row.version} was interrupted during {step}; "
                   f"{good or 'no release'} is running")
        ui.step(message)
        return message
    finally:
        state.close()


def _restore_if_migrating(state: State, layout: Layout, rel: ReleaseDir, version: str) -> None:
    """A crash during migrations leaves the database half-migrated: put the backup back."""
    steps = state.conn.execute(
        "SELECT step, status, detail FROM events WHERE version=? ORDER BY id", (version,)
    ).fetchall()
    if ("migrate", "started") not in [(a, b) for a, b, _ in steps]:
        return
    files = [d for a, b, d in steps if (a, b) == ("backup", "file")]
    manifest = rel.manifest()
    if not files or manifest is None or manifest.runtime.database is None:
        return
    from bundler.install import database

    env = environ.release_env(layout, manifest.runtime.env, rel.environment())
    backup = database.Backup.from_json(json.loads(files[-1]))
    db = database.Database(env.expand(manifest.runtime.database.url),
                           manifest.runtime.database.compose_service)
    ui.step(f"Restoring the database from {backup.path.name} (migrations were interrupted)")
    if db.compose_service:
        # The interrupted release's project was just taken down: its database comes back alone.
        runtime.ensure_database(layout, version, db, env.as_dict())
    try:
        database.restore(db, backup, env.as_dict(), ui.note,
                         exec_in_service=runtime.service_exec(layout, version, db))
    finally:
        if db.compose_service:
            runtime.stop(layout, version)
    state.event(new_txn(), version, "restore", "done", backup.path.name)


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


def rollback(layout: Layout, to: str | None = None) -> RollbackResult:
    """Switch back to an earlier release (default: the one before the current), health-checked.

    The database is not restored: data written since would be lost. Restoring is automatic
    only when an install fails; see the install report for the backup file.
    """
    state = State.open(layout.db, create=False)
    try:
        current = layout.current_version()
        if current is None:
            raise StateError(f"no current release under {layout.root}",
                             hint="install one with `bundle install BUNDLE --root DIR`")
        target = to or _last_good(state, layout, current)
        if target is None or target == current:
            raise StateError(f"no earlier release to roll back to under {layout.root}",
                             hint="`bundle status --root DIR` lists the releases kept on disk")
        if not layout.release(target).is_dir() or state.release(target) is None:
            raise StateError(f"release {target} is not on disk under {layout.root}",
                             hint="only the releases kept by install.keep can be rolled back to")
        txn = new_txn()
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
        atomic_symlink(os.path.join("releases", target), layout.current)
        with state.tx():
            state.set_status(current, "rolled_back", f"manual rollback to {target}")
            state.set_status(target, "active")
            state.event(txn, target, "rollback", "done", f"from {current} (manual)")
        return RollbackResult(current, target, tuple(checks))
    finally:
        state.close()
