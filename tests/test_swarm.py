"""The swarm runtime on a real two-node swarm (tests/swarm_fixtures.py): the same kind of
bundle a one-host compose install takes, deployed as a stack with its images loaded into both
nodes' engines; upgraded by a rolling update; a release whose image never turns healthy is
rolled back by the swarm and by bundler while the old release keeps answering; a stopped
node's engine refuses the install, or degrades it with --allow-degraded.

`bundle` runs inside the manager's network namespace (the install runs on a manager): the
nodes' addresses exist only there, nothing else is reachable. Host-mode ports and
`endpoint_mode: dnsrr`: this kernel has no IPVS, so no routing mesh and no VIPs."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bundler.bundle import supportfile
from bundler.errors import MigrationError, NodeDownError, RolledBackError
from tests import docker_fixtures as dfx
from tests import pg_image
from tests import swarm_fixtures as sfx
from tests.helpers import bundle, host_policy
from tests.swarm_fixtures import answers, on_manager, service_name, swarm_root

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HEALTH = ["CMD", "busybox", "timeout", "2", "busybox", "wget", "-q", "-O", "/dev/null",
          "http://127.0.0.1/version"]


def _image(client: Any, base: str, ref: str, version: str, serves: bool) -> str:
    """A web server image: busybox httpd answering /version with `version`; `serves=False`:
    one that never answers (its healthcheck never passes)."""
    # says what it serves first: the support archive gathers the tasks' logs
    cmd = (["busybox", "sh", "-c", 'echo "serving $RELEASE on $(busybox hostname)"; '
            "exec busybox httpd -f -p 80 -h /www"] if serves
           else ["busybox", "sleep", "3600"])
    dockerfile = f"FROM {base}\nCOPY www/ /www/\nCMD {json.dumps(cmd)}\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("Dockerfile", dockerfile), ("www/version", version.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    image, _ = client.images.build(fileobj=buf, custom_context=True, tag=ref, rm=True,
                                   pull=False)
    return str(image.id)


@dataclass(frozen=True)
class Built:
    bundles: dict[str, Path]  # version -> bundle
    ids: dict[str, str]  # version -> Image ID
    refs: dict[str, str]  # version -> image reference
    pub: Path


def _profile(base: Path, name: str, version: str, image: str, port: int, seq: int,
             nodes: tuple[int, ...] = (1, 2)) -> Path:
    app = base / f"{name}-app-{version}"
    app.mkdir(parents=True)
    (app / "docker-compose.yml").write_text(textwrap.dedent(f"""\
        version: "3.8"
        services:
          web:
            image: {image}
            environment:
              RELEASE: "{version}"
            healthcheck:
              test: {json.dumps(HEALTH)}
              interval: 1s
              timeout: 3s
              retries: 2
            stop_grace_period: 1s
            ports:
              - {{target: 80, published: {port}, mode: host}}
            deploy:
              replicas: 2
              endpoint_mode: dnsrr
              placement: {{max_replicas_per_node: 1}}
              update_config: {{parallelism: 1, monitor: 2s}}
        """))
    profile = base / f"{name}-{version}.yaml"
    checks = "".join(f"""
          - name: node{i}
            http: http://{sfx.SUBNET}.{i}:{port}/version
            timeout: 1s
            retries: 20
            interval: 250ms""" for i in nodes)
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: {name}
        version: {version}
        sequence: {seq}
        images:
          - ref: {image}
        files:
          - {{src: {app.name}, dest: stack}}
        compose:
          files: [stack/docker-compose.yml]
        health:""") + checks + "\n")
    return profile


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Releases 1.0.0 and 2.0.0 (serving), 3.0.0 (never healthy), signed, built from images
    in the host's engine; the same bundles a one-host compose install takes."""
    import docker

    client = docker.from_env(timeout=600)
    tmp = tmp_path_factory.mktemp("swarm-bundles")
    tag = dfx.unique("sw")
    base = f"bundler-test/{tag}-base:1"
    refs = {v: f"bundler-test/{tag}-web:{v}" for v in ("1.0.0", "2.0.0", "3.0.0", "down")}
    assert bundle("keygen", tmp / "release").rc == 0
    try:
        dfx.import_base(client, base)
        ids = {v: _image(client, base, ref, v.replace("down", "1.0.0"), serves=v != "3.0.0")
               for v, ref in refs.items()}
        bundles = {}
        for seq, (version, ref) in enumerate(list(refs.items())[:3], start=1):
            done = bundle("build", _profile(tmp, "swweb", version, ref, 8080, seq),
                          "--key", tmp / "release.key", "--out", tmp / "out", "--cache-dir",
                          tmp / "cache", "--json")
            assert done.rc == 0, done.err
            bundles[version] = Path(json.loads(done.out)["bundle"])
        # a product whose health checks ask the manager only (the test stops the worker)
        done = bundle("build", _profile(tmp, "swdown", "1.0.0", refs["down"], 8081, 1, (1,)),
                      "--key", tmp / "release.key", "--out", tmp / "out", "--cache-dir",
                      tmp / "cache", "--json")
        assert done.rc == 0, done.err
        bundles["down"] = Path(json.loads(done.out)["bundle"])
        yield Built(bundles, ids, refs, tmp / "release.pub")
    finally:
        dfx.remove_images(client, *refs.values(), base)
        client.close()


def _status(swarm: sfx.Swarm, root: Path) -> dict[str, Any]:
    done = on_manager(swarm, "status", "--root", root, "--json")
    return dict(json.loads(done.out))


def _doctor(swarm: sfx.Swarm, root: Path) -> dict[str, dict[str, str]]:
    done = on_manager(swarm, "doctor", "--root", root, "--json")
    return {r["check"]: r for r in json.loads(done.out)["checks"]}


def test_deploy_upgrade_and_rollback_on_two_nodes(swarm: sfx.Swarm, built: Built, poller: Any,
                                                 tmp_path: Path) -> None:
    root = swarm_root(swarm, tmp_path / "root")
    trust = ["--trust", built.pub, "--root", root]

    first = on_manager(swarm, "install", built.bundles["1.0.0"], *trust)
    assert first.rc == 0, first.err
    # the images reached both nodes' engines, with the signed Image IDs
    for node in swarm.nodes:
        assert node.docker("image", "inspect", "--format", "{{.Id}}", built.refs["1.0.0"]
                           ).stdout.strip() == built.ids["1.0.0"]
    assert answers(swarm, 8080) == {n.name: "1.0.0" for n in swarm.nodes}
    status = _status(swarm, root)
    units = {u["name"]: u for u in status["services"]}
    assert set(units) == {f"swarm:web@{n.name}" for n in swarm.nodes}, units
    assert all(u["running"] and "healthy" in u["detail"] for u in units.values()), units
    rows = _doctor(swarm, root)
    for n in swarm.nodes:
        assert rows[f"node {n.name}"]["status"] == "ok", rows
        assert rows[f"node {n.name} images"]["detail"].startswith("1 of 1 "), rows
        assert rows[f"node {n.name} disk"]["status"] == "ok", rows
    assert rows["port 8080"]["status"] == "ok", rows
    # the support archive has each service's logs, from its tasks on both nodes
    out = tmp_path / "support.tar.gz"
    made = on_manager(swarm, "support", "--root", root, "--out", out)
    assert made.rc == 0, made.err
    log = supportfile.read(out).members["logs/swarm/web.log"].decode()
    assert log.count("serving 1.0.0 on ") == 2, log

    # a rolling upgrade while a round-robin client keeps asking both nodes
    finish = poller(8080)
    up = on_manager(swarm, "install", built.bundles["2.0.0"], *trust)
    served = finish()
    assert up.rc == 0, up.err
    assert answers(swarm, 8080) == {n.name: "2.0.0" for n in swarm.nodes}
    assert served["failed"] == 0 and set(served["seen"]) <= {"1.0.0", "2.0.0"}, served

    # 3.0.0 never turns healthy: the swarm rolls its update back, bundler the stack
    finish = poller(8080)
    bad = on_manager(swarm, "install", built.bundles["3.0.0"], *trust)
    served = finish()
    assert bad.rc == RolledBackError.exit_code, bad.err
    assert "the swarm rolled back its update (a new task failed: " in bad.err, bad.err
    assert "unhealthy container" in bad.err, bad.err
    # the update stopped at the first node: the other one's 2.0.0 task was never stopped
    # (without bundler's stop-first `delay` the swarm may go on to it before counting the
    # failure, and neither node serves until its rollback)
    tasks = swarm.manager.docker("service", "ps", service_name(swarm, "swweb", "web"),
                                 "--format", "{{.Image}}|{{.Node}}|{{.CurrentState}}|{{.Error}}"
                                 ).stdout.splitlines()
    placed = {t.split("|")[1] for t in tasks if t.startswith(built.refs["3.0.0"] + "|")}
    assert len(placed - {""}) == 1, tasks  # "": a restart the rollback cancelled unplaced
    assert served["failed"] == 0 and set(served["seen"]) == {"2.0.0"}, served
    assert answers(swarm, 8080) == {n.name: "2.0.0" for n in swarm.nodes}
    after = _status(swarm, root)
    assert after["current"]["version"] == "2.0.0" and after["healthy"] is True, after

    assert on_manager(swarm, "stop", "--root", root).rc == 0
    assert swarm.manager.docker("service", "ls", "-q").stdout.strip() == ""


def test_a_stopped_node_refuses_the_install_or_degrades_it(swarm: sfx.Swarm, built: Built,
                                                          tmp_path: Path) -> None:
    root = swarm_root(swarm, tmp_path / "root")
    trust = ["--trust", built.pub, "--root", root]
    stack = "bundler-swdown-"
    swarm.worker.stop()
    try:
        swarm.wait_node(swarm.worker, "down")
        refused = on_manager(swarm, "install", built.bundles["down"], *trust)
        assert refused.rc == NodeDownError.exit_code, refused.err
        assert f"swarm node(s) down: {swarm.worker.name} (down" in refused.err, refused.err
        assert "nothing was changed" in refused.err
        assert sorted(p.name for p in root.iterdir()) == ["swarm.yaml"]
        assert stack not in swarm.manager.docker("service", "ls").stdout

        degraded = on_manager(swarm, "install", built.bundles["down"], *trust,
                              "--allow-degraded")
        assert degraded.rc == 0, degraded.err
        units = {u["name"]: u for u in _status(swarm, root)["services"]}
        assert {n for n, u in units.items() if u["running"]} == {
            f"swarm:web@{swarm.manager.name}"}, units
        history = on_manager(swarm, "history", "--root", root, "--json")
        assert f"--allow-degraded with node(s) down: {swarm.worker.name} (down)" in history.out
        assert answers(swarm, 8081)[swarm.manager.name] == "1.0.0"
        rows = _doctor(swarm, root)
        assert rows[f"node {swarm.worker.name}"]["status"] == "fail", rows
        assert rows[f"node {swarm.manager.name}"]["status"] == "ok", rows
    finally:
        swarm.worker.start()
        swarm.wait_node(swarm.worker, "ready")
    # the node is back: installing the same bundle again loads its images there and brings
    # the second replica up
    again = on_manager(swarm, "install", built.bundles["down"], *trust)
    assert again.rc == 0, again.err
    assert f"{swarm.worker.name}: lacks {built.refs['down']}" in again.err
    assert answers(swarm, 8081) == {n.name: "1.0.0" for n in swarm.nodes}
    assert on_manager(swarm, "stop", "--root", root).rc == 0


STAMP = ('psql -X -v ON_ERROR_STOP=1 -h tasks.db -U "$POSTGRES_USER" -d appdb -c "CREATE '
         "TABLE IF NOT EXISTS stamps (v text); INSERT INTO stamps VALUES ('$STAMP by "
         "$POSTGRES_USER')\"")


def _db_profile(base: Path, version: str, web: str, seq: int, sql: dict[str, str],
                sock: Path, stamp: str = STAMP) -> Path:
    app = base / f"swdb-app-{version}"
    (app / "sql").mkdir(parents=True)
    for name, text in sql.items():
        (app / "sql" / name).write_text(text)
    (app / "docker-compose.yml").write_text(textwrap.dedent(f"""\
        version: "3.8"
        services:
          db:
            image: {pg_image.REF}
            # TCP too: the one-off migration task reaches it over the stack's overlay network
            environment: {{POSTGRES_USER: app, POSTGRES_DB: appdb, LISTEN_ADDRESSES: "*"}}
            # its socket on the manager's filesystem: SQL migrations connect from there
            volumes: [pgdata:/var/lib/postgresql/data, {sock}:/var/run/postgresql]
            deploy:
              placement: {{constraints: [node.role == manager]}}
          web:
            image: {web}
            healthcheck:
              test: {json.dumps(HEALTH)}
              interval: 1s
              timeout: 3s
              retries: 2
            stop_grace_period: 1s
            ports:
              - {{target: 80, published: 8082, mode: host}}
            deploy:
              replicas: 2
              endpoint_mode: dnsrr
              placement: {{max_replicas_per_node: 1}}
              update_config: {{parallelism: 1, monitor: 1s}}
        volumes:
          pgdata: {{}}
        """))
    profile = base / f"swdb-{version}.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: swdb
        version: {version}
        sequence: {seq}
        images:
          - ref: {pg_image.REF}
          - ref: {web}
        files:
          - {{src: {app.name}, dest: stack}}
        compose:
          files: [stack/docker-compose.yml]
        database:
          url: postgresql://app@/appdb?host={sock}
          compose_service: db
        migrations:
          - {{name: schema, sql: stack/sql}}
          # a one-off task of the db service (psql is in its image), as this release defines
          # it (POSTGRES_USER is the service's), with the migration's own env (STAMP)
          - name: stamp
            service: db
            command: [sh, -c, {json.dumps(stamp)}]
            env: {{STAMP: "{version}"}}
        health:
          - {{name: web, http: "http://{sfx.SUBNET}.2:8082/version", retries: 20,
              interval: 250ms, timeout: 1s}}
        """))
    return profile


def test_the_database_is_migrated_once_and_restored_when_the_upgrade_fails(
        swarm: sfx.Swarm, built: Built, tmp_path: Path) -> None:
    """A PostgreSQL service in the stack, on the manager: backed up and migrated once from the
    manager (inside its task), started alone before the first migration; a release that never
    turns healthy rolls the stack back and restores the database."""
    import docker

    pg_image.ensure(docker.from_env())
    v1 = {"001_items.sql": "CREATE TABLE items (id int PRIMARY KEY, name text);\n"
                           "INSERT INTO items VALUES (1, 'a'), (2, 'b');\n"}
    v3 = {**v1, "002_price.sql": "ALTER TABLE items ADD COLUMN price int DEFAULT 0;\n"
                                 "INSERT INTO items VALUES (3, 'c', 7);\n"}
    sock = tmp_path / "pgsock"
    sock.mkdir()
    sock.chmod(0o1777)  # the server runs as uid 999 in its container
    bundles = []
    fails = 'echo "ERROR:  relation nope does not exist" >&2; exit 3'
    for version, web, seq, sql, stamp in (("1.0.0", built.refs["1.0.0"], 1, v1, STAMP),
                                          ("3.0.0", built.refs["3.0.0"], 2, v3, STAMP),
                                          ("4.0.0", built.refs["1.0.0"], 3, v3, fails)):
        done = bundle("build", _db_profile(tmp_path, version, web, seq, sql, sock, stamp),
                      "--key",
                      built.pub.with_suffix(".key"), "--out", tmp_path / "out", "--cache-dir",
                      tmp_path / "cache", "--json")
        assert done.rc == 0, done.err
        bundles.append(Path(json.loads(done.out)["bundle"]))
    root = swarm_root(swarm, tmp_path / "root")
    host_policy(root, f"host-mount={sock}")  # the db service mounts the socket directory
    trust = ["--trust", built.pub, "--root", root]

    def sql(query: str) -> str:
        cid = swarm.manager.docker("ps", "-q", "--filter",
                                   "label=com.docker.swarm.service.name="
                                   + service_name(swarm, "swdb", "db")).stdout.split()[0]
        return swarm.manager.docker("exec", cid, "psql", "-X", "-h", "/var/run/postgresql",
                                    "-U", "app", "-d", "appdb", "-Atc", query).stdout.strip()
    try:
        first = on_manager(swarm, "install", bundles[0], *trust)
        assert first.rc == 0, first.err
        assert first.err.count("Running 2 migration(s)") == 1, first.err
        assert sql("SELECT count(*) FROM items") == "2"
        assert sql("SELECT string_agg(v, ',') FROM stamps") == "1.0.0 by app", first.err
        assert answers(swarm, 8082) == {n.name: "1.0.0" for n in swarm.nodes}
        # the one-off job is gone; only the stack's own services are left
        assert sorted(swarm.manager.docker("service", "ls", "--format", "{{.Name}}").stdout
                      .split()) == sorted(service_name(swarm, "swdb", s) for s in ("db", "web"))

        bad = on_manager(swarm, "install", bundles[1], *trust)
        assert bad.rc == RolledBackError.exit_code, bad.err
        assert bad.err.count("Backing up the database") == 1, bad.err
        assert "Restoring the database" in bad.err, bad.err
        assert "migration stamp: running sh -c" in bad.err, bad.err  # 3.0.0's ran, then
        assert sql("SELECT count(*) FROM items") == "2"  # the restore undid it
        assert sql("SELECT count(*) FROM information_schema.columns WHERE column_name = "
                   "'price'") == "0"
        assert sql("SELECT string_agg(v, ',') FROM stamps") == "1.0.0 by app"

        # a one-off migration that fails: its exit and error in the line, the database
        # restored, the job removed, 1.0.0 serving again
        failed = on_manager(swarm, "install", bundles[2], *trust)
        assert failed.rc == MigrationError.exit_code, failed.err
        assert "failed (exit 3): ERROR:  relation nope does not exist" in failed.err, failed.err
        assert sql("SELECT count(*) FROM information_schema.columns WHERE column_name = "
                   "'price'") == "0"
        assert "oneoff" not in swarm.manager.docker("service", "ls").stdout
        assert answers(swarm, 8082) == {n.name: "1.0.0" for n in swarm.nodes}

        # a job an install killed mid-way left behind goes with the stack
        stack = service_name(swarm, "swdb", "db").removesuffix("_db")
        swarm.manager.docker("service", "create", "--detach", "--name", f"{stack}_db-oneoff-x",
                             "--label", f"bundler.oneoff={stack}", "--replicas", "0",
                             pg_image.REF)
        assert on_manager(swarm, "stop", "--root", root).rc == 0
        assert swarm.manager.docker("service", "ls", "-q").stdout.strip() == ""
        assert answers(swarm, 8082) == {n.name: "1.0.0" for n in swarm.nodes}
    finally:
        on_manager(swarm, "stop", "--root", root)
