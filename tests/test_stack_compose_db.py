"""A compose stack whose PostgreSQL runs as a compose service (seeds 002/003): the database is
backed up and restored INSIDE its container (client and server versions match), migrations
reach it through its unix socket, and everything runs under `unshare -n`.

The install side gets a PATH whose pg_dump, pg_restore and psql fail: a backup or restore
that worked cannot have used the host's tools."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bundler.errors import Interrupted, MigrationError, RolledBackError, UnhealthyError
from bundler.install import compose_runtime as cr
from tests import docker_fixtures as dfx
from tests import pg_image
from tests.helpers import bundle, bundle_argv, host_policy, offline
from tests.pg_fixtures import snapshot

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.slow]

PRODUCT = "shopdb"


def _clean(engine: Any, project: str) -> None:
    for c in engine.containers.list(all=True, filters={
            "label": f"com.docker.compose.project={project}"}):
        c.remove(force=True)
    for v in engine.volumes.list(filters={"label": f"com.docker.compose.project={project}"}):
        v.remove(force=True)


def profile(base: Path, version: str, seq: int, web: str, migrations: dict[str, str],
            healthy: bool = True) -> Path:
    app = base / f"app-{version}"
    (app / "sql").mkdir(parents=True)
    for name, sql in migrations.items():
        (app / "sql" / name).write_text(sql)
    test = "busybox true" if healthy else "busybox false"
    (app / "docker-compose.yml").write_text(textwrap.dedent(f"""\
        version: "3.7"
        services:
          db:
            image: {pg_image.REF}
            environment: {{POSTGRES_USER: app, POSTGRES_DB: appdb, STARTUP_DELAY: "3"}}
            network_mode: none
            volumes:
              - pgdata:/var/lib/postgresql/data
              - ${{PGSOCK}}:/var/run/postgresql
            # no healthcheck, as in many compose files: bundler waits until it answers
          web:
            image: {web}
            command: ["busybox", "sleep", "3600"]
            network_mode: none
            depends_on: [db]
            environment: {{RELEASE: "{version}"}}
            healthcheck:
              test: ["CMD-SHELL", "{test}"]
              interval: 1s
              retries: 2
        volumes:
          pgdata: {{}}
        """))
    path = base / f"p-{version}.yaml"
    path.write_text(textwrap.dedent(f"""\
        schema: 1
        name: {PRODUCT}
        version: {version}
        sequence: {seq}
        images:
          - ref: {pg_image.REF}
          - ref: {web}
        files:
          - {{src: app-{version}, dest: stack}}
        env:
          required: [DATABASE_URL, PGSOCK]
          secret: [DATABASE_URL]
        compose:
          files: [stack/docker-compose.yml]
        database:
          url: ${{DATABASE_URL}}
          compose_service: db
        migrations:
          - {{name: schema, sql: stack/sql}}
          # a one-off container of the db service (seed 001 runs alembic this way)
          - name: seed
            service: db
            command: [psql, -X, -v, ON_ERROR_STOP=1, -h, /var/run/postgresql, -U, app,
                      -d, appdb, -c, "INSERT INTO items (id, name) VALUES (100, 'seeded')
                                      ON CONFLICT (id) DO NOTHING"]
        health:
          - {{name: db, postgres: "${{DATABASE_URL}}"}}
        """))
    return path


def no_host_pg_tools(tmp_path: Path) -> str:
    shims = tmp_path / "no-pg-tools"
    shims.mkdir()
    for tool in ("pg_dump", "pg_restore", "psql"):
        (shims / tool).write_text(f"#!/bin/sh\necho 'host {tool} must not be used' >&2\n"
                                  "exit 97\n")
        (shims / tool).chmod(0o755)
    return f"PATH={shims}:{os.environ['PATH']}"


def test_database_in_a_compose_service(tmp_path: Path, engine: Any,
                                       keys: tuple[Path, Path]) -> None:
    pg_image.ensure(engine)
    pair = dfx.make_pair(engine, "cdb")
    root = tmp_path / "target"
    project = cr.project_name(PRODUCT, root)  # the default: per product and root
    _clean(engine, project)
    sock = tmp_path / "pgsock"
    sock.mkdir()
    sock.chmod(0o1777)  # the server runs as uid 999 in its container
    url = f"postgresql://app@/appdb?host={sock}"
    try:
        m1 = {"001_items.sql": "CREATE TABLE items (id int PRIMARY KEY, name text);\n"
                               "INSERT INTO items VALUES (1, 'a'), (2, 'b');\n"}
        m2 = {**m1, "002_price.sql": "ALTER TABLE items ADD COLUMN price int DEFAULT 0;\n"
                                     "INSERT INTO items VALUES (3, 'c', 7);\n"}
        m3 = {**m2, "003_bad.sql": "CREATE TABLE half (x int);\nDELETE FROM items;\n"
                                   "SELECT no_such_function();\n"}
        m3b = {**m2, "003_ok.sql": "CREATE TABLE audit (at timestamptz);\n"
                                   "UPDATE items SET price = 99;\n"}
        bundles = []
        for version, seq, web, migs, healthy in (("1.0.0", 1, pair.a, m1, True),
                                                 ("2.0.0", 2, pair.b, m2, True),
                                                 ("3.0.0", 3, pair.a, m3, True),
                                                 ("3.0.1", 4, pair.a, m3b, False),
                                                 ("4.0.0", 5, pair.a, m3b, True)):
            built = bundle("build", profile(tmp_path, version, seq, web, migs, healthy),
                           "--key", keys[0], "--out", tmp_path / "out", "--cache-dir",
                           tmp_path / "cache", "--json")
            assert built.rc == 0, built.err
            bundles.append(json.loads(built.out)["bundle"])
        (root / "shared").mkdir(parents=True)
        (root / "shared" / ".env").write_text(f"DATABASE_URL={url}\nPGSOCK={sock}\n")
        host_policy(root, f"host-mount={sock}")  # the db service mounts the socket directory
        trust = ["--trust", keys[1], "--root", root]
        path = no_host_pg_tools(tmp_path)

        def install(n: int, fault: str = "") -> list[str]:
            return ["env", path, *([f"BUNDLER_FAULT={fault}"] if fault else []),
                    *bundle_argv("install", bundles[n], *trust)]

        r1, r2, doctor = offline(install(0), install(1),
                                 ["env", path, *bundle_argv("doctor", "--root", root, "--json")])
        assert r1.rc == 0, r1.err
        # first install: the database service was started alone, backed up, migrated
        assert f"compose up: project {project}, 1 service(s)" in r1.err, r1.err
        assert "(in compose service db)" in r1.err
        assert r2.rc == 0, r2.err
        rows = {r["check"]: r for r in json.loads(doctor.out)["checks"]}
        assert rows["database"]["status"] == "ok", rows
        assert "in compose service db" in rows["database"]["detail"]

        def state() -> dict[str, Any]:
            with psycopg.connect(host=str(sock), dbname="appdb", user="app") as conn:
                return snapshot(conn)

        after_v2 = state()
        assert after_v2["data"]["public.items"][0] == 4, after_v2["data"]  # 3 + seeded
        assert "migration seed: running psql" in r1.err and "in compose service db" in r1.err
        running = {c.name: c.id for c in engine.containers.list(
            filters={"label": f"com.docker.compose.project={project}"})}

        # Ctrl+C during the backup of an upgrade: nothing of 2.0.0 is touched
        (interrupted,) = offline(install(2, "int:backup"))
        assert interrupted.rc == Interrupted.exit_code, interrupted.err
        assert {c.name: c.id for c in engine.containers.list(filters={
            "label": f"com.docker.compose.project={project}"})} == running

        # a failing migration: restored inside the container, 2.0.0 serving
        r3, r4, status = offline(install(2), install(3),
                                 bundle_argv("status", "--root", root, "--json"))
        assert r3.rc == MigrationError.exit_code, r3.err
        assert "003_bad.sql" in r3.err and "rolled back to 2.0.0" in r3.err
        assert "in compose service db" in r3.err  # the restore ran in the container
        assert r4.rc == RolledBackError.exit_code, r4.err  # unhealthy web: 003_ok.sql undone
        assert "compose service web is unhealthy" in r4.err
        assert state() == after_v2
        current = json.loads(status.out)
        assert current["current"]["version"] == "2.0.0" and current["healthy"] is True
        web = engine.containers.list(filters={"label": [
            f"com.docker.compose.project={project}", "com.docker.compose.service=web"]})
        assert [c.image.id for c in web] == [pair.ids[pair.b]]

        # kill -9 as migrations start, the database changed behind its back (a half-done
        # migration): the next install restores it in the container before installing again
        (crashed,) = offline(install(4, "kill:migrate"))
        assert crashed.rc == -9, crashed.err
        with psycopg.connect(host=str(sock), dbname="appdb", user="app") as conn:
            conn.execute("CREATE TABLE half (x int)")
        (r5,) = offline(install(4))
        assert r5.rc == 0, r5.err
        assert "interrupted during migrate" in r5.err, r5.err
        after_v4 = state()
        assert ("public", "half", "BASE TABLE") not in after_v4["tables"]
        assert ("public", "audit", "BASE TABLE") in after_v4["tables"]

        hist = json.loads(bundle("history", "--root", root, "--json").out)["events"]
        steps = [(e["version"], e["step"], e["status"]) for e in hist]
        assert ("1.0.0", "database-service", "done") in steps
        assert ("3.0.0", "restore", "done") in steps and ("3.0.1", "restore", "done") in steps
        assert ("4.0.0", "restore", "done") in steps
        assert ("2.0.0", "rollback", "done") not in steps

        # stopped by the operator: doctor says the database service is not running
        assert bundle("stop", "--root", root).rc == 0
        (stopped,) = offline(["env", path, *bundle_argv("doctor", "--root", root, "--json")])
        rows = {r["check"]: r for r in json.loads(stopped.out)["checks"]}
        assert stopped.rc == UnhealthyError.exit_code and rows["database"]["status"] == "fail", rows
        assert rows["database"]["detail"] == (f"compose service db of project {project} is "
                                              "not running"), rows
    finally:
        bundle("stop", "--root", root)
        _clean(engine, project)
        dfx.remove_images(engine, pair.a, pair.b, pair.base)
