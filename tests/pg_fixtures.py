"""A throwaway PostgreSQL cluster for the tests, reached through a unix socket only.

- `start_cluster()`: `initdb -A trust` (as the `postgres` OS user when we are root: initdb
  refuses root) into a fresh temp dir, then `pg_ctl start` with `listen_addresses=''` (no TCP
  at all) and the socket in a temp dir; durability off (a test cluster). A role `pwuser` must
  authenticate with a password (scram), to test secrets handling. No binaries, no `postgres`
  user, or a cluster that will not start: skip locally, FAIL under CI=true.
- `snapshot(conn)`: everything a restore must bring back, as plain data to compare: schemas,
  tables, columns (type, nullability, default), indexes, routines, types, extensions, sequence
  positions, and every table's row count and content hash.
- Run as a script (see `netns_roundtrip`), it does a backup/restore round trip: the tests run
  it inside `unshare -n`, where only the socket connects it to the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

from tests.helpers import unavailable

PW_USER = "pwuser"
PW_PASSWORD = "pw-S3cret:/@x"  # URL-hostile on purpose: must be quoted, and never shown


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, or Debian's versioned directory."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                        else 0)
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PgCluster:
    root: Path
    datadir: Path
    sockdir: Path
    port: int
    bindir: Path
    as_owner: tuple[str, ...]  # prefix that runs a command as the cluster's OS user

    def url(self, dbname: str, user: str = "postgres", password: str | None = None,
            scheme: str = "postgresql") -> str:
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"{scheme}://{auth}@/{dbname}?host={self.sockdir}&port={self.port}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(host=str(self.sockdir), port=self.port, user="postgres",
                               dbname=dbname, autocommit=True)

    def create_database(self, owner: str = "postgres") -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(psycopg.Error), self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        subprocess.run([*self.as_owner, str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                        "-m", "immediate", "-w", "stop"], capture_output=True, check=False,
                       cwd=self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PgCluster:
    bindir = find_bindir()
    if bindir is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        raise AssertionError("unreachable")
    for tool in ("pg_dump", "pg_restore", "psql"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not on PATH")
    as_owner: tuple[str, ...] = ()
    if os.geteuid() == 0:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` OS user to run initdb as")
            raise AssertionError("unreachable") from None
        as_owner = ("runuser", "-u", "postgres", "--")
    root = Path(tempfile.mkdtemp(prefix="bundler-pg-"))
    root.chmod(0o755)
    datadir, sockdir = root / "data", root / "sock"
    sockdir.mkdir()
    if as_owner:
        os.chown(sockdir, owner.pw_uid, owner.pw_gid)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    port = _free_port()

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_owner, *argv], capture_output=True, text=True, check=False,
                              cwd=root, timeout=120)

    done = run(str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres",
               "-E", "UTF8", "--locale=C", "--no-sync")
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"initdb failed: {done.stderr.strip()[-500:]}")
    # The password role must really authenticate; everyone else is trusted (local only).
    (datadir / "pg_hba.conf").write_text(
        f"local all {PW_USER} scram-sha-256\nlocal all all trust\n")
    options = (f"-p {port} -k {sockdir} -c listen_addresses='' -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40")
    done = run(str(bindir / "pg_ctl"), "-D", str(datadir), "-o", options,
               "-l", str(datadir / "server.log"), "-w", "-t", "60", "start")
    cluster = PgCluster(root, datadir, sockdir, port, bindir, as_owner)
    if done.returncode != 0:
        log = (datadir / "server.log").read_text(errors="replace")[-800:] \
            if (datadir / "server.log").exists() else ""
        cluster.stop()
        unavailable(f"the PostgreSQL test cluster did not start: {done.stderr.strip()} {log}")
    with cluster.connect() as conn:
        conn.execute(f"CREATE ROLE {PW_USER} LOGIN PASSWORD '{PW_PASSWORD}'")
    return cluster


@contextlib.contextmanager
def cluster_session() -> Iterator[PgCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- snapshots

_USER_SCHEMAS = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
                 "AND n.nspname !~ '^pg_'")


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The database's user-visible state as comparable plain data."""
    def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(sql).fetchall()]

    out: dict[str, Any] = {
        "schemas": rows(f"SELECT n.nspname FROM pg_namespace n WHERE {_USER_SCHEMAS} "
                        "ORDER BY 1"),
        "tables": rows("SELECT table_schema, table_name, table_type FROM "
                       "information_schema.tables WHERE table_schema NOT IN "
                       "('pg_catalog', 'information_schema') ORDER BY 1, 2"),
        "columns": rows("SELECT table_schema, table_name, column_name, data_type, is_nullable, "
                        "column_default FROM information_schema.columns WHERE table_schema "
                        "NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3"),
        "relations": rows("SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN "
                          f"pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_SCHEMAS} "
                          "ORDER BY 1, 2"),
        "routines": rows("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n "
                         f"ON n.oid = p.pronamespace WHERE {_USER_SCHEMAS} AND NOT EXISTS "
                         "(SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e') "
                         "ORDER BY 1"),
        "types": rows("SELECT n.nspname, t.typname, t.typtype FROM pg_type t JOIN pg_namespace "
                      f"n ON n.oid = t.typnamespace WHERE {_USER_SCHEMAS} AND t.typtype IN "
                      "('d', 'e', 'r') ORDER BY 1, 2"),
        "enum_labels": rows("SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON "
                            "t.oid = e.enumtypid ORDER BY 1, e.enumsortorder"),
        "extensions": rows("SELECT extname, extversion FROM pg_extension ORDER BY 1"),
        "sequences": rows("SELECT schemaname, sequencename, last_value FROM pg_sequences "
                          "ORDER BY 1, 2"),
    }
    data = {}
    for schema, table, kind in out["tables"]:
        if kind != "BASE TABLE":
            continue
        count, digest = conn.execute(
            f'SELECT count(*), md5(coalesce(string_agg(t::text, E\'\\n\' ORDER BY t::text), '
            f"'')) FROM \"{schema}\".\"{table}\" t").fetchone() or (0, "")
        data[f"{schema}.{table}"] = (count, digest)
    out["data"] = data
    return out


def netns_roundtrip(argv: list[str]) -> None:
    """check → backup → change → restore → compare, printing one JSON line (for unshare -n)."""
    from bundler.install import db as engines
    from bundler.install.db import postgres

    url, workdir = argv[0], Path(argv[1])
    db = engines.Database(url)
    lines: list[str] = []
    engines.check(db, {})
    info = psycopg.conninfo.conninfo_to_dict(postgres.pg_target(db).uri)
    with psycopg.connect(**info, autocommit=True) as conn:
        before = snapshot(conn)
        t0 = time.monotonic()
        saved = engines.backup(db, workdir, {}, lines.append)
        t1 = time.monotonic()
        conn.execute("CREATE TABLE made_offline (x int); ALTER TABLE items ADD COLUMN extra "
                     "int; DELETE FROM items WHERE id % 2 = 0")
        changed = snapshot(conn) != before
        t2 = time.monotonic()
        engines.restore(db, saved, {}, lines.append)
        t3 = time.monotonic()
        after = snapshot(conn)
    print(json.dumps({
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "changed": changed,
        "equal": after == before,
        "backup_s": round(t1 - t0, 3),
        "restore_s": round(t3 - t2, 3),
        "log": lines,
    }))


if __name__ == "__main__":
    netns_roundtrip(sys.argv[1:])


def alembic_ini(script_location: str) -> str:
    """What `alembic init` writes, trimmed; its logging sections make alembic say which
    revisions it ran (the installer reports them)."""
    return _ALEMBIC_INI.replace("{script_location}", script_location)


_ALEMBIC_INI = """\
[alembic]
script_location = {script_location}

[loggers]
keys = root,alembic

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARN
handlers = console

[logger_alembic]
level = INFO
handlers =
qualname = alembic

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
"""
