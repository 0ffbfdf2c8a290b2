"""A bare air-gapped target host for end-to-end tests (issue 9): a fresh Debian 12 container.

`bare_target` (a fixture, registered in conftest) starts containers of the images built by
`tests.bare_image` (`bare`: python3 only; `pg15`: plus Debian's postgresql-15), each with:

- `--network none` (only loopback: no route anywhere, nothing to reach),
- a host directory mounted READ-ONLY at /stick (the USB stick; writable when asked, for a
  host that writes its receipt onto the stick),
- a writable host directory mounted at /srv (install roots go under it, e.g. /srv/demo; the
  test can read what was written there),
- optionally the host's Docker engine socket (compose and image bundles: the engine is the one
  prerequisite a target keeps),
- root, an init as PID 1 (supervised services started by one command keep running, reaped,
  for the next command: install, then status, upgrade, rollback on the same host).

    host = bare_target(stick=stick_dir)            # or variant="pg15", docker_socket=True
    r = host.run("python3", "--version")           # Run(rc, out, err), like tests.helpers
    r = run_kit(host, stick_dir / "bundle.pyz", "install", "/stick/app.bundle", ...)

Every container is removed when the test ends, passed or failed. A missing engine or
debootstrap fails under CI=true and skips elsewhere (tests.helpers.unavailable).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import bare_image
from tests.helpers import Run, unavailable

STICK = "/stick"
SRV = "/srv"
LABEL = "bundler-test"
# Image builds/imports this session did (printed in pytest's terminal summary: CI timing).
BUILD_REPORT: list[str] = []


def _socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else "/var/run/docker.sock"


@dataclass
class BareHost:
    """One running bare target container."""

    client: Any
    container: Any
    variant: str
    stick: Path  # host side of /stick (read-only inside)
    srv: Path  # host side of /srv (writable inside)
    stick_at: str = STICK  # where the stick is mounted inside

    def run(self, *argv: str | os.PathLike[str], timeout: float = 600,
            env: dict[str, str] | None = None, workdir: str | None = None) -> Run:
        """Run argv in the container as root (no shell); rc 124 means it timed out."""
        # coreutils `timeout` inside the container: the engine's exec API has none of its own
        cmd = ["timeout", "-k", "5", str(int(timeout)), *(str(os.fspath(a)) for a in argv)]
        result = self.container.exec_run(cmd, demux=True, user="root", environment=env,
                                         workdir=workdir)
        out, err = result.output if result.output is not None else (None, None)
        return Run(int(result.exit_code), (out or b"").decode(errors="replace"),
                   (err or b"").decode(errors="replace"))

    def sh(self, script: str, timeout: float = 600, workdir: str | None = None) -> Run:
        return self.run("sh", "-c", script, timeout=timeout, workdir=workdir)


def run_kit(host: BareHost, kit: Path, *args: str | os.PathLike[str],
            timeout: float = 900) -> Run:
    """Run the target kit (issue 9 item 1: one `.pyz` on the stick) the way an operator does:
    `python3 -I -S /stick/<kit> ARGS` — isolated, no site-packages, nothing but the kit."""
    rel = Path(kit).resolve().relative_to(host.stick.resolve())
    return host.run("python3", "-I", "-S", f"{host.stick_at}/{rel.as_posix()}", *args,
                    timeout=timeout)


@dataclass
class Images:
    """The session's images, built or imported on first use (cached: see tests.bare_image)."""

    client: Any
    refs: dict[str, str] = field(default_factory=dict)

    def ref(self, variant: str) -> str:
        if variant not in self.refs:
            try:
                built = bare_image.ENSURE[variant](self.client)
            except bare_image.Unavailable as exc:
                unavailable(f"the bare target image cannot be built here: {exc}")
            BUILD_REPORT.append(built.describe())
            self.refs[variant] = built.ref
        return self.refs[variant]


@dataclass
class BareTargets:
    """The `bare_target` fixture's value: call it to start a fresh bare host."""

    images: Images
    workdir: Path
    hosts: list[BareHost] = field(default_factory=list)

    def __call__(self, variant: str = "bare", stick: Path | None = None,
                 docker_socket: bool = False,
                 mounts: dict[Path, str] | None = None, stick_at: str = STICK,
                 stick_writable: bool = False) -> BareHost:
        """A new container of `variant` with `stick` at /stick (or `stick_at`; read-only
        unless `stick_writable`; an empty dir if None), a fresh writable /srv, the engine socket
        if asked, and `mounts` (host path → container path, read-only)."""
        ref = self.images.ref(variant)
        n = len(self.hosts)
        if stick is None:
            stick = self.workdir / f"stick{n}"
            stick.mkdir(parents=True)
        srv = self.workdir / f"srv{n}"
        srv.mkdir(parents=True)
        volumes = {str(stick.resolve()): {"bind": stick_at,
                                          "mode": "rw" if stick_writable else "ro"},
                   str(srv.resolve()): {"bind": SRV, "mode": "rw"}}
        for src, dest in (mounts or {}).items():
            volumes[str(Path(src).resolve())] = {"bind": dest, "mode": "ro"}
        if docker_socket:
            sock = _socket_path()
            volumes[sock] = {"bind": "/var/run/docker.sock", "mode": "rw"}
        container = self.images.client.containers.create(
            ref, ["sleep", "infinity"], init=True, network_mode="none",
            user="root", hostname="airgapped", volumes=volumes,
            name=f"bundler-bare-{uuid.uuid4().hex[:10]}", labels={LABEL: "bare-target"})
        host = BareHost(self.images.client, container, variant, stick, srv, stick_at)
        self.hosts.append(host)  # before it can fail to start: removed at teardown either way
        container.start()
        return host

    def close(self) -> None:
        import docker

        for host in self.hosts:
            with contextlib.suppress(docker.errors.NotFound):
                host.container.remove(force=True)
        self.hosts.clear()
