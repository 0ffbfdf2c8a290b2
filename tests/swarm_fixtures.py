"""A two-node Docker Swarm on this one machine (DESIGN.md section 8), for the swarm runtime's
tests: two extra dockerd daemons, each in its own network namespace, joined by a bridge that
lives in a third namespace. Their addresses (10.99.0.0/24) exist only inside these
namespaces: nothing reaches the host's network or the internet.

- each daemon is started with `nsenter --net=` (not `ip netns exec`, which remounts /sys and
  breaks dockerd's cgroup detection), `unshare --uts` (its own hostname = its node name), its
  own data/exec roots, pidfile and unix socket, `--bridge=none`, an address pool inside
  10.99.x, and DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 (else the agent tries to pull even when
  the stack was deployed with `--resolve-image never`).
- the swarm: node 1 manager (`--dispatcher-heartbeat 1s`: a dead node shows in ~2 s), node 2
  worker.
- teardown, also after a failed bring-up: every daemon stopped (TERM, then KILL by pid),
  every mount under the roots unmounted, the namespaces deleted, the directories removed.

No IPVS on this kernel: the ingress routing mesh and service VIPs do not work here; the tests
publish `mode: host` ports and use `endpoint_mode: dnsrr`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import Run, unavailable

SUBNET = "10.99.0"
POOL = "10.99.128.0/17"  # overlay networks of the stacks (the node subnet stays outside it)
START_TIMEOUT = 60.0


def _run(*argv: str, check: bool = True, timeout: float = 60,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass
class Node:
    name: str  # its hostname, as the swarm names it
    netns: str
    address: str  # inside the namespaces only
    root: Path  # data root, log
    exec_root: Path  # short path: containerd's socket lives under it
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def host(self) -> str:
        """DOCKER_HOST for this node's engine."""
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """An environment whose docker CLI and SDK talk to this node's engine."""
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, check: bool = True, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
        return _run("docker", "-H", self.host, *args, check=check, timeout=timeout)

    def in_netns(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a host command inside this node's network namespace (curl its ports)."""
        return _run("nsenter", f"--net=/run/netns/{self.netns}", *argv, check=False,
                    timeout=timeout)

    def start(self) -> None:
        """Start (or restart: same roots, so it rejoins the swarm) this node's dockerd."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "dockerd.log").open("ab")
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--",
                "sh", "-c", f'hostname {self.name} && exec "$@"', "sh",
                "dockerd", "--data-root", str(self.root / "data"),
                "--exec-root", str(self.exec_root), "--pidfile", str(self.root / "docker.pid"),
                "-H", self.host, "--bridge=none", "--storage-driver=overlay2",
                "--default-address-pool", f"base={POOL},size=24"]
        env = {**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}
        env.pop("DOCKER_HOST", None)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd of {self.name} exited: {self.log_tail()}")
            if self.socket.exists() and self.docker("info", check=False,
                                                    timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd of {self.name} did not answer: {self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """Stop this node's dockerd (TERM: it stops its containers; KILL after `timeout`)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        path = self.root / "dockerd.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Swarm:
    tag: str
    base: Path
    bridge_ns: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    @property
    def worker(self) -> Node:
        return self.nodes[1]

    def wait_node(self, node: Node, state: str, timeout: float = 30) -> None:
        """Until the manager sees `node` in `state` ("ready" or "down")."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            seen = self.manager.docker("node", "inspect", node.name, "--format",
                                       "{{.Status.State}}", check=False).stdout.strip()
            if seen == state:
                return
            time.sleep(0.3)
        raise RuntimeError(f"node {node.name} is {seen!r}, not {state!r}")

    def load(self, archive: Path) -> None:
        """`docker load` one archive into every node (test set-up, not bundler's own load)."""
        for node in self.nodes:
            node.docker("load", "-i", str(archive), timeout=300)


def _ip(*args: str, netns: str | None = None) -> None:
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    # `ip netns exec` is fine for `ip` itself; only dockerd minds its /sys remount.
    _run(*prefix, "ip", *args)


def _own_pids(marker: str) -> list[int]:
    """Processes of this swarm (dockerd, its containerd and shims): their command line names
    the swarm's unique roots. Found by pid, killed by pid."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return [p for p in pids if p != os.getpid()]


def _unmount_under(*roots: Path) -> None:
    """Unmount everything mounted below the roots, deepest first (overlay layers, the
    namespace bind mounts under the exec root)."""
    prefixes = tuple(str(r) for r in roots)
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefixes):
            mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        _run("umount", "-l", point, check=False)


def teardown(swarm: Swarm) -> None:
    for node in swarm.nodes:
        with contextlib.suppress(Exception):
            node.stop()
    for pid in _own_pids(swarm.tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for node in swarm.nodes:
        _unmount_under(node.root, node.exec_root)
    for ns in [n.netns for n in swarm.nodes] + [swarm.bridge_ns]:
        _run("ip", "netns", "del", ns, check=False)
    for node in swarm.nodes:
        shutil.rmtree(node.exec_root, ignore_errors=True)
    shutil.rmtree(swarm.base, ignore_errors=True)


def _network(swarm: Swarm) -> None:
    _ip("netns", "add", swarm.bridge_ns)
    _ip("link", "add", "br0", "type", "bridge", netns=swarm.bridge_ns)
    _ip("link", "set", "br0", "up", netns=swarm.bridge_ns)
    for i, node in enumerate(swarm.nodes, start=1):
        _ip("netns", "add", node.netns)
        inner, outer = f"{swarm.tag}a{i}", f"{swarm.tag}b{i}"
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", inner, "netns", node.netns)
        _ip("link", "set", outer, "netns", swarm.bridge_ns)
        _ip("link", "set", outer, "master", "br0", "up", netns=swarm.bridge_ns)
        _ip("link", "set", inner, "name", "eth0", netns=node.netns)
        _ip("addr", "add", f"{node.address}/24", "dev", "eth0", netns=node.netns)
        _ip("link", "set", "eth0", "up", netns=node.netns)
        _ip("link", "set", "lo", "up", netns=node.netns)


def _require_root() -> None:
    if os.geteuid() != 0:
        unavailable("a two-node swarm needs root (network namespaces, extra dockerd daemons)")
    for tool in ("dockerd", "nsenter", "unshare", "ip"):
        if shutil.which(tool) is None:
            unavailable(f"a two-node swarm needs {tool}")


@contextlib.contextmanager
def two_node_swarm(base: Path) -> Iterator[Swarm]:
    """A manager and a worker, ready; torn down afterwards whatever happened."""
    _require_root()
    tag = "bsw" + uuid.uuid4().hex[:6]  # short: interface names have 15 characters
    swarm = Swarm(tag, base / tag, f"{tag}-br")
    for i in (1, 2):
        swarm.nodes.append(Node(name=f"{tag}-node{i}", netns=f"{tag}-n{i}",
                                address=f"{SUBNET}.{i}", root=swarm.base / f"node{i}",
                                exec_root=Path("/run") / f"{tag}-{i}"))
    try:
        _network(swarm)
        for node in swarm.nodes:
            node.start()
        manager, worker = swarm.nodes
        manager.docker("swarm", "init", "--advertise-addr", manager.address,
                       "--listen-addr", f"{manager.address}:2377",
                       "--dispatcher-heartbeat", "1s")
        token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        worker.docker("swarm", "join", "--token", token, "--advertise-addr", worker.address,
                      f"{manager.address}:2377")
        swarm.wait_node(worker, "ready")
        yield swarm
    finally:
        teardown(swarm)


# --- helpers of the swarm tests -----------------------------------------------------------------

def on_manager(swarm: Swarm, *args: str | os.PathLike[str], timeout: float = 300) -> Run:
    """The real `bundle` CLI on the manager: in its network namespace, its engine as
    DOCKER_HOST."""
    done = subprocess.run(["nsenter", f"--net=/run/netns/{swarm.manager.netns}",
                           sys.executable, "-m", "bundler", *map(os.fspath, args)],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "DOCKER_HOST": swarm.manager.host})
    return Run(done.returncode, done.stdout, done.stderr)


def swarm_root(swarm: Swarm, root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "swarm.yaml").write_text("nodes:\n" + "".join(
        f"  {n.name}: {n.host}\n" for n in swarm.nodes))
    return root


def answers(swarm: Swarm, port: int, path: str = "/version") -> dict[str, str]:
    """What each node answers on `port` (its own address)."""
    out = {}
    for node in swarm.nodes:
        got = node.in_netns(sys.executable, "-c", _GET, f"http://{node.address}:{port}{path}")
        out[node.name] = got.stdout if got.returncode == 0 else got.stderr.strip()[-200:]
    return out


_GET = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.stdout.write(opener.open(sys.argv[1], timeout=2).read().decode())
"""

# A client like the guide's load balancer: round-robin over the nodes, the next node when one
# does not answer; one request counts as failed only when no node answered it.
_POLLER = """
import json, os, sys, time, urllib.request
urls, stop = sys.argv[1].split(","), sys.argv[2]
failed, seen, errors, n = 0, {}, {}, 0
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while not os.path.exists(stop):
    body, why = None, []
    for k in range(len(urls)):
        try:
            body = opener.open(urls[(n + k) % len(urls)], timeout=3).read().decode()
            break
        except Exception as exc:
            why.append(f"{urls[(n + k) % len(urls)]}: {exc}"[:160])
    n += 1
    if body is None:
        failed += 1
        key = " / ".join(why)
        errors[key] = errors.get(key, 0) + 1
    else:
        seen[body] = seen.get(body, 0) + 1
    time.sleep(0.02)
print(json.dumps({"requests": n, "failed": failed, "seen": seen, "errors": errors}))
"""


class Balancer:
    """The load balancer in front (run in the manager's namespace): round-robin over the
    nodes' `port`, the next node when one does not answer, until `finish`."""

    def __init__(self, swarm: Swarm, port: int, path: str, stop: Path) -> None:
        self.stop = stop
        urls = ",".join(f"http://{n.address}:{port}{path}" for n in swarm.nodes)
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{swarm.manager.netns}",
                                      sys.executable, "-c", _POLLER, urls, str(stop)],
                                     stdout=subprocess.PIPE, text=True)

    def finish(self) -> dict[str, Any]:
        """{"requests": n, "failed": unanswered, "seen": {body: count}}"""
        self.stop.touch()
        out, _ = self.proc.communicate(timeout=30)
        return dict(json.loads(out))

    def kill(self) -> None:
        self.stop.touch()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def service_name(swarm: Swarm, product: str, service: str) -> str:
    names = swarm.manager.docker("service", "ls", "--format", "{{.Name}}").stdout.split()
    return next(n for n in names if n.startswith(f"bundler-{product}-")
                and n.endswith(f"_{service}"))


if __name__ == "__main__":  # bring one up by hand: python -m tests.swarm_fixtures
    import tempfile

    started = time.monotonic()
    with two_node_swarm(Path(tempfile.mkdtemp())) as s:
        print(f"up in {time.monotonic() - started:.1f} s")
        print(s.manager.docker("node", "ls").stdout)
    print(f"up and down in {time.monotonic() - started:.1f} s")
