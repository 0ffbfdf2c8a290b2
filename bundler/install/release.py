"""One release under an install root, bound once: its directory, its signed manifest, the
environment it was installed for, and its runtime (bundler.install.runtimes). Built once per
release, from the verified manifest (`of`) or from what the release directory holds (`load`);
everything that acts on a release (install, its undo, recovery, rollback, control, doctor)
takes one instead of a (layout, version) pair."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from bundler.bundle.manifest import Manifest
from bundler.bundle.models import DatabaseSpec
from bundler.errors import StateError
from bundler.install import datadirs, environ, health, runas, runtimes
from bundler.install import db as engines
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.runtimes import Runtime

# Seconds a just-started database service gets to accept connections (initdb of a new volume
# included).
DB_READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Release:
    layout: Layout
    version: str
    dir: ReleaseDir
    manifest: Manifest
    environment: str  # production, staging, development
    runtime: Runtime

    @classmethod
    def of(cls, layout: Layout, manifest: Manifest, environment: str) -> Release:
        """The release a verified manifest describes (its directory may not exist yet)."""
        rel = ReleaseDir(layout.release(manifest.version))
        return cls(layout, manifest.version, rel, manifest, environment,
                   runtimes.bind(layout, rel, manifest, environment))

    @classmethod
    def load(cls, layout: Layout, version: str) -> Release | None:
        """Release `version` as its directory holds it (None: no manifest there)."""
        rel = ReleaseDir(layout.release(version))
        manifest = rel.manifest()
        if manifest is None:
            return None
        environment = rel.environment()
        return cls(layout, version, rel, manifest, environment,
                   runtimes.bind(layout, rel, manifest, environment))

    @classmethod
    def require(cls, layout: Layout, version: str) -> Release:
        found = cls.load(layout, version)
        if found is None:
            raise StateError(f"release {version} has no manifest on disk")
        return found

    @classmethod
    def current(cls, layout: Layout) -> Release | None:
        version = layout.current_version()
        return cls.load(layout, version) if version is not None else None

    def env(self, service_env: dict[str, str] | None = None) -> environ.ReleaseEnv:
        """Its environment now (the shared .env is read again: its secrets are learnt)."""
        return environ.release_env(self.layout, self.manifest.runtime.env, self.environment,
                                   service_env, version=self.version)

    def databases(self, env: environ.ReleaseEnv) -> list[engines.Database]:
        """Every database of the release, in profile order (one for a single `database:`)."""
        return [self.database_for(spec, env) for spec in self.manifest.runtime.all_databases()]

    def database_for(self, spec: DatabaseSpec, env: environ.ReleaseEnv) -> engines.Database:
        return engines.Database(env.expand(spec.url), spec.compose_service, spec.name,
                                 runas.db_owner(self.manifest))

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or update in place, for containers) everything the release runs, its data
        directories made ready (owned by its `user`) first."""
        datadirs.prepare(self.layout, self.manifest)
        self.runtime.start()

    def stop(self, keep_containers: bool = False) -> None:
        self.runtime.stop(keep_containers)

    def quiesce(self, keep: tuple[str, ...] = ()) -> None:
        self.runtime.quiesce(keep)

    def crashed(self, since: float | None = None) -> list[str]:
        """Decisive evidence that the release will not come up, whatever its health checks say
        next: one line per failing unit, with the last lines of its own output, redacted.
        Process services: one that exited (or could not start) after `since`; compose: a
        container that exited non-zero or restarts after `since`, or is unhealthy; swarm:
        tasks that failed after `since`. `since`: wall clock, taken before the start (None:
        any time). An engine that does not answer is no evidence: [] then."""
        env = self.env()
        for svc in self.manifest.runtime.services:  # their own env's secrets are masked too
            self.env(dict(svc.env))
        return [env.redact(line) for line in self.runtime.crashed(since)]

    def watch(self) -> health.Crashed:
        """`crashed` for what is started from now on: call it just before starting the release
        and hand the result to the health checks."""
        return functools.partial(self.crashed, time.time())

    def check(self, crashed: health.Crashed | None = None,
              retries: int | None = None) -> list[CheckResult]:
        """Its health checks, with the runtime's evidence to give up early on."""
        m = self.manifest
        return health.run_all(m.runtime.health, self.env(), retries=retries,
                              user=m.runtime.user, crashed=crashed)

    def restart(self) -> list[CheckResult]:
        """Start it and check it (what an undo does to the release it returns to)."""
        crashed = self.watch()
        self.start()
        return self.check(crashed)

    # --- its databases in container services --------------------------------------------------

    def service_exec(self, db: engines.Database) -> engines.ServiceExec | None:
        """How to run the database's client tools inside its container service (None: on the
        host)."""
        return self.runtime.service_exec(db.compose_service) if db.compose_service else None

    def ensure_database(self, db: engines.Database, env: dict[str, str]) -> bool:
        """Start the database's service alone if it is down, then wait until it answers (a
        healthcheck may be missing); True if it was started here."""
        assert db.compose_service
        started = self.runtime.ensure_service(db.compose_service)
        if started:
            engines.wait_ready(db, env, DB_READY_TIMEOUT, exec_in_service=self.service_exec(db))
        return started
