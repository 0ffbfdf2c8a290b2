"""What varies on the target: how a release's services run. One protocol (`Runtime`), one
module per kind: `process` (supervised processes), `compose` (a Docker Compose project, plus
any processes), `swarm` (the same compose files as a swarm stack). `pick` is the one place that
decides which kind a release runs as; a `Release` (bundler.install.release) binds it once.

A new runtime is one new module with a class that satisfies `Runtime` (most easily a subclass
of `ProcessRuntime` that overrides its container hooks), and one line in `pick`; see
docs/design/runtimes.md.
"""

from __future__ import annotations

from typing import Protocol

from bundler.bundle.manifest import Manifest
from bundler.install import db as engines
from bundler.install import environ, migrations
from bundler.install import swarm_runtime as swarm_driver
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.runtimes.common import HostCheck, NodeDown, UnitState
from bundler.install.runtimes.compose import ComposeRuntime
from bundler.install.runtimes.process import ProcessRuntime
from bundler.install.runtimes.swarm import SwarmRuntime
from bundler.ui import Log

__all__ = ["ComposeRuntime", "HostCheck", "NodeDown", "ProcessRuntime", "Runtime",
           "SwarmRuntime", "UnitState", "bind", "pick"]


class Runtime(Protocol):
    """How one release's services run. Building one runs nothing; every call acts on that
    release alone (a container project is shared by the product's releases: see
    `containers`)."""

    @property
    def kind(self) -> str:
        """"process", "compose", "swarm": for messages only."""

    @property
    def containers(self) -> bool:
        """It runs containers of a project shared by every release of the product under the
        root: an upgrade to such a release updates the project in place (the previous
        release's containers are not stopped first), and its undo puts the project back."""

    @property
    def rolling(self) -> bool:
        """An update replaces tasks while the previous release serves, and the runtime rolls a
        failed update back by itself: with nothing to migrate, nothing is stopped first."""

    @property
    def boot_unit(self) -> bool:
        """A boot unit brings it back after a reboot (else the runtime itself does)."""

    @property
    def service_label(self) -> str:
        """What the host policy calls one of its services."""

    def preflight(self, env: environ.ReleaseEnv, allow_degraded: bool) -> list[NodeDown]: ...
    def host_checks(self, env: environ.ReleaseEnv) -> list[HostCheck]: ...
    def load_images(self, log: Log) -> list[str] | None: ...
    def start(self) -> None: ...
    def stop(self, keep_containers: bool = False) -> None: ...
    def quiesce(self, keep: tuple[str, ...] = ()) -> None: ...
    def states(self) -> list[UnitState]: ...
    def failures(self) -> list[str]: ...
    def crashed(self, since: float | None) -> list[str]: ...
    def service_exec(self, service: str) -> engines.ServiceExec: ...
    def ensure_service(self, service: str) -> bool: ...
    def oneoff_runner(self) -> migrations.ServiceRun | None: ...
    def interpolation_env(self, values: dict[str, str], bundled_dotenv: dict[str, str] | None
                          ) -> dict[str, str | None] | None: ...
    def unrestarted(self) -> list[str]: ...


def pick(layout: Layout, m: Manifest) -> type[ProcessRuntime]:
    """The kind release `m` runs as under `layout`: the one place that decides."""
    if m.runtime.compose is None:
        return ProcessRuntime
    if swarm_driver.configured(layout):
        return SwarmRuntime
    return ComposeRuntime


def bind(layout: Layout, rel: ReleaseDir, m: Manifest, environment: str) -> Runtime:
    """Release `m`'s runtime (placed, or to be placed, at `rel`; installed for
    `environment`)."""
    return pick(layout, m)(layout, rel, m, environment)
