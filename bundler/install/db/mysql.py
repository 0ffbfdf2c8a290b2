"""MySQL and MariaDB (one protocol): check, backup, restore, fingerprint, SQL migrations and
the `mysql:` health check; the engine of kind mysql.

Everything goes through the client programs a bare host (or the database's own container)
has: `mariadb` / `mariadb-dump` (Debian: mariadb-client), else `mysql` / `mysqldump`. No
Python driver is needed. The password never appears in argv: locally it goes into a 0600
`--defaults-file` in a private temp directory (with user, host, port, socket, database); in a
compose service it is MYSQL_PWD in the client's environment (passed through compose's own
environment, `-e MYSQL_PWD`), and the client connects through the container's default socket.

- Backup: `mariadb-dump --single-transaction --routines --triggers` (a consistent snapshot of
  InnoDB tables without locking writers) to a temp file beside the target, read back in full
  (it must end with the dump's own "-- Dump completed" line, i.e. the tool finished), fsynced
  and renamed into place. Kind "mysqldump".
- Restore: ONE client session drops every view, table, sequence and routine of the database
  (foreign key checks off), then replays the dump. MySQL DDL is not transactional: a restore
  cut short leaves the database partly restored (run it again: it starts from empty each
  time); the backup itself is untouched.
- Fingerprint: every table's name, type and creation time, and its `CHECKSUM TABLE` value.
- SQL migrations (`sql_*` below): a ledger table `bundler_migrations`; each file runs in one
  client session as `START TRANSACTION; <file>; INSERT <ledger row>; COMMIT;` and the client
  stops at the first error, so the session ends uncommitted: a failing file's row changes are
  rolled back. DDL (CREATE/ALTER/DROP) commits implicitly in MySQL, so a failing file may leave
  its earlier DDL statements applied: the installer's restore of the backup covers that.
  A `GET_LOCK('bundler:migrations')` session is held for the whole run.
- Health check: `mariadb ... -e 'SELECT 1'` against the URL.

Security (docs/security-mysql.md): the client runs as root and obeys its own commands (`\\!`
runs a shell) wherever its input has one outside a quoted string, and object names are picked
by whoever holds the application's account. So no name is ever parsed out of the client's
output: names are selected as HEX(), decoded here and written back quoted (`unhex`,
`quote_name`); values bundler writes are hex literals; output is read escaped (no `-r`), from
stdout alone. Every script fed to the client (restore, migration) runs with `--binary-mode`
(no client command but DELIMITER and \\C) and, where the client has it, `--sandbox` with
mariadb-dump's sandbox line first. URL parts holding a control character, and a database name
starting with `-`, are refused; option-file values are quoted; the database is never a bare
word in argv.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from bundler import proc, timeouts
from bundler.bundle import hostneeds
from bundler.bundle.models import DbKind
from bundler.errors import CommandError, InstallError, LockedError, MigrationError
from bundler.fsutil import create_file
from bundler.install.db.base import (
    LEDGER,
    Backup,
    Database,
    Engine,
    Log,
    ServerEngine,
    ServiceExec,
    backup_path,
    placing,
    wrong_backup,
)
from bundler.redact import redact

BACKUP_KIND = "mysqldump"  # what Backup.kind says of its backups
DUMP_TIMEOUT = timeouts.DB_DUMP
CONNECT_TIMEOUT = timeouts.DB_CONNECT
LOCK_NAME = "bundler:migrations"
LOCK_WAIT = 600
DONE_MARK = b"-- Dump completed"


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
    """The URL's parts; InstallError (one line, password never shown) for a part the client's
    option file or argv could misread (see `_refuse_unsafe`)."""
    parts = urlsplit("mysql://" + url.partition("://")[2])
    if "@" in parts.path + parts.query + parts.fragment:
        # not shown: a bare '/', '?' or '#' in the password ends the host there, and the
        # password, past it, is not masked
        raise InstallError("a MySQL URL holds an '@' after its host",
                           hint="use mysql://user:password@host:3306/db, with a '/', '?', '#' "
                                "or '@' in the password percent-encoded (%2F, %3F, %23, %40)")
    try:
        port = parts.port
    except ValueError:
        raise InstallError(f"MySQL URL {_printable(display)}: its port is not a number",
                           hint="use mysql://user:password@host:3306/db") from None
    if "/" in parts.path.lstrip("/"):
        raise InstallError(f"MySQL URL {_printable(display)}: its path holds more than a "
                           "database name", hint="percent-encode a '/' in the database name "
                                                 "(%2F)")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise InstallError(f"MySQL URL {_printable(display)} names no database",
                           hint="use mysql://user@host:3306/DBNAME")
    password = unquote(parts.password) if parts.password is not None else None
    password = password or params.get("password") or (env or {}).get("MYSQL_PWD") or None
    socket = params.get("unix_socket") or params.get("socket") or None
    t = MyTarget(unquote(parts.username) if parts.username else None, password,
                 parts.hostname or None, port, socket, dbname)
    _refuse_unsafe(t, display)
    return t


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _refuse_unsafe(t: MyTarget, display: str) -> None:
    """A control character would end a line of the option file (`%0A` in the user adds an
    option such as `tee=FILE`); a database name starting with `-` reads as an option."""
    shown = _printable(display)
    for part, value in (("user", t.user), ("password", t.password), ("host", t.host),
                        ("socket", t.socket), ("database name", t.dbname)):
        if value and (bad := _CONTROL.search(value)):
            raise InstallError(
                f"MySQL URL {shown}: its {part} holds a control character "
                f"(U+{ord(bad.group()):04X})",
                hint=f"remove it from the URL's {part} (percent-encoded, %0A is a newline; "
                     "%09 a tab)")
    if t.dbname.startswith("-"):
        raise InstallError(f"MySQL URL {shown}: its database name starts with '-'",
                           hint="name a database that does not start with '-' (the client "
                                "tools would read it as an option)")


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _tool(*names: str) -> str:
    for name in names:
        if found := proc.which(name):  # bundler's own PATH, never a .env's (see bundler.proc)
            return found
    raise InstallError(f"{names[0]} is not on PATH: it is needed for a MySQL/MariaDB database",
                       hint=f"install the client tools (Debian: {hostneeds.MARIADB_CLIENT}), or "
                            "run the database as a compose service")


def client() -> str:
    return _tool("mariadb", "mysql")


def dumper() -> str:
    return _tool("mariadb-dump", "mysqldump")


@contextlib.contextmanager
def _defaults(t: MyTarget) -> Iterator[str]:
    """A 0600 option file with the connection settings, the password and the database (never
    in argv), every value quoted."""
    tmp = Path(tempfile.mkdtemp(prefix="bundler-my-"))
    try:
        path = tmp / "my.cnf"
        create_file(path, 0o600)
        lines = ["[client]"]
        if t.user:
            lines.append(_opt("user", t.user))
        if t.password:
            lines.append(_opt("password", t.password))
        if t.socket:
            lines += [_opt("socket", t.socket), "protocol=socket"]
        elif t.host:
            lines += [_opt("host", t.host), "protocol=tcp"]
        if t.port:
            lines.append(f"port={t.port}")
        # the interactive clients' own group: the dump tools refuse connect-timeout, and read
        # `database` in [client] as a prefix of their --databases
        lines += ["[mysql]", f"connect-timeout={CONNECT_TIMEOUT}", _opt("database", t.dbname)]
        path.write_text("\n".join(lines) + "\n")
        yield f"--defaults-file={path}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _opt(key: str, value: str) -> str:
    """`key="value"` as the option file parser reads it back: inside double quotes, `#` is
    no comment and backslash escapes (control characters are refused in parse_url)."""
    return f'{key}="{_opt_escape(value)}"'


def _opt_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


_SERVICE_SH = ('for t in "$0" "$1"; do command -v "$t" >/dev/null 2>&1 && { shift 2; '
               'exec "$t" "$@"; }; done; echo "neither $0 nor $1 in this container" >&2; exit 127')


def run_client(db: Database, args: Sequence[str], env: Mapping[str, str], *,
               dump: bool = False, stdin: Path | None = None, stdout: Path | None = None,
               timeout: float = 600, exec_in_service: ServiceExec | None = None
               ) -> proc.Result:
    """Run the client (or, `dump`, the dump tool) with `args` against `db`'s database (set
    here: never a bare word in argv)."""
    t = target(db, env)
    names = ("mariadb-dump", "mysqldump") if dump else ("mariadb", "mysql")
    tail = ["--", t.dbname] if dump else []
    try:
        if db.compose_service:
            if exec_in_service is None:
                raise InstallError(f"database {db.display} runs in compose service "
                                   f"{db.compose_service!r} but no way to run commands in it "
                                   "was given", hint="this is a bug in bundler")
            argv = ["sh", "-c", _SERVICE_SH, *names]
            if t.user:
                argv += [f"--user={t.user}"]
            if not dump:
                argv += [f"--database={t.dbname}"]
            argv += [*args, *tail]
            service_env = {"MYSQL_PWD": t.password} if t.password else {}
            return exec_in_service(argv, stdin, stdout, env=service_env, timeout=timeout)
        with _defaults(t) as opt:
            return proc.run([_tool(*names), opt, *args, *tail], env=proc.clean_env(env),
                            timeout=timeout, check=False, stdin=stdin, stdout=stdout)
    except CommandError as exc:
        raise InstallError(t.scrub(exc.message), hint=exc.hint) from None


# Batch output without -r: tab, newline, NUL and backslash in a value are escaped, so a row is
# one line ("\r" is not escaped: split on "\n" only) and its fields split on tabs.
_BATCH = ("--batch", "--skip-column-names", "--binary-mode")


def query(db: Database, sql: str, env: Mapping[str, str], *, what: str,
          exec_in_service: ServiceExec | None = None, timeout: float = 600) -> list[list[str]]:
    """Rows of `sql` (fed on stdin: no size limit of argv; rows read from stdout alone), or
    InstallError naming `what`. A column holding a name or any text is to be selected as
    HEX() and read back with `unhex`: never parse such a value out of the client's output."""
    t = target(db, env)
    with _scratch() as tmp:
        (tmp / "query.sql").write_text(sql.rstrip().rstrip(";") + ";\n")
        create_file(tmp / "rows", 0o600)
        result = run_client(db, _BATCH, env, stdin=tmp / "query.sql", stdout=tmp / "rows",
                            timeout=timeout, exec_in_service=exec_in_service)
        if result.returncode != 0:
            raise _failed(t, what, result)
        text = (tmp / "rows").read_text(encoding="utf-8", errors="replace")
    return [line.split("\t") for line in text.split("\n") if line]


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="bundler-my-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_HEX = re.compile(r"(?:[0-9A-F]{2})*")


def unhex(value: str, what: str) -> str:
    """A HEX() column back to text; InstallError if it is not one."""
    if not _HEX.fullmatch(value):
        raise InstallError(f"{what}: the server's answer is not the hex column asked for",
                           hint="this is a bug in bundler, or not a MySQL/MariaDB server")
    try:
        return bytes.fromhex(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InstallError(f"{what}: a name is not UTF-8",
                           hint="this is a bug in bundler") from None


def quote_name(name: str) -> str:
    """`name` as a quoted identifier: inside backticks the client parses no command, and the
    server reads a doubled backtick as one."""
    return "`" + name.replace("`", "``") + "`"


def _failed(t: MyTarget, what: str, result: proc.Result) -> InstallError:
    text = t.scrub(result.output).strip()
    line = next((ln for ln in text.splitlines() if "ERROR" in ln or "error" in ln.lower()),
                text.splitlines()[0] if text else "")
    return InstallError(f"{what} failed (exit {result.returncode}): {line}",
                        hint="check that the server runs and that the URL's host, port (or "
                             "socket), user, password and database are right")


SANDBOX_LINE = "/*M!999999\\- enable the sandbox mode */\n"


def script_flags(db: Database, env: Mapping[str, str],
                 exec_in_service: ServiceExec | None) -> tuple[list[str], str]:
    """The client's flags for a script from a file, and the line the script must start with.
    `--binary-mode`: no client command but DELIMITER and \\C (MySQL and MariaDB clients);
    a client that has `--sandbox` runs with it too, and gets the sandbox line (the one that
    mariadb-dump writes; older clients and MySQL's reject that line, so they do not)."""
    result = run_client(db, ["--help"], env, timeout=60, exec_in_service=exec_in_service)
    if result.returncode == 0 and "--sandbox" in result.output:
        return ["--binary-mode", "--sandbox"], SANDBOX_LINE
    return ["--binary-mode"], ""


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
    try:
        t = parse_url(url, redact(url), env)
    except InstallError as exc:
        return exc.message
    try:
        with _defaults(t) as opt:
            result = proc.run([client(), opt, *_BATCH, "-e", "SELECT 1"],
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


def backup(db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str], log: Log,
           exec_in_service: ServiceExec | None = None) -> Path:
    """A new dump in `dest_dir`, named only once it is read back whole."""
    final = backup_path(dest_dir, target(db, env).dbname, ".mysql.sql", when)
    tmp = dest_dir / f".{final.name}.tmp"
    with placing(tmp, final):
        dump(db, tmp, env, log, exec_in_service=exec_in_service)
        log(f"verified {final.name}: read back to its completion line")
    return final


def dump(db: Database, tmp: Path, env: Mapping[str, str], log: Log, *,
         exec_in_service: ServiceExec | None = None) -> None:
    """Dump `db` into `tmp` (created 0600 here) and read it back; InstallError if not whole."""
    t = target(db, env)
    log(f"mariadb-dump {db.display} -> {tmp.name}"
        + (f" (in compose service {db.compose_service})" if db.compose_service else ""))
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    create_file(tmp, 0o600)
    result = run_client(db, DUMP_OPTS, env, dump=True, stdout=tmp,
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

# Every object the dump recreates, by kind; names as HEX() (see the module's docstring).
_OBJECTS = (
    "SELECT table_type, HEX(CONVERT(table_name USING utf8mb4)) FROM information_schema.tables "
    "WHERE table_schema = DATABASE() "
    "UNION ALL SELECT routine_type, HEX(CONVERT(routine_name USING utf8mb4)) "
    "FROM information_schema.routines WHERE routine_schema = DATABASE()")
_DROP = {"VIEW": "VIEW", "BASE TABLE": "TABLE", "SYSTEM VERSIONED": "TABLE",
         "SEQUENCE": "SEQUENCE", "PROCEDURE": "PROCEDURE", "FUNCTION": "FUNCTION"}


def drop_statements(db: Database, env: Mapping[str, str],
                    exec_in_service: ServiceExec | None = None) -> list[str]:
    """`DROP ... IF EXISTS` for every object of the database, views first, each name quoted
    here from its HEX(); InstallError (before anything is dropped) for a kind bundler cannot
    drop."""
    what = f"listing {db.display}"
    drops: list[tuple[bool, str]] = []
    for row in query(db, _OBJECTS, env, what=what, exec_in_service=exec_in_service):
        kind = _DROP.get(row[0]) if len(row) == 2 else None
        if kind is None:
            raise InstallError(f"{what}: cannot restore a database holding a "
                               f"{_printable(row[0])!r} object",
                               hint="drop it by hand, then restore again")
        drops.append((kind != "VIEW",
                      f"DROP {kind} IF EXISTS {quote_name(unhex(row[1], what))};"))
    return [statement for _, statement in sorted(drops)]


def restore(db: Database, dump: Path, work_dir: Path, env: Mapping[str, str], log: Log, *,
            exec_in_service: ServiceExec | None = None) -> None:
    """Empty the database, then replay `dump`, in one sandboxed client session."""
    t = target(db, env)
    drops = drop_statements(db, env, exec_in_service)
    flags, first = script_flags(db, env, exec_in_service)
    log(f"restoring {db.display} from {dump.name} ({len(drops)} object(s) dropped first)")
    fd, name = tempfile.mkstemp(prefix=".restore-", suffix=".sql", dir=work_dir)
    script = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(dump, "rb") as src:
            out.write((first + "SET NAMES utf8mb4;\nSET FOREIGN_KEY_CHECKS = 0;\n"
                       + "".join(d + "\n" for d in drops)).encode())
            shutil.copyfileobj(src, out, 1 << 20)
            out.write(b"\nSET FOREIGN_KEY_CHECKS = 1;\n")
        result = run_client(db, flags, env, stdin=script, timeout=DUMP_TIMEOUT,
                            exec_in_service=exec_in_service)
    finally:
        script.unlink(missing_ok=True)
    if result.returncode != 0:
        raise _failed(t, f"restoring {db.display} from {dump.name}", result)


# --------------------------------------------------------------------------- fingerprint

def fingerprint(db: Database, env: Mapping[str, str], *,
                exec_in_service: ServiceExec | None = None) -> str:
    """Every table's name (hex), type and creation time, and each base table's CHECKSUM."""
    what = "reading the database's tables"
    tables = query(db, "SELECT HEX(CONVERT(table_name USING utf8mb4)), table_type, "
                   "create_time FROM information_schema.tables WHERE table_schema = "
                   "DATABASE() ORDER BY 1", env, what=what, exec_in_service=exec_in_service)
    parts = ["|".join(row) for row in tables]
    base = [unhex(r[0], what) for r in tables
            if len(r) == 3 and r[1] in ("BASE TABLE", "SYSTEM VERSIONED")]
    if base:
        what = "checksumming the database's tables"
        sums = query(db, "CHECKSUM TABLE " + ", ".join(quote_name(n) for n in base), env,
                     what=what, exec_in_service=exec_in_service)
        if len(sums) != len(base):
            raise InstallError(f"{what}: {len(sums)} answer(s) for {len(base)} table(s)",
                               hint="a table was created or dropped meanwhile: try again")
        parts += [row[-1] for row in sums]
    return "mysql:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- migrations

def _lit(value: str) -> str:
    """`value` as a SQL string literal that reads the same whatever the sql_mode (hex: nothing
    for the client or the server to unescape)."""
    return f"CONVERT(X'{value.encode().hex()}' USING utf8mb4)"


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
        self._flags: tuple[list[str], str] | None = None  # script_flags(), asked once

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
        what = "reading the migration ledger"
        rows = query(self.db, f"SELECT HEX(CONVERT(file USING utf8mb4)), sha256 FROM {LEDGER} "
                     f"WHERE migration = {_lit(migration)}", self.env, what=what,
                     exec_in_service=self.run_in)
        return {unhex(r[0], what): r[1] for r in rows if len(r) == 2}

    def apply(self, migration: str, file: str, sha256: str, text: str, work_dir: Path) -> None:
        if _TXN_CONTROL.search(text):
            raise MigrationError(f"migration {migration}: {file} holds its own transaction "
                                 "control (BEGIN/COMMIT/ROLLBACK)",
                                 hint="remove it: bundler runs each file in one transaction")
        t = target(self.db, self.env)
        if self._flags is None:
            self._flags = script_flags(self.db, self.env, self.run_in)
        flags, first = self._flags
        # --binary-mode reads CRLF as is: what the client in text mode reads, LF endings
        text = text.replace("\r\n", "\n")
        script = (f"{first}SET autocommit = 0;\nSTART TRANSACTION;\n{text}\n;\n"
                  f"INSERT INTO {LEDGER} (migration, file, sha256) VALUES "
                  f"({_lit(migration)}, {_lit(file)}, {_lit(sha256)});\nCOMMIT;\n")
        fd, name = tempfile.mkstemp(prefix=".migrate-", suffix=".sql", dir=work_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(script)
            result = run_client(self.db, flags, self.env, stdin=path,
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
def migration_lock(db: Database, env: Mapping[str, str], log: Log,
                   lock_wait: int = LOCK_WAIT) -> Iterator[None]:
    """Hold GET_LOCK(LOCK_NAME) in a client session of our own for the whole run (local
    client only; a database in a compose service is migrated by one installer anyway: the
    root lock)."""
    if db.compose_service:
        yield
        return
    t = target(db, env)
    with _defaults(t) as opt:
        holder = subprocess.Popen(
            [client(), opt, *_BATCH, "--unbuffered"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=proc.clean_env(env), text=True)
        try:
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.write(f"SELECT GET_LOCK('{LOCK_NAME}', {lock_wait});\n")
            holder.stdin.flush()
            answer = holder.stdout.readline().strip()
            if answer != "1":
                raise LockedError(f"another installer has been migrating {db.display} for "
                                  f"over {lock_wait}s" if answer == "0" else
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


@contextlib.contextmanager
def migration_session(db: Database, env: Mapping[str, str], log: Log, *, ledger: bool,
                      lock_wait: int, exec_in_service: ServiceExec | None) -> Iterator[Ledger]:
    """The migration lock for the whole run, and the ledger (its table created when
    `ledger`: the release has sql migrations)."""
    with migration_lock(db, env, log, lock_wait):
        book = Ledger(db, env, exec_in_service)
        if ledger:
            book.create()
        yield book


# --------------------------------------------------------------------------- the engine

class Mysql(ServerEngine):
    """The MySQL/MariaDB engine (see the module's docstring)."""

    kind = DbKind.MYSQL
    backup_kind = BACKUP_KIND

    def check_url(self, db: Database, env: Mapping[str, str]) -> None:
        target(db, env)

    def check(self, db: Database, env: Mapping[str, str],
              run_in: ServiceExec | None) -> None:
        check(db, env, exec_in_service=run_in)

    def backup(self, db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str],
               log: Log, run_in: ServiceExec | None) -> Path:
        return backup(db, dest_dir, when, env, log, exec_in_service=run_in)

    def restore(self, db: Database, backup: Backup, env: Mapping[str, str], log: Log,
                run_in: ServiceExec | None) -> None:
        if backup.kind != BACKUP_KIND:
            raise wrong_backup(backup, "a mysqldump")
        restore(db, backup.path, backup.path.parent, env, log, exec_in_service=run_in)

    def fingerprint(self, db: Database, env: Mapping[str, str],
                    run_in: ServiceExec | None) -> str:
        return fingerprint(db, env, exec_in_service=run_in)

    def ping(self, url: str, env: Mapping[str, str], timeout: float) -> str:
        return ping(url, env, max(1.0, timeout))

    def migration_session(self, db: Database, env: Mapping[str, str], log: Log, *,
                          ledger: bool, lock_wait: int, run_in: ServiceExec | None
                          ) -> contextlib.AbstractContextManager[Ledger]:
        return migration_session(db, env, log, ledger=ledger, lock_wait=lock_wait,
                                 exec_in_service=run_in)

    def read_ledger(self, db: Database, env: Mapping[str, str],
                    migration: str) -> dict[str, str]:
        return Ledger(db, env, None).read(migration)

    def client_env(self, db: Database) -> dict[str, str]:
        return {}

    def scrub(self, db: Database, text: str) -> str:
        return target(db).scrub(text)


ENGINE: Engine = Mysql()
