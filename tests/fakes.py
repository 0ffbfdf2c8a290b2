"""Fakes at the install side's adapter boundaries, for unit tests that run in milliseconds:
a runtime (bundler.install.runtimes), a database engine behind the database facade
(bundler.install.db: backup, restore, fingerprint, wait_ready) and the migrations
(bundler.install.migrations.run, pending), and the health checks. They share one `World`:
what they did, in order, what the databases hold, and what they must fail at.

    world = fakes.install(monkeypatch)   # every Release now runs on a FakeRuntime
    world.fail["start:2.0.0"] = InstallError("boom")
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bundler.bundle.manifest import Manifest
from bundler.errors import InstallError
from bundler.install import db as engines
from bundler.install import health, migrations, runtimes
from bundler.install.environ import ReleaseEnv
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.runtimes import HostCheck, NodeDown, UnitState


@dataclass
class World:
    """Everything the fakes did, and what they should do next."""

    calls: list[str] = field(default_factory=list)  # "start:2.0.0", "backup:app", ...
    fail: dict[str, BaseException] = field(default_factory=dict)  # call -> raised instead
    running: set[str] = field(default_factory=set)  # versions whose units run
    unhealthy: set[str] = field(default_factory=set)  # versions whose checks fail
    data: dict[str | None, str] = field(default_factory=dict)  # database name -> contents
    backups: dict[str, str] = field(default_factory=dict)  # backup file -> contents saved
    migrated_to: str = "v2"  # what a migration writes
    containers: bool = False  # the fake runtime runs containers (a shared project)
    rolling: bool = False

    def act(self, call: str) -> None:
        self.calls.append(call)
        if call in self.fail:
            raise self.fail.pop(call)

    def only(self, prefix: str) -> list[str]:
        return [c for c in self.calls if c.startswith(prefix)]


class FakeRuntime:
    """The `Runtime` protocol, recording into the World instead of running anything."""

    world: ClassVar[World]
    kind: ClassVar[str] = "fake"
    boot_unit: ClassVar[bool] = False  # never a systemd unit from a unit test
    service_label: ClassVar[str] = "service"

    def __init__(self, layout: Layout, rel: ReleaseDir, manifest: Manifest,
                 environment: str) -> None:
        self.layout, self.rel, self.manifest = layout, rel, manifest
        self.version = manifest.version

    @property
    def containers(self) -> bool:
        return self.world.containers

    @property
    def rolling(self) -> bool:
        return self.world.rolling

    def preflight(self, env: ReleaseEnv, allow_degraded: bool) -> list[NodeDown]:
        self.world.act(f"preflight:{self.version}")
        return []

    def host_checks(self, env: ReleaseEnv) -> list[HostCheck]:
        return []

    def load_images(self, log: Any) -> list[str] | None:
        self.world.act(f"images:{self.version}")
        return None

    def start(self) -> None:
        self.world.act(f"start:{self.version}")
        self.world.running.add(self.version)

    def stop(self, keep_containers: bool = False) -> None:
        self.world.act(f"stop:{self.version}" + (":keep" if keep_containers else ""))
        self.world.running.discard(self.version)

    def quiesce(self, keep: tuple[str, ...] = ()) -> None:
        self.world.act(f"quiesce:{self.version}")
        self.world.running.discard(self.version)

    def states(self) -> list[UnitState]:
        return [UnitState("web", self.version in self.world.running, "fake")]

    def failures(self) -> list[str]:
        return []

    def crashed(self, since: float | None) -> list[str]:
        return []

    def service_exec(self, service: str) -> engines.ServiceExec:
        raise InstallError(f"release {self.version} has no compose project")

    def ensure_service(self, service: str) -> bool:
        raise InstallError(f"release {self.version} has no compose project")

    def oneoff_runner(self) -> migrations.ServiceRun | None:
        return None

    def interpolation_env(self, values: dict[str, str], bundled_dotenv: dict[str, str] | None
                          ) -> dict[str, str | None] | None:
        return None

    def unrestarted(self) -> list[str]:
        return []


class FakeEngine:
    """The database facade's functions, over the World's `data` (one string per database)."""

    def __init__(self, world: World) -> None:
        self.world = world

    def backup(self, db: engines.Database, dest_dir: Path, env: Mapping[str, str], log: Any,
               *, exec_in_service: Any = None) -> engines.Backup:
        self.world.act(f"backup:{db.name}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        path = dest_dir / f"{db.name or 'db'}-{len(self.world.backups)}.fake"
        contents = self.world.data[db.name]
        path.write_text(contents)
        self.world.backups[str(path)] = contents
        return engines.Backup(path, "fake", len(contents),
                               hashlib.sha256(contents.encode()).hexdigest(), "now")

    def restore(self, db: engines.Database, made: engines.Backup, env: Mapping[str, str],
                log: Any, *, exec_in_service: Any = None) -> None:
        self.world.act(f"restore:{db.name}")
        self.world.data[db.name] = self.world.backups[str(made.path)]

    def fingerprint(self, db: engines.Database, env: Mapping[str, str], *,
                    exec_in_service: Any = None) -> str:
        self.world.act(f"fingerprint:{db.name}")
        return hashlib.sha256(self.world.data[db.name].encode()).hexdigest()[:12]

    def wait_ready(self, *args: Any, **kwargs: Any) -> None:
        return None

    def migrate(self, steps: Sequence[migrations.Migration], db: engines.Database,
                *args: Any, **kwargs: Any) -> list[migrations.MigrationResult]:
        self.world.data[db.name] = "half-migrated"  # a failure leaves it half done
        self.world.act(f"migrate:{db.name}")
        self.world.data[db.name] = self.world.migrated_to
        return [migrations.MigrationResult(s.name, s.kind, ("001.sql",), "") for s in steps]

    def pending(self, steps: Sequence[migrations.Migration], *args: Any,
                **kwargs: Any) -> list[migrations.MigrationResult]:
        return [migrations.MigrationResult(s.name, s.kind, (), "") for s in steps]


def fake_checks(world: World) -> Any:
    """health.run_all: every check of a release passes unless its version is unhealthy (the
    version is the release environment's `{release}`)."""
    def run_all(checks: tuple[Any, ...], env: ReleaseEnv, retries: Any = None,
                user: Any = None, crashed: Any = None) -> list[CheckResult]:
        version = Path(dict(env.places).get("{release}", "?")).name
        world.calls.append(f"check:{version}")
        ok = version not in world.unhealthy
        return [CheckResult(c.name, c.kind, ok, 1, "fine" if ok else "connection refused")
                for c in checks]
    return run_all


def install(monkeypatch: pytest.MonkeyPatch, world: World | None = None) -> World:
    """Every Release built from now on runs on a FakeRuntime; the database facade, the
    migrations and the health checks are the World's."""
    world = world or World()
    FakeRuntime.world = world
    monkeypatch.setattr(runtimes, "pick", lambda layout, m: FakeRuntime)
    engine = FakeEngine(world)
    for name in ("backup", "restore", "fingerprint", "wait_ready"):
        monkeypatch.setattr(engines, name, getattr(engine, name))
    monkeypatch.setattr(migrations, "run", engine.migrate)
    monkeypatch.setattr(migrations, "pending", engine.pending)
    monkeypatch.setattr(health, "run_all", fake_checks(world))
    return world
