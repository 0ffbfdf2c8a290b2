"""Seed 003 (tourism RAG backend) end to end: the backend with 4 uvicorn workers, PostgreSQL
17 + pgvector (Debian 13), MariaDB 10.11 and Redis as compose services, images built here
(scripts/seed_images.py), installed with no network but a link to this host where the engine
publishes the guide's ports.

One root, four releases built once for the module: 1.0.0 (install), 1.1.0 (migrations in
both databases), 1.2.0 (PostgreSQL's migration succeeds, then MariaDB's fails: exit 17) and
1.2.1 (both migrate, then the backend cannot log in to MariaDB: unhealthy, exit 12). After
each failure BOTH databases are back to their full dumps before the install."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import MigrationError, RolledBackError
from bundler.install import compose_runtime as cr
from scripts import seed_images
from tests import seed_stack
from tests.helpers import HostLink, Run, bundle, bundle_argv, free_port, host_link, offline

pytestmark = [pytest.mark.docker, pytest.mark.network, pytest.mark.slow]

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
PRODUCT = "tourism"
PG_SECRET = "pg-S3cret-tourism"
MY_SECRET = "my-S3cret-tourism"


@dataclass(frozen=True)
class Bundles:
    pub: Path
    by_version: dict[str, Path]


def _release(src: Path, version: str, seq: int, migrations: dict[str, str | None],
             mariadb_password: str) -> None:
    yaml = src / f"{PRODUCT}.yaml"
    yaml.write_text(re.sub(r"(?m)^version: .*\n(sequence: .*\n)?",
                           f"version: {version}\nsequence: {seq}\n", yaml.read_text()))
    compose = src / PRODUCT / "docker-compose.yml"
    text = re.sub(r'APP_VERSION: ".*"', f'APP_VERSION: "{version}"', compose.read_text())
    # only the backend's: the mariadb service keeps creating the user with the real one
    text = re.sub(r"(?m)^(      MARIADB_HOST: mariadb\n      MARIADB_USER: tourism_user\n"
                  r"      MARIADB_PASSWORD: ).*$", rf"\g<1>{mariadb_password}", text)
    compose.write_text(text)
    for name, sql in migrations.items():
        path = src / PRODUCT / "migrations" / name
        if sql is None:
            path.unlink()
        else:
            path.write_text(sql)


@pytest.fixture(scope="module")
def tourism(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundles]:
    base = tmp_path_factory.mktemp("seed003")
    seed_images.ensure_seed(engine, "003")
    (base / "keys").mkdir()
    assert bundle("keygen", base / "keys" / "release").rc == 0
    src = base / "profiles"
    shutil.copytree(PROFILES / PRODUCT, src / PRODUCT)
    shutil.copy(PROFILES / f"{PRODUCT}.yaml", src / f"{PRODUCT}.yaml")
    good = "${MARIADB_PASSWORD}"
    releases: list[tuple[str, int, dict[str, str | None], str]] = [
        ("1.0.0", 1, {}, good),
        ("1.1.0", 2, {"vectors/002_rating.sql":
                      "ALTER TABLE places ADD COLUMN rating real NOT NULL DEFAULT 4.0;\n"
                      "UPDATE places SET rating = 4.8 WHERE region = '제주';\n",
                      "chat/002_session.sql":
                      "ALTER TABLE chat_history ADD COLUMN session_id VARCHAR(64) NULL;\n"
                      "CREATE INDEX chat_history_session ON chat_history (session_id);\n"},
         good),
        # vectors' migration succeeds, then chat's fails half-way (the last database)
        ("1.2.0", 3, {"vectors/003_more.sql":
                      "INSERT INTO places (name, region, embedding) VALUES "
                      "('경복궁', '서울', '[0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5]');\n"
                      "DELETE FROM places WHERE region = '부산';\n",
                      "chat/003_bad.sql":
                      "DELETE FROM chat_history;\nINSERT INTO no_such_table VALUES (1);\n"},
         good),
        # both migrate, then the backend logs in to MariaDB with the wrong password
        ("1.2.1", 4, {"chat/003_bad.sql": None,
                      "chat/003_archive.sql": "DELETE FROM chat_history;\n"},
         "not-the-password"),
    ]
    out: dict[str, Path] = {}
    for version, seq, migrations, password in releases:
        _release(src, version, seq, migrations, password)
        built = bundle("build", src / f"{PRODUCT}.yaml", "--key", base / "keys" / "release.key",
                       "--out", base / "out", "--cache-dir", base / "cache", "--json",
                       timeout=900)
        assert built.rc == 0, built.err
        out[version] = Path(json.loads(built.out)["bundle"])
    yield Bundles(base / "keys" / "release.pub", out)


def test_inspect_lists_images_databases_and_migrations(tourism: Bundles) -> None:
    shown = bundle("inspect", tourism.by_version["1.1.0"], "--trust", tourism.pub, "--json")
    assert shown.rc == 0, shown.err
    data = json.loads(shown.out)
    assert [i["ref"] for i in data["images"]] == ["tourism/backend:1.0.0", "tourism/pgvector:17",
                                                  "tourism/mariadb:10.11", "tourism/redis:7"]
    assert data["databases"] == [
        {"name": "vectors", "kind": "postgres", "compose_service": "postgres"},
        {"name": "chat", "kind": "mysql", "compose_service": "mariadb"}]
    steps = {x["name"]: (x["database"], x["steps"]) for x in data["migrations"]}
    assert list(steps) == ["vectors", "chat"]
    assert steps["vectors"][0] == "vectors" and "002_rating.sql" in steps["vectors"][1], steps
    assert steps["chat"][0] == "chat" and "002_session.sql" in steps["chat"][1], steps
    assert data["wheels"] == [] and data["npm"] == []  # the guide builds them into images
    paths = {f["path"] for f in data["files"]}
    assert {"files/stack/migrations/vectors/002_rating.sql",
            "files/stack/migrations/chat/002_session.sql"} <= paths, sorted(paths)


def test_the_sbom_lists_each_images_debian_packages(tourism: Bundles, tmp_path: Path) -> None:
    """Issue 21: the seed's SBOM validates against the CycloneDX schema and lists, per image
    (built here from Debian 12 and 13 packages), the Debian packages inside it."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    out = tmp_path / "bom.json"
    shown = bundle("sbom", tourism.by_version["1.1.0"], "--trust", tourism.pub, "--out", out)
    assert shown.rc == 0, shown.err
    text = out.read_text()
    assert JsonStrictValidator(SchemaVersion.V1_7).validate_str(text) is None
    doc = json.loads(text)

    def props(c: dict[str, Any]) -> dict[str, str]:
        return {p["name"]: p["value"] for p in c.get("properties", [])}
    debs: dict[str, dict[str, str]] = {}
    for c in doc["components"]:
        if props(c).get("bundler:kind") == "image-deb":
            debs.setdefault(props(c)["bundler:where"], {})[c["name"]] = c["purl"]
    assert set(debs) == {"tourism/backend:1.0.0", "tourism/pgvector:17",
                         "tourism/mariadb:10.11", "tourism/redis:7"}, sorted(debs)
    assert "mariadb-server" in debs["tourism/mariadb:10.11"]
    assert any(n.startswith("postgresql-17") for n in debs["tourism/pgvector:17"])
    assert "redis-server" in debs["tourism/redis:7"]
    assert "distro=debian-13" in debs["tourism/pgvector:17"]["libc6"]
    assert "distro=debian-12" in debs["tourism/mariadb:10.11"]["libc6"]


def _post(url: str, body: dict[str, object]) -> list[str]:
    return [sys.executable, "-c", "import urllib.request, sys; r = urllib.request.urlopen("
            f"urllib.request.Request({url!r}, data={json.dumps(body).encode()!r}, "
            "headers={'Content-Type': 'application/json'}), timeout=10); "
            "sys.stdout.write(r.read().decode())"]


def _my_dump(engine: Any, project: str) -> str:
    code, out = seed_stack.container(engine, project, "mariadb").exec_run(
        ["mariadb-dump", "--skip-dump-date", "--single-transaction", "tourism_db"])
    assert code == 0, out
    return str(out.decode())


def test_install_upgrade_and_both_failures_restore_both_databases(
        tourism: Bundles, engine: Any, tmp_path: Path, roots: list[Path]) -> None:
    root = tmp_path / "target"
    roots.append(root)
    project = cr.project_name(PRODUCT, root)
    ports = {n: free_port() for n in ("BACKEND", "POSTGRES", "MARIADB", "REDIS")}
    try:
        with host_link() as link:
            (root / "shared").mkdir(parents=True)
            h = link.host
            (root / "shared" / ".env").write_text(
                f"POSTGRES_PASSWORD={PG_SECRET}\nMARIADB_PASSWORD={MY_SECRET}\n"
                "OPENAI_API_KEY=sk-test-003\n"
                f"DATABASE_URL=postgresql://tourism_user:{PG_SECRET}@{h}:{ports['POSTGRES']}"
                "/tourism_db\n"
                f"CHAT_URL=mysql://tourism_user:{MY_SECRET}@{h}:{ports['MARIADB']}/tourism_db\n"
                f"PUBLISH_ADDR={h}\n" + "".join(f"{k}_PORT={v}\n" for k, v in ports.items()))
            _story(tourism, engine, project, link, ports, ["--trust", tourism.pub, "--root",
                                                           root])
    finally:
        seed_stack.clean(engine, project)


def _story(tourism: Bundles, engine: Any, project: str, link: HostLink,
           ports: dict[str, int], trust: list[Any]) -> None:
    api = f"http://{link.host}:{ports['BACKEND']}"

    def install(version: str, *more: list[str]) -> list[Run]:
        return offline(bundle_argv("install", tourism.by_version[version], *trust),
                       bundle_argv("status", "--root", trust[3], "--json"),
                       seed_stack.get(f"{api}/health"), *more, link=link)

    def state() -> tuple[str, str]:
        return (seed_stack.pg_dump(engine, project, "tourism_user", "tourism_db"),
                _my_dump(engine, project))

    ask = {"query": "서울 맛집 추천해줘", "top_k": 2}
    r1, s1, h1, q1, q2, metrics = install("1.0.0", _post(f"{api}/rag/query", ask),
                                          _post(f"{api}/rag/query", ask),
                                          seed_stack.get(f"{api}/metrics"))
    assert r1.rc == 0, r1.err
    assert "in compose service mariadb" in r1.err and "in compose service postgres" in r1.err
    assert json.loads(s1.out)["healthy"] is True
    health = json.loads(h1.out)
    assert health | {"pid": 0} == {"status": "ok", "version": "1.0.0", "pid": 0,
                                   "postgres": "ok", "mariadb": "ok", "redis": "ok"}
    first, second = json.loads(q1.out), json.loads(q2.out)
    assert len(first["places"]) == 2 and first["cached"] is False, q1.out + q1.err
    assert second == first | {"cached": True}  # the answer came from Redis
    assert "cache_hits_total" in metrics.out and "rag_queries_total" in metrics.out
    procs = seed_stack.container(engine, project, "backend").top()["Processes"]
    assert sum("multiprocessing" in " ".join(p) for p in procs) >= 4, procs  # 4 workers
    vectors, chat = state()
    assert "embedding public.vector(8)" in vectors and "USING hnsw" in vectors
    assert "서울 맛집 추천해줘" in chat

    r2, _, h2 = install("1.1.0")
    assert r2.rc == 0, r2.err
    assert json.loads(h2.out)["version"] == "1.1.0"
    before = state()
    assert "rating" in before[0] and "session_id" in before[1]

    r3, s3, h3 = install("1.2.0")
    assert r3.rc == MigrationError.exit_code, r3.err
    assert "003_bad.sql" in r3.err and "rolled back to 1.1.0" in r3.err, r3.err
    assert state() == before  # 003_more.sql ran in PostgreSQL, and was undone
    assert json.loads(s3.out)["current"]["version"] == "1.1.0"
    assert json.loads(h3.out)["version"] == "1.1.0"  # the previous release serves

    r4, s4, h4 = install("1.2.1")
    assert r4.rc == RolledBackError.exit_code, r4.err
    # the compose healthcheck (the guide's) fails first: /health answers 503
    assert "compose service backend is unhealthy" in r4.err and "503" in r4.err, r4.err
    assert state() == before  # both databases migrated, and were restored
    st = json.loads(s4.out)
    assert st["current"]["version"] == "1.1.0" and st["healthy"] is True
    assert json.loads(h4.out)["status"] == "ok"
    for run in (r1, r2, r3, r4):
        assert PG_SECRET not in run.err + run.out and MY_SECRET not in run.err + run.out
