"""A Debian 12 host that BOOTS, for reboot tests (issue 17 §3; DESIGN.md section 9).

The `systemd` image of tests.bare_image (the bare host plus systemd, systemd-sysv and dbus)
runs with systemd as PID 1:

    docker run -d --tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:ro
               --network none -e container=docker IMAGE /lib/systemd/systemd

(`systemd-nspawn --boot` and `--privileged` do not work on these machines.) Like a bare host it
has the stick read-only at /stick and a writable /srv from the test's directory. `power_cut()`
is `docker kill` (SIGKILL to PID 1: no shutdown, nothing stopped cleanly) then `docker start`:
the filesystem stays, every process is gone, and systemd boots again.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.bare_target import LABEL, SRV, STICK, BareHost, Images

BOOT_TIMEOUT = 120.0


@dataclass
class BootedHost(BareHost):
    boots: int = 1

    def wait_booted(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait until systemd has finished booting (every startup job ran, ours included);
        its verdict: running, or degraded when a unit failed."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            r = self.run("systemctl", "is-system-running", "--wait", timeout=max(
                5, deadline - time.monotonic()))
            last = (r.out + r.err).strip()
            if last in ("running", "degraded"):
                return last
            time.sleep(0.5)  # the manager is not up yet (no bus): ask again
        raise AssertionError(f"the host did not finish booting in {timeout:.0f}s: {last}")

    def power_cut(self) -> str:
        """Pull the plug, then power on: SIGKILL to every process, then a fresh boot."""
        self.container.kill()
        self.container.wait(timeout=60)
        self.container.start()
        self.boots += 1
        return self.wait_booted()


@dataclass
class BootedTargets:
    """Start booted hosts; every container is removed at close()."""

    images: Images
    workdir: Path
    hosts: list[BootedHost] = field(default_factory=list)

    def __call__(self, stick: Path) -> BootedHost:
        ref = self.images.ref("systemd")
        srv = self.workdir / f"srv{len(self.hosts)}"
        srv.mkdir(parents=True)
        container = self.images.client.containers.create(
            ref, ["/lib/systemd/systemd"], network_mode="none", hostname="airgapped",
            environment={"container": "docker"},
            tmpfs={"/run": "", "/run/lock": ""},
            volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"},
                     str(stick.resolve()): {"bind": STICK, "mode": "ro"},
                     str(srv.resolve()): {"bind": SRV, "mode": "rw"}},
            name=f"bundler-booted-{uuid.uuid4().hex[:10]}", labels={LABEL: "booted-target"})
        host = BootedHost(self.images.client, container, "systemd", stick, srv)
        self.hosts.append(host)  # before it can fail to start: removed at close() either way
        container.start()
        host.wait_booted()
        return host

    def close(self) -> None:
        import docker

        for host in self.hosts:
            with contextlib.suppress(docker.errors.NotFound):
                host.container.remove(force=True)
        self.hosts.clear()
