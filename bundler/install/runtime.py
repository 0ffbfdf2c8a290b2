"""The runtimes a release can use, behind one interface: supervised processes and/or a
docker compose project. The installer, recovery and control commands only call this."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from bundler import ui
from bundler.errors import InstallError
from bundler.install import compose_runtime as cr
from bundler.install import database, environ, migrations, process_runtime
from bundler.install.layout import Layout, ReleaseDir
from bundler.models import ComposeSpec

# Seconds a just-started database service gets to accept connections (initdb of a new volume
# included).
DB_READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class UnitState:
    name: str
    running: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "running": self.running, "detail": self.detail}


def _compose(layout: Layout, rel: ReleaseDir, spec: ComposeSpec, product: str
             ) -> tuple[cr.ComposeProject, cr.ComposeTool]:
    manifest = rel.manifest()
    assert manifest is not None
    env = environ.release_env(layout, manifest.runtime.env, rel.environment())
    env_file = environ.shared_env_file(layout)
    project = cr.ComposeProject(
        name=spec.project or cr.project_name(product),
        files=tuple(rel.files / f for f in spec.files),
        workdir=(rel.files / spec.files[0]).parent,
        env_file=env_file if env_file.is_file() else None,
        env=env.values)
    return project, cr.detect(spec.tool)


def start(layout: Layout, version: str) -> None:
    """Start (or update in place, for compose) everything release `version` runs."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    assert m is not None, f"release {version} has no manifest"
    if m.runtime.compose is not None:
        project, tool = _compose(layout, rel, m.runtime.compose, m.name)
        cr.up(project, tool, ui.note)
    process_runtime.start(m.runtime.services, layout, rel, m.runtime.env, rel.environment())


def stop(layout: Layout, version: str, keep_compose: bool = False) -> None:
    """Stop what release `version` runs. `keep_compose`: leave its compose project up (an
    upgrade to a release that is also a compose project recreates only what changed)."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None:
        return
    process_runtime.stop(m.runtime.services, rel)
    if m.runtime.compose is not None and not keep_compose:
        project, tool = _compose(layout, rel, m.runtime.compose, m.name)
        cr.down(project, tool, ui.note)


def uses_compose(layout: Layout, version: str | None) -> bool:
    if version is None:
        return False
    m = ReleaseDir(layout.release(version)).manifest()
    return m is not None and m.runtime.compose is not None


def states(layout: Layout, version: str) -> list[UnitState]:
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None:
        return []
    out = [UnitState(s.name, s.running, f"supervisor pid {s.pid}" if s.pid else "stopped")
           for s in process_runtime.states(m.runtime.services, rel)]
    if m.runtime.compose is not None:
        project, tool = _compose(layout, rel, m.runtime.compose, m.name)
        for c in cr.ps(project, tool):
            detail = c.status + (f", {c.health}" if c.health else "")
            out.append(UnitState(f"compose:{c.name}", c.running and c.health in (None,
                                                                                  "healthy"),
                                 detail))
    return out


def _project_of(layout: Layout, version: str) -> tuple[cr.ComposeProject, cr.ComposeTool]:
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None or m.runtime.compose is None:
        raise InstallError(f"release {version} has no compose project",
                           hint="database.compose_service needs the profile's `compose:`")
    return _compose(layout, rel, m.runtime.compose, m.name)


def service_exec(layout: Layout, version: str, db: database.Database
                 ) -> database.ServiceExec | None:
    """How to run the database's client tools inside its compose service (None: on the host).
    The container is found by the product's project label, whichever release started it."""
    if not db.compose_service:
        return None
    project, _tool = _project_of(layout, version)
    return functools.partial(cr.exec_in, project, db.compose_service)


def ensure_service(layout: Layout, version: str, service: str) -> bool:
    """Start `service` of release `version`'s compose project alone if it is not running
    (the database, before backups and migrations); True if it was started here."""
    project, tool = _project_of(layout, version)
    if cr.running_container(project, service) is not None:
        return False
    cr.up(project, tool, ui.note, only=(service,))
    return True


def ensure_database(layout: Layout, version: str, db: database.Database,
                    env: dict[str, str]) -> bool:
    """`ensure_service` for the database's service, then wait until it answers (a healthcheck
    may be missing); True if it was started here."""
    assert db.compose_service
    started = ensure_service(layout, version, db.compose_service)
    if started:
        database.wait_ready(db, env, DB_READY_TIMEOUT,
                            exec_in_service=service_exec(layout, version, db))
    return started


def quiesce(layout: Layout, version: str, keep: tuple[str, ...] = ()) -> None:
    """Stop everything release `version` runs that could write to the database, except the
    compose services in `keep` (the database itself); compose containers are stopped, not
    removed (the caller brings the right release back with its own `up`)."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None:
        return
    process_runtime.stop(m.runtime.services, rel)
    if m.runtime.compose is not None:
        project, _tool = _compose(layout, rel, m.runtime.compose, m.name)
        cr.stop_services(project, ui.note, keep)


def oneoff_runner(layout: Layout, version: str) -> migrations.ServiceRun | None:
    """How release `version` runs a command as a one-off container of one of its compose
    services (a migration with `service:`); None without compose."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None or m.runtime.compose is None:
        return None
    project, tool = _compose(layout, rel, m.runtime.compose, m.name)
    return functools.partial(cr.run_oneoff, project, tool, ui.note)
