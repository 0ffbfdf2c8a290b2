"""The state database (SQLite, the embedded default): releases, the event journal, and
per-product facts such as the last accepted sequence.

Every detail is redacted (`bundler.redact`) before it is written: no secret reaches the file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bundler import timeouts
from bundler.errors import StateError, disk_full
from bundler.fsutil import create_file, private_dir
from bundler.install import strict
from bundler.redact import redact

SCHEMA_VERSION = 2

# Space kept aside in state/ for the journal: when the disk fills during an install, this file
# is deleted so that the rollback can still be recorded (SQLite's rollback journal and the new
# pages need room). Made again by the next writer that finds space for it.
RESERVE = "reserve"
RESERVE_BYTES = 2 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    version      TEXT PRIMARY KEY,
    product      TEXT NOT NULL,
    sequence     INTEGER NOT NULL,
    digest       TEXT NOT NULL,
    keyid        TEXT NOT NULL,
    status       TEXT NOT NULL,
    installed_at TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '',
    txn          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      TEXT NOT NULL,
    txn     TEXT NOT NULL,
    version TEXT NOT NULL,
    step    TEXT NOT NULL,
    status  TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS products (
    name          TEXT PRIMARY KEY,
    last_sequence INTEGER NOT NULL
);
"""


_RELEASE_COLUMNS = "version, product, sequence, digest, keyid, status, installed_at, detail, txn"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ReleaseRow:
    version: str
    product: str
    sequence: int
    digest: str
    keyid: str
    status: str
    installed_at: str
    detail: str = ""
    txn: str = ""  # the install transaction that last wrote this row


@dataclass(frozen=True)
class Event:
    ts: str
    txn: str
    version: str
    step: str
    status: str
    detail: str


class State:
    def __init__(self, conn: sqlite3.Connection, schema: int = SCHEMA_VERSION,
                 reserve: Path | None = None) -> None:
        self.conn = conn
        self.reserve = reserve
        # A read-only look at a v1 database (not upgraded: reading changes nothing).
        self._columns = _RELEASE_COLUMNS if schema >= 2 else \
            _RELEASE_COLUMNS.replace(", txn", ", '' AS txn")

    @classmethod
    def open(cls, db: Path, create: bool = True) -> State:
        if not create and not db.exists():
            raise StateError(f"no bundler state at {db}",
                             hint="nothing was installed under this --root yet")
        strict.check_target(db.parent.parent)  # StrictModes, before it is read or written
        if create:
            # Explicit modes whatever the umask: state/ 0700, state.db 0600 (SQLite gives its
            # -journal the database file's mode). A looser state from an older bundler is
            # narrowed here, by a writer only.
            private_dir(db.parent)
            create_file(db, 0o600)
        # check_same_thread off: the installer's concurrent steps journal through one
        # connection, serialized by its _Journal lock (never two statements at once).
        conn = sqlite3.connect(db, isolation_level=None, timeout=timeouts.SQLITE_BUSY,
                               check_same_thread=False)
        # Rollback journal, not WAL: readers open the file read-only and leave no -wal/-shm
        # files behind, so a refused bundle changes nothing at all on the target.
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{db} was written by a newer bundler (schema {version})",
                             hint="upgrade bundler on this host")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            if version == 1:
                # v2: each release row names the transaction that last installed it, so that
                # recovery acts on that attempt's journal only (never an older attempt's).
                conn.execute("ALTER TABLE releases ADD COLUMN txn TEXT NOT NULL DEFAULT ''")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        state = cls(conn, reserve=db.parent / RESERVE)
        if create:
            state.make_reserve()
        return state

    def make_reserve(self) -> None:
        """Set RESERVE_BYTES aside (real blocks, not a sparse file), if there is room."""
        if self.reserve is None or self.reserve.exists():
            return
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:  # no room now (or no fallocate here): try again next time
            self.reserve.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def release_reserve(self) -> bool:
        """Give the reserve back to the filesystem (the disk is full); False if there was
        none to give."""
        if self.reserve is None or not self.reserve.exists():
            return False
        self.reserve.unlink(missing_ok=True)
        return True

    @classmethod
    def open_readonly(cls, db: Path) -> State | None:
        """The state for reading only, or None when nothing was installed yet."""
        if not db.exists():
            return None
        strict.check_target(db.parent.parent)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None,
                               timeout=timeouts.SQLITE_BUSY)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise StateError(f"{db} was written by a newer bundler (schema {version})",
                             hint="upgrade bundler on this host")
        return cls(conn, version)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self._commit()
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL, I/O errors): a second ROLLBACK
            # would fail with "no transaction is active" and hide the real error.
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            raise

    def _commit(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if not (disk_full(exc) and self.conn.in_transaction and self.release_reserve()):
                raise
            self.conn.execute("COMMIT")

    def event(self, txn: str, version: str, step: str, status: str, detail: str = "") -> None:
        row = (now(), txn, version, step, status, redact(detail))
        insert = "INSERT INTO events (ts, txn, version, step, status, detail) VALUES (?,?,?,?,?,?)"
        try:
            self.conn.execute(insert, row)
        except sqlite3.OperationalError as exc:
            # A full disk: the reserve makes room for this record (and the rollback's).
            if self.conn.in_transaction or not (disk_full(exc) and self.release_reserve()):
                raise
            self.conn.execute(insert, row)

    def upsert_release(self, row: ReleaseRow) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO releases (version, product, sequence, digest, keyid, "
            "status, installed_at, detail, txn) VALUES (?,?,?,?,?,?,?,?,?)",
            (row.version, row.product, row.sequence, row.digest, row.keyid, row.status,
             row.installed_at, redact(row.detail), row.txn),
        )

    def set_status(self, version: str, status: str, detail: str = "") -> None:
        self.conn.execute("UPDATE releases SET status=?, detail=? WHERE version=?",
                          (status, redact(detail), version))

    def release(self, version: str) -> ReleaseRow | None:
        row = self.conn.execute(f"SELECT {self._columns} FROM releases WHERE version=?",
                                (version,)).fetchone()
        return ReleaseRow(*row) if row else None

    def releases(self) -> list[ReleaseRow]:
        rows = self.conn.execute(
            f"SELECT {self._columns} FROM releases ORDER BY installed_at, sequence")
        return [ReleaseRow(*r) for r in rows]

    def passed_checks(self, version: str) -> bool:
        """Whether release `version` passed its health checks since it was last installed:
        it went live (active, superseded), or its journal says so (`health done` of its
        install or of a rollback to it, a resumed commit). A release rolled back by its own
        install never did: it is no rollback target (see recovery.rollback, _prune)."""
        row = self.release(version)
        if row is None:
            return False
        if row.status in ("active", "superseded"):
            return True
        first = self.conn.execute("SELECT min(id) FROM events WHERE txn=? AND version=?",
                                  (row.txn, version)).fetchone()[0] if row.txn else None
        return self.conn.execute(
            "SELECT 1 FROM events WHERE version=? AND id>=? AND ((step='health' AND "
            "status='done') OR (step='recover' AND status='resumed')) LIMIT 1",
            (version, first or 0)).fetchone() is not None

    def events(self, limit: int = 200) -> list[Event]:
        rows = self.conn.execute(
            "SELECT ts, txn, version, step, status, detail FROM events ORDER BY id DESC LIMIT ?",
            (limit,))
        # Redacted again on the way out: rows written by an older bundler were stored as given.
        return [Event(ts, txn, version, step, status, redact(detail))
                for ts, txn, version, step, status, detail in rows][::-1]

    def product(self) -> tuple[str, int] | None:
        row = self.conn.execute("SELECT name, last_sequence FROM products").fetchone()
        return (row[0], row[1]) if row else None

    def accept_sequence(self, product: str, sequence: int) -> None:
        self.conn.execute(
            "INSERT INTO products VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
            "last_sequence=max(last_sequence, excluded.last_sequence)", (product, sequence))

    def bind_product(self, product: str) -> None:
        """Bind the root to `product` when an install of it begins (last_sequence 0: none
        accepted yet), so a failed first install does not leave the root open to another."""
        self.conn.execute("INSERT INTO products VALUES (?, 0) ON CONFLICT(name) DO NOTHING",
                          (product,))


def new_txn() -> str:
    return uuid.uuid4().hex[:12]
