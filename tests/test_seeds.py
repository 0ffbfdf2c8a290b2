"""The users' stacks (../shared/seeds) as bundles: each profile under profiles/ is built from
the real package registries and installed offline (`unshare -n`), the way the seed's
deployment guide would have it done by hand."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from bundler.errors import MigrationError
from tests.helpers import bundle, bundle_argv, offline, unavailable
from tests.pg_fixtures import PgCluster

PROFILES = Path(__file__).resolve().parent.parent / "profiles"

pytestmark = [pytest.mark.slow]


def _get(url: str) -> list[str]:
    return [sys.executable, "-c",
            f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10)"
            ".read().decode())"]


@pytest.mark.network
@pytest.mark.postgres
def test_seed_001_metrics_dashboard(tmp_path: Path, keys: tuple[Path, Path],
                                    cluster: PgCluster, roots: list[Path]) -> None:
    """Seed 001: FastAPI + APScheduler + pandas + reportlab backend on PostgreSQL 15 with an
    alembic migration, and the Node dashboard's chart libraries (npm)."""
    built = bundle("build", PROFILES / "llm-webapp.yaml", "--frozen", "--key", keys[0],
                   "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--json")
    assert built.rc == 0, built.err
    info = json.loads(bundle("inspect", json.loads(built.out)["bundle"], "--trust", keys[1],
                             "--json").out)
    wheels = {w["name"]: w["version"] for w in info["wheels"]}
    assert wheels["pandas"] == "2.1.3" and wheels["reportlab"] == "4.0.7", wheels
    assert len(wheels) == len([f for f in info["files"] if f["kind"] == "wheel"])
    (project,) = info["npm"]
    assert {"chart.js"} <= {p["name"] for p in project["packages"]}, project
    assert info["runtimes"]["node"].startswith("20."), info["runtimes"]
    assert info["databases"] == [{"name": None, "kind": None, "compose_service": None}]
    assert info["migrations"] == [{
        "name": "schema", "kind": "alembic", "database": None, "path": "backend",
        "steps": ["migrations/versions/20251102_add_metrics_tables.py"], "command": None}]
    human = bundle("inspect", json.loads(built.out)["bundle"], "--trust", keys[1]).out
    assert "pandas==2.1.3" in human and "migration schema (alembic)" in human, human
    dbname = cluster.create_database()
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL={cluster.url(dbname)}\n")
    install, status, api, libs, pdf = offline(
        bundle_argv("install", json.loads(built.out)["bundle"], "--trust", keys[1],
                    "--root", root, "--environment", "development"),
        bundle_argv("status", "--root", root, "--json"),
        _get("http://127.0.0.1:8000/api/v1/metrics/status"),
        _get("http://127.0.0.1:3000/libs"),
        [sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
         "'http://127.0.0.1:8000/api/v1/metrics/export.pdf', timeout=10).read()[:5])"])
    assert install.rc == 0, install.err
    assert "alembic applied 20251102_add_metrics_tables" in install.err, install.err
    assert json.loads(status.out)["healthy"] is True, status.out
    assert api.rc == 0 and json.loads(api.out)["status"] == "healthy", api.out + api.err
    assert json.loads(libs.out)["chart.js"].startswith("4."), libs.out
    assert pdf.out.strip() == "b'%PDF-'", pdf.out + pdf.err  # reportlab works on the target
    with cluster.connect(dbname) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"metric_snapshots", "metric_collection_failures", "alembic_version"} <= tables
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (
            "20251102_add_metrics_tables",)
    report = json.loads((root / "current" / "report.json").read_text())
    assert [c["name"] for c in report["checks"]] == ["metrics-api", "dashboard", "database"]


@pytest.mark.network
def test_seed_004_rag_assistant_on_sqlite_and_redis(tmp_path: Path, keys: tuple[Path, Path],
                                                    roots: list[Path]) -> None:
    """Seed 004 without Docker: FastAPI under uvicorn, SQLite (backup API) and a supervised
    redis-server; then an upgrade whose migration fails gives the database back exactly."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed (apt-get install redis-server)")
    src = tmp_path / "profiles"
    shutil.copytree(PROFILES / "rag-assistant", src / "rag-assistant")
    for name in ("rag-assistant.yaml", "rag-assistant.lock"):
        shutil.copy(PROFILES / name, src / name)
    v1 = bundle("build", src / "rag-assistant.yaml", "--frozen", "--key", keys[0], "--out",
                tmp_path / "out", "--cache-dir", tmp_path / "cache", "--json")
    assert v1.rc == 0, v1.err
    # 2.0.1 ships a migration that fails half-way
    (src / "rag-assistant/backend/migrations/002_bad.sql").write_text(
        "ALTER TABLE users ADD COLUMN plan TEXT;\nDELETE FROM users;\n"
        "INSERT INTO no_such_table VALUES (1);\n")
    yaml_text = (src / "rag-assistant.yaml").read_text()
    (src / "rag-assistant.yaml").write_text(yaml_text.replace("version: 2.0.0",
                                                              "version: 2.0.1"))
    v2 = bundle("build", src / "rag-assistant.yaml", "--frozen", "--key", keys[0], "--out",
                tmp_path / "out", "--cache-dir", tmp_path / "cache", "--sequence",
                "4000000000", "--json")
    assert v2.rc == 0, v2.err
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared" / "data").mkdir(parents=True)
    db = root / "shared" / "data" / "users.db"
    secret = "sk-test-0123456789abcdef"
    (root / "shared" / ".env").write_text(f"DATABASE_URL=sqlite:///{db}\n"
                                          f"OPENAI_API_KEY={secret}\n")
    trust = ["--trust", keys[1], "--root", root]
    install, first, second, health, upgrade, after = offline(
        bundle_argv("install", json.loads(v1.out)["bundle"], *trust),
        _get("http://127.0.0.1:8000/api/answer?q=hello"),
        _get("http://127.0.0.1:8000/api/answer?q=hello"),
        _get("http://127.0.0.1:8000/health"),
        bundle_argv("install", json.loads(v2.out)["bundle"], *trust),
        _get("http://127.0.0.1:8000/health"))
    assert install.rc == 0, install.err
    assert json.loads(first.out)["cached"] is False
    assert json.loads(second.out)["cached"] is True  # through the supervised redis
    assert json.loads(health.out) == {"status": "ok", "env": "prod", "users": 1}
    assert upgrade.rc == MigrationError.exit_code, upgrade.err
    assert "002_bad.sql" in upgrade.err and "rolled back to 2.0.0" in upgrade.err
    assert json.loads(after.out)["users"] == 1  # restored: the DELETE is gone
    with sqlite3.connect(db) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(users)")]
    assert "plan" not in columns
    assert secret not in install.err + install.out + upgrade.err + upgrade.out
