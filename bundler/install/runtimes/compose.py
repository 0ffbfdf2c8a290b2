"""The compose runtime: a release's containers as one Docker Compose project (the project
itself is bundler.install.compose_runtime's), plus any supervised processes beside them.

The project is shared by every release of the product under one root (one name): an upgrade
updates it in place, and a rollback brings the previous release's files back up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from bundler import proc, ui
from bundler.errors import PolicyError
from bundler.install import compose_runtime as cr
from bundler.install import db as engines
from bundler.install import environ, migrations, ports
from bundler.install.runtimes.common import NodeDown, UnitState
from bundler.install.runtimes.process import ProcessRuntime


class ComposeRuntime(ProcessRuntime):
    kind: ClassVar[str] = "compose"
    containers: ClassVar[bool] = True
    service_label: ClassVar[str] = "compose service"

    def project(self) -> cr.ComposeProject:
        """The release's compose project. Building it runs nothing: the compose tool is
        detected (a few subprocesses) only by the calls that run compose itself."""
        m = self.manifest
        spec = m.runtime.compose
        assert spec is not None
        env = environ.release_env(self.layout, m.runtime.env, self.environment,
                                  version=m.version)
        env_file = self.layout.env_file
        return cr.ComposeProject(
            name=spec.project or cr.project_name(m.name, self.layout.root),
            files=tuple(self.rel.files / f for f in spec.files),
            workdir=(self.rel.files / spec.files[0]).parent,
            env_file=env_file if env_file.is_file() else None,
            env=env.values)

    def tool(self) -> cr.ComposeTool:
        assert self.manifest.runtime.compose is not None
        return cr.detect(self.manifest.runtime.compose.tool)

    def preflight(self, env: environ.ReleaseEnv, allow_degraded: bool) -> list[NodeDown]:
        ports.refuse_foreign(self.layout, self.manifest, env)
        self._refuse_foreign_project()
        return []

    def _refuse_foreign_project(self) -> None:
        """A profile's explicit `compose.project` must not name a stack this root did not
        start: compose would recreate, and a rollback take down, another installation's
        containers. (The default name is per root, see project_name.)"""
        spec = self.manifest.runtime.compose
        if spec is None or not spec.project:
            return
        elsewhere = cr.started_elsewhere(spec.project, self.layout.root)
        if elsewhere:
            raise PolicyError(
                f"compose project {spec.project!r} already runs containers started from "
                f"{', '.join(elsewhere)}, not from {self.layout.root}",
                hint="give this product its own compose.project in the profile (or leave it "
                     "out: bundler then uses one per install root), or remove that stack first")

    def service_exec(self, service: str) -> engines.ServiceExec:
        """The container is found by the product's project label, whichever release started
        it."""
        return cr.InService(self.project(), service)

    def ensure_service(self, service: str) -> bool:
        project = self.project()
        if cr.running_container(project, service) is not None:
            return False
        cr.up(project, self.tool(), ui.note, only=(service,))
        return True

    def oneoff_runner(self) -> migrations.ServiceRun | None:
        project, tool = self.project(), self.tool()

        def run(service: str, argv: Sequence[str], env: Mapping[str, str],
                timeout: float) -> proc.Result:
            return cr.run_oneoff(project, tool, ui.note, service, argv, env, timeout)
        return run

    def interpolation_env(self, values: dict[str, str], bundled_dotenv: dict[str, str] | None
                          ) -> dict[str, str | None] | None:
        """Compose's process environment over the `.env` file it reads. `bundled_dotenv`: the
        bundle's own `.env` beside the first compose file ({}: none; None: there is one, not
        read yet). A variable only that file sets is None (compose may or may not read it)."""
        process = cr.process_env(values)
        if bundled_dotenv is None:
            return None
        if not self.layout.env_file.is_file():
            return {**bundled_dotenv, **process}  # no --env-file: compose reads the bundle's
        return {**{k: None for k in bundled_dotenv}, **process}

    def unrestarted(self) -> list[str]:
        """Services with no `restart:` policy: the engine does not restart them."""
        assert self.manifest.runtime.compose is not None
        return cr.no_restart_policy(self.rel.files, self.manifest.runtime.compose.files)

    # --- the container hooks ------------------------------------------------------------------

    def _up(self) -> None:
        cr.up(self.project(), self.tool(), ui.note)

    def _down(self) -> None:
        cr.down(self.project(), self.tool(), ui.note)

    def _pause(self, keep: tuple[str, ...]) -> None:
        cr.stop_services(self.project(), ui.note, keep)

    def _unit_states(self) -> list[UnitState]:
        out = []
        for c in cr.ps(self.project()):
            detail = c.status + (f", {c.health}" if c.health else "")
            out.append(UnitState(f"compose:{c.name}",
                                 c.running and c.health in (None, "healthy"), detail))
        return out

    def _units_crashed(self, since: float | None) -> list[str]:
        return cr.crashed(self.project(), since)
