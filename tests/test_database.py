"""The installer's database steps against a REAL PostgreSQL (and SQLite): backup, restore,
migrations (sql ledger + advisory lock, alembic, command), reachability checks, secrets, and a
round trip inside `unshare -n`.

A throwaway cluster (tests/pg_fixtures.py) serves the whole module over a unix socket; every
test gets its own fresh database. No PostgreSQL here: skipped locally, failed under CI=true.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bundler import proc
from bundler.errors import InstallError, LockedError, MigrationError
from bundler.fsutil import sha256_file
from bundler.install import db as engines
from bundler.install import migrations
from bundler.install.db import Backup, Database, postgres
from bundler.install.migrations import Migration
from bundler.redact import redact
from tests.helpers import REPO, free_port, offline
from tests.pg_fixtures import PW_PASSWORD, PW_USER, PgCluster, alembic_ini, snapshot

ENV: Mapping[str, str] = {}
VENV = Path(sys.prefix)  # the suite's own venv: it carries alembic + sqlalchemy (dev extras)


@pytest.fixture
def dbname(cluster: PgCluster) -> Iterator[str]:
    name = cluster.create_database()
    yield name
    cluster.drop_database(name)


@pytest.fixture
def conn(cluster: PgCluster, dbname: str) -> Iterator[psycopg.Connection[Any]]:
    with cluster.connect(dbname) as c:
        yield c


@pytest.fixture
def pgdb(cluster: PgCluster, dbname: str) -> Database:
    return Database(cluster.url(dbname))


class Log(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


def write_sql(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))


SEED_SQL = """
    CREATE EXTENSION IF NOT EXISTS pgcrypto;
    CREATE TYPE mood AS ENUM ('ok', 'meh');
    CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, mood mood DEFAULT 'ok');
    INSERT INTO users (name) SELECT 'user' || g FROM generate_series(1, 50) g;
    CREATE TABLE items (id bigint PRIMARY KEY, owner int REFERENCES users(id), body text);
    INSERT INTO items SELECT g, 1 + g % 50, md5(g::text) FROM generate_series(1, {rows}) g;
    CREATE INDEX items_owner ON items (owner);
    CREATE VIEW busy AS SELECT owner, count(*) AS n FROM items GROUP BY owner;
    CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql AS 'SELECT upper(t)';
    CREATE SCHEMA audit;
    CREATE TABLE audit.events (at timestamptz DEFAULT now(), what text);
    INSERT INTO audit.events (what) VALUES ('seeded');
"""

# What a migration does to it: new tables, columns, types, functions, schemas, extensions,
# changed and deleted rows, dropped objects, moved sequences.
MIGRATE_SQL = """
    ALTER TABLE users ADD COLUMN email text;
    UPDATE users SET name = 'renamed', email = 'x@example.org' WHERE id <= 10;
    DELETE FROM items WHERE id % 3 = 0;
    INSERT INTO users (name) SELECT 'new' || g FROM generate_series(1, 20) g;
    CREATE TABLE orders (id serial PRIMARY KEY, item bigint REFERENCES items(id), qty int);
    INSERT INTO orders (item, qty) SELECT id, 1 FROM items WHERE id < 100;
    CREATE TYPE status AS ENUM ('new', 'done');
    ALTER TYPE mood ADD VALUE 'great';
    CREATE FUNCTION whisper(t text) RETURNS text LANGUAGE sql AS 'SELECT lower(t)';
    CREATE SCHEMA reporting;
    CREATE TABLE reporting.daily (day date, total int);
    CREATE MATERIALIZED VIEW reporting.totals AS SELECT count(*) FROM items;
    DROP VIEW busy;
    DROP SCHEMA audit CASCADE;
    DROP EXTENSION pgcrypto;
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX users_email ON users (email);
"""


def seed(conn: psycopg.Connection[Any], rows: int = 5000) -> None:
    conn.execute(textwrap.dedent(SEED_SQL).replace("{rows}", str(rows)))


# --------------------------------------------------------------------------- (1) restore

@pytest.mark.postgres
def test_restore_undoes_a_migration_exactly(pgdb: Database, conn: psycopg.Connection[Any],
                                            tmp_path: Path) -> None:
    seed(conn, rows=100_000)
    engines.check(pgdb, ENV)
    before = snapshot(conn)
    log = Log()
    t0 = time.monotonic()
    saved = engines.backup(pgdb, tmp_path / "backups", ENV, log)
    backup_s = time.monotonic() - t0
    assert saved.kind == "pg_dump" and saved.path.is_file() and saved.size > 0
    assert saved.path.parent == tmp_path / "backups"
    assert [p.name for p in saved.path.parent.iterdir()] == [saved.path.name]  # no temp left
    assert sha256_file(saved.path) == (saved.sha256, saved.size)

    conn.execute(textwrap.dedent(MIGRATE_SQL))
    migrated = snapshot(conn)
    for key in ("schemas", "tables", "columns", "routines", "types", "extensions", "data"):
        assert migrated[key] != before[key], key  # the migration really changed each aspect

    t0 = time.monotonic()
    engines.restore(pgdb, saved, ENV, log)
    restore_s = time.monotonic() - t0
    after = snapshot(conn)
    for key in before:
        assert after[key] == before[key], key
    assert after["data"]["public.items"][0] == 100000
    # The application can use it as before: sequences continue where they were.
    assert conn.execute("INSERT INTO users (name) VALUES ('next') RETURNING id"
                        ).fetchone() == (51,)
    print(f"\n100k-row database: backup {backup_s:.2f}s ({saved.size} bytes), "
          f"restore {restore_s:.2f}s")


@pytest.mark.postgres
def test_restore_is_all_or_nothing(pgdb: Database, conn: psycopg.Connection[Any],
                                   tmp_path: Path) -> None:
    """A dump cut short (pg_restore dies half-way) must not commit a half-restored database:
    the reset already ran in the same transaction, and the COMMIT never arrives."""
    seed(conn)
    saved = engines.backup(pgdb, tmp_path, ENV, Log())
    conn.execute(textwrap.dedent(MIGRATE_SQL))
    migrated = snapshot(conn)
    cut = tmp_path / "cut.pgdump"
    cut.write_bytes(saved.path.read_bytes()[: saved.size * 2 // 3])
    digest, size = sha256_file(cut)
    broken = Backup(cut, "pg_dump", size, digest, saved.created)
    with pytest.raises(InstallError) as err:
        engines.restore(pgdb, broken, ENV, Log())
    assert "nothing was changed" in err.value.hint or "nothing was changed" in err.value.message
    assert snapshot(conn) == migrated

    # A backup file that changed after it was taken is refused before anything runs.
    tampered = Backup(saved.path, "pg_dump", saved.size, "0" * 64, saved.created)
    with pytest.raises(InstallError, match="changed since it was taken"):
        engines.restore(pgdb, tampered, ENV, Log())
    assert snapshot(conn) == migrated


@pytest.mark.postgres
def test_restore_does_not_hang_on_a_busy_database(cluster: PgCluster, dbname: str,
                                                  pgdb: Database,
                                                  conn: psycopg.Connection[Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that still holds a lock (the app was not stopped) makes the restore fail
    with a hint after the lock timeout, not hang; the database is unchanged."""
    seed(conn)
    saved = engines.backup(pgdb, tmp_path, ENV, Log())
    monkeypatch.setattr(postgres, "RESTORE_LOCK_TIMEOUT", "1s")
    with cluster.connect(dbname) as holder:
        holder.execute("BEGIN; LOCK TABLE items IN ACCESS SHARE MODE")
        with pytest.raises(InstallError) as err:
            engines.restore(pgdb, saved, ENV, Log())
        holder.execute("ROLLBACK")
    assert "lock timeout" in err.value.message and "stop the services" in err.value.hint
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (5000,)


# --------------------------------------------------------------------------- (2) sql ledger

def sql_migration(path: str = "db/sql", name: str = "schema") -> Migration:
    return Migration(name=name, kind="sql", path=path)


@pytest.mark.postgres
def test_sql_migrations_ledger(pgdb: Database, conn: psycopg.Connection[Any],
                               tmp_path: Path) -> None:
    files = tmp_path / "files"
    sqldir = files / "db" / "sql"
    write_sql(sqldir, {
        "001_create.sql": "CREATE TABLE notes (id int PRIMARY KEY, body text);\n",
        "002_rows.sql": "INSERT INTO notes VALUES (1, 'a'), (2, '50% off');\n"
                        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\n"
                        "BEGIN\n  RETURN 1;\nEND;\n$$;\n",
    })
    log = Log()
    first = migrations.run([sql_migration()], pgdb, files, None, ENV, log)
    assert first[0].applied == ("001_create.sql", "002_rows.sql")
    assert conn.execute("SELECT count(*) FROM notes").fetchone() == (2,)
    assert migrations.pending([sql_migration()], pgdb, files, None, ENV)[0].applied == ()

    again = migrations.run([sql_migration()], pgdb, files, None, ENV, log)
    assert again[0].applied == () and "up to date" in again[0].detail
    assert conn.execute("SELECT count(*) FROM notes").fetchone() == (2,)

    # An applied file edited afterwards: refused, naming it, before anything else runs.
    original = (sqldir / "001_create.sql").read_text()
    (sqldir / "001_create.sql").write_text(original + "-- tweak\n")
    write_sql(sqldir, {"002b_more.sql": "CREATE TABLE should_not_exist (x int);"})
    with pytest.raises(MigrationError, match=r"001_create\.sql was changed after it was applied"):
        migrations.run([sql_migration()], pgdb, files, None, ENV, log)
    assert conn.execute("SELECT to_regclass('should_not_exist')").fetchone() == (None,)
    (sqldir / "001_create.sql").write_text(original)
    (sqldir / "002b_more.sql").unlink()

    # A failing third file rolls back only itself; the first two stay applied.
    write_sql(sqldir, {"003_bad.sql": """\
        CREATE TABLE half (x int);
        INSERT INTO half VALUES (1);
        ALTER TABLE notes ADD COLUMN tag text;
        INSERT INTO missing_table VALUES (1);
        """})
    assert migrations.pending([sql_migration()], pgdb, files, None, ENV)[0].applied == (
        "003_bad.sql",)
    with pytest.raises(MigrationError) as err:
        migrations.run([sql_migration()], pgdb, files, None, ENV, log)
    assert err.value.exit_code == MigrationError.exit_code and isinstance(err.value, InstallError)
    assert "schema: 003_bad.sql line 4" in err.value.message
    assert 'relation "missing_table" does not exist' in err.value.message
    ledger = conn.execute("SELECT file FROM bundler_migrations ORDER BY file").fetchall()
    assert ledger == [("001_create.sql",), ("002_rows.sql",)]
    assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)
    cols = conn.execute("SELECT column_name FROM information_schema.columns "
                        "WHERE table_name = 'notes' ORDER BY 1").fetchall()
    assert cols == [("body",), ("id",)]


@pytest.mark.postgres
def test_sql_files_must_not_control_the_transaction(pgdb: Database,
                                                    conn: psycopg.Connection[Any],
                                                    tmp_path: Path) -> None:
    files = tmp_path / "files"
    write_sql(files / "db" / "sql", {"001.sql": "BEGIN;\nCREATE TABLE a (x int);\nCOMMIT;\n"})
    with pytest.raises(MigrationError, match=r"001\.sql line 1: 'BEGIN;'"):
        migrations.run([sql_migration()], pgdb, files, None, ENV, Log())
    assert conn.execute("SELECT to_regclass('a')").fetchone() == (None,)
    # Hidden on one line with other statements: caught after the fact, and reported.
    write_sql(files / "db" / "sql", {"001.sql": "CREATE TABLE a (x int); COMMIT;\n"})
    with pytest.raises(MigrationError, match="ended the transaction itself"):
        migrations.run([sql_migration()], pgdb, files, None, ENV, Log())
    assert conn.execute("SELECT count(*) FROM bundler_migrations").fetchone() == (0,)


# --------------------------------------------------------------------------- (3) concurrency

@pytest.mark.postgres
def test_concurrent_runs_are_serialised(pgdb: Database, conn: psycopg.Connection[Any],
                                        tmp_path: Path) -> None:
    files = tmp_path / "files"
    write_sql(files / "db" / "sql", {
        # Slow, and not idempotent: a second concurrent apply would fail or double the rows.
        "001_create.sql": "CREATE TABLE runs (file text); SELECT pg_sleep(0.6);\n"
                          "INSERT INTO runs VALUES ('001');\n",
        "002_more.sql": "INSERT INTO runs VALUES ('002');\n",
    })
    barrier = threading.Barrier(2)
    outcomes: list[Any] = [None, None]
    logs = [Log(), Log()]

    def worker(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = migrations.run([sql_migration()], pgdb, files, None, ENV, logs[i])
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(o, list) for o in outcomes), outcomes
    applied = sorted(o[0].applied for o in outcomes)
    assert applied == [(), ("001_create.sql", "002_more.sql")]
    assert conn.execute("SELECT file FROM runs ORDER BY 1").fetchall() == [("001",), ("002",)]
    assert any("waiting" in line for log in logs for line in log)


@pytest.mark.postgres
def test_lock_wait_is_bounded(pgdb: Database, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = tmp_path / "files"
    write_sql(files / "db" / "sql", {"001.sql": "SELECT 1;"})
    monkeypatch.setattr(migrations, "LOCK_WAIT", 1)
    with postgres.connect(pgdb, ENV) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (postgres.ADVISORY_LOCK_KEY,))
        with pytest.raises(LockedError, match="another installer"):
            migrations.run([sql_migration()], pgdb, files, None, ENV, Log())


# --------------------------------------------------------------------------- (4) alembic


ALEMBIC_ENV = '''\
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

fileConfig(context.config.config_file_name)
# bundler passes the database URL as DATABASE_URL (never in argv).
engine = create_engine(os.environ["DATABASE_URL"])
with engine.connect() as connection:
    # One transaction per revision: a failing revision leaves the earlier ones applied, the
    # half-migrated state a restore has to undo.
    context.configure(connection=connection, transaction_per_migration=True)
    context.run_migrations()
'''


def revision(rev: str, down: str | None, body: str) -> str:
    return (f'"""revision {rev}"""\nfrom alembic import op\n\nrevision = "{rev}"\n'
            f"down_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade():\n{textwrap.indent(textwrap.dedent(body), '    ')}\n")


def alembic_project(files: Path) -> Path:
    root = files / "backend"
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "alembic.ini").write_text(alembic_ini("%(here)s/migrations"))
    (root / "migrations" / "env.py").write_text(ALEMBIC_ENV)
    versions = root / "migrations" / "versions"
    (versions / "0001_create.py").write_text(revision("0001", None, """\
        op.execute("CREATE TABLE metric_snapshots (id serial PRIMARY KEY, value int)")
        op.execute("INSERT INTO metric_snapshots (value) SELECT g FROM generate_series(1, 10) g")
        """))
    (versions / "0002_column.py").write_text(revision("0002", "0001", """\
        op.execute("ALTER TABLE metric_snapshots ADD COLUMN label text DEFAULT 'x'")
        """))
    return root


@pytest.mark.postgres
def test_alembic_without_logging_is_not_reported_as_already_at_head(
        cluster: PgCluster, dbname: str, tmp_path: Path) -> None:
    """An env.py without fileConfig prints nothing: the result says where the database
    stands instead of claiming there was nothing to do."""
    db = Database(cluster.url(dbname, scheme="postgresql+psycopg"))
    files = tmp_path / "files"
    project = alembic_project(files)
    env_py = project / "migrations" / "env.py"
    env_py.write_text(env_py.read_text().replace(
        "fileConfig(context.config.config_file_name)", ""))
    mig = Migration(name="backend", kind="alembic", path="backend")
    (done,) = migrations.run([mig], db, files, VENV, ENV, Log())
    assert done.detail.startswith("alembic at 0002 (its env.py logs nothing"), done.detail


@pytest.mark.postgres
def test_alembic_upgrade_and_failed_revision_is_restorable(
        cluster: PgCluster, dbname: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    assert (VENV / "bin" / "alembic").exists(), "the dev extras carry alembic"
    db = Database(cluster.url(dbname, scheme="postgresql+psycopg"))
    files = tmp_path / "files"
    project = alembic_project(files)
    mig = Migration(name="backend", kind="alembic", path="backend")
    assert migrations.pending([mig], db, files, VENV, ENV)[0].applied == ("0002",)

    done = migrations.run([mig], db, files, VENV, ENV, Log())
    assert done[0].applied == ("0001", "0002")
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0002",)
    assert migrations.run([mig], db, files, VENV, ENV, Log())[0].applied == ()

    saved = engines.backup(db, tmp_path / "backups", ENV, Log())
    before = snapshot(conn)
    versions = project / "migrations" / "versions"
    (versions / "0003_good.py").write_text(revision("0003", "0002", """\
        op.execute("CREATE TABLE metric_collection_failures (id int)")
        op.execute("ALTER TABLE metric_snapshots ADD COLUMN source text")
        """))
    (versions / "0004_bad.py").write_text(revision("0004", "0003", """\
        op.execute("CREATE TABLE never_kept (id int)")
        op.execute("INSERT INTO no_such_table VALUES (1)")
        """))
    with pytest.raises(MigrationError) as err:
        migrations.run([mig], db, files, VENV, ENV, Log())
    message = err.value.message
    assert "migration backend" in message and "revision 0004" in message
    assert "0004_bad.py" in message and 'relation "no_such_table" does not exist' in message
    # Half-migrated: 0003 committed, 0004 rolled back.
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0003",)
    assert snapshot(conn) != before

    engines.restore(db, saved, ENV, Log())
    assert snapshot(conn) == before
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0002",)


# --------------------------------------------------------------------------- command kind

@pytest.mark.postgres
def test_command_migration(cluster: PgCluster, tmp_path: Path) -> None:
    name = cluster.create_database(owner=PW_USER)
    db = Database(cluster.url(name, user=PW_USER, password=PW_PASSWORD))
    files = tmp_path / "files"
    files.mkdir()
    (files / "marker").write_text("cwd is the files dir")
    ok = Migration(name="prisma", kind="command", command=(
        "sh", "-c", 'cat marker >/dev/null && psql -X -q -w -d "$DATABASE_URL" '
                    '-c "CREATE TABLE cmd_made (x int)" '
                    '&& echo "Applying migration \\`20251102_init\\`"'))
    result = migrations.run([ok], db, files, None, ENV, Log())
    assert result[0].applied == ("20251102_init",)
    with cluster.connect(name) as c:
        assert c.execute("SELECT to_regclass('cmd_made')").fetchone() is not None

    # `cwd` (kept in path): e.g. the Node project whose node_modules/.bin holds prisma
    (files / "backend").mkdir()
    (files / "backend" / "schema.prisma").write_text("// schema\n")
    in_dir = Migration(name="deploy", kind="command", path="backend",
                       command=("sh", "-c", "test -f schema.prisma"))
    assert migrations.run([in_dir], db, files, None, ENV, Log())[0].detail.startswith("sh ok")
    outside = Migration(name="deploy", kind="command", path="../elsewhere", command=("true",))
    with pytest.raises(MigrationError, match="leaves the release's files"):
        migrations.run([outside], db, files, None, ENV, Log())

    bad = Migration(name="prisma", kind="command", env=(("EXTRA", "1"),), command=(
        "sh", "-c", 'echo "connecting to $DATABASE_URL (pw $PGPASSWORD)"; '
                    'echo "Error: P3009 migrate found failed migrations"; exit 3'))
    with pytest.raises(MigrationError) as err:
        migrations.run([bad], db, files, None, ENV, Log())
    text = str(err.value) + err.value.hint
    assert "migration prisma: sh failed (exit 3): Error: P3009" in text
    assert PW_PASSWORD not in text and "***" in text


@pytest.mark.postgres
def test_command_migration_finds_the_database_as_left(cluster: PgCluster, tmp_path: Path) -> None:
    """No ledger table of bundler's in a release without sql migrations: a first `prisma
    migrate deploy` refuses any table it did not make (P3005). Prisma 6 lists what it applied
    as a tree, which is reported."""
    name = cluster.create_database()
    db = Database(cluster.url(name))
    prisma6 = ("The following migration(s) have been applied:\n\nmigrations/\n"
               "  └─ 20240115000000_init/\n    └─ migration.sql\n"
               "  └─ 20240116000000_add_ai_insight_cache/\n    └─ migration.sql\n")
    deploy = Migration(name="prisma", kind="command", command=(
        "sh", "-c", 'test -z "$(psql -X -q -w -t -A -d "$DATABASE_URL" -c '
                    "\"SELECT tablename FROM pg_tables WHERE schemaname = 'public'\")\" "
                    f"&& printf '{prisma6}'"))
    result = migrations.run([deploy], db, tmp_path, None, ENV, Log())
    assert result[0].applied == ("20240115000000_init", "20240116000000_add_ai_insight_cache")
    with cluster.connect(name) as c:
        assert c.execute(f"SELECT to_regclass('{migrations.LEDGER}')").fetchone() == (None,)


# --------------------------------------------------------------------------- (5) sqlite

def test_sqlite_backup_is_consistent_while_the_app_writes_and_restore_is_exact(
        tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    db = Database(f"sqlite:///{path}")
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, batch int, body text)")
        c.executemany("INSERT INTO events (batch, body) VALUES (0, ?)",
                      [(f"row{i}",) for i in range(10)])
    engines.check(db, ENV)
    stop = threading.Event()

    def writer() -> None:  # the application: batches of exactly 10 rows, one per transaction
        with sqlite3.connect(path, timeout=30) as w:
            batch = 1
            while not stop.is_set():
                with w:
                    w.executemany("INSERT INTO events (batch, body) VALUES (?, 'x')",
                                  [(batch,)] * 10)
                batch += 1

    app = threading.Thread(target=writer)
    app.start()
    try:
        time.sleep(0.05)
        saved = engines.backup(db, tmp_path / "backups", ENV, Log())
    finally:
        stop.set()
        app.join()
    assert saved.kind == "sqlite"
    with sqlite3.connect(saved.path) as b:
        count, batches = b.execute("SELECT count(*), count(DISTINCT batch) FROM events"
                                   ).fetchone()
        assert count == 10 * batches  # whole transactions only: a consistent snapshot
        assert b.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        saved_rows = b.execute("SELECT * FROM events ORDER BY id").fetchall()
    assert not Path(f"{saved.path}-wal").exists()

    files = tmp_path / "files"
    write_sql(files / "sql", {
        "001.sql": "CREATE TABLE extra (x int); ALTER TABLE events ADD COLUMN tag text;",
        "002.sql": "INSERT INTO extra VALUES (1); DELETE FROM events WHERE id < 5;",
    })
    mig = sql_migration("sql")
    assert migrations.run([mig], db, files, None, ENV, Log())[0].applied == ("001.sql",
                                                                              "002.sql")
    assert migrations.run([mig], db, files, None, ENV, Log())[0].applied == ()
    write_sql(files / "sql", {"003.sql": "CREATE TABLE half (x int);\n"
                                         "INSERT INTO nope VALUES (1);"})
    with pytest.raises(MigrationError, match=r"003\.sql: sqlite: no such table: nope"):
        migrations.run([mig], db, files, None, ENV, Log())
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT file FROM bundler_migrations ORDER BY 1").fetchall() == [
            ("001.sql",), ("002.sql",)]
        assert c.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall() == []
    (files / "sql" / "001.sql").write_text("-- edited\n")
    with pytest.raises(MigrationError, match=r"001\.sql was changed"):
        migrations.run([mig], db, files, None, ENV, Log())

    engines.restore(db, saved, ENV, Log())
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT * FROM events ORDER BY id").fetchall() == saved_rows
        tables = c.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1"
                           ).fetchall()
        assert tables == [("events",)]


def test_sqlite_missing_file_backs_up_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db = Database(f"sqlite:////{path}")  # SQLAlchemy's absolute form works too
    engines.check(db, ENV)
    saved = engines.backup(db, tmp_path / "b", ENV, Log())
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE made_later (x int)")
    engines.restore(db, saved, ENV, Log())
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


# --------------------------------------------------------------------------- (6) check, secrets

def test_bad_urls_are_refused_without_secrets(tmp_path: Path) -> None:
    secret = "hunter2-very-secret"
    for url in (f"mysql://root:{secret}@db/app", "sqlite://", "sqlite:///",
                f"postgresql://app:{secret}@127.0.0.1:{free_port()}/app",
                f"postgresql://app@127.0.0.1:{free_port()}/app?password={secret}",
                f"sqlite:///{tmp_path}/no/such/dir/x.db"):
        with pytest.raises(InstallError) as err:
            engines.check(Database(url), ENV)
        shown = err.value.message + err.value.hint + str(err.value)
        assert secret not in shown, url
        assert err.value.message.count("\n") == 0, err.value.message
    # Masked in every message, even written unencoded (an "@" inside the password).
    assert redact("postgresql://app:p@ss:wd@db:5432/app") == (
        "postgresql://app:****@db:5432/app")
    assert redact("postgresql://app:p@ss@db/app?password=x&sslmode=require") == (
        "postgresql://app:****@db/app?password=****&sslmode=require")
    not_a_db = tmp_path / "junk.db"
    not_a_db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InstallError, match="cannot be read"):
        engines.check(Database(f"sqlite:///{not_a_db}"), ENV)


@pytest.mark.postgres
def test_check_wrong_password_and_missing_database(cluster: PgCluster, dbname: str,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    wrong = Database(cluster.url(dbname, user=PW_USER, password="Wr0ng-pass-xyz"))
    with pytest.raises(InstallError) as err:
        engines.check(wrong, ENV)
    assert "password authentication failed" in err.value.message
    assert "Wr0ng-pass-xyz" not in str(err.value) + err.value.hint
    assert "check the password" in err.value.hint
    with pytest.raises(InstallError) as err:
        engines.check(Database(cluster.url("no_such_db")), ENV)
    assert "create the database" in err.value.hint
    engines.check(Database(cluster.url(dbname, user=PW_USER, password=PW_PASSWORD)), ENV)
    out, errout = capfd.readouterr()
    assert "Wr0ng-pass-xyz" not in out + errout and PW_PASSWORD not in out + errout


@pytest.mark.postgres
def test_password_goes_by_environment_never_argv(cluster: PgCluster, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = cluster.create_database(owner=PW_USER)
    db = Database(cluster.url(name, user=PW_USER, password=PW_PASSWORD))
    with cluster.connect(name) as c:
        c.execute(f"SET ROLE {PW_USER}; CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    calls: list[tuple[tuple[str, ...], dict[str, str]]] = []
    real_run = proc.run

    def spy(args: Sequence[str | os.PathLike[str]], **kw: Any) -> proc.Result:
        calls.append((tuple(map(str, args)), dict(kw.get("env") or {})))
        return real_run(args, **kw)

    monkeypatch.setattr(proc, "run", spy)
    log = Log()
    engines.check(db, ENV)
    saved = engines.backup(db, tmp_path, ENV, log)
    with cluster.connect(name) as c:
        c.execute("DROP TABLE t")
    engines.restore(db, saved, ENV, log)
    with cluster.connect(name) as c:
        assert c.execute("SELECT x FROM t").fetchall() == [(1,)]
        assert c.execute("SELECT tableowner FROM pg_tables WHERE tablename = 't'"
                         ).fetchone() == (PW_USER,)
    tools = [(argv, env) for argv, env in calls if argv[0] in ("pg_dump", "psql")]
    assert {argv[0] for argv, _ in tools} == {"pg_dump", "psql"}
    for argv, _env in calls:
        assert not any(PW_PASSWORD in a or "pw-S3cret" in a for a in argv), argv
    for _argv, env in tools:
        assert env["PGPASSWORD"] == PW_PASSWORD
    assert log and not any("S3cret" in line for line in log)
    assert all("pwuser:****@" in line for line in log if "postgresql://" in line)


# --------------------------------------------------------------------------- compose service

@pytest.mark.postgres
def test_tools_run_inside_the_compose_service(cluster: PgCluster, dbname: str,
                                              conn: psycopg.Connection[Any],
                                              tmp_path: Path) -> None:
    """`compose_service`: every client tool runs through exec_in_service, connecting by the
    service's own socket as the URL's user (the URL's host means nothing inside it)."""
    seed(conn)
    calls: list[tuple[list[str], Mapping[str, str]]] = []

    def exec_in_service(argv: Sequence[str], stdin_path: Path | None,
                        stdout_path: Path | None, *, env: Mapping[str, str],
                        timeout: float) -> proc.Result:
        # Stands in for `docker compose exec -T db ...`: the "container" has the server's
        # socket as its default (PGHOST), and only the variables it was given.
        calls.append((list(argv), dict(env)))
        inside = {"PATH": os.environ["PATH"], "PGHOST": str(cluster.sockdir),
                  "PGPORT": str(cluster.port), **env}
        with open(stdin_path or os.devnull, "rb") as src, \
                open(stdout_path, "wb") if stdout_path else open(os.devnull, "wb") as dst:
            done = subprocess.run(list(argv), stdin=src, stdout=dst if stdout_path else
                                  subprocess.PIPE, stderr=subprocess.STDOUT, env=inside,
                                  timeout=timeout, check=False)
        return proc.Result(tuple(argv), done.returncode,
                           (done.stdout or b"").decode("utf-8", "replace"))

    url = f"postgresql://postgres:Sekr1t@db.invalid:5432/{dbname}"
    db = Database(url, compose_service="db")
    engines.check(db, ENV, exec_in_service=exec_in_service)
    before = snapshot(conn)
    saved = engines.backup(db, tmp_path, ENV, Log(), exec_in_service=exec_in_service)
    conn.execute(textwrap.dedent(MIGRATE_SQL))
    engines.restore(db, saved, ENV, Log(), exec_in_service=exec_in_service)
    assert snapshot(conn) == before
    used = {argv[0] for argv, _ in calls}
    assert used == {"pg_dump", "pg_restore", "psql"}
    for argv, env in calls:
        assert not any("db.invalid" in a or "Sekr1t" in a for a in argv), argv
        assert env.get("PGPASSWORD") == "Sekr1t"
    with pytest.raises(InstallError, match="no way to run commands in it"):
        engines.backup(db, tmp_path, ENV, Log())


# --------------------------------------------------------------------------- (7) air gap

@pytest.mark.postgres
@pytest.mark.netns
def test_round_trip_inside_unshare_n(cluster: PgCluster, dbname: str,
                                     conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    seed(conn)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            "from tests.pg_fixtures import netns_roundtrip; netns_roundtrip(sys.argv[1:])")
    [run] = offline([sys.executable, "-c", code, cluster.url(dbname), str(tmp_path)],
                    timeout=120)
    assert run.rc == 0, run.err
    report = json.loads(run.out.strip().splitlines()[-1])
    assert report["interfaces"] == ["lo"]  # no network at all in there
    assert report["changed"] and report["equal"], report


def test_a_failed_prisma_migration_is_named() -> None:
    """The JS schema engine says only "external connector error"; the migration it failed in
    is in its trace (the native engine's P3018 text names it too)."""
    js = ("3 migrations found in prisma/migrations\nError: external connector error\n"
          "Null constraint failed: \n   0: sql_schema_connector::apply_migration::apply_script\n"
          '           with migration_name="20240302000000_require_metric_unit"\n')
    assert migrations._prisma_failure(js) == (
        "Prisma migration 20240302000000_require_metric_unit failed: external connector error: "
        "Null constraint failed")
    native = ("Error: P3018\n\nA migration failed to apply.\n\nMigration name: 20240302_x\n\n"
              "Database error code: 23502\n")
    assert migrations._prisma_failure(native) == "Prisma migration 20240302_x failed: P3018"
    assert migrations._prisma_failure("Error: P3005\n\nThe database schema is not empty.") is None
