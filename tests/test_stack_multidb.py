"""Two databases in one release: PostgreSQL (the tests' cluster) and MariaDB (a throwaway
server), each with SQL migrations, installed under `unshare -n` (unix sockets only)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.errors import MigrationError, RolledBackError
from tests.helpers import Project, bundle, bundle_argv, offline
from tests.mariadb_fixtures import MariaDb
from tests.pg_fixtures import PgCluster, snapshot

pytestmark = [pytest.mark.postgres, pytest.mark.mariadb, pytest.mark.slow]

PROFILE = """\
env:
  required: [DATABASE_URL, CHAT_URL]
  secret: [DATABASE_URL, CHAT_URL]
databases:
  - name: vectors
    kind: postgres
    url: ${DATABASE_URL}
  - name: chat
    kind: mysql
    url: ${CHAT_URL}
migrations:
  - {name: schema, sql: app/db/pg}
  - {name: history, sql: app/db/chat, database: chat}
"""


@pytest.fixture
def pgurl(cluster: PgCluster) -> Iterator[str]:
    name = cluster.create_database()
    yield cluster.url(name)
    cluster.drop_database(name)


@pytest.fixture
def chatdb(mariadb: MariaDb) -> str:
    return mariadb.create_database()


def migration(project: Project, where: str, name: str, sql: str) -> None:
    d = project.dir / "app" / "db" / where
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(sql)


def build(project: Project, keys: tuple[Path, Path], cache: Path, version: str, seq: int,
          healthy: bool = True, extra: str = "") -> Path:
    profile = project.profile(version, healthy=healthy, sequence=seq, extra=PROFILE + extra)
    result = bundle("build", profile, "--key", keys[0], "--out", project.dir / "dist",
                    "--cache-dir", cache, "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


def test_two_databases_migrate_and_are_both_restored(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        cluster: PgCluster, pgurl: str, mariadb: MariaDb, chatdb: str,
        roots: list[Path]) -> None:
    pgname = pgurl.split("@/")[1].split("?")[0]

    def state() -> tuple[object, str]:
        with cluster.connect(pgname) as conn:
            return snapshot(conn), mariadb.dump(chatdb)

    migration(project, "pg", "001_docs.sql",
              "CREATE TABLE docs (id int PRIMARY KEY, body text);\n"
              "INSERT INTO docs VALUES (1, 'a'), (2, 'b');\n")
    migration(project, "chat", "001_msgs.sql",
              "CREATE TABLE msgs (id int PRIMARY KEY, body text) ENGINE=InnoDB;\n"
              "INSERT INTO msgs VALUES (1, 'hello'), (2, 'world');\n")
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    migration(project, "pg", "002_score.sql",
              "ALTER TABLE docs ADD COLUMN score int DEFAULT 0;\nUPDATE docs SET score = 5;\n")
    migration(project, "chat", "002_user.sql",
              "ALTER TABLE msgs ADD COLUMN who varchar(20) DEFAULT 'x';\n"
              "INSERT INTO msgs VALUES (3, 'again', 'me');\n")
    v2 = build(project, keys, cache_dir, "2.0.0", 2)
    # The LAST database's migration fails, after the first database's succeeded.
    migration(project, "pg", "003_more.sql",
              "CREATE TABLE tags (t text);\nINSERT INTO docs VALUES (3, 'c', 1);\n")
    migration(project, "chat", "003_bad.sql",
              "CREATE TABLE half (x int);\nINSERT INTO msgs VALUES (4, 'd', 'x');\n"
              "INSERT INTO msgs VALUES (1, 'duplicate', 'x');\n")
    v3 = build(project, keys, cache_dir, "3.0.0", 3)
    (project.dir / "app" / "db" / "chat" / "003_bad.sql").unlink()
    migration(project, "chat", "003_ok.sql",
              "CREATE TABLE audit (at datetime);\nUPDATE msgs SET who = 'changed';\n")
    v3b = build(project, keys, cache_dir, "3.0.1", 4, healthy=False)

    manifest = json.loads(bundle("inspect", v1, "--trust", keys[1], "--json").out)
    assert [(d["name"], d["kind"]) for d in manifest["databases"]] == [
        ("vectors", "postgres"), ("chat", "mysql")]
    v3info = json.loads(bundle("inspect", v3, "--trust", keys[1], "--json").out)
    assert [(x["name"], x["database"], x["steps"]) for x in v3info["migrations"]] == [
        ("schema", "vectors", ["001_docs.sql", "002_score.sql", "003_more.sql"]),
        ("history", "chat", ["001_msgs.sql", "002_user.sql", "003_bad.sql"])]

    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(
        f"DATABASE_URL={pgurl}\nCHAT_URL={mariadb.url(chatdb)}\n")
    trust = ["--trust", keys[1], "--root", root]
    r1, r2 = offline(bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust))
    assert r1.rc == 0, r1.err
    assert r2.rc == 0, r2.err
    assert "my-S3cret" not in r1.err + r2.err + r1.out + r2.out
    after_v2 = state()
    assert mariadb.sql("SELECT count(*), group_concat(who ORDER BY id) FROM msgs",
                       chatdb).split() == ["3", "x,x,me"]
    with cluster.connect(pgname) as conn:
        assert conn.execute("SELECT count(*), sum(score) FROM docs").fetchone() == (2, 10)

    r3, s3 = offline(bundle_argv("install", v3, *trust),
                     bundle_argv("status", "--root", root, "--json"))
    assert r3.rc == MigrationError.exit_code, r3.err
    assert "003_bad.sql" in r3.err and "rolled back to 2.0.0" in r3.err
    assert state() == after_v2  # both databases: schema and rows exactly as before v3
    assert json.loads(s3.out)["current"]["version"] == "2.0.0"

    r4, s4 = offline(bundle_argv("install", v3b, *trust),
                     bundle_argv("status", "--root", root, "--json"))
    assert r4.rc == RolledBackError.exit_code, r4.err
    assert "health check 'web' failed" in r4.err
    assert state() == after_v2  # 003_more.sql and 003_ok.sql ran, and were undone
    assert json.loads(s4.out)["healthy"] is True

    hist = json.loads(bundle("history", "--root", root, "--json").out)["events"]
    steps = [(e["version"], e["step"], e["status"]) for e in hist]
    assert ("3.0.0", "restore", "done:vectors") in steps
    assert ("3.0.0", "restore", "done:chat") in steps
    assert ("3.0.1", "restore", "done") in steps


def test_kill_9_in_the_last_database_restores_both_on_rerun(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        cluster: PgCluster, pgurl: str, mariadb: MariaDb, chatdb: str,
        roots: list[Path]) -> None:
    pgname = pgurl.split("@/")[1].split("?")[0]

    def state() -> tuple[object, str]:
        with cluster.connect(pgname) as conn:
            return snapshot(conn), mariadb.dump(chatdb)

    migration(project, "pg", "001_docs.sql", "CREATE TABLE docs (id int);\n"
                                             "INSERT INTO docs VALUES (1);\n")
    migration(project, "chat", "001_msgs.sql", "CREATE TABLE msgs (id int);\n"
                                               "INSERT INTO msgs VALUES (1);\n")
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    migration(project, "pg", "002_more.sql", "INSERT INTO docs VALUES (2);\n")
    # The chat database is changed, then its installer dies (as on a power cut).
    crash = ("  - name: crash\n    database: chat\n    command: [sh, -c, 'mariadb --no-defaults "
             f"-S {mariadb.socket} -uroot {chatdb} -e \"CREATE TABLE half (x int)\" "
             "&& kill -9 $PPID']\n")
    v2 = build(project, keys, cache_dir, "2.0.0", 2, extra=crash)
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(
        f"DATABASE_URL={pgurl}\nCHAT_URL={mariadb.url(chatdb)}\n")
    trust = ["--trust", keys[1], "--root", root]
    (r1,) = offline(bundle_argv("install", v1, *trust))
    assert r1.rc == 0, r1.err
    before = state()
    (crashed,) = offline(bundle_argv("install", v2, *trust))
    assert crashed.rc == -signal.SIGKILL, crashed.err
    after = state()
    assert after[0] != before[0] and after[1] != before[1]  # both half-migrated
    rerun, status = offline(bundle_argv("install", v1, *trust),
                            bundle_argv("status", "--root", root, "--json"))
    assert rerun.rc == 0, rerun.err
    assert "interrupted during migrate" in rerun.err
    assert state() == before
    st = json.loads(status.out)
    assert st["current"]["version"] == "1.0.0" and st["healthy"] is True


def test_mysql_health_check_against_the_real_server(mariadb: MariaDb, chatdb: str) -> None:
    from bundler.bundle.models import HealthCheck
    from bundler.install.environ import ReleaseEnv
    from bundler.install.health import run_check

    env = ReleaseEnv("production", (("CHAT_URL", mariadb.url(chatdb)),),
                     frozenset({"CHAT_URL"}))
    good = run_check(HealthCheck(name="chat", kind="mysql", target="${CHAT_URL}", retries=1),
                     env)
    assert good.ok, good.detail
    bad = run_check(HealthCheck(name="chat", kind="mysql", retries=1, interval_ms=10,
                                target=mariadb.url(chatdb, password="wrong")), env)
    assert not bad.ok and "Access denied" in bad.detail and "wrong" not in bad.detail
