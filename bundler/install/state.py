"""The state database (SQLite, the embedded default): releases, the event journal, and
per-product facts such as the last accepted sequence."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bundler.errors import StateError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    version      TEXT PRIMARY KEY,
    product      TEXT NOT NULL,
    sequence     INTEGER NOT NULL,
    digest       TEXT NOT NULL,
    keyid        TEXT NOT NULL,
    status       TEXT NOT NULL,
    installed_at TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT ''
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


@dataclass(frozen=True)
class Event:
    ts: str
    txn: str
    version: str
    step: str
    status: str
    detail: str


class State:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, db: Path, create: bool = True) -> State:
        if not create and not db.exists():
            raise StateError(f"no bundler state at {db}",
                             hint="nothing was installed under this --root yet")
        db.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db, isolation_level=None, timeout=30)
        # Rollback journal, not WAL: readers open the file read-only and leave no -wal/-shm
        # files behind, so a refused bundle changes nothing at all on the target.
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{db} was written by a newer bundler (schema {version})",
                             hint="upgrade bundler on this host")
        if version < SCHEMA_VERSION:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return cls(conn)

    @classmethod
    def open_readonly(cls, db: Path) -> State | None:
        """The state for reading only, or None when nothing was installed yet."""
        if not db.exists():
            return None
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None,
                               timeout=30)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise StateError(f"{db} was written by a newer bundler (schema {version})",
                             hint="upgrade bundler on this host")
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def event(self, txn: str, version: str, step: str, status: str, detail: str = "") -> None:
        self.conn.execute(
            "INSERT INTO events (ts, txn, version, step, status, detail) VALUES (?,?,?,?,?,?)",
            (now(), txn, version, step, status, detail),
        )

    def upsert_release(self, row: ReleaseRow) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO releases VALUES (?,?,?,?,?,?,?,?)",
            (row.version, row.product, row.sequence, row.digest, row.keyid, row.status,
             row.installed_at, row.detail),
        )

    def set_status(self, version: str, status: str, detail: str = "") -> None:
        self.conn.execute("UPDATE releases SET status=?, detail=? WHERE version=?",
                          (status, detail, version))

    def release(self, version: str) -> ReleaseRow | None:
        row = self.conn.execute("SELECT * FROM releases WHERE version=?", (version,)).fetchone()
        return ReleaseRow(*row) if row else None

    def releases(self) -> list[ReleaseRow]:
        rows = self.conn.execute("SELECT * FROM releases ORDER BY installed_at, sequence")
        return [ReleaseRow(*r) for r in rows]

    def events(self, limit: int = 200) -> list[Event]:
        rows = self.conn.execute(
            "SELECT ts, txn, version, step, status, detail FROM events ORDER BY id DESC LIMIT ?",
            (limit,))
        return [Event(*r) for r in rows][::-1]

    def product(self) -> tuple[str, int] | None:
        row = self.conn.execute("SELECT name, last_sequence FROM products").fetchone()
        return (row[0], row[1]) if row else None

    def accept_sequence(self, product: str, sequence: int) -> None:
        self.conn.execute(
            "INSERT INTO products VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
            "last_sequence=max(last_sequence, excluded.last_sequence)", (product, sequence))


def new_txn() -> str:
    return uuid.uuid4().hex[:12]
