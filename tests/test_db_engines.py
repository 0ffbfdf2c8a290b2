"""The database facade (bundler.install.db) and its choice of engine, with the fake engine
(tests/fake_db.py): backup/restore/fingerprint and the migration orchestration in
milliseconds. The real engines are tested against real servers in test_database.py (PostgreSQL,
SQLite) and test_mysql_security.py (MariaDB)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bundler.bundle.models import DATABASE_KINDS, DbKind, HealthCheck
from bundler.errors import InstallError, MigrationError
from bundler.install import db, health, migrations
from bundler.install.db import Backup, Database
from bundler.install.db import mysql as mysql_engine
from bundler.install.db import postgres as postgres_engine
from bundler.install.db import sqlite as sqlite_engine
from bundler.install.migrations import Migration
from tests.fake_db import FakeEngine, install

APP = Database("sqlite:////srv/app/app.db")
ENV: dict[str, str] = {}


def quiet(_: str) -> None:
    pass


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    return install(monkeypatch, DbKind.SQLITE)


# --------------------------------------------------------------------------- one vocabulary

@pytest.mark.parametrize(("url", "kind"), [
    ("postgres://u@h/db", DbKind.POSTGRES),
    ("postgresql://u:pw@127.0.0.1:5432/db", DbKind.POSTGRES),
    ("postgresql+psycopg://u@/db?host=/run/pg", DbKind.POSTGRES),
    ("POSTGRESQL://u@h/db", DbKind.POSTGRES),
    ("mysql://u@h/db", DbKind.MYSQL),
    ("mariadb://u@h/db", DbKind.MYSQL),
    ("mysql+pymysql://u@h/db", DbKind.MYSQL),
    ("sqlite:///abs/app.db", DbKind.SQLITE),
    ("sqlite:////abs/app.db", DbKind.SQLITE),
    ("${DATABASE_URL}", None),
    ("redis://h:6379", None),
    ("postgres", None),
])
def test_a_url_scheme_names_one_kind(url: str, kind: DbKind | None) -> None:
    assert DbKind.of_url(url) is kind


def test_every_kind_has_its_engine_and_the_profile_spells_the_same_kinds() -> None:
    assert set(db.ENGINES) == set(DbKind)
    assert all(engine.kind is kind for kind, engine in db.ENGINES.items())
    assert DATABASE_KINDS == ("postgres", "mysql", "sqlite")
    assert db.engine(Database("postgresql+psycopg://u@h/db")) is postgres_engine.ENGINE
    assert db.engine(Database("mariadb://u@h/db")) is mysql_engine.ENGINE
    assert db.engine(Database("sqlite:///a.db")) is sqlite_engine.ENGINE
    assert len({e.backup_kind for e in db.ENGINES.values()}) == len(DbKind)


def test_a_url_of_no_kind_is_refused_with_its_password_masked() -> None:
    with pytest.raises(InstallError) as err:
        db.check(Database("redis://app:S3cret@h:6379/0"), ENV)
    assert type(err.value) is InstallError  # exit 11
    assert "S3cret" not in err.value.message and "postgresql://" in err.value.hint


# --------------------------------------------------------------------------- the facade

def test_backup_then_restore_brings_the_rows_back(fake: FakeEngine, tmp_path: Path) -> None:
    fake.write(APP, "orders", 3)
    before = db.fingerprint(APP, ENV)
    saved = db.backup(APP, tmp_path / "backups", ENV, quiet)
    assert saved.kind == "fake" and saved.path.is_file() and saved.size > 0
    assert stat.S_IMODE((tmp_path / "backups").stat().st_mode) == 0o700
    assert Backup.from_json(saved.to_json()) == saved
    fake.write(APP, "orders", 4)
    fake.write(APP, "added_by_migration", True)
    assert db.fingerprint(APP, ENV) != before
    db.restore(APP, saved, ENV, quiet)
    assert fake.rows(APP) == {"orders": 3}
    assert db.fingerprint(APP, ENV) == before
    assert [w for w, _ in fake.calls] == ["fingerprint", "backup", "fingerprint", "restore",
                                          "fingerprint"]


def test_fingerprint_changes_with_every_write_and_only_then(fake: FakeEngine) -> None:
    seen = {db.fingerprint(APP, ENV)}
    for n in range(3):
        fake.write(APP, "n", n)
        value = db.fingerprint(APP, ENV)
        assert value not in seen and db.fingerprint(APP, ENV) == value
        seen.add(value)


def test_a_failing_restore_raises_the_engines_error_and_changes_nothing(
        fake: FakeEngine, tmp_path: Path) -> None:
    fake.write(APP, "orders", 3)
    saved = db.backup(APP, tmp_path, ENV, quiet)
    fake.write(APP, "orders", 4)
    fake.fail_restore = "lock timeout"
    with pytest.raises(InstallError) as err:
        db.restore(APP, saved, ENV, quiet)
    assert type(err.value) is InstallError  # exit 11
    assert "nothing was changed: lock timeout" in err.value.message
    assert fake.rows(APP) == {"orders": 4}


def test_a_changed_backup_is_refused_before_the_engine_sees_it(
        fake: FakeEngine, tmp_path: Path) -> None:
    fake.write(APP, "orders", 3)
    saved = db.backup(APP, tmp_path, ENV, quiet)
    saved.path.write_text('{"orders": 0}')
    fake.write(APP, "orders", 4)
    with pytest.raises(InstallError) as err:
        db.restore(APP, saved, ENV, quiet)
    assert "missing or changed since it was taken" in err.value.message
    assert "NOT restored" in err.value.hint
    assert fake.did("restore") == [] and fake.rows(APP) == {"orders": 4}


def test_another_engines_backup_is_refused(fake: FakeEngine, tmp_path: Path) -> None:
    saved = db.backup(APP, tmp_path, ENV, quiet)
    foreign = Backup(saved.path, "pg_dump", saved.size, saved.sha256, saved.created)
    with pytest.raises(InstallError, match="is a pg_dump backup, not a fake one"):
        db.restore(APP, foreign, ENV, quiet)


def test_a_backup_that_fails_half_way_leaves_no_file(fake: FakeEngine, tmp_path: Path) -> None:
    fake.write(APP, "orders", 3)
    fake.fail_backup = True
    with pytest.raises(InstallError, match="fake dump"):
        db.backup(APP, tmp_path / "b", ENV, quiet)
    assert list((tmp_path / "b").iterdir()) == []


def test_each_database_goes_to_the_engine_of_its_kind(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pg, my = install(monkeypatch, DbKind.POSTGRES), install(monkeypatch, DbKind.MYSQL)
    main, chat = Database("postgresql://app@h/main"), Database("mariadb://app@h/chat")
    for one in (main, chat):
        db.restore(one, db.backup(one, tmp_path, ENV, quiet), ENV, quiet)
    assert pg.did("backup") == pg.did("restore") == [main.url]
    assert my.did("backup") == my.did("restore") == [chat.url]


def test_a_database_health_check_is_the_engines_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    pg = install(monkeypatch, DbKind.POSTGRES)
    check = HealthCheck("db", kind="postgres", target="postgresql://app@h/main")
    assert health.probe(check) == (True, "postgres: SELECT 1 ok")
    pg.down = True
    assert health.probe(check) == (False, "postgres: fake is down")
    assert pg.did("ping") == [check.target] * 2


# --------------------------------------------------------------------------- migrations

def _sql(files: Path, **texts: str) -> Migration:
    (files / "sql").mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (files / "sql" / f"{name}.sql").write_text(text)
    return Migration(name="schema", kind="sql", path="sql")


def test_sql_migrations_run_in_order_under_the_lock_once(fake: FakeEngine,
                                                        tmp_path: Path) -> None:
    m = _sql(tmp_path, **{"002": "B", "001": "A"})
    (done,) = migrations.run([m], APP, tmp_path, None, ENV, quiet)
    assert done.applied == ("001.sql", "002.sql")
    assert migrations.pending([m], APP, tmp_path, None, ENV)[0].applied == ()
    assert migrations.run([m], APP, tmp_path, None, ENV, quiet)[0].applied == ()
    assert [w for w, _ in fake.calls] == ["lock", "unlock", "lock", "unlock"]


def test_an_edited_applied_file_is_refused_before_anything_runs(
        fake: FakeEngine, tmp_path: Path) -> None:
    m = _sql(tmp_path, **{"001": "A"})
    migrations.run([m], APP, tmp_path, None, ENV, quiet)
    _sql(tmp_path, **{"001": "A edited", "002": "B"})
    with pytest.raises(MigrationError) as err:
        migrations.run([m], APP, tmp_path, None, ENV, quiet)
    assert type(err.value) is MigrationError  # exit 17
    assert "001.sql was changed after it was applied" in err.value.message
    assert fake.ledgers[APP.url].applied == ["001.sql"]


def test_a_failing_file_stops_the_run_and_keeps_the_ones_before(
        fake: FakeEngine, tmp_path: Path) -> None:
    m = _sql(tmp_path, **{"001": "A", "002": "B", "003": "C"})
    fake.fail_migration = "002.sql"
    with pytest.raises(MigrationError, match=r"002\.sql: fake: syntax error"):
        migrations.run([m], APP, tmp_path, None, ENV, quiet)
    assert fake.ledgers[APP.url].applied == ["001.sql"]
    assert fake.calls[-1] == ("unlock", APP.url)  # the lock is let go on the way out
