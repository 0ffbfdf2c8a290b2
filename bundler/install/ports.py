"""Which local ports a release serves, and who holds them now (from /proc: no `ss`/`lsof` on a
bare host). A port held by anything but the current release is refused before an install
creates anything: otherwise the new release crash-loops, its health check reaches the other
program ("status 404") and the previous release cannot come back either."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from bundler.bundle.manifest import Manifest
from bundler.errors import BundlerError, PolicyError
from bundler.install import environ
from bundler.install.layout import Layout, ReleaseDir

_LOCAL = ("127.0.0.1", "localhost", "0.0.0.0", "[::1]", "::1", "[::]")
_LISTEN = "0A"
# Processes that publish a container's port on the host for the engine.
_ENGINE = ("docker-proxy", "dockerd", "containerd-shim", "rootlesskit")


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


def release_ports(m: Manifest, env: environ.ReleaseEnv) -> dict[int, str]:
    """port -> why the release needs it: its local http/tcp health checks and the ports its
    compose files publish (recorded at build time)."""
    ports: dict[int, str] = {}
    for check in m.runtime.health:
        if check.kind not in ("http", "tcp"):
            continue
        try:
            target = env.expand(check.target)
        except BundlerError:
            continue
        netloc = urllib.parse.urlsplit(target).netloc if check.kind == "http" else target
        host, _, port_text = netloc.rpartition(":")
        if host in _LOCAL and port_text.isdigit():
            ports.setdefault(int(port_text), f"health check {check.name}")
    for port in m.runtime.compose.ports if m.runtime.compose else ():
        ports.setdefault(port, "published by the compose files")
    return ports


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)[:120] or "?"


def holders(port: int) -> list[Holder]:
    """The processes listening on `port` (any address) in this network namespace."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(entry / "fd" / fd) in wanted:
                    found.append(Holder(int(entry.name), _command(int(entry.name))))
                    break
            except OSError:
                continue
    return found or [Holder(0, "a process this user cannot see")]


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def ours(holder: Holder, layout: Layout, current: str | None) -> bool:
    """Is `holder` the current release's: a descendant of one of its supervisors, or (for a
    compose release) the engine publishing a container's port?"""
    if current is None:
        return False
    rel = ReleaseDir(layout.release(current))
    m = rel.manifest()
    if m is None:
        return False
    if m.runtime.compose is not None and any(e in holder.command for e in _ENGINE):
        return True
    supervisors = set()
    for pidfile in rel.run.glob("*.pid"):
        try:
            supervisors.add(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    pid = holder.pid
    for _ in range(64):
        if pid <= 1:
            return False
        if pid in supervisors:
            return True
        pid = _parent(pid)
    return False


def foreign(layout: Layout, m: Manifest, env: environ.ReleaseEnv
            ) -> list[tuple[int, str, list[Holder]]]:
    """(port, why, holders) for each port the release needs that a program other than the
    current release holds."""
    current = layout.current_version()
    out = []
    for port, why in sorted(release_ports(m, env).items()):
        held = holders(port)
        if held and not all(ours(h, layout, current) for h in held):
            out.append((port, why, held))
    return out


def refuse_foreign(layout: Layout, m: Manifest, env: environ.ReleaseEnv) -> None:
    """PolicyError naming each port and its holder, before anything is created."""
    busy = foreign(layout, m, env)
    if busy:
        what = "; ".join(f"port {port} ({why}) is held by {', '.join(map(str, held))}"
                         for port, why, held in busy)
        raise PolicyError(f"{m.name} {m.version} needs ports that another program holds: {what}",
                          hint="stop that program (or give the release another port in the "
                               "profile), then install again")
