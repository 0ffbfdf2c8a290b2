"""The database path end to end, against a real PostgreSQL reached by its unix socket from
inside `unshare -n`: backup, SQL migrations, a failing migration and a failing health check
(both restore the database exactly), and a kill -9 in the middle of a migration."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import MigrationError, RolledBackError
from tests import pg_fixtures
from tests.helpers import Project, build_release, bundle, bundle_argv, offline, write_migration
from tests.pg_fixtures import PgCluster, snapshot

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DB_PROFILE = """\
env:
  required: [DATABASE_URL]
  secret: [DATABASE_URL]
database:
  url: ${DATABASE_URL}
migrations:
  - {name: schema, sql: app/db/migrations}
"""


@pytest.fixture
def dburl(cluster: PgCluster) -> Iterator[str]:
    name = cluster.create_database()
    yield cluster.url(name)
    cluster.drop_database(name)


def state_of(cluster: PgCluster, url: str) -> dict[str, Any]:
    with cluster.connect(url.split("@/")[1].split("?")[0]) as conn:
        return snapshot(conn)


def test_migrations_failures_restore_the_database(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        cluster: PgCluster, dburl: str, roots: list[Path]) -> None:
    write_migration(project, "001_items.sql",
                    "CREATE TABLE items (id int PRIMARY KEY, name text);\n"
                    "INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c');\n")
    v1 = build_release(project, keys, cache_dir, "1.0.0", 1, extra=DB_PROFILE)
    write_migration(project, "002_price.sql",
                    "ALTER TABLE items ADD COLUMN price int DEFAULT 0;\n"
                    "INSERT INTO items VALUES (4, 'd', 10);\n")
    v2 = build_release(project, keys, cache_dir, "2.0.0", 2, extra=DB_PROFILE)
    write_migration(project, "003_bad.sql",
                    "CREATE TABLE half (x int);\nINSERT INTO items VALUES (5, 'e', 1);\n"
                    "SELECT no_such_function();\n")
    v3 = build_release(project, keys, cache_dir, "3.0.0", 3, extra=DB_PROFILE)
    (project.dir / "app" / "db" / "migrations" / "003_bad.sql").unlink()
    write_migration(project, "003_ok.sql", "CREATE TABLE audit (at timestamptz);\n"
                    "UPDATE items SET price = 99;\n")
    v3b = build_release(project, keys, cache_dir, "3.0.1", 4, healthy=False, extra=DB_PROFILE)

    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL={dburl}\n")
    trust = ["--trust", keys[1], "--root", root]
    r1, r2 = offline(bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust))
    assert r1.rc == 0, r1.err
    assert r2.rc == 0, r2.err
    after_v2 = state_of(cluster, dburl)
    with cluster.connect(dburl.split("@/")[1].split("?")[0]) as conn:
        assert conn.execute("SELECT count(*), sum(price) FROM items").fetchone() == (4, 10)

    r3, s3 = offline(bundle_argv("install", v3, *trust),
                     bundle_argv("status", "--root", root, "--json"))
    # a failed migration: rolled back, with its own exit code
    assert r3.rc == MigrationError.exit_code, r3.err
    assert "003_bad.sql" in r3.err and "rolled back to 2.0.0" in r3.err
    assert "Restoring the database" in r3.err
    assert state_of(cluster, dburl) == after_v2  # schema and rows exactly as before v3
    assert json.loads(s3.out)["current"]["version"] == "2.0.0"
    assert json.loads(s3.out)["healthy"] is True

    r4, s4 = offline(bundle_argv("install", v3b, *trust),
                     bundle_argv("status", "--root", root, "--json"))
    assert r4.rc == RolledBackError.exit_code, r4.err
    assert "health check 'web' failed" in r4.err
    assert state_of(cluster, dburl) == after_v2  # 003_ok.sql ran, and was undone
    assert json.loads(s4.out)["healthy"] is True

    hist = json.loads(bundle("history", "--root", root, "--json").out)["events"]
    steps = [(e["version"], e["step"], e["status"]) for e in hist]
    assert ("3.0.0", "migrate", "failed") in steps and ("3.0.0", "restore", "done") in steps
    assert ("3.0.1", "restore", "done") in steps


def test_kill_9_during_a_migration_is_restored_on_rerun(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        cluster: PgCluster, dburl: str, roots: list[Path]) -> None:
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int);\n"
                    "INSERT INTO items VALUES (1);\n")
    v1 = build_release(project, keys, cache_dir, "1.0.0", 1, extra=DB_PROFILE)
    # The migration changes the database, then its installer dies (as on a power cut).
    crash = ("  - name: crash\n    command: [sh, -c, 'psql \"$DATABASE_URL\" -qc "
             "\"CREATE TABLE half (x int)\" && kill -9 $PPID']\n")
    v2 = build_release(project, keys, cache_dir, "2.0.0", 2, extra=DB_PROFILE + crash)
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL={dburl}\n")
    trust = ["--trust", keys[1], "--root", root]
    (r1,) = offline(bundle_argv("install", v1, *trust))
    assert r1.rc == 0, r1.err
    before = state_of(cluster, dburl)
    (crashed,) = offline(bundle_argv("install", v2, *trust))
    assert crashed.rc == -signal.SIGKILL, crashed.err
    assert state_of(cluster, dburl) != before  # half-migrated
    rerun, status = offline(bundle_argv("install", v1, *trust),
                            bundle_argv("status", "--root", root, "--json"))
    assert rerun.rc == 0, rerun.err
    assert "interrupted during migrate" in rerun.err
    assert state_of(cluster, dburl) == before
    st = json.loads(status.out)
    assert st["current"]["version"] == "1.0.0" and st["healthy"] is True


def test_postgres_health_check_against_the_real_server(cluster: PgCluster, dburl: str) -> None:
    from bundler.bundle.models import HealthCheck
    from bundler.install.environ import ReleaseEnv
    from bundler.install.health import run_check

    env = ReleaseEnv("production", (("DATABASE_URL", dburl),), frozenset({"DATABASE_URL"}))
    check = HealthCheck(name="db", kind="postgres", target="${DATABASE_URL}", retries=1)
    assert run_check(check, env).ok
    gone = ReleaseEnv("production", (("DATABASE_URL", dburl.replace("/t_", "/nope_")),),
                      frozenset())
    result = run_check(check, gone)
    assert not result.ok and "does not exist" in result.detail


ALEMBIC_ENV = """\
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

fileConfig(context.config.config_file_name)
url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
with create_engine(url).connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
"""

ALEMBIC_REVISION = """\
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("widgets")
"""


@pytest.mark.network
def test_upgrade_with_alembic_and_sql_migrations(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        cluster: PgCluster, dburl: str, roots: list[Path]) -> None:
    """alembic runs from the release's own venv, filled offline from bundled wheels."""
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int);\n")
    v1 = build_release(project, keys, cache_dir, "1.0.0", 1, extra=DB_PROFILE)
    alembic_dir = project.dir / "app" / "db"
    (alembic_dir / "alembic.ini").write_text(pg_fixtures.alembic_ini("models"))
    (alembic_dir / "models" / "versions").mkdir(parents=True)
    (alembic_dir / "models" / "env.py").write_text(ALEMBIC_ENV)
    (alembic_dir / "models" / "versions" / "0001_widgets.py").write_text(ALEMBIC_REVISION)
    write_migration(project, "002_more.sql", "ALTER TABLE items ADD COLUMN name text;\n")
    (project.dir / "requirements.in").write_text(
        "tinygreet\nalembic\nsqlalchemy\npsycopg[binary]\n")
    profile = project.profile("2.0.0", sequence=2, extra=DB_PROFILE + (
        "  - {name: models, alembic: app/db}\n"))
    text = profile.read_text().replace(
        "  requirements: requirements.txt\n  find_links: [wheelhouse]\n  no_index: true\n",
        "  requirements_in: requirements.in\n  find_links: [wheelhouse]\n")
    profile.write_text(text)
    built = bundle("build", profile, "--key", keys[0], "--out", project.dir / "dist",
                   "--cache-dir", cache_dir, "--json")
    assert built.rc == 0, built.err
    v2 = Path(json.loads(built.out)["bundle"])
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL={dburl}\n")
    trust = ["--trust", keys[1], "--root", root]
    r1, r2 = offline(bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust))
    assert r1.rc == 0, r1.err
    assert r2.rc == 0, r2.err
    with cluster.connect(dburl.split("@/")[1].split("?")[0]) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
        cols = conn.execute("SELECT column_name FROM information_schema.columns "
                            "WHERE table_name = 'items' ORDER BY 1").fetchall()
        assert cols == [("id",), ("name",)]
        assert conn.execute("SELECT to_regclass('widgets')").fetchone() == ("widgets",)
    events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
    applied = [e["detail"] for e in events if (e["version"], e["step"], e["status"]) ==
               ("2.0.0", "migrate", "applied")]
    assert applied and "002_more.sql" in applied[0] and "0001" in applied[0]
