"""Seed 000 (AI Insights Module 배포 가이드) end to end: the Node.js backend on Prisma 6.19.3,
PostgreSQL and Redis, built from the npm registry (the build machine's `npm install` and
`prisma generate` as actions) and installed under `unshare -n` with the carried Node.js;
`prisma migrate deploy` runs offline through the JS schema engine and the pg driver adapter.

Four releases, built once for the module: 1.5.0 (first install, production settings), 1.6.0
(a Prisma migration that adds a column, with the regenerated client using it), 1.7.0 (a first
migration succeeds, the second fails on the rows already there: exit 17) and 1.7.1 (migrates,
then its backend cannot start: exit 12). After each failure the database is byte for byte its
pre-install pg_dump and 1.6.0 serves again. Then 1.5.0 once more on two more roots, with the
guide's staging and development settings (`--environment`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bundler.errors import MigrationError, RolledBackError
from tests import bare_image
from tests.helpers import bundle, bundle_argv, offline, unavailable
from tests.pg_fixtures import PgCluster

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
MIGRATIONS = "health-platform/backend/prisma/migrations"
JWT_SECRET = "jwt-S3cret-for-seed-000"
REDIS_PORT = 6379  # inside the test's own network namespace

pytestmark = [pytest.mark.slow, pytest.mark.network]


@dataclass(frozen=True)
class Built:
    bundles: dict[str, Path]  # version -> bundle file
    pub: Path
    build_seconds: dict[str, float]


def _migration(src: Path, name: str, sql: str) -> None:
    (src / MIGRATIONS / name).mkdir()
    (src / MIGRATIONS / name / "migration.sql").write_text(sql)


def _set_version(src: Path, version: str) -> None:
    path = src / "health-platform.yaml"
    text = path.read_text()
    current = next(line for line in text.splitlines() if line.startswith("version: "))
    path.write_text(text.replace(current, f"version: {version}"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The four releases, built from the registry with the shared test caches (bundler's
    cache for tarballs and the Node.js runtime, npm's own for the build machine's install)."""
    import time

    if shutil.which("npm") is None:
        unavailable("npm is not installed on the build machine (apt-get install npm)")
    tmp = tmp_path_factory.mktemp("seed000")
    keygen = bundle("keygen", tmp / "release")
    assert keygen.rc == 0, keygen.err
    src = tmp / "profiles"
    shutil.copytree(PROFILES / "health-platform", src / "health-platform",
                    ignore=shutil.ignore_patterns("node_modules", "generated"))
    for name in ("health-platform.yaml", "health-platform.lock"):
        shutil.copy(PROFILES / name, src / name)
    cache = bare_image.cache_dir()
    env = {"npm_config_cache": str(cache / "npm-cache")}
    bundles: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    def build(version: str, sequence: int) -> None:
        _set_version(src, version)
        started = time.monotonic()
        done = bundle("build", src / "health-platform.yaml", "--frozen", "--key",
                      tmp / "release.key", "--out", tmp / "out", "--cache-dir",
                      cache / "bundler-cache", "--sequence", str(sequence), "--json",
                      env=env, timeout=900)
        seconds[version] = round(time.monotonic() - started, 1)
        assert done.rc == 0, done.err
        bundles[version] = Path(json.loads(done.out)["bundle"])

    build("1.5.0", 1000)
    # 1.6.0: the schema gains a column; the build's `prisma generate` gives the client it
    (src / "health-platform/backend/prisma/schema.prisma").write_text(
        (src / "health-platform/backend/prisma/schema.prisma").read_text().replace(
            "  expiresAt    DateTime\n", "  expiresAt    DateTime\n  score        Float?\n"))
    _migration(src, "20240201000000_add_insight_score",
               'ALTER TABLE "AIInsightCache" ADD COLUMN "score" DOUBLE PRECISION;\n')
    server = src / "health-platform/backend/dist/server.js"
    server.write_text(server.read_text().replace(
        "      insightsData: data,\n", "      insightsData: data,\n      score: data.average,\n"))
    build("1.6.0", 2000)
    # 1.7.0: a new table (applies), then a NOT NULL column the existing rows lack (fails)
    _migration(src, "20240301000000_add_goal",
               'CREATE TABLE "Goal" ("id" SERIAL PRIMARY KEY, "userId" TEXT NOT NULL, '
               '"target" DOUBLE PRECISION NOT NULL);\n'
               'INSERT INTO "Goal" ("userId", "target") SELECT "id", 75 FROM "User";\n')
    _migration(src, "20240302000000_require_metric_unit",
               'ALTER TABLE "HealthMetric" ADD COLUMN "unit" TEXT NOT NULL;\n')
    build("1.7.0", 3000)
    # 1.7.1: without them, a migration that applies, and a backend that needs a setting
    # nobody configured, so it exits at start and never answers /health
    for name in ("20240301000000_add_goal", "20240302000000_require_metric_unit"):
        shutil.rmtree(src / MIGRATIONS / name)
    _migration(src, "20240401000000_add_user_note", 'ALTER TABLE "User" ADD COLUMN "note" TEXT;\n')
    server.write_text(server.read_text().replace(
        '"JWT_SECRET"];', '"JWT_SECRET", "AI_INSIGHTS_PROVIDER_KEY"];'))
    build("1.7.1", 4000)
    return Built(bundles, tmp / "release.pub", seconds)


@pytest.fixture
def redis_pidfile(tmp_path: Path) -> Iterator[Path]:
    """The Redis the test starts inside its network namespace (the host's Redis, which the
    guide expects running); stopped afterwards by its pid."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server / redis-cli are not installed (apt-get install redis-server)")
    pidfile = tmp_path / "redis.pid"
    yield pidfile
    if pidfile.exists():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)


_CLIENT = """
import json, sys, urllib.request, urllib.error
out = []
for spec in sys.argv[1:]:
    method, _, url = spec.partition(" ")
    req = urllib.request.Request("http://127.0.0.1:5000" + url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            out.append(json.loads(r.read()))
    except (urllib.error.URLError, OSError) as exc:
        out.append({"unreachable": str(exc)})
print(json.dumps(out))
"""


def _requests(*specs: str) -> list[str]:
    return [sys.executable, "-c", _CLIENT, *specs]


def _dump(url: str, path: Path) -> list[str]:
    return ["pg_dump", "--no-password", "-d", url, "-f", str(path)]


def _dumped(path: Path) -> str:
    """A plain pg_dump, less the random key of its \\restrict lines (pg_dump 15.14+)."""
    return "".join(line for line in path.read_text().splitlines(keepends=True)
                   if not line.startswith(("\\restrict ", "\\unrestrict ")))


def test_seed_000_bundle_lists_its_npm_packages_database_and_migration(built: Built) -> None:
    shown = bundle("inspect", built.bundles["1.5.0"], "--trust", built.pub, "--json")
    assert shown.rc == 0, shown.err
    info = json.loads(shown.out)
    npm = {Path(f["path"]).name for f in info["files"] if f["kind"] == "npm"}
    assert {"prisma-6.19.3.tgz", "@prisma+client-6.19.3.tgz", "@prisma+adapter-pg-6.19.3.tgz",
            "@prisma+adapter-pg-7.10.1.tgz", "pg-8.23.1.tgz", "redis-4.7.1.tgz"} <= npm, \
        sorted(npm)
    (project,) = info["npm"]
    packages = {(p["name"], p["version"]) for p in project["packages"]}
    assert {("prisma", "6.19.3"), ("@prisma/client", "6.19.3"), ("pg", "8.23.1"),
            ("redis", "4.7.1")} <= packages, sorted(packages)
    assert info["databases"] == [{"name": "main", "kind": "postgres", "compose_service": None}]
    assert [(x["name"], x["kind"], x["database"]) for x in info["migrations"]] == [
        ("prisma", "command", "main")]
    assert info["services"] == ["backend"]
    assert info["health"] == ["backend", "redis", "database"]
    files = {f["path"] for f in info["files"]}
    # the client `prisma generate` made on the build machine travels with the files
    assert "files/backend/generated/client/index.js" in files
    assert not any("/node_modules/" in p for p in files)


@pytest.mark.postgres
def test_seed_000_install_upgrade_and_two_failed_releases(
        built: Built, tmp_path: Path, cluster: PgCluster, roots: list[Path],
        redis_pidfile: Path) -> None:
    dbname = cluster.create_database()
    url = cluster.url(dbname)
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(
        f"DATABASE_URL={url}\nREDIS_URL=redis://127.0.0.1:{REDIS_PORT}/0\n"
        f"JWT_SECRET={JWT_SECRET}\n")
    dumps = tmp_path / "dumps"
    dumps.mkdir()

    def install(version: str, where: Path = root, environment: str = "production"
                ) -> list[str]:
        return bundle_argv("install", built.bundles[version], "--trust", built.pub, "--root",
                           where, "--environment", environment)

    # the guide's other two environments: the same bundle, each on its own root and database
    others = {}
    for environment in ("staging", "development"):
        other = tmp_path / environment
        roots.append(other)
        (other / "shared").mkdir(parents=True)
        (other / "shared" / ".env").write_text(
            f"DATABASE_URL={cluster.url(cluster.create_database())}\n"
            f"REDIS_URL=redis://127.0.0.1:{REDIS_PORT}/1\nJWT_SECRET={JWT_SECRET}\n")
        others[environment] = other

    (redis, v1, use1, ttl, v2, use2, before3, v3, after3, use3, before4, v4, after4, use4,
     status, stop, stg, use_stg, stop_stg, dev, use_dev, stop_dev) = offline(
        ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "yes", "--pidfile", str(redis_pidfile)],
        install("1.5.0"),
        _requests("GET /health", "POST /api/metrics?user=u1&value=70",
                  "GET /api/ai-insights?user=u1", "POST /api/metrics?user=u1&value=80",
                  "POST /api/metrics?user=u1&value=90", "GET /api/ai-insights?user=u1",
                  "GET /api/ai-insights?user=u1"),
        ["redis-cli", "-p", str(REDIS_PORT), "TTL", "ai-insights:u1"],
        install("1.6.0"),
        _requests("GET /health", "GET /api/ai-insights?user=u1",
                  "POST /api/metrics?user=u2&value=60", "POST /api/metrics?user=u2&value=62",
                  "POST /api/metrics?user=u2&value=64", "GET /api/ai-insights?user=u2"),
        _dump(url, dumps / "before-1.7.0.sql"),
        install("1.7.0"),
        _dump(url, dumps / "after-1.7.0.sql"),
        _requests("GET /health", "GET /api/ai-insights?user=u2"),
        _dump(url, dumps / "before-1.7.1.sql"),
        install("1.7.1"),
        _dump(url, dumps / "after-1.7.1.sql"),
        _requests("GET /health", "GET /api/ai-insights?user=u1"),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("stop", "--root", root),
        *[c for env, where in others.items() for c in (
            install("1.5.0", where, env), _requests("GET /health"),
            bundle_argv("stop", "--root", where))],
        timeout=1500)
    assert redis.rc == 0, redis.err
    # 1.5.0: migrated offline by prisma, serving with the production settings of the guide
    assert v1.rc == 0, v1.err
    assert ("applied 20240115000000_init, 20240116000000_add_ai_insight_cache"
            in v1.err), v1.err
    health, first, insufficient, _, _, generated, cached = json.loads(use1.out)
    assert health["status"] == "ok" and health["environment"] == "production", health
    assert health["aiInsights"] == {"cacheTtl": 3600, "minDataPoints": 3}, health
    assert first == {"userId": "u1", "dataPoints": 1}
    assert insufficient == {"cached": False, "insufficient": True, "dataPoints": 1}
    assert generated["cached"] is False and generated["dataPoints"] == 3, generated
    assert cached == {**generated, "cached": True}  # from Redis
    assert 1800 < int(ttl.out) <= 3600, ttl.out  # AI_INSIGHTS_CACHE_TTL of production
    # 1.6.0: the column migration, and the regenerated client writing it
    assert v2.rc == 0, v2.err
    assert "applied 20240201000000_add_insight_score" in v2.err, v2.err
    health2, still_cached, *_, u2 = json.loads(use2.out)
    assert health2["status"] == "ok" and still_cached["cached"] is True
    assert u2["cached"] is False and u2["average"] == 62, u2
    with cluster.connect(dbname) as conn:
        assert conn.execute('SELECT score FROM "AIInsightCache" WHERE "userId" = %s',
                            ("u2",)).fetchone() == (62.0,)
    # 1.7.0: its first migration applied, its second failed: all of it undone
    assert v3.rc == MigrationError.exit_code, v3.err
    assert ("Prisma migration 20240302000000_require_metric_unit failed: external connector "
            "error: Null constraint failed") in v3.err, v3.err
    assert "rolled back to 1.6.0" in v3.err, v3.err
    assert before3.rc == after3.rc == 0, before3.err + after3.err
    assert _dumped(dumps / "after-1.7.0.sql") == _dumped(dumps / "before-1.7.0.sql")
    health3, served3 = json.loads(use3.out)
    assert health3["status"] == "ok" and served3["cached"] is True, use3.out
    # 1.7.1: migrated, then unhealthy: the same restore, exit 12
    assert v4.rc == RolledBackError.exit_code, v4.err
    assert "applied 20240401000000_add_user_note" in v4.err, v4.err
    assert "backend" in v4.err and "rolled back to 1.6.0" in v4.err, v4.err
    assert before4.rc == after4.rc == 0, before4.err + after4.err
    assert _dumped(dumps / "after-1.7.1.sql") == _dumped(dumps / "before-1.7.1.sql")
    health4, served4 = json.loads(use4.out)
    assert health4["status"] == "ok" and served4["cached"] is True, use4.out
    state = json.loads(status.out)
    assert state["current"]["version"] == "1.6.0" and state["healthy"] is True, status.out
    assert stop.rc == 0, stop.err
    with cluster.connect(dbname) as conn:
        applied = [r[0] for r in conn.execute(
            "SELECT migration_name FROM _prisma_migrations ORDER BY migration_name")]
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert applied == ["20240115000000_init", "20240116000000_add_ai_insight_cache",
                       "20240201000000_add_insight_score"]
    assert "Goal" not in tables and "bundler_migrations" not in tables, tables
    # staging and development: the guide's settings of each (section 2's .env files)
    for run, use, stopped, environment, ttl_, points in (
            (stg, use_stg, stop_stg, "staging", 1800, 3),
            (dev, use_dev, stop_dev, "development", 300, 1)):
        assert run.rc == 0, run.err
        (seen,) = json.loads(use.out)
        assert seen["status"] == "ok" and seen["environment"] == environment, seen
        assert seen["aiInsights"] == {"cacheTtl": ttl_, "minDataPoints": points}, seen
        assert stopped.rc == 0, stopped.err
    outputs = "".join(r.out + r.err for r in (v1, v2, v3, v4, status, stg, dev))
    assert JWT_SECRET not in outputs
    print(f"seed 000 builds (s): {built.build_seconds}")
