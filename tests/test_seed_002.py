"""Seed 002 (insurance chatbot) end to end: its images built here from the Debian, npm and
PyPI registries (scripts/seed_images.py), bundled, and installed with no network but a link
to this host, where the engine publishes nginx's ports: every health check goes through
nginx, as the guide's `curl localhost:8080/api/health` does.

One root, four releases built once for the module: 1.2.0 (install), 1.3.0 (an upgrade that
migrates), 1.4.0 (its second migration fails after the first succeeded: exit 17) and 1.4.1
(migrates, then its backend cannot reach the database: unhealthy, exit 12). After each
failure the database is back to its full pg_dump before the install and 1.3.0 serves."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import MigrationError, RolledBackError
from bundler.install import compose_runtime as cr
from scripts import seed_images
from tests import seed_stack
from tests.helpers import (
    HostLink,
    Run,
    bundle,
    bundle_argv,
    free_port,
    host_link,
    host_policy,
    offline,
)

pytestmark = [pytest.mark.docker, pytest.mark.network, pytest.mark.slow]

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
PRODUCT = "insurance-chatbot"
SECRET = "pg-S3cret-chatbot"


@dataclass(frozen=True)
class Bundles:
    pub: Path
    by_version: dict[str, Path]


def _release(src: Path, version: str, seq: int, migrations: dict[str, str | None],
             backend_password: str) -> None:
    """Edit the copied profile in place into `version` (a None migration is removed)."""
    yaml = src / f"{PRODUCT}.yaml"
    yaml.write_text(re.sub(r"(?m)^version: .*\n(sequence: .*\n)?",
                           f"version: {version}\nsequence: {seq}\n", yaml.read_text()))
    compose = src / PRODUCT / "docker-compose.yml"
    text = re.sub(r'APP_VERSION: ".*"', f'APP_VERSION: "{version}"', compose.read_text())
    compose.write_text(re.sub(r"SPRING_DATASOURCE_PASSWORD: .*",
                              f"SPRING_DATASOURCE_PASSWORD: {backend_password}", text))
    for name, sql in migrations.items():
        path = src / PRODUCT / "migrations" / name
        if sql is None:
            path.unlink()
        else:
            path.write_text(sql)


@pytest.fixture(scope="module")
def chatbot(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundles]:
    base = tmp_path_factory.mktemp("seed002")
    seed_images.ensure_seed(engine, "002")  # built from the registries once, then cached
    (base / "keys").mkdir()
    assert bundle("keygen", base / "keys" / "release").rc == 0
    key = base / "keys" / "release.key"
    src = base / "profiles"
    shutil.copytree(PROFILES / PRODUCT, src / PRODUCT)
    shutil.copy(PROFILES / f"{PRODUCT}.yaml", src / f"{PRODUCT}.yaml")
    releases: list[tuple[str, int, dict[str, str | None], str]] = [
        ("1.2.0", 1, {}, "${POSTGRES_PASSWORD}"),
        ("1.3.0", 2, {"002_feedback.sql":
                      "CREATE TABLE feedback (message_id bigint REFERENCES chat_message (id),"
                      " helpful boolean NOT NULL);\n"
                      "ALTER TABLE faq ADD COLUMN category text NOT NULL DEFAULT '일반';\n"
                      "INSERT INTO faq (question, answer, category) VALUES "
                      "('해지 환급금은?', '가입 기간에 따라 다릅니다.', '계약');\n"},
         "${POSTGRES_PASSWORD}"),
        # the first migration succeeds, the second fails half-way
        ("1.4.0", 3, {"003_ok.sql": "CREATE TABLE audit (at timestamptz);\n"
                                    "UPDATE faq SET category = '변경';\n",
                      "004_bad.sql": "DELETE FROM faq;\nSELECT no_such_function();\n"},
         "${POSTGRES_PASSWORD}"),
        # migrates fine, but this backend logs in with the wrong password: DOWN
        ("1.4.1", 4, {"004_bad.sql": None,
                      "004_cleanup.sql": "DELETE FROM faq WHERE category = '변경';\n"},
         "not-the-password"),
    ]
    out: dict[str, Path] = {}
    for version, seq, migrations, password in releases:
        _release(src, version, seq, migrations, password)
        built = bundle("build", src / f"{PRODUCT}.yaml", "--key", key, "--out", base / "out",
                       "--cache-dir", base / "cache", "--json", timeout=900)
        assert built.rc == 0, built.err
        out[version] = Path(json.loads(built.out)["bundle"])
    yield Bundles(base / "keys" / "release.pub", out)


def test_inspect_lists_images_databases_and_migrations(chatbot: Bundles) -> None:
    shown = bundle("inspect", chatbot.by_version["1.3.0"], "--trust", chatbot.pub, "--json")
    assert shown.rc == 0, shown.err
    data = json.loads(shown.out)
    assert [i["ref"] for i in data["images"]] == [
        "insurance-chatbot/nginx:1.2.0", "insurance-chatbot/frontend:1.2.0",
        "insurance-chatbot/backend:1.2.0", "insurance-chatbot/ai:1.2.0",
        "insurance-chatbot/postgres:15"]
    assert all(i["image_id"].startswith("sha256:") for i in data["images"])
    assert data["databases"] == [{"name": "chatbot", "kind": "postgres",
                                  "compose_service": "postgres"}]
    assert [(x["name"], x["database"], x["steps"]) for x in data["migrations"]] == [
        ("schema", "chatbot", ["001_chat.sql", "002_feedback.sql"])]
    assert data["wheels"] == [] and data["npm"] == []  # the guide builds them into images
    paths = {f["path"] for f in data["files"]}
    assert {"files/stack/migrations/001_chat.sql", "files/stack/migrations/002_feedback.sql",
            "files/stack/nginx/chatbot.conf"} <= paths, sorted(paths)
    # the wheels and npm packages are inside the images (built by scripts/seed_images.py)
    assert not [p for p in paths if p.endswith((".whl", ".tgz"))]


def test_install_upgrade_and_both_failures_restore(chatbot: Bundles, engine: Any,
                                                   tmp_path: Path, roots: list[Path]) -> None:
    root = tmp_path / "target"
    roots.append(root)
    project = cr.project_name(PRODUCT, root)
    sock = tmp_path / "pgsock"
    sock.mkdir()
    sock.chmod(0o1777)  # PostgreSQL runs as its own user in the container
    ports = {name: free_port() for name in ("HTTP", "FRONTEND", "BACKEND", "AI")}
    trust = ["--trust", chatbot.pub, "--root", root]
    try:
        with host_link() as link:
            (root / "shared").mkdir(parents=True)
            (root / "shared" / ".env").write_text(
                f"POSTGRES_PASSWORD={SECRET}\nOPENAI_API_KEY=sk-test-002\n"
                f"PG_SOCKET_DIR={sock}\n"
                f"DATABASE_URL=postgresql://chatbot_user@/chatbot?host={sock}\n"
                f"PUBLISH_ADDR={link.host}\n"
                + "".join(f"{k}_PORT={v}\n" for k, v in ports.items()))
            host_policy(root, f"host-mount={sock}")  # the profile's one policy line
            _story(chatbot, engine, project, link, ports, trust)
    finally:
        seed_stack.clean(engine, project)


def _story(chatbot: Bundles, engine: Any, project: str, link: HostLink, ports: dict[str, int],
           trust: list[Any]) -> None:
    host = link.host

    def via_nginx() -> list[list[str]]:
        return [seed_stack.get(f"http://{host}:{ports['HTTP']}/api/info"),
                seed_stack.get(f"http://{host}:{ports['HTTP']}/"),
                seed_stack.get(f"http://{host}:{ports['HTTP']}/ai/store"),
                seed_stack.get(f"http://{host}:{ports['AI']}/")]

    def dump() -> str:
        return seed_stack.pg_dump(engine, project, "chatbot_user", "chatbot")

    def install(version: str) -> list[Run]:
        return offline(bundle_argv("install", chatbot.by_version[version], *trust),
                       bundle_argv("status", "--root", trust[3], "--json"), *via_nginx(),
                       link=link)

    r1, s1, info1, page, store1, ai = install("1.2.0")
    assert r1.rc == 0, r1.err
    assert "in compose service postgres" in r1.err, r1.err
    assert json.loads(s1.out)["healthy"] is True
    assert [c["name"] for c in json.loads(s1.out)["checks"]] == [
        "frontend", "backend", "ai", "api-via-nginx", "database"]
    info = json.loads(info1.out)
    assert info["version"] == "1.2.0" and info["faqs"] == 2, info1.out + info1.err
    assert info["ai"]["status"] == "healthy"  # backend -> AI server over the bridge network
    assert "react-dom.production.min.js" in page.out and "보험 챗봇" in page.out
    assert json.loads(store1.out)["created_by"] == "1.2.0", store1.err
    assert json.loads(ai.out) == {"status": "healthy", "service": "AI Server",
                                  "version": "1.2.0"}
    nets = {n.name: n.attrs["Driver"] for n in engine.networks.list(
        filters={"label": f"com.docker.compose.project={project}"})}
    assert nets == {f"{project}_chatbot-network": "bridge"}

    r2, _, info2, _, store2, _ = install("1.3.0")
    assert r2.rc == 0, r2.err
    assert json.loads(info2.out)["version"] == "1.3.0" and json.loads(info2.out)["faqs"] == 3
    assert json.loads(store2.out)["created_by"] == "1.2.0"  # the named volume was kept
    before = dump()
    assert "feedback" in before and "해지 환급금은?" in before

    r3, s3, info3, _, _, _ = install("1.4.0")
    assert r3.rc == MigrationError.exit_code, r3.err
    assert "004_bad.sql" in r3.err and "rolled back to 1.3.0" in r3.err, r3.err
    assert dump() == before  # 003_ok.sql ran, and was undone
    assert json.loads(s3.out)["current"]["version"] == "1.3.0"
    assert json.loads(info3.out)["version"] == "1.3.0"  # the previous release serves

    r4, s4, info4, _, _, _ = install("1.4.1")
    assert r4.rc == RolledBackError.exit_code, r4.err
    assert "health check 'backend' failed" in r4.err, r4.err
    assert dump() == before  # its migration ran, and was undone
    st = json.loads(s4.out)
    assert st["current"]["version"] == "1.3.0" and st["healthy"] is True
    assert json.loads(info4.out) | {"ai": None} == {"service": "backend", "version": "1.3.0",
                                                   "faqs": 3, "ai": None}
    for run in (r1, r2, r3, r4):
        assert SECRET not in run.err + run.out
