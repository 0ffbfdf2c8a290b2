"""The process runtime: a release's services as supervised processes on this host
(bundler.install.process_runtime does the supervising). It is also the base of the container
runtimes, whose releases may run supervised processes beside their containers: they override
the container hooks (`_up`, `_down`, `_pause`, ...), never the process half."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

from bundler.bundle.imagearchive import ImageRecord
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import Service
from bundler.errors import InstallError
from bundler.install import db as engines
from bundler.install import environ, images, migrations, ports, process_runtime, runas
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.runtimes.common import HostCheck, NodeDown, UnitState
from bundler.ui import Log


@dataclass(frozen=True)
class ProcessRuntime:
    """Release `manifest`, placed (or to be placed) at `rel` under `layout`, installed for
    `environment`. Building one runs nothing."""

    layout: Layout
    rel: ReleaseDir
    manifest: Manifest
    environment: str

    kind: ClassVar[str] = "process"
    containers: ClassVar[bool] = False
    rolling: ClassVar[bool] = False
    boot_unit: ClassVar[bool] = True
    service_label: ClassVar[str] = "service"

    @property
    def services(self) -> tuple[Service, ...]:
        return self.manifest.runtime.services

    @property
    def version(self) -> str:
        return self.rel.path.name

    # --- before anything changes --------------------------------------------------------------

    def preflight(self, env: environ.ReleaseEnv, allow_degraded: bool) -> list[NodeDown]:
        """Refuse (PolicyError) what would clash with another program; the nodes that are down
        (none here)."""
        ports.refuse_foreign(self.layout, self.manifest, env)
        return []

    def host_checks(self, env: environ.ReleaseEnv) -> list[HostCheck]:
        """`bundle doctor`'s rows: the local ports the release serves, and who holds each now.
        With a current release its own ports are expected to be busy (it serves them, and an
        install replaces it); without one, a busy port belongs to someone else."""
        current = self.layout.current_version()
        rows = []
        for port, why in sorted(ports.release_ports(self.manifest, env).items()):
            held = ports.holders(port)
            if not held:
                rows.append(HostCheck(f"port {port}", "ok", f"free ({why})"))
            elif all(ports.ours(h, self.layout, current) for h in held):
                rows.append(HostCheck(f"port {port}", "ok", f"in use by the current release "
                                                            f"{current}, which an install "
                                                            f"replaces ({why})"))
            else:
                rows.append(HostCheck(f"port {port}", "fail",
                                      f"held by {', '.join(map(str, held))}, not by this "
                                      f"product ({why})"))
        return rows

    def load_images(self, log: Log) -> list[str] | None:
        """Load the release's images into the engine, each checked against its signed Image
        ID; the nodes loaded (None: this host's engine only)."""
        images.load(self.rel.images_archive, self._image_records(), log)
        return None

    def _image_records(self) -> list[ImageRecord]:
        return [ImageRecord(i.ref, i.image_id) for i in self.manifest.images]

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or update in place, for containers) everything the release runs."""
        self._up()
        m = self.manifest
        if m.runtime.user:  # its SQLite database too (created, or restored, by root meanwhile)
            sqlite = runas.sqlite_file(m, environ.release_env(self.layout, m.runtime.env,
                                                              self.environment))
            if sqlite is not None:
                runas.sqlite_writable(sqlite, runas.account(m.runtime.user))
        process_runtime.start(self.services, self.layout, self.rel, m.runtime.env,
                              self.environment, user=m.runtime.user)

    def stop(self, keep_containers: bool = False) -> None:
        """Stop what the release runs. `keep_containers`: leave its containers up (an upgrade
        to a release that also runs them updates them in place)."""
        process_runtime.stop(self.services, self.rel)
        if not keep_containers:
            self._down()

    def quiesce(self, keep: tuple[str, ...] = ()) -> None:
        """Stop everything the release runs that could write to the database, except the
        container services in `keep` (the database itself); containers are stopped, not
        removed (the caller brings the right release back with its own start)."""
        process_runtime.stop(self.services, self.rel)
        self._pause(keep)

    def states(self) -> list[UnitState]:
        return [UnitState(s.name, s.running, s.detail)
                for s in process_runtime.states(self.services, self.rel)] + self._unit_states()

    def failures(self) -> list[str]:
        """Why the release's supervised services are not up (cannot start, crash-looping)."""
        return process_runtime.failures(self.services, self.rel)

    def crashed(self, since: float | None) -> list[str]:
        """Decisive evidence that the release will not come up (see Release.crashed); not
        redacted. An engine that does not answer is no evidence."""
        out = process_runtime.crashed(self.services, self.rel, since)
        with contextlib.suppress(InstallError):
            out += self._units_crashed(since)
        return out

    # --- a database in a container service ----------------------------------------------------

    def service_exec(self, service: str) -> engines.ServiceExec:
        """How to run a database's client tools inside its container `service`."""
        raise self._no_containers()

    def ensure_service(self, service: str) -> bool:
        """Start container `service` alone if it is not running (the database, before backups
        and migrations); True if it was started here."""
        raise self._no_containers()

    def oneoff_runner(self) -> migrations.ServiceRun | None:
        """How a migration with `service:` runs as a one-off container (None: no containers)."""
        return None

    def interpolation_env(self, values: dict[str, str], bundled_dotenv: dict[str, str] | None
                          ) -> dict[str, str | None] | None:
        """What the release's compose files are interpolated with (None: nothing exact can be
        said: no compose files here)."""
        return None

    def unrestarted(self) -> list[str]:
        """Container services nothing restarts after a crash or an engine restart."""
        return []

    def _no_containers(self) -> InstallError:
        return InstallError(f"release {self.version} has no compose project",
                            hint="engines.compose_service needs the profile's `compose:`")

    # --- the container hooks (nothing to do for processes alone) ------------------------------

    def _up(self) -> None:
        return None

    def _down(self) -> None:
        return None

    def _pause(self, keep: tuple[str, ...]) -> None:
        return None

    def _unit_states(self) -> list[UnitState]:
        return []

    def _units_crashed(self, since: float | None) -> list[str]:
        return []
