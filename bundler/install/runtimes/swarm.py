"""The swarm runtime: a compose release deployed as a Docker Swarm stack, on a root whose
`swarm.yaml` names the nodes (the stack itself is bundler.install.swarm_runtime's).

What differs from one host's compose project: images go to every node, an update replaces
tasks while the previous release serves and the swarm rolls a failed one back by itself
(`rolling`), and the swarm, not a boot unit, restarts its services after a reboot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from bundler import proc, ui
from bundler.bundle.platforms import parse_platform
from bundler.errors import BundlerError
from bundler.install import db as engines
from bundler.install import environ, migrations, ports
from bundler.install import swarm_runtime as swarm
from bundler.install.runtimes.common import HostCheck, NodeDown, UnitState
from bundler.install.runtimes.compose import ComposeRuntime
from bundler.ui import Log


class SwarmRuntime(ComposeRuntime):
    kind: ClassVar[str] = "swarm"
    rolling: ClassVar[bool] = True
    boot_unit: ClassVar[bool] = False
    service_label: ClassVar[str] = "swarm service"

    def stack(self) -> swarm.Stack:
        project = self.project()
        values = environ.read_env_file(project.env_file) if project.env_file is not None else {}
        return swarm.Stack(project.name, project.files, project.workdir,
                           {**values, **dict(project.env)})

    def preflight(self, env: environ.ReleaseEnv, allow_degraded: bool) -> list[NodeDown]:
        """Every node up and its engine answering, before anything changes (NodeDownError);
        with `allow_degraded`, the nodes that are down."""
        return [NodeDown(n.name, n.state) for n in swarm.preflight(self.layout, allow_degraded)]

    def host_checks(self, env: environ.ReleaseEnv) -> list[HostCheck]:
        """Every node, and the ports across the swarm."""
        m = self.manifest
        try:
            checks = swarm.doctor(
                self.layout, self.project().name, sorted(ports.release_ports(m, env)),
                self._image_records(),
                parse_platform(m.target.platform).arch if m.images else None, m.payload_size)
        except BundlerError as exc:
            return [HostCheck("swarm", "fail", exc.message.splitlines()[0])]
        return [HostCheck(c.name, c.status, c.detail) for c in checks]

    def load_images(self, log: Log) -> list[str] | None:
        """Into every node's engine, each checked there, before anything starts."""
        return swarm.load_images(self.layout, self.rel.images_archive, self._image_records(),
                                 log)

    def service_exec(self, service: str) -> engines.ServiceExec:
        return swarm.InTask(self.layout, self.stack(), service)

    def ensure_service(self, service: str) -> bool:
        stack = self.stack()
        if swarm.service_container(self.layout, stack.name, service):
            return False
        # The stack with only this service running (the others at 0 replicas, scaled up by
        # the release's own deploy after the migrations).
        swarm.deploy(stack, ui.note, only=(service,))
        return True

    def oneoff_runner(self) -> migrations.ServiceRun | None:
        stack = self.stack()

        def job(service: str, argv: Sequence[str], env: Mapping[str, str],
                timeout: float) -> proc.Result:
            return swarm.run_oneoff(stack, ui.note, service, argv, env, timeout)
        return job

    def interpolation_env(self, values: dict[str, str], bundled_dotenv: dict[str, str] | None
                          ) -> dict[str, str | None] | None:
        """`docker stack deploy`'s environment; it never reads a `.env` file itself."""
        process = swarm.process_env(values)
        if bundled_dotenv is None:
            return None
        return {**{k: None for k in bundled_dotenv}, **process}

    def unrestarted(self) -> list[str]:
        return []  # the swarm restarts its tasks (deploy.restart_policy)

    # --- the container hooks ------------------------------------------------------------------

    def _up(self) -> None:
        if self.manifest.images:
            swarm.ensure_images(self.layout, self.rel.images_archive, self._image_records(),
                                ui.note)
        # Fewer replicas are accepted only while a node is still down.
        swarm.deploy(self.stack(), ui.note,
                     allow_degraded=self.rel.degraded_marker.exists() and any(
                         not n.up for n in swarm.nodes(self.layout)))

    def _down(self) -> None:
        swarm.remove(self.stack(), ui.note)

    def _pause(self, keep: tuple[str, ...]) -> None:
        swarm.scale_down(self.stack(), ui.note, keep)

    def _unit_states(self) -> list[UnitState]:
        out = []
        for r in swarm.replicas(self.layout, self.stack().name):
            detail = r.state + (f", {r.health}" if r.health else "") + (
                f": {r.error}" if r.error and not r.ok else "")
            out.append(UnitState(f"swarm:{r.service}@{r.node}", r.ok, detail))
        return out

    def _units_crashed(self, since: float | None) -> list[str]:
        return swarm.crashed(self.stack(), since)
