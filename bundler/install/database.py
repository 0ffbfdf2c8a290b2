"""Database backup and restore for `bundle install`: PostgreSQL (pg_dump -Fc) and SQLite.

The installer backs the database up before migrating and restores it when the migration or
the new release fails. Three promises:

- A backup is complete or absent. `pg_dump -Fc` (SQLite: the backup API, a consistent copy
  even while the application writes) goes to a temp file beside the target; it is read back
  in full (`pg_restore --list`, then a decode of every data block), fsynced and only then
  renamed into place. Its sha256 is recorded, and `restore` refuses a file that changed since.
- A restore brings the database back to EXACTLY the backed-up state, schema and rows, even
  after a migration added tables, columns, types, functions, schemas or extensions, or failed
  half-way; and it is all or nothing. PostgreSQL: ONE transaction, in one `psql` session, first
  empties the database (every non-system schema but `public` is dropped with CASCADE, and
  `public` is emptied object by object: `pg_dump` assumes it exists), then replays
  `pg_restore -1 -f -` (the dump as a script) streamed through a FIFO: no plain-SQL copy of the
  data ever lands on disk. The `COMMIT` is the last line of that script, so a stream cut short
  for any reason (pg_restore died, the disk went away) commits nothing: the session ends inside
  the transaction and the server rolls it back. `pg_restore --clean --if-exists` would not do:
  it drops only what the dump names, so objects a migration created after the dump survive.
  SQLite: the backup API copies the backup over the live database in one transaction.
- Secrets never show. The password in a URL (user:PASSWORD@ or ?password=) is handed to the
  client tools as PGPASSWORD in their environment, never in argv; every message, log line and
  quoted tool output goes through `bundler.redact.redact`.

URLs: `postgresql://user@/db?host=/sock/dir&port=5432` (unix socket),
`postgresql://user:pw@127.0.0.1:5432/db`, a `+driver` suffix (`postgresql+psycopg://`) is
accepted and ignored; `sqlite:///abs/path.db` and SQLAlchemy's `sqlite:////abs/path.db` both
name /abs/path.db (relative SQLite paths are refused: an installer must not depend on its cwd).

Databases in a compose service (`Database.compose_service`): pg_dump, pg_restore and psql run
INSIDE that service, so client and server versions always match. This module does not call
compose itself: the caller passes `exec_in_service` (see `ServiceExec`), typically
`docker compose -p PROJECT exec -T -e PGPASSWORD SERVICE ARGV...` with stdin/stdout redirected
to the given paths and PGPASSWORD in compose's own environment. Inside the service the tools
connect through the container's default unix socket as the URL's user to the URL's database
(the URL's host and port are what the application uses, not what works inside the container).

Not reset by a PostgreSQL restore (database-wide objects a schema drop does not reach, rarely
made by application migrations): event triggers, publications, subscriptions, foreign-data
wrappers and servers, casts, languages, operator classes and families, and the ACL of the
`public` schema itself. They are listed here so nobody assumes otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import shutil
import sqlite3
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from bundler import proc
from bundler.bundle import hostneeds
from bundler.errors import CommandError, InstallError
from bundler.fsutil import CHUNK, create_file, private_dir, require_space, sha256_file
from bundler.install import fsowner, mysql_db
from bundler.redact import redact

# Seconds. A dump or a restore of a big database takes long; a hung one must still end.
DUMP_TIMEOUT = 4 * 3600.0
RESTORE_TIMEOUT = 4 * 3600.0
CONNECT_TIMEOUT = 10
# How long a restore waits for locks held by sessions that are still using the database
# (the installer stops the release first; a straggler must not make the restore hang).
RESTORE_LOCK_TIMEOUT = "120s"
DUMP_LOCK_TIMEOUT = "120s"

# One key for every bundler that migrates or restores a database: restores take it for their
# transaction, migrations for their whole run, so the two never interleave.
ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"bundler:migrations").digest()[:8], "big",
                                   signed=True)

CONNECT_HINT = ("check that the database server is running and that the URL's host, port (or "
                "socket directory), user and database, and the password, are right")

Log = Callable[[str], None]


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
    def kind(self) -> str:
        """"postgresql", "mysql" (MySQL or MariaDB, see mysql_db) or "sqlite"; InstallError
        for anything else."""
        scheme = self.url.partition("://")[0].split("+", 1)[0].lower()
        if scheme in ("postgresql", "postgres"):
            return "postgresql"
        if scheme in ("mysql", "mariadb"):
            return "mysql"
        if scheme == "sqlite":
            return "sqlite"
        raise InstallError(
            f"database URL {redact(self.url)} is not a postgresql://, mysql:// or sqlite:/// URL",
            hint="use postgresql://user@host:5432/db, postgresql://user@/db?host=/socket/dir, "
                 "mysql://user@host:3306/db or sqlite:///absolute/path.db")

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
    kind: str  # "pg_dump" | "sqlite" | "mysqldump"
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


# --------------------------------------------------------------------------- URLs and secrets

@dataclass(frozen=True)
class PgTarget:
    """A PostgreSQL URL taken apart: `uri` carries no password and is safe in argv and logs."""

    uri: str
    password: str | None
    user: str | None
    dbname: str | None
    params: tuple[tuple[str, str], ...]

    def scrub(self, text: str) -> str:
        return redact(text, (self.password,))


def pg_target(db: Database) -> PgTarget:
    if db.kind != "postgresql":
        raise InstallError(f"{db.display} is not a PostgreSQL database")
    parts = urlsplit("postgresql://" + db.url.partition("://")[2])
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user_q, colon, password_q = userinfo.partition(":")
    password = unquote(password_q) if colon else None
    params: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password":
            password = password or value
        else:
            params.append((key, value))
    netloc = f"{user_q}@{hostport}" if at else hostport
    query = urlencode(params, safe="/")
    uri = f"postgresql://{netloc}{parts.path}" + (f"?{query}" if query else "")
    dbname = unquote(parts.path.lstrip("/")) or dict(params).get("dbname") or None
    user = unquote(user_q) or dict(params).get("user") or None
    return PgTarget(uri, password or None, user, dbname, tuple(params))


def sqlite_path(db: Database) -> Path:
    if db.kind != "sqlite":
        raise InstallError(f"{db.display} is not a SQLite database")
    path = urlsplit(db.url).path
    if not path.startswith("/") or not path.strip("/"):
        raise InstallError(f"SQLite URL {db.display} does not name an absolute file path",
                           hint="use sqlite:///absolute/path.db (or sqlite:////absolute/path.db)")
    return Path("/" + path.lstrip("/"))


# libpq environment variables honoured from `env` for direct (psycopg) connections too.
_LIBPQ_ENV = {"PGPASSFILE": "passfile", "PGSSLMODE": "sslmode", "PGSSLROOTCERT": "sslrootcert",
              "PGSSLCERT": "sslcert", "PGSSLKEY": "sslkey", "PGCONNECT_TIMEOUT": "connect_timeout",
              "PGAPPNAME": "application_name"}


def _password(pg: PgTarget, env: Mapping[str, str]) -> str | None:
    return pg.password or env.get("PGPASSWORD") or None


def tool_env(pg: PgTarget, env: Mapping[str, str]) -> dict[str, str]:
    """Environment for local client tools: `env` over proc.clean_env(), plus PGPASSWORD; PATH
    is bundler's own (they are bundler's tools, see bundler.proc), never a .env's."""
    child = proc.clean_env(env)
    child["PATH"] = proc.own_path()
    password = _password(pg, env)
    if password:
        child["PGPASSWORD"] = password
    child.setdefault("PGCONNECT_TIMEOUT", str(CONNECT_TIMEOUT))
    return child


def _service_env(pg: PgTarget, env: Mapping[str, str]) -> dict[str, str]:
    out = {"PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT)}
    password = _password(pg, env)
    if password:
        out["PGPASSWORD"] = password
    return out


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def connect(db: Database, env: Mapping[str, str], *, timeout: int = CONNECT_TIMEOUT) -> Any:
    """A psycopg connection (autocommit) to a PostgreSQL `db`, or InstallError (redacted)."""
    import psycopg

    pg = pg_target(db)
    keys = {k for k, _ in pg.params}
    kwargs: dict[str, Any] = {}
    for var, key in _LIBPQ_ENV.items():
        if var in env and key not in keys:
            kwargs[key] = env[var]
    if "connect_timeout" not in keys:
        kwargs.setdefault("connect_timeout", timeout)
    password = _password(pg, env)
    if password:
        kwargs["password"] = password
    try:
        return psycopg.connect(pg.uri, autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise InstallError(f"cannot connect to database {db.display}: "
                           f"{pg.scrub(first_line(str(exc)))}", hint=_connect_hint(str(exc))
                           ) from None


def _connect_hint(message: str) -> str:
    low = message.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return "check the password: in the URL (user:PASSWORD@) or PGPASSWORD in the environment"
    if "does not exist" in low and "database" in low:
        return "create the database first, or fix the database name in the URL"
    if "role" in low and "does not exist" in low:
        return "fix the user name in the URL"
    return CONNECT_HINT


# --------------------------------------------------------------------------- running the tools

def _need_service_exec(db: Database, exec_in_service: ServiceExec | None) -> ServiceExec:
    if exec_in_service is None:
        raise InstallError(
            f"database {db.display} runs in compose service {db.compose_service!r} but no way "
            "to run commands in it was given",
            hint="this is a bug in bundler: the installer must pass exec_in_service")
    return exec_in_service


def _service_conn_args(pg: PgTarget) -> list[str]:
    args = []
    if pg.user:
        args += ["-U", pg.user]
    if pg.dbname:
        args += ["-d", pg.dbname]
    return args


def _run_tool(db: Database, argv: Sequence[str], env: Mapping[str, str], *,
              service_argv: Sequence[str] | None = None, stdin: Path | None = None,
              stdout: Path | None = None, timeout: float,
              exec_in_service: ServiceExec | None) -> proc.Result:
    """Run a client tool locally (`argv`) or in the compose service (`service_argv`)."""
    pg = pg_target(db)
    try:
        if db.compose_service:
            runner = _need_service_exec(db, exec_in_service)
            return runner(list(service_argv if service_argv is not None else argv), stdin,
                          stdout, env=_service_env(pg, env), timeout=timeout)
        return proc.run(argv, env=tool_env(pg, env), timeout=timeout, check=False)
    except CommandError as exc:
        raise InstallError(pg.scrub(exc.message), hint=exc.hint) from None


def _tool_failed(pg: PgTarget, what: str, result: proc.Result) -> InstallError:
    text = pg.scrub(result.output)
    error = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()),
                 first_line(text))
    tail = "\n".join(text.rstrip().splitlines()[-proc.TAIL_LINES:])
    return InstallError(f"{what} failed (exit {result.returncode}): {error}"
                        + (f"\n{tail}" if tail and tail.strip() != error else ""),
                        hint=_connect_hint(text) if "connection" in text.lower()
                        else "read the tool's output above")


def _major(version_output: str) -> int | None:
    match = re.search(r"\)\s+(\d+)(?:\.(\d+))?", version_output)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- check

def check_url(db: Database, env: Mapping[str, str]) -> None:
    """Read `db`'s URL as its engine will, without connecting: InstallError (one line, password
    masked) for one it would refuse later. Run before anything is written."""
    if db.kind == "mysql":
        mysql_db.target(db, env)


def check(db: Database, env: Mapping[str, str], *,
          exec_in_service: ServiceExec | None = None) -> None:
    """Raise InstallError (one line, redacted, with a hint) unless `db` is reachable and can be
    backed up from here: PostgreSQL answers and pg_dump/pg_restore/psql are new enough for it;
    a SQLite file is a database (or does not exist yet, in a directory that does)."""
    if db.kind == "sqlite":
        _sqlite_check(sqlite_path(db), db.owner)
        return
    if db.kind == "mysql":
        mysql_db.check(db, env, exec_in_service=exec_in_service)
        return
    pg = pg_target(db)
    if db.compose_service:
        for tool in ("pg_dump", "pg_restore", "psql"):
            result = _run_tool(db, [tool, "--version"], env, timeout=60,
                               exec_in_service=exec_in_service)
            if result.returncode != 0:
                raise InstallError(
                    f"{tool} is not available in compose service {db.compose_service!r}: "
                    f"{pg.scrub(first_line(result.output))}",
                    hint="the database service's image must carry the PostgreSQL client tools "
                         "(the official postgres images do)")
        result = _run_tool(db, ["psql"], env, timeout=CONNECT_TIMEOUT + 30,
                           exec_in_service=exec_in_service,
                           service_argv=["psql", "-X", "-w", "-A", "-t", *_service_conn_args(pg),
                                         "-c", "SELECT 1"])
        if result.returncode != 0:
            raise InstallError(f"cannot connect to database {db.display} in compose service "
                               f"{db.compose_service!r}: {pg.scrub(first_line(result.output))}",
                               hint=_connect_hint(result.output))
        return
    with connect(db, env) as conn:
        server = int(conn.info.server_version) // 10000
    for tool in ("pg_dump", "pg_restore", "psql"):
        if shutil.which(tool, path=tool_env(pg, env).get("PATH")) is None:
            raise InstallError(
                f"{tool} is not on PATH: it is needed to back up {db.display}",
                hint=f"install the PostgreSQL {server} client tools (Debian: "
                     f"{hostneeds.postgres_client(server)}), or run the database as a compose "
                     "service")
        result = proc.run([tool, "--version"], env=tool_env(pg, env), timeout=60, check=False)
        client = _major(result.output)
        if client is not None and client < server:
            raise InstallError(
                f"{tool} {client} cannot back up or restore PostgreSQL {server} at {db.display}",
                hint=f"install the PostgreSQL {server} client tools (Debian: "
                     f"{hostneeds.postgres_client(server)}), or run the database as a compose "
                     "service")


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


def _sqlite_check(path: Path, owner: proc.RunAs | None) -> None:
    fsowner.call(owner, lambda: _sqlite_readable(path))


def _sqlite_readable(path: Path) -> None:
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

def _now() -> datetime:
    return datetime.now(UTC)


def _backup_path(dest_dir: Path, stem: str, suffix: str, when: datetime) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "db"
    base = f"{safe}-{when.strftime('%Y%m%dT%H%M%SZ')}"
    path = dest_dir / f"{base}{suffix}"
    n = 1
    while path.exists():
        path = dest_dir / f"{base}-{n}{suffix}"
        n += 1
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(db: Database, dest_dir: Path, env: Mapping[str, str], log: Log, *,
           exec_in_service: ServiceExec | None = None) -> Backup:
    """Back `db` up into a new file in `dest_dir`; the file exists only once it is verified."""
    private_dir(dest_dir)  # 0700 whatever the umask: backups hold the whole database
    when = _now()
    started = time.monotonic()
    if db.kind == "sqlite":
        path = _sqlite_backup(sqlite_path(db), dest_dir, when, log, db.owner)
        kind = "sqlite"
    elif db.kind == "mysql":
        path = _mysql_backup(db, dest_dir, when, env, log, exec_in_service)
        kind = "mysqldump"
    else:
        path = _pg_backup(db, dest_dir, when, env, log, exec_in_service)
        kind = "pg_dump"
    digest, size = sha256_file(path)
    log(f"backup of {db.display}: {path.name}, {size} bytes, "
        f"{time.monotonic() - started:.1f}s")
    return Backup(path, kind, size, digest, when.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _pg_backup(db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str], log: Log,
               exec_in_service: ServiceExec | None) -> Path:
    pg = pg_target(db)
    final = _backup_path(dest_dir, pg.dbname or pg.user or "postgres", ".pgdump", when)
    tmp = dest_dir / f".{final.name}.tmp"
    log(f"pg_dump {db.display} -> {final.name}"
        + (f" (in compose service {db.compose_service})" if db.compose_service else ""))
    dump_opts = ["-Fc", "-w", f"--lock-wait-timeout={DUMP_LOCK_TIMEOUT}"]
    with _placing(tmp, final):
        # 0600 before the first byte is written (pg_dump -f and a redirect keep the mode).
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        create_file(tmp, 0o600)
        result = _run_tool(db, ["pg_dump", *dump_opts, "-f", str(tmp), "-d", pg.uri], env,
                           service_argv=["pg_dump", *dump_opts, *_service_conn_args(pg)],
                           stdout=tmp, timeout=DUMP_TIMEOUT, exec_in_service=exec_in_service)
        if result.returncode != 0:
            raise _tool_failed(pg, f"pg_dump of {db.display}", result)
        os.chmod(tmp, 0o600)  # the whole database: readable by its owner only (kept so)
        entries = _verify_dump(db, tmp, env, exec_in_service)
        log(f"verified {final.name}: {entries} archive entries, every data block readable")
    return final


def _mysql_backup(db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str],
                  log: Log, exec_in_service: ServiceExec | None) -> Path:
    final = _backup_path(dest_dir, mysql_db.target(db, env).dbname, ".mysql.sql", when)
    tmp = dest_dir / f".{final.name}.tmp"
    with _placing(tmp, final):
        mysql_db.backup(db, tmp, env, log, exec_in_service=exec_in_service)
        log(f"verified {final.name}: read back to its completion line")
    return final


def _verify_dump(db: Database, path: Path, env: Mapping[str, str],
                 exec_in_service: ServiceExec | None) -> int:
    """Read the archive back: its table of contents, then every data block (decompressed)."""
    pg = pg_target(db)
    listing = _run_tool(db, ["pg_restore", "--list", str(path)], env,
                        service_argv=["pg_restore", "--list"], stdin=path, timeout=DUMP_TIMEOUT,
                        exec_in_service=exec_in_service)
    if listing.returncode != 0:
        raise _tool_failed(pg, f"pg_restore --list of the new backup {path.name}", listing)
    entries = sum(1 for ln in listing.output.splitlines() if ln and not ln.startswith(";"))
    full = _run_tool(db, ["pg_restore", "-f", os.devnull, str(path)], env,
                     service_argv=["pg_restore", "-f", "/dev/null"], stdin=path,
                     timeout=DUMP_TIMEOUT, exec_in_service=exec_in_service)
    if full.returncode != 0:
        raise _tool_failed(pg, f"reading back the new backup {path.name}", full)
    return entries


def _sqlite_backup(path: Path, dest_dir: Path, when: datetime, log: Log,
                   owner: proc.RunAs | None) -> Path:
    final = _backup_path(dest_dir, path.stem, ".sqlite", when)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=dest_dir)
    tmp = Path(tmp_name)
    with _placing(tmp, final), _sqlite_errors(f"SQLite backup of {path} failed"):
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
def _placing(tmp: Path, final: Path) -> Iterator[None]:
    """`tmp` becomes `final` only once the block has written and verified it: fsynced, renamed,
    its directory fsynced. On any failure it is removed: a backup is complete or absent."""
    try:
        yield
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync(final.parent)


@contextlib.contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise InstallError(f"{what}: {exc}",
                           hint="check that the file is a SQLite database and readable") from None


# --------------------------------------------------------------------------- fingerprint

# What has been written to a PostgreSQL database: per user table the counts of rows inserted,
# updated and deleted (cumulative, aborted writes included: a false "changed" only costs the
# operator a flag), and the identity of every user relation (DDL, TRUNCATE). Reads change
# nothing here, and neither does a checkpoint or a cluster-wide WAL position of other databases.
_PG_FINGERPRINT = (
    "SELECT md5(coalesce((SELECT string_agg(format('%s:%s:%s:%s', relid, n_tup_ins, n_tup_upd,"
    " n_tup_del), ',' ORDER BY relid) FROM pg_stat_user_tables), '') || '|' || "
    "coalesce((SELECT string_agg(format('%s:%s:%s', c.oid, c.relname, c.relfilenode), ','"
    " ORDER BY c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'), ''))")


def fingerprint(db: Database, env: Mapping[str, str], *,
                exec_in_service: ServiceExec | None = None) -> str:
    """A short value that changes when the database is written to: compared before a restore
    that was left pending, it tells whether the restore would discard writes made since
    bundler last looked. SQLite: the file's bytes; PostgreSQL: see `_PG_FINGERPRINT`."""
    if db.kind == "sqlite":
        path = sqlite_path(db)
        parts = []
        for f in (path, path.with_name(path.name + "-wal")):
            parts.append(sha256_file(f)[0] if f.is_file() else "-")
        return "sqlite:" + hashlib.sha256(":".join(parts).encode()).hexdigest()[:32]
    if db.kind == "mysql":
        return mysql_db.fingerprint(db, env, exec_in_service=exec_in_service)
    pg = pg_target(db)
    if db.compose_service:
        result = _run_tool(db, ["psql"], env, timeout=CONNECT_TIMEOUT + 60,
                           exec_in_service=exec_in_service,
                           service_argv=["psql", "-X", "-w", "-A", "-t",
                                         *_service_conn_args(pg), "-c", _PG_FINGERPRINT])
        if result.returncode != 0:
            raise _tool_failed(pg, "reading the database's write counters", result)
        value = result.output.strip().splitlines()[-1].strip() if result.output.strip() else ""
    else:
        with connect(db, env) as conn:
            value = str(conn.execute(_PG_FINGERPRINT).fetchone()[0])
    return f"pg:{value}"


# --------------------------------------------------------------------------- restore

def restore(db: Database, backup: Backup, env: Mapping[str, str], log: Log, *,
            exec_in_service: ServiceExec | None = None) -> None:
    """Put `db` back exactly as it was when `backup` was taken; all or nothing."""
    started = time.monotonic()
    digest, size = (sha256_file(backup.path) if backup.path.is_file() else ("", -1))
    if (digest, size) != (backup.sha256, backup.size):
        raise InstallError(
            f"backup {backup.path} is missing or changed since it was taken "
            f"(expected {backup.size} bytes, sha256 {backup.sha256[:16]}…)",
            hint="the database was NOT restored; restore it by hand from another copy")
    if db.kind == "sqlite":
        _sqlite_restore(sqlite_path(db), backup, log, db.owner)
    elif db.kind == "mysql":
        if backup.kind != "mysqldump":
            raise InstallError(f"backup {backup.path} is a {backup.kind} backup, not a "
                               "mysqldump")
        mysql_db.restore(db, backup.path, backup.path.parent, env, log,
                         exec_in_service=exec_in_service)
    else:
        if backup.kind != "pg_dump":
            raise InstallError(f"backup {backup.path} is a {backup.kind} backup, not a pg_dump")
        _pg_restore(db, backup, env, log, exec_in_service)
    log(f"restored {db.display} from {backup.path.name} in {time.monotonic() - started:.1f}s")


def _sqlite_restore(path: Path, backup: Backup, log: Log, owner: proc.RunAs | None) -> None:
    if backup.kind != "sqlite":
        raise InstallError(f"backup {backup.path} is a {backup.kind} backup, not a SQLite one")
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


# Runs first, inside the restore's transaction: empty the database so that the dump, replayed
# next, yields exactly the backed-up state. Everything is formatted while search_path is
# pg_catalog alone, so every user object's name comes out schema-qualified.
RESET_SQL = r"""
DO $bundler_reset$
DECLARE
  item record;
  stmts text[];
  stmt text;
BEGIN
  -- Large objects: the dump recreates them by OID.
  PERFORM pg_catalog.lo_unlink(l.oid) FROM pg_catalog.pg_largeobject_metadata l;
  -- Every schema but public and the system's own, with all it holds (extensions included).
  FOR item IN SELECT n.nspname FROM pg_catalog.pg_namespace n
      WHERE n.nspname <> 'public' AND n.nspname <> 'information_schema'
        AND n.nspname !~ '^pg_'
  LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', item.nspname);
  END LOOP;
  -- public itself stays (pg_dump assumes it exists); everything in it goes. Statements are
  -- built first, then run with IF EXISTS: an earlier CASCADE may already have taken one.
  SELECT coalesce(array_agg(s.stmt ORDER BY s.pass, s.stmt), '{}') INTO stmts FROM (
    SELECT 1 AS pass, format('DROP EXTENSION IF EXISTS %I CASCADE', e.extname) AS stmt
      FROM pg_catalog.pg_extension e WHERE e.extnamespace = 'public'::regnamespace
    UNION ALL
    SELECT CASE WHEN c.relkind IN ('v', 'm') THEN 2 WHEN c.relkind = 'S' THEN 4 ELSE 3 END,
           format('DROP %s IF EXISTS %I.%I CASCADE',
                  CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                 WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                                 WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END,
                  'public', c.relname)
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'public'::regnamespace
       AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                          AND d.deptype = 'e')
    UNION ALL
    SELECT 5, format('DROP ROUTINE IF EXISTS %s CASCADE', p.oid::regprocedure)
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = 'public'::regnamespace
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid
                          AND d.deptype = 'e')
    UNION ALL
    SELECT 6, format('DROP %s IF EXISTS %s CASCADE',
                     CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype)
      FROM pg_catalog.pg_type t
     WHERE t.typnamespace = 'public'::regnamespace
       AND t.typtype IN ('b', 'd', 'e', 'r')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type el WHERE el.typarray = t.oid)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_type'::regclass AND d.objid = t.oid
                          AND d.deptype = 'e')
    UNION ALL
    SELECT 7, format('DROP COLLATION IF EXISTS %I.%I CASCADE', 'public', co.collname)
      FROM pg_catalog.pg_collation co
     WHERE co.collnamespace = 'public'::regnamespace
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_collation'::regclass
                          AND d.objid = co.oid AND d.deptype = 'e')
    UNION ALL
    SELECT 7, format('DROP CONVERSION IF EXISTS %I.%I CASCADE', 'public', cv.conname)
      FROM pg_catalog.pg_conversion cv WHERE cv.connamespace = 'public'::regnamespace
    UNION ALL
    SELECT 7, format('DROP TEXT SEARCH CONFIGURATION IF EXISTS %I.%I CASCADE', 'public',
                     cf.cfgname)
      FROM pg_catalog.pg_ts_config cf WHERE cf.cfgnamespace = 'public'::regnamespace
    UNION ALL
    SELECT 8, format('DROP TEXT SEARCH DICTIONARY IF EXISTS %I.%I CASCADE', 'public',
                     dc.dictname)
      FROM pg_catalog.pg_ts_dict dc WHERE dc.dictnamespace = 'public'::regnamespace
    UNION ALL
    SELECT 8, format('DROP OPERATOR IF EXISTS %s CASCADE', o.oid::regoperator)
      FROM pg_catalog.pg_operator o
     WHERE o.oprnamespace = 'public'::regnamespace
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_operator'::regclass
                          AND d.objid = o.oid AND d.deptype = 'e')
  ) s;
  FOREACH stmt IN ARRAY stmts LOOP
    EXECUTE stmt;
  END LOOP;
END
$bundler_reset$;
"""


def restore_prologue() -> bytes:
    """What psql runs before the dump's own script (which starts with BEGIN, ends with COMMIT):
    open the transaction, wait for running bundler migrations, empty the database."""
    return (
        "BEGIN;\n"
        "SET client_min_messages = error;\n"  # the dump's own BEGIN warns; nothing to see
        "SET statement_timeout = 0;\n"
        "SET idle_in_transaction_session_timeout = 0;\n"  # psql may wait on a slow stream
        f"SET lock_timeout = '{RESTORE_LOCK_TIMEOUT}';\n"
        "SET search_path = pg_catalog;\n"
        f"SELECT pg_catalog.pg_advisory_xact_lock({ADVISORY_LOCK_KEY});\n"
        + RESET_SQL
        + "SET lock_timeout = 0;\n"
    ).encode()


def _pg_restore(db: Database, backup: Backup, env: Mapping[str, str], log: Log,
                exec_in_service: ServiceExec | None) -> None:
    pg = pg_target(db)
    log(f"restoring {db.display} from {backup.path.name} (one transaction)"
        + (f" in compose service {db.compose_service}" if db.compose_service else ""))
    psql_opts = ["-X", "-q", "-w", "-o", os.devnull, "-v", "ON_ERROR_STOP=1"]
    results: dict[str, proc.Result | BaseException] = {}
    with _fifos() as (dump_fifo, script_fifo):
        pump = _Pump(restore_prologue(), dump_fifo, script_fifo)

        def call(key: str, done: threading.Event, fn: Callable[[], proc.Result]) -> None:
            try:
                results[key] = fn()
            except BaseException as exc:
                results[key] = exc
            finally:
                done.set()

        producer = threading.Thread(target=call, daemon=True, args=(
            "pg_restore", pump.source_done, lambda: _run_tool(
                db, ["pg_restore", "--single-transaction", "-f", str(dump_fifo),
                     str(backup.path)], env,
                service_argv=["pg_restore", "--single-transaction", "-f", "-"],
                stdin=backup.path, stdout=dump_fifo, timeout=RESTORE_TIMEOUT,
                exec_in_service=exec_in_service)))
        consumer = threading.Thread(target=call, daemon=True, args=(
            "psql", pump.sink_done, lambda: _run_tool(
                db, ["psql", *psql_opts, "-d", pg.uri, "-f", str(script_fifo)], env,
                service_argv=["psql", *psql_opts, *_service_conn_args(pg), "-f", "-"],
                stdin=script_fifo, timeout=RESTORE_TIMEOUT, exec_in_service=exec_in_service)))
        feeder = threading.Thread(target=pump.run, daemon=True)
        for thread in (producer, consumer, feeder):
            thread.start()
        _supervise(feeder, producer, dump_fifo, consumer, script_fifo)
    produced, applied = results.get("pg_restore"), results.get("psql")
    for outcome in (applied, produced):
        if isinstance(outcome, BaseException):
            raise outcome
    assert isinstance(applied, proc.Result) and isinstance(produced, proc.Result)
    if applied.returncode != 0:
        error = next((ln for ln in applied.output.splitlines() if "ERROR" in ln),
                     first_line(applied.output))
        if "lock timeout" in applied.output:
            hint = "stop the services that still use the database, then restore again"
        elif "connection to server" in applied.output:
            hint = _connect_hint(applied.output)
        else:
            hint = ("the restore is one transaction: the database is as it was before it; "
                    "read the error above")
        raise InstallError(f"restoring {db.display} from {backup.path.name} failed, "
                           f"nothing was changed: {pg.scrub(error.strip())}", hint=hint)
    if produced.returncode != 0:
        raise InstallError(
            f"pg_restore could not read {backup.path.name}: "
            f"{pg.scrub(first_line(produced.output))}",
            hint="the stream was cut short before its COMMIT: nothing was changed")
    if pump.error:
        raise InstallError(f"restoring {db.display}: {pump.error}",
                           hint="the stream was cut short before its COMMIT: nothing was changed")


def _supervise(feeder: threading.Thread, producer: threading.Thread, dump_fifo: Path,
               consumer: threading.Thread, script_fifo: Path) -> None:
    """Wait for all three; once the pump is gone, release a peer stuck opening its FIFO (a FIFO
    open blocks until the other end opens: pg_restore may never get to it when psql failed
    first, and psql never sees EOF if the pump died before it opened)."""
    while any(t.is_alive() for t in (feeder, producer, consumer)):
        if not feeder.is_alive():
            if producer.is_alive():
                _poke(dump_fifo, os.O_RDONLY)
            if consumer.is_alive():
                _poke(script_fifo, os.O_WRONLY)
        for thread in (feeder, producer, consumer):
            thread.join(0.05)


def _poke(fifo: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, mode | os.O_NONBLOCK))


@contextlib.contextmanager
def _fifos() -> Iterator[tuple[Path, Path]]:
    """Two FIFOs in a private temp dir: pg_restore's script output, and what psql reads."""
    tmp = Path(tempfile.mkdtemp(prefix="bundler-restore-"))
    try:
        dump, script = tmp / "dump.sql", tmp / "script.sql"
        os.mkfifo(dump, 0o600)
        os.mkfifo(script, 0o600)
        yield dump, script
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Pump:
    """Copies prologue + pg_restore's output into psql's input, never blocking forever.

    Both FIFOs are opened here O_RDWR (on Linux that never blocks, and it keeps each FIFO open
    for the peer that has not opened it yet), non-blocking, with poll timeouts, so a peer that
    dies or never starts cannot hang the restore: `sink_done` (psql ended) stops the copy, and
    `source_done` (pg_restore ended) means "drain what is buffered, then end the stream".
    """

    def __init__(self, prologue: bytes, source: Path, sink: Path) -> None:
        self.prologue = prologue
        self.source_done = threading.Event()
        self.sink_done = threading.Event()
        self.error: str | None = None
        self._src = os.open(source, os.O_RDWR | os.O_NONBLOCK)
        self._dst = os.open(sink, os.O_RDWR | os.O_NONBLOCK)
        for fd in (self._src, self._dst):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)

    def run(self) -> None:
        try:
            if self._write(self.prologue) and self._copy():
                self._drained()
        except OSError as exc:
            self.error = f"streaming the restore script failed: {exc}"
        finally:
            # Closing the sink's last writer gives psql EOF: if the dump's COMMIT was not in
            # the stream, psql ends inside the transaction and the server rolls it back.
            os.close(self._dst)
            os.close(self._src)

    def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if self.sink_done.is_set():
                return False
            _, ready, _ = select.select([], [self._dst], [], 0.1)
            if not ready:
                continue
            try:
                view = view[os.write(self._dst, view):]
            except BlockingIOError:
                continue
        return True

    def _copy(self) -> bool:
        while True:
            finished = self.source_done.is_set()
            try:
                chunk = os.read(self._src, CHUNK)
            except BlockingIOError:
                if finished:  # the producer is gone and its buffer is empty
                    return True
                if self.sink_done.is_set():
                    return False
                select.select([self._src], [], [], 0.1)
                continue
            if not self._write(chunk):
                return False

    def _drained(self) -> None:
        """Wait until psql has read everything (or ended): closing earlier would discard it."""
        pending = bytearray(4)
        while not self.sink_done.is_set():
            fcntl.ioctl(self._dst, termios.FIONREAD, pending)
            if int.from_bytes(pending, "little") == 0:
                return
            time.sleep(0.02)
