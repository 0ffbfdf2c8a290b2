"""Undo, shared by the install (bundler.install.steps: each step pushes its undo on an
`UndoStack` as it acts) and by recovery (bundler.install.recovery: after a kill -9 it
rebuilds, from the journal, the undo of the steps that ran, and unwinds it the same way)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bundler import ui
from bundler.install import db as engines
from bundler.install.release import Release

Undo = Callable[[], None]
Record = Callable[[str, str, str], None]  # (step, status, detail) into the journal


@dataclass
class UndoStack:
    """Undo actions in the order their steps ran; `unwind` runs them newest first and stops
    at the first that fails: what is left undone is for recovery to finish (the journal says
    what), never papered over by running the rest (a previous release restarted on a
    database whose restore failed)."""

    entries: list[tuple[str, Undo]] = field(default_factory=list)

    def push(self, name: str, undo: Undo) -> None:
        self.entries.append((name, undo))

    def once(self, name: str, undo: Undo) -> None:
        """Push `undo` unless an undo of that name is there already."""
        if all(n != name for n, _ in self.entries):
            self.push(name, undo)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.entries]

    def unwind(self) -> None:
        while self.entries:
            _, undo = self.entries[-1]
            undo()
            self.entries.pop()


def restore_database(release: Release, db: engines.Database, made: engines.Backup,
                     env: dict[str, str], why: str = "",
                     keep_current: Callable[[engines.ServiceExec | None], None] | None = None
                     ) -> None:
    """Put `db` back from the backup `made`: the undo of a migration. A database in a
    container service of `release` is started alone first if it is down. `keep_current`:
    saves what the restore discards (recovery, when something wrote to it since)."""
    run_in = release.service_exec(db)
    if db.compose_service:
        release.ensure_database(db, env)
    if keep_current is not None:
        keep_current(run_in)
    ui.step(f"Restoring the database {db.label} from {made.path.name}{why}")
    engines.restore(db, made, env, ui.note, exec_in_service=run_in)


def restore_databases(release: Release, taken: Sequence[tuple[engines.Database,
                                                               engines.Backup]],
                      env: dict[str, str], record: Record, done: set[str | None]) -> None:
    """The migrate step's undo: every database back from the backup this attempt took, in
    profile order; each one restored is added to `done` and journaled (`restore`)."""
    for db, made in taken:
        restore_database(release, db, made, env)
        done.add(db.name)
        if len(taken) > 1:
            record("restore", f"done:{db.name}", made.path.name)
    record("restore", "done", ", ".join(b.path.name for _, b in taken))
