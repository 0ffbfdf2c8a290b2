"""MySQL and MariaDB (one protocol) for `bundle install`: check, backup, restore, fingerprint,
SQL migrations and the `mysql:` health check. `database.py` dispatches here for `kind` mysql.

Everything goes through the client programs a bare host (or the database's own container)
has: `mariadb` / `mariadb-dump` (Debian: mariadb-client), else `mysql` / `mysqldump`. No
Python driver is needed. The password never appears in argv: locally it goes into a 0600
`--defaults-file` in a private temp directory (with user, host, port and socket); inside a
compose service it is MYSQL_PWD in the client's environment (passed through compose's own
environment, `-e MYSQL_PWD`), and the client connects through the container's default socket.

- Backup: `mariadb-dump --single-transaction --routines --triggers` (a consistent snapshot of
  InnoDB tables without locking writers) to a temp file beside the target, read back in full
  (it must end with the dump's own "-- Dump completed" line, i.e. the tool finished), fsynced
  and renamed into place. Kind "mysqldump".
- Restore: ONE client session drops every table, view, sequence and routine of the database
  (foreign key checks off), then replays the dump. MySQL DDL is not transactional: a restore
  cut short leaves the database partly restored (run it again: it starts from empty each
  time); the backup itself is untouched.
- Fingerprint: the list of the database's tables with their `CHECKSUM TABLE` values.
- SQL migrations (`sql_*` below): a ledger table `bundler_migrations`; each file runs in one
  client session as `START TRANSACTION; <file>; INSERT <ledger row>; COMMIT;` and the client
  stops at the first error, so the session ends uncommitted: a failing file's row changes are
  rolled back. DDL (CREATE/ALTER/DROP) commits implicitly in MySQL, so a failing file may leave
  its earlier DDL statements applied: the installer's restore of the backup covers that.
  A `GET_LOCK('bundler:migrations')` session is held for the whole run.
- Health check: `mariadb ... -e 'SELECT 1'` against the URL.

URLs: `mysql://user:pw@host:3306/db`, `mariadb://...`, `?unix_socket=/path` (or `socket=`)
for a unix socket; a `+driver` suffix (`mysql+pymysql://`) is accepted and ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from bundler import proc
from bundler.errors import CommandError, InstallError, LockedError, MigrationError
from bundler.fsutil import create_file
from bundler.redact import redact

if TYPE_CHECKING:
    from bundler.install.database import Database, ServiceExec

DUMP_TIMEOUT = 4 * 3600.0
CONNECT_TIMEOUT = 10
LOCK_NAME = "bundler:migrations"
LOCK_WAIT = 600
LEDGER = "bundler_migrations"
DONE_MARK = b"-- Dump completed"

Log = Callable[[str], None]


@dataclass(frozen=True)
class MyTarget:
    user: str | None
    password: str | None
    host: str | None
    port: int | None
    socket: str | None
    dbname: str

    def scrub(self, text: str) -> str:
        return redact(text, (self.password,))


def target(db: Database, env: Mapping[str, str] | None = None) -> MyTarget:
    return parse_url(db.url, db.display, env)


def parse_url(url: str, display: str, env: Mapping[str, str] | None = None) -> MyTarget:
    parts = urlsplit("mysql://" + url.partition("://")[2])
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise InstallError(f"MySQL URL {display} names no database",
                           hint="use mysql://user@host:3306/DBNAME")
    password = unquote(parts.password) if parts.password is not None else None
    password = password or params.get("password") or (env or {}).get("MYSQL_PWD") or None
    socket = params.get("unix_socket") or params.get("socket") or None
    return MyTarget(unquote(parts.username) if parts.username else None, password,
                    parts.hostname or None, parts.port, socket, dbname)


def _tool(*names: str) -> str:
    for name in names:
        if found := proc.which(name):  # bundler's own PATH, never a .env's (see bundler.proc)
            return found
    raise InstallError(f"{names[0]} is not on PATH: it is needed for a MySQL/MariaDB database",
                       hint="install the client tools (Debian: mariadb-client), or run the "
                            "database as a compose service")


def client() -> str:
    return _tool("mariadb", "mysql")


def dumper() -> str:
    return _tool("mariadb-dump", "mysqldump")


@contextlib.contextmanager
def _defaults(t: MyTarget) -> Iterator[str]:
    """A 0600 option file with the connection settings (and the password): never in argv."""
    tmp = Path(tempfile.mkdtemp(prefix="bundler-my-"))
    try:
        path = tmp / "my.cnf"
        create_file(path, 0o600)
        lines = ["[client]"]
        if t.user:
            lines.append(f"user={t.user}")
        if t.password:
            lines.append(f'password="{_opt_escape(t.password)}"')
        if t.socket:
            lines.append(f"socket={t.socket}")
            lines.append("protocol=socket")
        elif t.host:
            lines.append(f"host={t.host}")
            lines.append("protocol=tcp")
        if t.port:
            lines.append(f"port={t.port}")
        # the interactive clients' own groups (the dump tools refuse this option)
        lines += ["[mysql]", f"connect-timeout={CONNECT_TIMEOUT}"]
        path.write_text("\n".join(lines) + "\n")
        yield f"--defaults-file={path}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _opt_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


_SERVICE_SH = ('for t in "$0" "$1"; do command -v "$t" >/dev/null 2>&1 && { shift 2; '
               'exec "$t" "$@"; }; done; echo "neither $0 nor $1 in this container" >&2; exit 127')


def run_client(db: Database, args: Sequence[str], env: Mapping[str, str], *,
               dump: bool = False, stdin: Path | None = None, stdout: Path | None = None,
               timeout: float = 600, exec_in_service: ServiceExec | None = None
               ) -> proc.Result:
    """Run the client (or, `dump`, the dump tool) with `args` against `db`."""
    t = target(db, env)
    names = ("mariadb-dump", "mysqldump") if dump else ("mariadb", "mysql")
    try:
        if db.compose_service:
            if exec_in_service is None:
                raise InstallError(f"database {db.display} runs in compose service "
                                   f"{db.compose_service!r} but no way to run commands in it "
                                   "was given", hint="this is a bug in bundler")
            argv = ["sh", "-c", _SERVICE_SH, *names]
            if t.user:
                argv += [f"--user={t.user}"]
            argv += list(args)
            service_env = {"MYSQL_PWD": t.password} if t.password else {}
            return exec_in_service(argv, stdin, stdout, env=service_env, timeout=timeout)
        with _defaults(t) as opt:
            return proc.run([_tool(*names), opt, *args], env=proc.clean_env(env),
                            timeout=timeout, check=False, stdin=stdin, stdout=stdout)
    except CommandError as exc:
        raise InstallError(t.scrub(exc.message), hint=exc.hint) from None


def query(db: Database, sql: str, env: Mapping[str, str], *, what: str,
          exec_in_service: ServiceExec | None = None, timeout: float = 600) -> list[list[str]]:
    """Rows of `sql` (tab-separated batch output), or InstallError naming `what`."""
    t = target(db, env)
    result = run_client(db, ["-N", "-B", "-r", t.dbname, "-e", sql], env, timeout=timeout,
                        exec_in_service=exec_in_service)
    if result.returncode != 0:
        raise _failed(t, what, result)
    return [ln.split("\t") for ln in result.output.splitlines() if ln and not
            ln.startswith(("Warning", "mysql: [Warning]", "mariadb: [Warning]"))]


def _failed(t: MyTarget, what: str, result: proc.Result) -> InstallError:
    text = t.scrub(result.output).strip()
    line = next((ln for ln in text.splitlines() if "ERROR" in ln or "error" in ln.lower()),
                text.splitlines()[0] if text else "")
    return InstallError(f"{what} failed (exit {result.returncode}): {line}",
                        hint="check that the server runs and that the URL's host, port (or "
                             "socket), user, password and database are right")


# --------------------------------------------------------------------------- check

def check(db: Database, env: Mapping[str, str], *,
          exec_in_service: ServiceExec | None = None) -> None:
    if not db.compose_service:
        client()
        dumper()
    query(db, "SELECT 1", env, what=f"connecting to {db.display}",
          exec_in_service=exec_in_service, timeout=CONNECT_TIMEOUT + 30)


def ping(url: str, env: Mapping[str, str], timeout: float) -> str:
    """The `mysql:` health check: connect and SELECT 1; '' when fine, else why not."""
    t = parse_url(url, redact(url), env)
    try:
        with _defaults(t) as opt:
            result = proc.run([client(), opt, "-N", "-B", t.dbname, "-e", "SELECT 1"],
                              env=proc.clean_env(env), timeout=timeout, check=False)
    except (CommandError, InstallError) as exc:
        return t.scrub(exc.message)
    if result.returncode != 0 or result.output.strip().splitlines()[-1:] != ["1"]:
        return t.scrub(result.output.strip().splitlines()[0] if result.output.strip()
                       else f"exit {result.returncode}")
    return ""


# --------------------------------------------------------------------------- backup

DUMP_OPTS = ("--single-transaction", "--routines", "--triggers", "--hex-blob",
             "--skip-dump-date", "--no-tablespaces")


def backup(db: Database, tmp: Path, env: Mapping[str, str], log: Log, *,
           exec_in_service: ServiceExec | None = None) -> None:
    """Dump `db` into `tmp` (created 0600 here) and read it back; InstallError if not whole."""
    t = target(db, env)
    log(f"mariadb-dump {db.display} -> {tmp.name}"
        + (f" (in compose service {db.compose_service})" if db.compose_service else ""))
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    create_file(tmp, 0o600)
    result = run_client(db, [*DUMP_OPTS, t.dbname], env, dump=True, stdout=tmp,
                        timeout=DUMP_TIMEOUT, exec_in_service=exec_in_service)
    if result.returncode != 0:
        raise _failed(t, f"mariadb-dump of {db.display}", result)
    verify(tmp)


def verify(path: Path) -> None:
    """Read the dump back in full: it must be text that ends with the tool's completion line."""
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            tail = (tail + chunk)[-4096:]
    last = [ln for ln in tail.splitlines() if ln.strip()]
    if not last or not last[-1].startswith(DONE_MARK):
        raise InstallError(f"the new backup {path.name} is incomplete (no '-- Dump completed' "
                           "at its end)", hint="the dump tool stopped early; read its output")


# --------------------------------------------------------------------------- restore

_OBJECTS = (
    "SELECT CONCAT(IF(table_type = 'VIEW', 'DROP VIEW IF EXISTS ', "
    "IF(table_type = 'SEQUENCE', 'DROP SEQUENCE IF EXISTS ', 'DROP TABLE IF EXISTS ')), "
    "'`', REPLACE(table_name, '`', '``'), '`;') FROM information_schema.tables "
    "WHERE table_schema = DATABASE() "
    "UNION ALL SELECT CONCAT('DROP ', routine_type, ' IF EXISTS `', "
    "REPLACE(routine_name, '`', '``'), '`;') FROM information_schema.routines "
    "WHERE routine_schema = DATABASE()")


def restore(db: Database, dump: Path, work_dir: Path, env: Mapping[str, str], log: Log, *,
            exec_in_service: ServiceExec | None = None) -> None:
    """Empty the database, then replay `dump`, in one client session."""
    t = target(db, env)
    drops = [row[0] for row in query(db, _OBJECTS, env, what=f"listing {db.display}",
                                     exec_in_service=exec_in_service)]
    log(f"restoring {db.display} from {dump.name} ({len(drops)} object(s) dropped first)")
    fd, name = tempfile.mkstemp(prefix=".restore-", suffix=".sql", dir=work_dir)
    script = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(dump, "rb") as src:
            out.write(("SET FOREIGN_KEY_CHECKS = 0;\n" + "\n".join(drops) + "\n").encode())
            shutil.copyfileobj(src, out, 1 << 20)
            out.write(b"\nSET FOREIGN_KEY_CHECKS = 1;\n")
        result = run_client(db, [t.dbname], env, stdin=script, timeout=DUMP_TIMEOUT,
                            exec_in_service=exec_in_service)
    finally:
        script.unlink(missing_ok=True)
    if result.returncode != 0:
        raise _failed(t, f"restoring {db.display} from {dump.name}", result)


# --------------------------------------------------------------------------- fingerprint

def fingerprint(db: Database, env: Mapping[str, str], *,
                exec_in_service: ServiceExec | None = None) -> str:
    tables = query(db, "SELECT table_name, table_type, create_time FROM "
                   "information_schema.tables WHERE table_schema = DATABASE() "
                   "ORDER BY table_name", env, what="reading the database's tables",
                   exec_in_service=exec_in_service)
    parts = ["|".join(row) for row in tables]
    base = [r[0] for r in tables if len(r) > 1 and r[1] == "BASE TABLE"]
    if base:
        names = ", ".join("`" + n.replace("`", "``") + "`" for n in base)
        parts += ["|".join(r) for r in query(db, f"CHECKSUM TABLE {names}", env,
                                             what="checksumming the database's tables",
                                             exec_in_service=exec_in_service)]
    return "mysql:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- migrations

def _q(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_TXN_CONTROL = re.compile(
    r"^[ \t]*(BEGIN|START[ \t]+TRANSACTION|COMMIT|ROLLBACK)[ \t]*(WORK)?[ \t]*;",
    re.IGNORECASE | re.MULTILINE)


class Ledger:
    """SQL migrations against MySQL/MariaDB, under a GET_LOCK held for the whole run."""

    def __init__(self, db: Database, env: Mapping[str, str],
                 exec_in_service: ServiceExec | None) -> None:
        self.db = db
        self.env = env
        self.run_in = exec_in_service

    def create(self) -> None:
        try:
            query(self.db, f"CREATE TABLE IF NOT EXISTS {LEDGER} ("
                  "migration VARCHAR(200) NOT NULL, file VARCHAR(255) NOT NULL, "
                  "sha256 CHAR(64) NOT NULL, applied_at TIMESTAMP NOT NULL "
                  "DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (migration, file))", self.env,
                  what=f"creating the migration ledger in {self.db.display}",
                  exec_in_service=self.run_in)
        except InstallError as exc:
            raise MigrationError(exc.message, hint="the database user needs CREATE") from None

    def read(self, migration: str) -> dict[str, str]:
        exists = query(self.db, "SELECT COUNT(*) FROM information_schema.tables WHERE "
                       f"table_schema = DATABASE() AND table_name = '{LEDGER}'", self.env,
                       what="reading the migration ledger", exec_in_service=self.run_in)
        if not exists or exists[0][0] == "0":
            return {}
        rows = query(self.db, f"SELECT file, sha256 FROM {LEDGER} WHERE migration = "
                     f"{_q(migration)}", self.env, what="reading the migration ledger",
                     exec_in_service=self.run_in)
        return {r[0]: r[1] for r in rows if len(r) == 2}

    def apply(self, migration: str, file: str, sha256: str, text: str, work_dir: Path) -> None:
        if _TXN_CONTROL.search(text):
            raise MigrationError(f"migration {migration}: {file} holds its own transaction "
                                 "control (BEGIN/COMMIT/ROLLBACK)",
                                 hint="remove it: bundler runs each file in one transaction")
        t = target(self.db, self.env)
        script = (f"SET autocommit = 0;\nSTART TRANSACTION;\n{text}\n;\n"
                  f"INSERT INTO {LEDGER} (migration, file, sha256) VALUES "
                  f"({_q(migration)}, {_q(file)}, {_q(sha256)});\nCOMMIT;\n")
        fd, name = tempfile.mkstemp(prefix=".migrate-", suffix=".sql", dir=work_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(script)
            result = run_client(self.db, [t.dbname], self.env, stdin=path,
                                exec_in_service=self.run_in, timeout=3600)
        finally:
            path.unlink(missing_ok=True)
        if result.returncode != 0:
            error = next((ln for ln in t.scrub(result.output).splitlines() if "ERROR" in ln),
                         t.scrub(result.output).strip()[:300])
            raise MigrationError(
                f"migration {migration}: {file}: {error}; its row changes were rolled back "
                "(MySQL commits DDL at once: the backup is restored), earlier files stay "
                "applied")


@contextlib.contextmanager
def migration_lock(db: Database, env: Mapping[str, str], log: Log) -> Iterator[None]:
    """Hold GET_LOCK(LOCK_NAME) in a client session of our own for the whole run (local
    client only; a database in a compose service is migrated by one installer anyway: the
    root lock)."""
    if db.compose_service:
        yield
        return
    t = target(db, env)
    with _defaults(t) as opt:
        holder = subprocess.Popen(
            [client(), opt, "-N", "-B", "--unbuffered", t.dbname],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=proc.clean_env(env), text=True)
        try:
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.write(f"SELECT GET_LOCK('{LOCK_NAME}', {LOCK_WAIT});\n")
            holder.stdin.flush()
            answer = holder.stdout.readline().strip()
            if answer != "1":
                raise LockedError(f"another installer has been migrating {db.display} for "
                                  f"over {LOCK_WAIT}s" if answer == "0" else
                                  f"cannot take the migration lock on {db.display}: "
                                  f"{t.scrub(answer)}",
                                  hint="wait for it to finish, then install again")
            log(f"holding the migration lock on {db.display}")
            yield
        finally:
            with contextlib.suppress(OSError):
                if holder.stdin is not None:
                    holder.stdin.close()
            try:
                holder.wait(30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
