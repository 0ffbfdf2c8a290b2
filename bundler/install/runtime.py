"""The runtimes a release can use, behind one interface: supervised processes and/or a
docker compose project. The installer, recovery and control commands only call this."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bundler import proc, ui
from bundler.bundle.imagearchive import ImageRecord
from bundler.bundle.manifest import IMAGES_PATH, Manifest
from bundler.errors import InstallError, PolicyError
from bundler.install import compose_runtime as cr
from bundler.install import database, datadirs, environ, migrations, process_runtime, runas
from bundler.install import swarm_runtime as swarm
from bundler.install.layout import Layout, ReleaseDir

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


def _project(layout: Layout, rel: ReleaseDir, m: Manifest) -> cr.ComposeProject:
    """The release's compose project. Building it runs nothing: the compose tool is
    detected (a few subprocesses) only by the calls that run compose itself."""
    spec = m.runtime.compose
    assert spec is not None
    env = environ.release_env(layout, m.runtime.env, rel.environment(), version=m.version)
    env_file = environ.shared_env_file(layout)
    return cr.ComposeProject(
        name=spec.project or cr.project_name(m.name, layout.root),
        files=tuple(rel.files / f for f in spec.files),
        workdir=(rel.files / spec.files[0]).parent,
        env_file=env_file if env_file.is_file() else None,
        env=env.values)


def refuse_foreign_project(layout: Layout, m: Manifest) -> None:
    """A profile's explicit `compose.project` must not name a stack this root did not start:
    compose would recreate, and a rollback take down, another installation's containers.
    (The default name is per root, see project_name.) PolicyError before anything changes."""
    spec = m.runtime.compose
    if spec is None or not spec.project:
        return
    elsewhere = cr.started_elsewhere(spec.project, layout.root)
    if elsewhere:
        raise PolicyError(
            f"compose project {spec.project!r} already runs containers started from "
            f"{', '.join(elsewhere)}, not from {layout.root}",
            hint="give this product its own compose.project in the profile (or leave it out: "
                 "bundler then uses one per install root), or remove that stack first")


def _swarm(layout: Layout, m: Manifest) -> bool:
    """A compose release on a root with swarm.yaml runs as a swarm stack."""
    return m.runtime.compose is not None and swarm.configured(layout.root)


def interpolation_env(layout: Layout, m: Manifest, values: Mapping[str, str],
                      bundled_dotenv: Mapping[str, str] | None) -> dict[str, str | None] | None:
    """What compose (or `docker stack deploy`) will interpolate release `m`'s compose files
    with, its env being `values`: its process environment, over the `.env` file it reads.
    `bundled_dotenv`: the bundle's own `.env` beside the first compose file ({}: none; None:
    there is one, not read yet). A variable only that file sets is None (compose may or may
    not read it); the result is None when nothing exact can be said yet."""
    on_swarm = _swarm(layout, m)
    process = swarm.process_env(values) if on_swarm else cr.process_env(values)
    if bundled_dotenv is None:
        return None
    if not on_swarm and not environ.shared_env_file(layout).is_file():
        return {**bundled_dotenv, **process}  # no --env-file: compose reads the bundle's
    return {**{k: None for k in bundled_dotenv}, **process}


def _stack(layout: Layout, rel: ReleaseDir, m: Manifest) -> swarm.Stack:
    project = _project(layout, rel, m)
    values = environ.read_env_file(project.env_file) if project.env_file is not None else {}
    return swarm.Stack(project.name, project.files, project.workdir,
                       {**values, **dict(project.env)})


def degraded_marker(rel: ReleaseDir) -> Path:
    """Present when the release was installed with --allow-degraded and a node was down: its
    stack is accepted with fewer replicas than asked while tasks wait for that node."""
    return rel.meta / "swarm-degraded"


def _tool(m: Manifest) -> cr.ComposeTool:
    assert m.runtime.compose is not None
    return cr.detect(m.runtime.compose.tool)


def start(layout: Layout, version: str) -> None:
    """Start (or update in place, for compose) everything release `version` runs."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    assert m is not None, f"release {version} has no manifest"
    datadirs.prepare(layout, m)  # there, and owned by this release's `user`
    if _swarm(layout, m):
        if m.images:
            swarm.ensure_images(layout.root, rel.path / IMAGES_PATH,
                                [ImageRecord(i.ref, i.image_id) for i in m.images], ui.note)
        # Fewer replicas are accepted only while a node is still down.
        swarm.deploy(_stack(layout, rel, m), ui.note,
                     allow_degraded=degraded_marker(rel).exists() and any(
                         not n.up for n in swarm.nodes(layout.root)))
    elif m.runtime.compose is not None:
        cr.up(_project(layout, rel, m), _tool(m), ui.note)
    if m.runtime.user:  # its SQLite database too (created, or restored, by root meanwhile)
        sqlite = runas.sqlite_file(m, environ.release_env(layout, m.runtime.env,
                                                          rel.environment()))
        if sqlite is not None:
            runas.sqlite_writable(sqlite, runas.account(m.runtime.user))
    process_runtime.start(m.runtime.services, layout, rel, m.runtime.env, rel.environment(),
                          user=m.runtime.user)


def stop(layout: Layout, version: str, keep_compose: bool = False) -> None:
    """Stop what release `version` runs. `keep_compose`: leave its compose project up (an
    upgrade to a release that is also a compose project recreates only what changed)."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None:
        return
    process_runtime.stop(m.runtime.services, rel)
    if _swarm(layout, m):
        if not keep_compose:
            swarm.remove(_stack(layout, rel, m), ui.note)
    elif m.runtime.compose is not None and not keep_compose:
        cr.down(_project(layout, rel, m), _tool(m), ui.note)


def failures(layout: Layout, version: str) -> list[str]:
    """Why the release's supervised services are not up (cannot start, crash-looping)."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    return process_runtime.failures(m.runtime.services, rel) if m is not None else []


def crashed(layout: Layout, version: str, since: float | None = None) -> list[str]:
    """Decisive evidence that release `version` will not come up, whatever its health checks
    say next: one line per failing unit, with the last lines of its own output, redacted.
    Process services: one that exited (or could not start) after `since`, from its
    supervisor's state file and its log; compose: a container that exited non-zero or
    restarts after `since`, or is unhealthy, per the engine (with `docker logs --tail`);
    swarm: tasks that failed after `since`. `since`: wall clock, taken before the start
    (None: any time). An engine that does not answer is no evidence: [] then."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None:
        return []
    env = environ.release_env(layout, m.runtime.env, rel.environment(), version=version)
    for svc in m.runtime.services:  # their own env's secrets are masked too
        environ.release_env(layout, m.runtime.env, rel.environment(), dict(svc.env),
                            version=version)
    out = process_runtime.crashed(m.runtime.services, rel, since)
    try:
        if _swarm(layout, m):
            out += swarm.crashed(_stack(layout, rel, m), since)
        elif m.runtime.compose is not None:
            out += cr.crashed(_project(layout, rel, m), since)
    except InstallError:
        pass
    return [env.redact(line) for line in out]


def watch(layout: Layout, version: str) -> Callable[[], list[str]]:
    """`crashed` for what is started from now on: call it just before starting the release
    and hand the result to the health checks (health.run_all's `crashed`)."""
    since = time.time()
    return functools.partial(crashed, layout, version, since)


def uses_swarm(layout: Layout, version: str | None) -> bool:
    if version is None:
        return False
    m = ReleaseDir(layout.release(version)).manifest()
    return m is not None and _swarm(layout, m)


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
    out = [UnitState(s.name, s.running, s.detail)
           for s in process_runtime.states(m.runtime.services, rel)]
    if _swarm(layout, m):
        for r in swarm.replicas(layout.root, _stack(layout, rel, m).name):
            detail = r.state + (f", {r.health}" if r.health else "") + (
                f": {r.error}" if r.error and not r.ok else "")
            out.append(UnitState(f"swarm:{r.service}@{r.node}", r.ok, detail))
    elif m.runtime.compose is not None:
        for c in cr.ps(_project(layout, rel, m)):
            detail = c.status + (f", {c.health}" if c.health else "")
            out.append(UnitState(f"compose:{c.name}", c.running and c.health in (None,
                                                                                  "healthy"),
                                 detail))
    return out


def _compose_release(layout: Layout, version: str) -> tuple[ReleaseDir, Manifest]:
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None or m.runtime.compose is None:
        raise InstallError(f"release {version} has no compose project",
                           hint="database.compose_service needs the profile's `compose:`")
    return rel, m


def service_exec(layout: Layout, version: str, db: database.Database
                 ) -> database.ServiceExec | None:
    """How to run the database's client tools inside its compose service (None: on the host).
    The container is found by the product's project label, whichever release started it."""
    if not db.compose_service:
        return None
    rel, m = _compose_release(layout, version)
    if _swarm(layout, m):
        return functools.partial(swarm.exec_in, layout.root, _stack(layout, rel, m),
                                 db.compose_service)
    return functools.partial(cr.exec_in, _project(layout, rel, m), db.compose_service)


def ensure_service(layout: Layout, version: str, service: str) -> bool:
    """Start `service` of release `version`'s compose project alone if it is not running
    (the database, before backups and migrations); True if it was started here."""
    rel, m = _compose_release(layout, version)
    if _swarm(layout, m):
        stack = _stack(layout, rel, m)
        if swarm.service_container(layout.root, stack.name, service):
            return False
        # The stack with only this service running (the others at 0 replicas, scaled up by
        # the release's own deploy after the migrations).
        swarm.deploy(stack, ui.note, only=(service,))
        return True
    project = _project(layout, rel, m)
    if cr.running_container(project, service) is not None:
        return False
    cr.up(project, _tool(m), ui.note, only=(service,))
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
    if _swarm(layout, m):
        swarm.scale_down(_stack(layout, rel, m), ui.note, keep)
    elif m.runtime.compose is not None:
        cr.stop_services(_project(layout, rel, m), ui.note, keep)


def oneoff_runner(layout: Layout, version: str) -> migrations.ServiceRun | None:
    """How release `version` runs a command as a one-off container of one of its compose
    services (a migration with `service:`): `compose run`, or a swarm job on a stack; None
    without compose."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None or m.runtime.compose is None:
        return None
    if _swarm(layout, m):
        stack = _stack(layout, rel, m)

        def job(service: str, argv: Sequence[str], env: Mapping[str, str],
                timeout: float) -> proc.Result:
            return swarm.run_oneoff(stack, ui.note, service, argv, env, timeout)
        return job
    project = _project(layout, rel, m)

    def run(service: str, argv: Sequence[str], env: Mapping[str, str],
            timeout: float) -> proc.Result:
        return cr.run_oneoff(project, _tool(m), ui.note, service, argv, env, timeout)
    return run
