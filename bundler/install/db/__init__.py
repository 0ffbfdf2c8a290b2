"""The databases of a release: backed up before migrations, restored when the release fails.

This package's functions are what the rest of the installer calls; each picks the engine of
the database's kind (`engine`, the one place that does) and hands it the work. An engine is
one module here (postgres, sqlite, mysql), an instance of `base.Engine`; a new kind of
database is a `DbKind` member (bundler/bundle/models.py) and one new module listed in
`ENGINES`. The design, and what each engine promises: docs/design/databases.md.

Two promises hold for every engine, and are kept here:
- A backup is complete or absent (each engine writes and verifies it under a temporary name;
  `base.placing` names it), in a 0700 directory; its sha256 is recorded, and `restore`
  refuses a file that changed since.
- Secrets never show: messages name a database by `Database.display` (password masked), and
  the engines scrub every quoted tool output through `bundler.redact`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from bundler.bundle.models import DbKind
from bundler.errors import InstallError
from bundler.fsutil import private_dir, sha256_file
from bundler.install.db import mysql, postgres, sqlite
from bundler.install.db.base import (
    LEDGER,
    Backup,
    Database,
    Engine,
    Ledger,
    Log,
    ServiceExec,
    first_line,
    now,
)

__all__ = ["ENGINES", "LEDGER", "Backup", "Database", "Engine", "Ledger", "Log", "ServiceExec",
           "backup", "check", "check_url", "engine", "engine_of", "fingerprint", "first_line",
           "owned_file", "ping", "restore", "wait_ready"]

ENGINES: dict[DbKind, Engine] = {e.kind: e for e in (postgres.ENGINE, mysql.ENGINE,
                                                     sqlite.ENGINE)}


def engine_of(kind: DbKind) -> Engine:
    """The engine of databases of `kind`."""
    return ENGINES[DbKind(kind)]


def engine(db: Database) -> Engine:
    """The engine of `db` (its URL's scheme); InstallError for a URL of no known kind."""
    return engine_of(db.kind)


def check_url(db: Database, env: Mapping[str, str]) -> None:
    """Read `db`'s URL as its engine will, without connecting: InstallError (one line, password
    masked) for one it would refuse later. Run before anything is written."""
    engine(db).check_url(db, env)


def check(db: Database, env: Mapping[str, str], *,
          exec_in_service: ServiceExec | None = None) -> None:
    """Raise InstallError (one line, redacted, with a hint) unless `db` is reachable and can be
    backed up from here: the server answers and the client tools are new enough for it; a
    SQLite file is a database (or does not exist yet, in a directory that does)."""
    engine(db).check(db, env, exec_in_service)


def wait_ready(db: Database, env: Mapping[str, str], timeout: float, *,
               exec_in_service: ServiceExec | None = None) -> None:
    """`check` until it passes or `timeout` seconds have gone by (then its last error): a
    database container that was just started (without a healthcheck compose could wait for)
    refuses connections while it initialises."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check(db, env, exec_in_service=exec_in_service)
            return
        except InstallError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.5)


def backup(db: Database, dest_dir: Path, env: Mapping[str, str], log: Log, *,
           exec_in_service: ServiceExec | None = None) -> Backup:
    """Back `db` up into a new file in `dest_dir`; the file exists only once it is verified."""
    private_dir(dest_dir)  # 0700 whatever the umask: backups hold the whole database
    when = now()
    started = time.monotonic()
    found = engine(db)
    path = found.backup(db, dest_dir, when, env, log, exec_in_service)
    digest, size = sha256_file(path)
    log(f"backup of {db.display}: {path.name}, {size} bytes, "
        f"{time.monotonic() - started:.1f}s")
    return Backup(path, found.backup_kind, size, digest, when.strftime("%Y-%m-%dT%H:%M:%SZ"))


def restore(db: Database, backup: Backup, env: Mapping[str, str], log: Log, *,
            exec_in_service: ServiceExec | None = None) -> None:
    """Put `db` back exactly as it was when `backup` was taken; all or nothing (MySQL: DDL is
    not transactional there, see db.mysql)."""
    started = time.monotonic()
    digest, size = (sha256_file(backup.path) if backup.path.is_file() else ("", -1))
    if (digest, size) != (backup.sha256, backup.size):
        raise InstallError(
            f"backup {backup.path} is missing or changed since it was taken "
            f"(expected {backup.size} bytes, sha256 {backup.sha256[:16]}…)",
            hint="the database was NOT restored; restore it by hand from another copy")
    engine(db).restore(db, backup, env, log, exec_in_service)
    log(f"restored {db.display} from {backup.path.name} in {time.monotonic() - started:.1f}s")


def fingerprint(db: Database, env: Mapping[str, str], *,
                exec_in_service: ServiceExec | None = None) -> str:
    """A short value that changes when the database is written to: compared before a restore
    that was left pending, it tells whether the restore would discard writes made since
    bundler last looked."""
    return engine(db).fingerprint(db, env, exec_in_service)


def ping(kind: DbKind, url: str, env: Mapping[str, str], timeout: float) -> str:
    """The health check of a database of `kind` at `url`: '' when it answers, else why not."""
    return engine_of(kind).ping(url, env, timeout)


def owned_file(db: Database) -> Path | None:
    """The file `db` lives in, which the release's account must be able to write (None: a
    database server)."""
    return engine(db).owned_file(db)
