"""`databases:` in profiles and manifests (no database server needed)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bundler.build.profile import load_profile
from bundler.bundle.models import DatabaseSpec, MigrationSpec, Runtime
from bundler.errors import ProfileError

BASE = """\
schema: 1
name: shop
version: 1.0.0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bundle.yaml"
    path.write_text(BASE + textwrap.dedent(text))
    return path


def test_databases_and_migrations_naming_theirs(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, """\
        databases:
          - name: vectors
            kind: postgres
            url: ${DATABASE_URL}
          - name: chat
            kind: mysql
            url: ${CHAT_URL}
            compose_service: mariadb
        compose: {files: [app/compose.yml]}
        migrations:
          - {name: schema, command: [true]}
          - {name: history, command: [true], database: chat}
        """), check_files=False)
    rt = p.runtime
    assert rt.database is None
    assert [(d.name, d.kind, d.compose_service) for d in rt.all_databases()] == [
        ("vectors", "postgres", None), ("chat", "mysql", "mariadb")]
    assert [rt.database_of(m).name for m in rt.migrations] == ["vectors", "chat"]  # type: ignore[union-attr]


@pytest.mark.parametrize("body, message", [
    ("""\
     database: {url: sqlite:///x.db}
     databases:
       - {name: a, kind: sqlite, url: "sqlite:///a.db"}
     """, "either `database:` or `databases:`"),
    ("""\
     databases:
       - {name: a, kind: sqlite, url: "sqlite:///a.db"}
       - {name: a, kind: sqlite, url: "sqlite:///b.db"}
     """, "database name 'a' appears twice"),
    ("""\
     databases:
       - {name: a, kind: oracle, url: "sqlite:///a.db"}
     """, "databases[0].kind"),
    ("""\
     databases:
       - {name: a, kind: mysql, url: "postgresql://u@h/db"}
     """, "is a postgresql:// URL but kind is mysql"),
    ("""\
     databases:
       - {name: a, kind: sqlite, url: "sqlite:///a.db"}
     migrations:
       - {name: m, command: [true], database: b}
     """, "names database 'b'"),
])
def test_databases_mistakes(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(write(tmp_path, body), check_files=False)
    assert message in str(err.value), str(err.value)


def test_single_database_manifest_json_is_unchanged() -> None:
    """`name`/`kind`/`database`/`databases` appear only when set: a profile with a single
    `database:` builds the same manifest bytes as before."""
    spec = DatabaseSpec("${DATABASE_URL}", None)
    assert spec.to_json() == {"url": "${DATABASE_URL}", "compose_service": None}
    mig = MigrationSpec("schema", "sql", "db")
    assert "database" not in mig.to_json()
    rt = Runtime(database=spec, migrations=(mig,))
    assert rt.all_databases() == (spec,) and rt.database_of(mig) is spec
    named = DatabaseSpec("${X}", None, "chat", "mysql")
    assert DatabaseSpec.from_json(json.loads(json.dumps(named.to_json()))) == named
    with pytest.raises(ValueError):
        DatabaseSpec.from_json({"url": "x", "kind": "oracle"})


def test_pending_lists_every_database_still_to_restore(tmp_path: Path) -> None:
    """recovery.pending(): per database, its last backup and fingerprints; one the attempt's
    own rollback restored is left out; `restore done` settles them all."""
    from bundler.install import recovery
    from bundler.install.state import ReleaseRow, State

    def backup(name: str, db: str) -> str:
        return json.dumps({"path": f"/b/{name}", "kind": "pg_dump", "size": 1, "sha256": "0",
                           "created": "2026-01-01T00:00:00Z", "database": db})

    state = State.open(tmp_path / "state.db")
    try:
        with state.tx():
            state.upsert_release(ReleaseRow("2.0.0", "shop", 2, "d", "k", "rollback_failed",
                                            "2026-01-01T00:00:00Z", txn="t1"))
        for step, status, detail in [
                ("verify", "done", ""), ("backup", "file", backup("old-v", "vectors")),
                ("backup", "file", backup("v", "vectors")), ("backup", "file", backup("c", "chat")),
                ("db-state", "before-migrate:vectors", "fv"),
                ("db-state", "before-migrate:chat", "fc"), ("migrate", "started", ""),
                ("migrate", "failed", "boom"), ("restore", "done:vectors", "v"),
                ("db-state", "after-failed-rollback:chat", "fc2")]:
            state.event("t1", "2.0.0", step, status, detail)
        p = recovery.pending(state)
        assert p is not None
        assert [(r.db_name, r.backup.path.name, r.before, r.after) for r in p.restores] == [
            ("chat", "c", "fc", "fc2")]
        assert p.backup is not None and p.backup.path.name == "c"
        state.event("t1", "2.0.0", "restore", "done", "c")
        p = recovery.pending(state)
        assert p is not None and p.restores == ()
    finally:
        state.close()
