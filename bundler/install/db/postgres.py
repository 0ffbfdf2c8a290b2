"""PostgreSQL: check, backup (pg_dump -Fc), restore, fingerprint, the SQL migration ledger,
the migration lock and the `postgres:` health check.

- A backup is complete or absent. `pg_dump -Fc` goes to a temp file beside the target; it is
  read back in full (`pg_restore --list`, then a decode of every data block), fsynced and only
  then renamed into place (base.placing).
- A restore brings the database back to EXACTLY the backed-up state, schema and rows, even
  after a migration added tables, columns, types, functions, schemas or extensions, or failed
  half-way; and it is all or nothing: ONE transaction, in one `psql` session, first empties the
  database (every non-system schema but `public` is dropped with CASCADE, and `public` is
  emptied object by object: `pg_dump` assumes it exists), then replays `pg_restore -1 -f -`
  (the dump as a script) streamed through a FIFO: no plain-SQL copy of the data ever lands on
  disk. The `COMMIT` is the last line of that script, so a stream cut short for any reason
  (pg_restore died, the disk went away) commits nothing: the session ends inside the
  transaction and the server rolls it back. `pg_restore --clean --if-exists` would not do: it
  drops only what the dump names, so objects a migration created after the dump survive.
- Secrets never show. The password in a URL (user:PASSWORD@ or ?password=) is handed to the
  client tools as PGPASSWORD in their environment, never in argv; every message, log line and
  quoted tool output goes through `bundler.redact.redact`.
- Migrations: a SESSION advisory lock (`ADVISORY_LOCK_KEY`) is held on a connection of our own
  for the whole run, so two installers never migrate the same database concurrently; restores
  take the same key for their transaction. Each SQL file runs in ONE transaction together with
  its row in `public.bundler_migrations`.

URLs: `postgresql://user@/db?host=/sock/dir&port=5432` (unix socket),
`postgresql://user:pw@127.0.0.1:5432/db`, a `+driver` suffix (`postgresql+psycopg://`) is
accepted and ignored.

Databases in a compose service (`Database.compose_service`): pg_dump, pg_restore and psql run
INSIDE that service, so client and server versions always match. This module does not call
compose itself: the caller passes `run_in` (see `base.ServiceExec`), typically
`docker compose -p PROJECT exec -T -e PGPASSWORD SERVICE ARGV...` with stdin/stdout redirected
to the given paths and PGPASSWORD in compose's own environment. Inside the service the tools
connect through the container's default unix socket as the URL's user to the URL's database
(the URL's host and port are what the application uses, not what works inside the container).

Not reset by a restore (database-wide objects a schema drop does not reach, rarely made by
application migrations): event triggers, publications, subscriptions, foreign-data wrappers
and servers, casts, languages, operator classes and families, and the ACL of the `public`
schema itself. They are listed here so nobody assumes otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import shutil
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from bundler import proc, timeouts
from bundler.bundle import hostneeds
from bundler.bundle.models import DbKind
from bundler.errors import CommandError, InstallError, LockedError, MigrationError
from bundler.fsutil import CHUNK, create_file
from bundler.install.db.base import (
    LEDGER,
    Backup,
    Database,
    Engine,
    Log,
    ServerEngine,
    ServiceExec,
    backup_path,
    first_line,
    placing,
    wrong_backup,
)
from bundler.redact import redact

BACKUP_KIND = "pg_dump"  # what Backup.kind says of its backups
DUMP_TIMEOUT = RESTORE_TIMEOUT = timeouts.DB_DUMP
CONNECT_TIMEOUT = timeouts.DB_CONNECT
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
    if db.kind != DbKind.POSTGRES:
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

def check(db: Database, env: Mapping[str, str], *,
          exec_in_service: ServiceExec | None = None) -> None:
    """Raise InstallError (one line, redacted, with a hint) unless `db` answers and
    pg_dump/pg_restore/psql are new enough for it."""
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


def ping(url: str, env: Mapping[str, str], timeout: float) -> str:
    """The `postgres:` health check: connect (the URL as the application writes it) and
    SELECT 1; '' when fine, else the driver's first line."""
    import psycopg  # imported here: it is slow, and only postgres checks need it

    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
        return ""
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --------------------------------------------------------------------------- backup

def backup(db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str], log: Log,
           exec_in_service: ServiceExec | None) -> Path:
    """pg_dump -Fc into a new file in `dest_dir`, read back in full before it is named."""
    pg = pg_target(db)
    final = backup_path(dest_dir, pg.dbname or pg.user or "postgres", ".pgdump", when)
    tmp = dest_dir / f".{final.name}.tmp"
    log(f"pg_dump {db.display} -> {final.name}"
        + (f" (in compose service {db.compose_service})" if db.compose_service else ""))
    dump_opts = ["-Fc", "-w", f"--lock-wait-timeout={DUMP_LOCK_TIMEOUT}"]
    with placing(tmp, final):
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
    """The database's write counters and the identity of its relations: `_PG_FINGERPRINT`."""
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


def restore(db: Database, backup: Backup, env: Mapping[str, str], log: Log,
            exec_in_service: ServiceExec | None) -> None:
    """The prologue, then the dump as a script, in one psql session (see the module)."""
    if backup.kind != BACKUP_KIND:
        raise wrong_backup(backup, "a pg_dump")
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


# --------------------------------------------------------------------------- migrations

class PgLedger:
    """The connection that holds the migration lock, and applies SQL files through it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def read(self, migration: str) -> dict[str, str]:
        rows = self.conn.execute(
            f"SELECT file, sha256 FROM public.{LEDGER} WHERE migration = %s",
            (migration,)).fetchall()
        return {str(f): str(s) for f, s in rows}

    def apply(self, migration: str, file: str, sha256: str, text: str, work_dir: Path) -> None:
        import psycopg
        from psycopg.pq import TransactionStatus

        try:
            with self.conn.transaction():
                self.conn.execute(text)  # no parameters: sent as one simple-protocol query
                if self.conn.info.transaction_status != TransactionStatus.INTRANS:
                    raise MigrationError(
                        f"migration {migration}: {file} ended the transaction itself (COMMIT "
                        "or ROLLBACK inside it): the file may be partly applied",
                        hint="remove transaction control from the file; restore the backup")
                self.conn.execute(
                    f"INSERT INTO public.{LEDGER} (migration, file, sha256) VALUES (%s, %s, %s)",
                    (migration, file, sha256))
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration {migration}: {file}{_pg_location(exc, text)}: "
                f"{_pg_message(exc)}; this file was rolled back, earlier ones stay applied"
            ) from None


def _pg_message(exc: Any) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return str(primary or first_line(str(exc)))


def _pg_location(exc: Any, text: str) -> str:
    diag = getattr(exc, "diag", None)
    position = getattr(diag, "statement_position", None) if diag is not None else None
    if not position:
        return ""
    with contextlib.suppress(ValueError):
        return f" line {text.count(chr(10), 0, int(position) - 1) + 1}"
    return ""


def _create_ledger(conn: Any) -> None:
    conn.execute(f"""CREATE TABLE IF NOT EXISTS public.{LEDGER} (
        migration text NOT NULL,
        file text NOT NULL,
        sha256 text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration, file))""")


@contextlib.contextmanager
def migration_session(db: Database, env: Mapping[str, str], log: Log, *, ledger: bool,
                      lock_wait: int) -> Iterator[PgLedger]:
    """The advisory lock for the whole run, and the ledger connection under it. The ledger
    table is created only when `ledger` (the release has sql migrations): a tool that refuses
    a non-empty schema without its own history (Prisma's P3005 on a first `migrate deploy`)
    must find the database as the operator left it."""
    import psycopg

    with connect(db, env) as conn:
        key = ADVISORY_LOCK_KEY
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            log(f"another installer is migrating {db.display}: waiting up to {lock_wait}s")
            conn.execute(f"SET lock_timeout = '{lock_wait}s'")
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg.errors.LockNotAvailable:
                raise LockedError(
                    f"another installer has been migrating {db.display} for over "
                    f"{lock_wait}s", hint="wait for it to finish, then install again"
                ) from None
            conn.execute("RESET lock_timeout")
        try:
            try:
                if ledger:
                    _create_ledger(conn)
            except psycopg.Error as exc:
                raise MigrationError(
                    f"cannot create the migration ledger public.{LEDGER} in {db.display}: "
                    f"{_pg_message(exc)}",
                    hint="the database user needs CREATE on schema public") from None
            yield PgLedger(conn)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def read_ledger(db: Database, env: Mapping[str, str], migration: str) -> dict[str, str]:
    with connect(db, env) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"public.{LEDGER}",)).fetchone()[0] is None:
            return {}
        return PgLedger(conn).read(migration)


# --------------------------------------------------------------------------- the engine

class Postgres(ServerEngine):
    """The PostgreSQL engine (see the module's docstring)."""

    kind = DbKind.POSTGRES
    backup_kind = BACKUP_KIND

    def check_url(self, db: Database, env: Mapping[str, str]) -> None:
        return None  # libpq reads any URL; what it refuses, `check` says when it connects

    def check(self, db: Database, env: Mapping[str, str],
              run_in: ServiceExec | None) -> None:
        check(db, env, exec_in_service=run_in)

    def backup(self, db: Database, dest_dir: Path, when: datetime, env: Mapping[str, str],
               log: Log, run_in: ServiceExec | None) -> Path:
        return backup(db, dest_dir, when, env, log, run_in)

    def restore(self, db: Database, backup: Backup, env: Mapping[str, str], log: Log,
                run_in: ServiceExec | None) -> None:
        restore(db, backup, env, log, run_in)

    def fingerprint(self, db: Database, env: Mapping[str, str],
                    run_in: ServiceExec | None) -> str:
        return fingerprint(db, env, exec_in_service=run_in)

    def ping(self, url: str, env: Mapping[str, str], timeout: float) -> str:
        return ping(url, env, timeout)

    def migration_session(self, db: Database, env: Mapping[str, str], log: Log, *,
                          ledger: bool, lock_wait: int, run_in: ServiceExec | None
                          ) -> contextlib.AbstractContextManager[PgLedger]:
        return migration_session(db, env, log, ledger=ledger, lock_wait=lock_wait)

    def read_ledger(self, db: Database, env: Mapping[str, str],
                    migration: str) -> dict[str, str]:
        return read_ledger(db, env, migration)

    def client_env(self, db: Database) -> dict[str, str]:
        password = pg_target(db).password
        return {"PGPASSWORD": password} if password else {}

    def scrub(self, db: Database, text: str) -> str:
        return pg_target(db).scrub(text)


ENGINE: Engine = Postgres()
