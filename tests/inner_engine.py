"""A second Docker engine with the containerd image store, run in a container of this host's
engine (docker-in-docker): Debian 13's Docker 26 (tests.bare_image `trixie-dockerd`) with
`{"features": {"containerd-snapshotter": true}}`, for what the host's classic Docker 20.10
cannot show (docs/design/image-delta.md).

What works on these machines (found out by running it):
- `--privileged` does not: the host's bounding set lacks CAP_SYS_RESOURCE ("unable to apply
  caps: operation not permitted"). Every other capability, seccomp and AppArmor unconfined do.
- The data roots (/var/lib/docker, /var/lib/containerd) on tmpfs: the overlayfs snapshotter
  works there (overlay on the container's own overlay root would not); gone with the container.
- A cgroup v1 host mounts /sys/fs/cgroup read-only in a container: with a private cgroup
  namespace the start script mounts the hierarchies again, read-write, rooted at the container's
  own cgroup, so the inner engine can run containers.
- No network anywhere: the container has none, the inner engine no bridge and no iptables.
- Its API socket is in a host directory bind-mounted at /run/dind; the test talks to it there.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import bare_image
from tests.helpers import unavailable

LABEL = "bundler-test"
START_TIMEOUT = 120.0
START = """\
#!/bin/sh
set -e
if [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then  # cgroup v1: mount our own, read-write
  for d in /sys/fs/cgroup/*; do umount "$d" 2>/dev/null || true; done
  umount /sys/fs/cgroup 2>/dev/null || true
  mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
  for s in $(awk 'NR > 1 && $4 == 1 {print $1}' /proc/cgroups); do
    mkdir -p "/sys/fs/cgroup/$s"
    mount -t cgroup -o "$s" cgroup "/sys/fs/cgroup/$s" 2>/dev/null || rmdir "/sys/fs/cgroup/$s"
  done
fi
exec dockerd "$@"
"""
DAEMON_JSON = {"features": {"containerd-snapshotter": True}}


@dataclass(frozen=True)
class InnerEngine:
    client: Any        # a docker SDK client on the inner engine
    socket: Path       # its API socket on this host
    container: Any     # the outer container (this host's engine)
    image: bare_image.Built

    def logs(self) -> str:
        return bytes(self.container.logs()).decode(errors="replace")[-4000:]


@contextlib.contextmanager
def containerd_engine(host: Any) -> Iterator[InnerEngine]:
    """Start the inner engine on `host` (a client of this host's engine); yield it once its
    API answers; remove the container and its socket directory afterwards."""
    import docker

    try:
        built = bare_image.ensure_trixie_dockerd(host)
    except bare_image.Unavailable as exc:
        unavailable(f"the trixie-dockerd image cannot be built: {exc}")
    work = Path(tempfile.mkdtemp(prefix="bundler-dind-", dir="/tmp"))  # short: a socket path
    conf, sock = work / "conf", work / "sock"
    conf.mkdir()
    sock.mkdir()
    (conf / "daemon.json").write_text(json.dumps(DAEMON_JSON))
    (conf / "start.sh").write_text(START)
    (conf / "start.sh").chmod(0o755)
    container = None
    client = None
    try:
        container = host.containers.create(
            built.ref, ["-H", "unix:///run/dind/docker.sock", "--iptables=false",
                        "--ip6tables=false", "--bridge=none"],
            entrypoint=["/run/dind-conf/start.sh"], name=f"bundler-dind-{uuid.uuid4().hex[:10]}",
            labels={LABEL: "containerd-engine"}, network_mode="none", cgroupns="private",
            cap_add=["ALL"], cap_drop=["SYS_RESOURCE"],
            security_opt=["seccomp=unconfined", "apparmor=unconfined"],
            tmpfs={"/var/lib/docker": "exec", "/var/lib/containerd": "exec", "/run": ""},
            volumes={str(conf): {"bind": "/run/dind-conf", "mode": "ro"},
                     str(conf / "daemon.json"): {"bind": "/etc/docker/daemon.json",
                                                 "mode": "ro"},
                     str(sock): {"bind": "/run/dind", "mode": "rw"}})
        container.start()
        client = _wait(container, sock / "docker.sock")
        yield InnerEngine(client, sock / "docker.sock", container, built)
    finally:
        if client is not None:
            client.close()
        if container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)
        shutil.rmtree(work, ignore_errors=True)


def _wait(container: Any, socket: Path) -> Any:
    import docker

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if socket.exists():
            client = docker.DockerClient(base_url=f"unix://{socket}", timeout=600)
            try:
                client.ping()
                return client
            except docker.errors.DockerException:
                client.close()
        container.reload()
        if container.status == "exited":
            break
        time.sleep(0.5)
    logs = bytes(container.logs()).decode(errors="replace")[-3000:]
    raise AssertionError(f"the inner dockerd did not answer within {START_TIMEOUT:.0f}s "
                         f"({container.status}):\n{logs}")
