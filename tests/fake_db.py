"""A fake database engine (bundler.install.db.base.Engine) for unit tests: no server, no file
but its backups, every call recorded, so backup/restore/rollback logic runs in milliseconds.

Install it for the kind a test's URLs name with `install(monkeypatch, kind)`: the facade
(`bundler.install.db`) then hands every database of that kind to it. Its "database" is a dict
per URL (`tables`); its backups are real files (JSON) written through `base.placing`, so the
facade's own promises (0700 directory, sha256 checked before a restore) are exercised too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from bundler import proc
from bundler.bundle.models import DbKind
from bundler.errors import InstallError, MigrationError
from bundler.install import db
from bundler.install.db.base import (
    Backup,
    Database,
    Engine,
    Log,
    ServiceExec,
    backup_path,
    placing,
    wrong_backup,
)
from bundler.redact import redact

BACKUP_KIND = "fake"


@dataclass
class FakeLedger:
    """The ledger in the fake's memory; `fail_on`: a file name whose apply fails (nothing of
    it recorded, as a real engine's transaction)."""

    rows: dict[tuple[str, str], str]
    fail_on: str | None = None
    applied: list[str] = field(default_factory=list)

    def read(self, migration: str) -> dict[str, str]:
        return {f: s for (m, f), s in self.rows.items() if m == migration}

    def apply(self, migration: str, file: str, sha256: str, text: str, work_dir: Path) -> None:
        if file == self.fail_on:
            raise MigrationError(f"migration {migration}: {file}: fake: syntax error; this file "
                                 "was rolled back, earlier ones stay applied")
        self.rows[(migration, file)] = sha256
        self.applied.append(file)


@dataclass
class FakeEngine:
    kind: DbKind = DbKind.SQLITE
    backup_kind: str = BACKUP_KIND
    tables: dict[str, dict[str, object]] = field(default_factory=dict)
    ledgers: dict[str, FakeLedger] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (what, database URL)
    down: bool = False               # check and ping fail: the server does not answer
    fail_backup: bool = False        # a dump that dies half-way
    fail_restore: str | None = None  # the error a restore fails with
    fail_migration: str | None = None

    # ---- what tests use to play the application

    def write(self, database: Database, key: str, value: object) -> None:
        self.tables.setdefault(database.url, {})[key] = value

    def rows(self, database: Database) -> dict[str, object]:
        return dict(self.tables.get(database.url, {}))

    def did(self, what: str) -> list[str]:
        return [url for w, url in self.calls if w == what]

    # ---- the Engine protocol

    def check_url(self, database: Database, env: Mapping[str, str]) -> None:
        self.calls.append(("check_url", database.url))

    def check(self, database: Database, env: Mapping[str, str],
              run_in: ServiceExec | None) -> None:
        self.calls.append(("check", database.url))
        if self.down:
            raise InstallError(f"cannot connect to database {database.display}: fake is down",
                               hint="start it")

    def backup(self, database: Database, dest_dir: Path, when: datetime,
               env: Mapping[str, str], log: Log, run_in: ServiceExec | None) -> Path:
        self.calls.append(("backup", database.url))
        final = backup_path(dest_dir, "fake", ".json", when)
        tmp = dest_dir / f".{final.name}.tmp"
        with placing(tmp, final):
            tmp.write_text(json.dumps(self.rows(database), sort_keys=True))
            if self.fail_backup:  # after writing: the half-made file must not stay
                raise InstallError(f"fake dump of {database.display} failed (exit 1)")
        return final

    def restore(self, database: Database, backup: Backup, env: Mapping[str, str], log: Log,
                run_in: ServiceExec | None) -> None:
        self.calls.append(("restore", database.url))
        if backup.kind != self.backup_kind:
            raise wrong_backup(backup, "a fake one")
        if self.fail_restore is not None:
            raise InstallError(f"restoring {database.display} from {backup.path.name} failed, "
                               f"nothing was changed: {self.fail_restore}")
        self.tables[database.url] = json.loads(backup.path.read_text())

    def fingerprint(self, database: Database, env: Mapping[str, str],
                    run_in: ServiceExec | None) -> str:
        self.calls.append(("fingerprint", database.url))
        text = json.dumps(self.rows(database), sort_keys=True)
        return "fake:" + hashlib.sha256(text.encode()).hexdigest()[:32]

    def ping(self, url: str, env: Mapping[str, str], timeout: float) -> str:
        self.calls.append(("ping", url))
        return "fake is down" if self.down else ""

    @contextlib.contextmanager
    def _session(self, database: Database) -> Iterator[FakeLedger]:
        self.calls.append(("lock", database.url))
        try:
            ledger = self.ledgers.setdefault(database.url, FakeLedger({}))
            ledger.fail_on = self.fail_migration
            yield ledger
        finally:
            self.calls.append(("unlock", database.url))

    def migration_session(self, database: Database, env: Mapping[str, str], log: Log, *,
                          ledger: bool, lock_wait: int, run_in: ServiceExec | None
                          ) -> contextlib.AbstractContextManager[FakeLedger]:
        return self._session(database)

    def read_ledger(self, database: Database, env: Mapping[str, str],
                    migration: str) -> dict[str, str]:
        return self.ledgers.setdefault(database.url, FakeLedger({})).read(migration)

    def file_owner(self, database: Database) -> proc.RunAs | None:
        return None

    def owned_file(self, database: Database) -> Path | None:
        return None

    def let_write(self, database: Database, user: proc.RunAs | None) -> None:
        return None

    def client_env(self, database: Database) -> dict[str, str]:
        return {}

    def scrub(self, database: Database, text: str) -> str:
        return redact(text)


def install(monkeypatch: pytest.MonkeyPatch, kind: DbKind = DbKind.SQLITE) -> FakeEngine:
    """A FakeEngine serving every database of `kind` until the test ends."""
    fake = FakeEngine(kind)
    engine: Engine = fake  # mypy: the fake keeps to the protocol
    monkeypatch.setitem(db.ENGINES, kind, engine)
    return fake
