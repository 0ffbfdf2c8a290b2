"""Issue 17 §3: what comes back when the Docker engine dies with a compose stack running, on a
real engine (20.10) of the test's own: a second dockerd in its own network namespace, with its
own data and exec roots (as tests.swarm_fixtures runs them), so the shared engine is never
touched.

The engine and everything it ran are SIGKILLed (dockerd, its containerd, the shims and the
containers' processes: a power cut for the engine), then it starts again. The measured fact
docs/boot.md relies on: a compose service with a `restart:` policy (unless-stopped here) is
running again, one without it is not; the install warned about that one, and `bundle start
--boot` (what the boot unit runs) brings the project back up whole and journals it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import UnhealthyError
from tests import docker_fixtures as dfx
from tests.helpers import bundle, bundle_argv, offline, unavailable
from tests.swarm_fixtures import Node, _own_pids, _run, _unmount_under

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@contextlib.contextmanager
def private_engine(base: Path) -> Iterator[Node]:
    """A dockerd of this test's own, in a network namespace with only loopback."""
    if os.geteuid() != 0:
        unavailable("a private dockerd needs root")
    tag = "ber" + uuid.uuid4().hex[:6]
    node = Node(name=tag, netns=f"{tag}-ns", address="127.0.0.1", root=base / tag,
                exec_root=Path("/run") / tag)
    try:
        _run("ip", "netns", "add", node.netns)
        _run("ip", "netns", "exec", node.netns, "ip", "link", "set", "lo", "up")
        node.start()
        yield node
    finally:
        with contextlib.suppress(Exception):
            for cid in node.docker("ps", "-aq", check=False).stdout.split():
                node.docker("rm", "-f", cid, check=False)
        with contextlib.suppress(Exception):
            node.stop()
        power_cut(node, restart=False)
        _run("ip", "netns", "del", node.netns, check=False)
        shutil.rmtree(node.root, ignore_errors=True)


def _container_pids(node: Node) -> list[int]:
    """Every process of every container of `node` (their cgroups, v1 or v2)."""
    pids: list[int] = []
    ids = node.docker("ps", "-q", "--no-trunc", check=False).stdout.split()
    for cid in ids:
        for procs in (*Path("/sys/fs/cgroup").glob(f"*/docker/{cid}/cgroup.procs"),
                      *Path("/sys/fs/cgroup").glob(f"docker/{cid}/cgroup.procs")):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in procs.read_text().split()]
    return sorted(set(pids))


def power_cut(node: Node, restart: bool = True) -> None:
    """SIGKILL the engine, its containerd and shims (their command lines name the node's
    roots) and its containers' processes; then start the engine again if `restart`."""
    victims = _container_pids(node) + _own_pids(node.name)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if node.proc is not None:
        with contextlib.suppress(Exception):
            node.proc.wait(10)
        node.proc = None
    deadline = time.monotonic() + 20
    while _own_pids(node.name) and time.monotonic() < deadline:
        time.sleep(0.2)
    # What a reboot clears: every mount, and /run (the exec root, with containerd's pid file:
    # a stale one whose pid was reused makes the engine wait on a containerd that is not it).
    _unmount_under(node.root, node.exec_root)
    shutil.rmtree(node.exec_root, ignore_errors=True)
    if restart:
        _start_again(node)


def _start_again(node: Node, timeout: float = 120) -> None:
    """Start the engine after the cut: it restores its containers first and may not answer
    `docker info` within Node.start's 10 s on a busy machine, so wait longer here."""
    try:
        node.start()
        return
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            if node.docker("info", check=False, timeout=20).returncode == 0:
                return
        time.sleep(1)
    raise AssertionError(f"the engine did not come back: {node.log_tail()}")


def _states(node: Node, project: str) -> dict[str, str]:
    out = node.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                      "--format", '{{.Label "com.docker.compose.service"}} {{.State}}').stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def _statuses(node: Node, project: str) -> dict[str, str]:
    """Each service's `docker ps` status line (e.g. "Up 3 seconds (healthy)")."""
    out = node.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                      "--format", '{{.Label "com.docker.compose.service"}} {{.Status}}').stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def _profile(base: Path, name: str, image: str) -> Path:
    service = """\
        image: {image}
        network_mode: none
        command: ["busybox", "sleep", "3600"]
        healthcheck: {{test: ["CMD", "busybox", "true"], interval: 1s, retries: 3}}
    """
    return dfx.compose_profile(
        base, name, [image],
        "services:\n  kept:\n    restart: unless-stopped\n"
        + textwrap.indent(textwrap.dedent(service.format(image=image)), "    ")
        + "  lost:\n"
        + textwrap.indent(textwrap.dedent(service.format(image=image)), "    "))


def test_after_an_engine_power_cut_only_services_with_a_restart_policy_come_back(
        engine: Any, keys: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = dfx.unique("ber")
    image = f"bundler-test/{name}:1"
    dfx.import_base(engine, image)
    try:
        built = bundle("build", _profile(tmp_path, name, image), "--key", keys[0], "--out",
                       tmp_path / "dist", "--cache-dir", tmp_path / "cache", "--json")
        assert built.rc == 0, built.err
    finally:
        dfx.remove_images(engine, image)  # the target engine gets it from the bundle only
    path = json.loads(built.out)["bundle"]
    root = tmp_path / "root"
    with private_engine(tmp_path / "engine") as node:
        monkeypatch.setenv("DOCKER_HOST", node.host)
        try:
            install, status = offline(
                bundle_argv("install", path, "--trust", keys[1], "--root", root),
                bundle_argv("status", "--root", root, "--json"))
            assert install.rc == 0, install.err
            assert ("compose service(s) lost have no restart policy: they stay down after a "
                    "reboot or an engine restart until `bundle start`") in install.err, \
                install.err
            assert json.loads(status.out)["healthy"] is True, status.out
            project = next(s["name"] for s in json.loads(status.out)["services"])
            label = node.docker("ps", "--format", '{{.Label "com.docker.compose.project"}}'
                                ).stdout.split()[0]
            assert _states(node, label) == {"kept": "running", "lost": "running"}, project

            power_cut(node)
            deadline = time.monotonic() + 60  # back, and healthy again (its check runs each 1s)
            while "(healthy)" not in _statuses(node, label).get("kept", "") and \
                    time.monotonic() < deadline:
                time.sleep(0.5)
            assert _states(node, label) == {"kept": "running", "lost": "exited"}

            after, boot, history, again = offline(
                bundle_argv("status", "--root", root, "--json"),
                bundle_argv("start", "--root", root, "--boot"),
                bundle_argv("history", "--root", root, "--json"),
                bundle_argv("status", "--root", root, "--json"))
            assert after.rc == UnhealthyError.exit_code, after.out + after.err
            running = {s["name"]: s["running"] for s in json.loads(after.out)["services"]}
            assert running == {"compose:kept": True, "compose:lost": False}, running
            assert boot.rc == 0, boot.out + boot.err
            assert _states(node, label) == {"kept": "running", "lost": "running"}
            assert json.loads(again.out)["healthy"] is True, again.out
            boots = [e["status"] for e in json.loads(history.out)["events"]
                     if e["step"] == "boot"]
            assert boots == ["none", "started", "healthy"], boots
        finally:
            offline(bundle_argv("stop", "--root", root))
