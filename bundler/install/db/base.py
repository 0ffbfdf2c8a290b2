"""What every database engine shares: the `Database` model, the `Backup` record, the `Engine`
and `Ledger` protocols, and the helpers that make a backup complete or absent.

The engines (postgres, sqlite, mysql beside this module) import this one; the package's
`__init__` picks the engine for a database and is what the rest of the installer calls. The
design: docs/design/databases.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bundler import proc
from bundler.bundle.models import DbKind
from bundler.errors import InstallError
from bundler.redact import redact

Log = Callable[[str], None]

# The migration ledger: one row per applied SQL file (migration, file, sha256, applied_at).
LEDGER = "bundler_migrations"


class ServiceExec(Protocol):
    """Runs `argv` inside the database's compose service (for `Database.compose_service`).

    stdin_path / stdout_path: files (or FIFOs) to connect to the command's stdin / stdout, or
    None for no stdin / captured stdout. `env`: variables to set inside the service (PGPASSWORD:
    pass it via compose's environment, `-e NAME`, never as `-e NAME=VALUE` in argv). Returns
    the finished command as a `proc.Result` whose output is what it printed (stderr, plus
    stdout when not redirected); a non-zero exit is returned, not raised. Must honour timeout.
    """

    def __call__(self, argv: Sequence[str], stdin_path: Path | None, stdout_path: Path | None,
                 *, env: Mapping[str, str], timeout: float) -> proc.Result: ...


@dataclass(frozen=True)
class Database:
    url: str
    compose_service: str | None = None
    name: str | None = None  # its `databases[].name` (None: the single `database:`)
    # SQLite: the account whose file access every read and write of the file runs with (the
    # release's `user`, who can write its directory; see fsowner). None: bundler's own.
    owner: proc.RunAs | None = None

    @property
    def kind(self) -> DbKind:
        """What its URL's scheme names (MySQL and MariaDB are both mysql); InstallError for
        anything else."""
        kind = DbKind.of_url(self.url)
        if kind is None:
            raise InstallError(
                f"database URL {redact(self.url)} is not a postgresql://, mysql:// or "
                "sqlite:/// URL",
                hint="use postgresql://user@host:5432/db, postgresql://user@/db?host=/socket/dir, "
                     "mysql://user@host:3306/db or sqlite:///absolute/path.db")
        return kind

    @property
    def label(self) -> str:
        """How messages name it: `NAME (URL)` for a named database, else the URL."""
        return f"{self.name} ({self.display})" if self.name else self.display

    @property
    def display(self) -> str:
        """The URL with its password masked: the only form of it that may be printed."""
        return redact(self.url)


@dataclass(frozen=True)
class Backup:
    path: Path
    kind: str  # the engine's `backup_kind`: "pg_dump" | "sqlite" | "mysqldump"
    size: int
    sha256: str
    created: str

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path), "kind": self.kind, "size": self.size,
                "sha256": self.sha256, "created": self.created}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Backup:
        return cls(Path(str(data["path"])), str(data["kind"]), int(data["size"]),
                   str(data["sha256"]), str(data["created"]))


class Ledger(Protocol):
    """The migration ledger of one database, under the migration lock (see
    `Engine.migration_session`): which SQL files of a migration were applied, and applying
    one together with its ledger row."""

    def read(self, migration: str) -> dict[str, str]:
        """file name -> sha256 of the files of `migration` applied so far."""
        ...

    def apply(self, migration: str, file: str, sha256: str, text: str, work_dir: Path) -> None:
        """Run `text` (the file `file`) and record it, in one transaction where the database
        allows it; MigrationError (the database's own error, secrets masked) if it fails.
        `work_dir`: where a scratch copy of the script may be written."""
        ...


class Engine(Protocol):
    """One kind of database: everything the installer does with a database of that kind. An
    engine is a module of this package holding one instance of it (`ENGINE`)."""

    kind: DbKind
    backup_kind: str  # what its backups are: Backup.kind

    def check_url(self, db: Database, env: Mapping[str, str]) -> None:
        """Read the URL as the engine will, without connecting: InstallError for one it would
        refuse later."""
        ...

    def check(self, db: Database, env: Mapping[str, str],
              run_in: ServiceExec | None) -> None:
        """InstallError unless `db` is reachable and can be backed up from here."""
        ...

    def backup(self, db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str],
               log: Log, run_in: ServiceExec | None) -> Path:
        """Write a new backup file into `dest_dir` (0700), read it back in full, and only then
        give it its final name (`placing`); that name."""
        ...

    def restore(self, db: Database, backup: Backup, env: Mapping[str, str], log: Log,
                run_in: ServiceExec | None) -> None:
        """Put `db` back exactly as `backup` (whose bytes the caller checked) holds it."""
        ...

    def fingerprint(self, db: Database, env: Mapping[str, str],
                    run_in: ServiceExec | None) -> str:
        """A short value that changes when the database is written to."""
        ...

    def ping(self, url: str, env: Mapping[str, str], timeout: float) -> str:
        """The health check of the kind: connect and run a trivial query; '' when fine, else
        why not (one line, secrets masked)."""
        ...

    def migration_session(self, db: Database, env: Mapping[str, str], log: Log, *,
                          ledger: bool, lock_wait: int, run_in: ServiceExec | None
                          ) -> AbstractContextManager[Ledger]:
        """The migration lock on `db` for a whole run (waiting up to `lock_wait` seconds for
        another installer, then LockedError), and the ledger under it (its table created when
        `ledger`: the release has SQL migrations)."""
        ...

    def read_ledger(self, db: Database, env: Mapping[str, str],
                    migration: str) -> dict[str, str]:
        """`Ledger.read` without the lock, for reports; {} when there is no ledger yet."""
        ...

    def file_owner(self, db: Database) -> proc.RunAs | None:
        """The account whose file access migrations run with (None: bundler's own)."""
        ...

    def owned_file(self, db: Database) -> Path | None:
        """The file the database lives in, which the release's account must be able to write
        (None: a database server)."""
        ...

    def let_write(self, db: Database, user: proc.RunAs | None) -> None:
        """Let `user` (an alembic or command migration's account) write the database."""
        ...

    def client_env(self, db: Database) -> dict[str, str]:
        """Variables an alembic or command migration's process gets so that the database's
        own client libraries find the password (the URL is DATABASE_URL)."""
        ...

    def scrub(self, db: Database, text: str) -> str:
        """`text` with the database's password (and every other known secret) masked."""
        ...


# --------------------------------------------------------------------------- shared helpers

def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class ServerEngine:
    """What the server engines (PostgreSQL, MySQL/MariaDB) answer alike: their data is no file
    of the host's, and the server's own accounts decide who may write it."""

    def file_owner(self, db: Database) -> proc.RunAs | None:
        return None

    def owned_file(self, db: Database) -> Path | None:
        return None

    def let_write(self, db: Database, user: proc.RunAs | None) -> None:
        return None



def now() -> datetime:
    return datetime.now(UTC)


def backup_path(dest_dir: Path, stem: str, suffix: str, when: datetime) -> Path:
    """A new file name in `dest_dir`: `<stem>-<when><suffix>`, numbered when taken."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "db"
    base = f"{safe}-{when.strftime('%Y%m%dT%H%M%SZ')}"
    path = dest_dir / f"{base}{suffix}"
    n = 1
    while path.exists():
        path = dest_dir / f"{base}-{n}{suffix}"
        n += 1
    return path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def placing(tmp: Path, final: Path) -> Iterator[None]:
    """`tmp` becomes `final` only once the block has written and verified it: fsynced, renamed,
    its directory fsynced. On any failure it is removed: a backup is complete or absent."""
    try:
        yield
        fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync(final.parent)


def wrong_backup(backup: Backup, expected: str) -> InstallError:
    """A restore handed another engine's backup."""
    return InstallError(f"backup {backup.path} is a {backup.kind} backup, not {expected}")
