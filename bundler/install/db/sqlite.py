"""SQLite: check, backup (the backup API), restore, fingerprint, the SQL migration ledger, the
migration lock (a flock on the file) and the file's ownership.

- A backup is one consistent copy even while the application writes (the backup API, one
  step), checked (`PRAGMA quick_check`), fsynced and only then renamed into place
  (base.placing). A database that does not exist yet is backed up as an empty one.
- A restore copies the backup's pages over the live database in one write transaction
  (the backup API again): tables a migration added are gone, the schema and rows are the
  backup's.
- Ownership: the file lives in a directory the release's `user` can write. Every read and
  write of it (check, backup, restore, migrations) runs with that account's file access
  (`Database.owner`, see fsowner), so a symlink it planted leads nowhere root could write;
  root only ever copies bytes through descriptors it opened itself (`_side_file`). The
  directory and the file are opened to the account's group (`writable`), never handed over.

URLs: `sqlite:///abs/path.db` and SQLAlchemy's `sqlite:////abs/path.db` both name
/abs/path.db (relative paths are refused: an installer must not depend on its cwd).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from bundler import proc
from bundler.bundle.models import DbKind
from bundler.errors import InstallError, MigrationError
from bundler.fsutil import require_space, sha256_file
from bundler.install import fsowner
from bundler.install.db.base import (
    LEDGER,
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

BACKUP_KIND = "sqlite"  # what Backup.kind says of its backups
DB_DIR_MODE = 0o1770     # a SQLite database's directory bundler creates
_SIDE_FILES = ("", "-journal", "-wal", "-shm")


def sqlite_path(db: Database) -> Path:
    if db.kind != DbKind.SQLITE:
        raise InstallError(f"{db.display} is not a SQLite database")
    path = urlsplit(db.url).path
    if not path.startswith("/") or not path.strip("/"):
        raise InstallError(f"SQLite URL {db.display} does not name an absolute file path",
                           hint="use sqlite:///absolute/path.db (or sqlite:////absolute/path.db)")
    return Path("/" + path.lstrip("/"))

# --------------------------------------------------------------------------- check

def _check(path: Path, owner: proc.RunAs | None) -> None:
    fsowner.call(owner, lambda: _readable(path))


def _readable(path: Path) -> None:
    if not path.exists():
        if not path.parent.is_dir():
            raise InstallError(f"SQLite database {path}: directory {path.parent} does not exist",
                               hint="create the directory, or fix the path in the URL")
        if not os.access(path.parent, os.W_OK, effective_ids=True):
            raise InstallError(f"SQLite database {path}: directory {path.parent} is not writable",
                               hint="run as the user who owns it, or fix its permissions")
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise InstallError(f"SQLite database {path} cannot be read: {exc}",
                           hint="check that the file is a SQLite database and readable") from None


@contextlib.contextmanager
def _side_file(path: Path) -> Iterator[tuple[Path, int]]:
    """A new, empty file beside the database (created, never opened through a symlink), and
    its descriptor; removed afterwards. The owner's copy of a backup lives here."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.bundler-", suffix=".tmp", dir=path.parent)
    side = Path(name)
    try:
        yield side, fd
    finally:
        os.close(fd)
        for extra in ("", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{side}{extra}")



# --------------------------------------------------------------------------- backup

def _backup(path: Path, dest_dir: Path, when: datetime, log: Log,
                   owner: proc.RunAs | None) -> Path:
    final = backup_path(dest_dir, path.stem, ".sqlite", when)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=dest_dir)
    tmp = Path(tmp_name)
    with placing(tmp, final), _errors(f"SQLite backup of {path} failed"):
        exists = path.exists()
        with open(fd, "r+b") as sink:
            if exists:
                require_space(dest_dir, path.stat().st_size, f"backing up {path}")
                log(f"sqlite backup {path} -> {final.name}")
                if owner is not None and owner.switches and os.geteuid() == 0:
                    fsowner.call(owner, lambda: _owner_snapshot(path, sink))
                else:
                    _snapshot(path, tmp)
            else:
                # Nothing there yet: the backed-up state is "an empty database".
                log(f"sqlite {path} does not exist yet: backing up an empty database")
        with contextlib.closing(sqlite3.connect(tmp)) as dst:
            if not exists:
                dst.execute("PRAGMA user_version = 0")  # writes the empty database's header
            dst.execute("PRAGMA journal_mode=DELETE")  # self-contained: no -wal beside it
            check_row = dst.execute("PRAGMA quick_check").fetchone()
            if not check_row or check_row[0] != "ok":
                raise InstallError(f"the SQLite backup of {path} failed its check: "
                                   f"{check_row[0] if check_row else 'no result'}")
        os.chmod(tmp, 0o600)
    return final


def _snapshot(path: Path, dest: Path) -> None:
    """One consistent copy of the database at `path` into the SQLite file `dest`."""
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as src, \
            contextlib.closing(sqlite3.connect(dest)) as dst:
        # One step (pages=-1): a read transaction on the source for the whole copy, so the
        # copy is one consistent snapshot even while the application writes.
        src.backup(dst)


def _owner_snapshot(path: Path, sink: BinaryIO) -> None:
    """With the owner's access (fsowner): snapshot into a side file, then copy its bytes into
    root's backup file, already open. Root never opens a path the owner could have swapped."""
    with _side_file(path) as (side, fd):
        _snapshot(path, side)
        with open(fd, "rb", closefd=False) as copy:
            copy.seek(0)
            shutil.copyfileobj(copy, sink, 1 << 20)
        sink.flush()



@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise InstallError(f"{what}: {exc}",
                           hint="check that the file is a SQLite database and readable") from None


# --------------------------------------------------------------------------- fingerprint

def fingerprint(db: Database) -> str:
    """The bytes of the file and of its write-ahead log."""
    path = sqlite_path(db)
    parts = []
    for f in (path, path.with_name(path.name + "-wal")):
        parts.append(sha256_file(f)[0] if f.is_file() else "-")
    return "sqlite:" + hashlib.sha256(":".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- restore

def _restore(path: Path, backup: Backup, log: Log, owner: proc.RunAs | None) -> None:
    if backup.kind != BACKUP_KIND:
        raise wrong_backup(backup, "a SQLite one")
    log(f"sqlite restore {backup.path.name} -> {path}")
    try:
        if owner is not None and owner.switches and os.geteuid() == 0:
            require_space(path.parent, backup.size, f"restoring {path}")
            with open(backup.path, "rb") as source:
                fsowner.call(owner, lambda: _owner_restore(source, path))
        else:
            _replace_pages(backup.path, path)
    except sqlite3.Error as exc:
        raise InstallError(f"SQLite restore of {path} from {backup.path} failed: {exc}",
                           hint="stop whatever holds the database open and restore again"
                           ) from None


def _replace_pages(source: Path, path: Path) -> None:
    with contextlib.closing(sqlite3.connect(source)) as src, \
            contextlib.closing(sqlite3.connect(path, timeout=60)) as dst:
        # The backup API replaces every page of the destination in one write transaction:
        # tables the migration added are gone, the schema and rows are the backup's.
        src.backup(dst)


def _owner_restore(source: BinaryIO, path: Path) -> None:
    """With the owner's access (fsowner): the backup's bytes (root opened the file) into a
    side file, then its pages over the database."""
    with _side_file(path) as (side, fd):
        with open(fd, "wb", closefd=False) as out:
            shutil.copyfileobj(source, out, 1 << 20)
        _replace_pages(side, path)




# --------------------------------------------------------------------------- migrations

class SqliteLedger:
    """The connection under the migration lock (a flock on the file), and the SQL files
    applied through it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def read(self, migration: str) -> dict[str, str]:
        rows = self.conn.execute(f"SELECT file, sha256 FROM {LEDGER} WHERE migration = ?",
                                 (migration,)).fetchall()
        return {str(f): str(s) for f, s in rows}

    def apply(self, migration: str, file: str, sha256: str, text: str, work_dir: Path) -> None:
        def q(value: str) -> str:
            return "'" + value.replace("'", "''") + "'"

        script = (f"BEGIN IMMEDIATE;\n{text}\n;\n"
                  f"INSERT INTO {LEDGER} (migration, file, sha256, applied_at) VALUES "
                  f"({q(migration)}, {q(file)}, {q(sha256)}, "
                  f"strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));\nCOMMIT;\n")
        try:
            self.conn.executescript(script)
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise MigrationError(
                f"migration {migration}: {file}: sqlite: {exc}; this file was rolled back, "
                "earlier ones stay applied") from None


def _create_ledger(conn: Any) -> None:
    conn.execute(f"""CREATE TABLE IF NOT EXISTS {LEDGER} (
        migration TEXT NOT NULL,
        file TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        applied_at TEXT NOT NULL,
        PRIMARY KEY (migration, file))""")


@contextlib.contextmanager
def migration_session(db: Database, log: Log) -> Iterator[SqliteLedger]:
    """An exclusive flock on the database file for the whole run, and the ledger (created, and
    with it the file when there is none yet). Run with the owner's file access (fsowner)."""
    path = sqlite_path(db)
    with contextlib.closing(sqlite3.connect(path, timeout=60, isolation_level=None)) as sconn:
        try:
            _create_ledger(sconn)  # also creates the file when there is none yet
        except sqlite3.Error as exc:
            raise MigrationError(f"cannot create the migration ledger in {path}: {exc}",
                                 hint="check that the database file is writable") from None
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"another installer is migrating {path}: waiting")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield SqliteLedger(sconn)
        finally:
            os.close(fd)  # releases the flock


def read_ledger(db: Database, migration: str) -> dict[str, str]:
    path = sqlite_path(db)

    def read() -> dict[str, str]:
        if not path.exists():
            return {}
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as sconn:
            if sconn.execute("SELECT 1 FROM sqlite_master WHERE name = ?",
                             (LEDGER,)).fetchone():
                return SqliteLedger(sconn).read(migration)
        return {}

    return fsowner.call(db.owner, read)


# --------------------------------------------------------------------------- ownership

def writable(path: Path, user: proc.RunAs | None) -> None:
    """Let `user` write the SQLite database at `path`: its directory (created for it when it
    does not exist) and the file and its journals, through its group."""
    if user is None or not user.switches or os.geteuid() != 0:
        return
    directory = path.parent
    if not directory.exists():
        fsowner.group_dir(directory, user, DB_DIR_MODE)
    elif not fsowner.can(user, directory.stat(), 3):
        raise InstallError(f"user {user.name} cannot write the SQLite database's directory "
                           f"{directory}", hint=f"chgrp {user.group_name()} {directory} && "
                                                f"chmod 1770 {directory}")
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        try:
            st = os.lstat(side)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise InstallError(f"{side} is not a regular file",
                               hint="a database path must not be a symlink")
        if not fsowner.can(user, st, 6):
            # Through a descriptor opened without following symlinks: the account can
            # replace the path between the lstat above and here.
            fd = os.open(side, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InstallError(f"{side} is not a regular file",
                                       hint="a database path must not be a symlink")
                os.fchown(fd, -1, user.gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o060)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------- the engine

class Sqlite:
    """The SQLite engine (see the module's docstring)."""

    kind = DbKind.SQLITE
    backup_kind = BACKUP_KIND

    def check_url(self, db: Database, env: Mapping[str, str]) -> None:
        return None  # the path is read where it is used (`sqlite_path`)

    def check(self, db: Database, env: Mapping[str, str],
              run_in: ServiceExec | None) -> None:
        _check(sqlite_path(db), db.owner)

    def backup(self, db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str],
               log: Log, run_in: ServiceExec | None) -> Path:
        return _backup(sqlite_path(db), dest_dir, when, log, db.owner)

    def restore(self, db: Database, backup: Backup, env: Mapping[str, str], log: Log,
                run_in: ServiceExec | None) -> None:
        _restore(sqlite_path(db), backup, log, db.owner)

    def fingerprint(self, db: Database, env: Mapping[str, str],
                    run_in: ServiceExec | None) -> str:
        return fingerprint(db)

    def ping(self, url: str, env: Mapping[str, str], timeout: float) -> str:
        try:
            _readable(sqlite_path(Database(url)))
        except InstallError as exc:
            return exc.message
        return ""

    def migration_session(self, db: Database, env: Mapping[str, str], log: Log, *,
                          ledger: bool, lock_wait: int, run_in: ServiceExec | None
                          ) -> contextlib.AbstractContextManager[SqliteLedger]:
        # the ledger always: creating it creates the file the flock is taken on
        return migration_session(db, log)

    def read_ledger(self, db: Database, env: Mapping[str, str],
                    migration: str) -> dict[str, str]:
        return read_ledger(db, migration)

    def file_owner(self, db: Database) -> proc.RunAs | None:
        return db.owner

    def owned_file(self, db: Database) -> Path | None:
        return sqlite_path(db)

    def let_write(self, db: Database, user: proc.RunAs | None) -> None:
        writable(sqlite_path(db), user)

    def client_env(self, db: Database) -> dict[str, str]:
        return {}

    def scrub(self, db: Database, text: str) -> str:
        return redact(text)


ENGINE: Engine = Sqlite()
