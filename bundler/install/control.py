"""Operations on an installed root: status, history, stop, start."""

from __future__ import annotations

from dataclasses import dataclass

from bundler.errors import StateError
from bundler.install.environ import remember_shared
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, locked
from bundler.install.recovery import Pending, check_recorded_manifest, pending
from bundler.install.release import Release
from bundler.install.runtimes import UnitState
from bundler.install.state import Event, ReleaseRow, State
from bundler.progname import cmd


@dataclass(frozen=True)
class Status:
    root: str
    product: str | None
    current: ReleaseRow | None
    services: tuple[UnitState, ...]
    checks: tuple[CheckResult, ...]
    releases: tuple[ReleaseRow, ...]
    pending: Pending | None = None  # an interrupted install that recovery has not settled

    @property
    def healthy(self) -> bool:
        return self.current is not None and all(c.ok for c in self.checks) and all(
            s.running for s in self.services)

    def to_json(self) -> dict[str, object]:
        return {
            "root": self.root,
            "product": self.product,
            "current": self.current.__dict__ if self.current else None,
            "healthy": self.healthy,
            "services": [s.to_json() for s in self.services],
            "checks": [c.to_json() for c in self.checks],
            "releases": [r.__dict__ for r in self.releases],
            "pending_recovery": self.pending.to_json() if self.pending else None,
        }


def current_release(layout: Layout) -> Release | None:
    version = layout.current_version()
    if version is None:
        return None
    found = Release.load(layout, version)
    if found is None:
        raise StateError(f"release {version} has no readable manifest",
                         hint="the release directory is damaged; "
                              f"`{cmd('rollback', '--root', layout.root)}` returns to a kept "
                              "release")
    return found


def status(layout: Layout) -> Status:
    remember_shared(layout)  # what the stored state quotes is masked (see bundler.redact)
    state = State.open(layout.db, create=False)
    try:
        product = state.product()
        found = current_release(layout)
        row = state.release(found.version) if found else None
        releases = tuple(state.releases())
        stuck = pending(state)
    finally:
        state.close()
    services: tuple[UnitState, ...] = ()
    checks: tuple[CheckResult, ...] = ()
    if found:
        services = tuple(found.runtime.states())
        checks = tuple(found.check(retries=1))
    return Status(str(layout.root), product[0] if product else None, row, services, checks,
                  releases, stuck)


def history(layout: Layout) -> list[Event]:
    remember_shared(layout)  # rows written before a value counted as secret: masked now
    state = State.open(layout.db, create=False)
    try:
        return state.events()
    finally:
        state.close()


def stop(layout: Layout) -> str:
    found = _require_current(layout)
    with locked(layout.root):
        found.stop()
    return found.version


def start(layout: Layout) -> tuple[str, list[CheckResult]]:
    release = _require_current(layout)
    check_recorded_manifest(layout, release.version)
    state = State.open_readonly(layout.db)
    stuck = pending(state) if state is not None else None
    if state is not None:
        state.close()
    if stuck is not None:  # starting the old release on a half-migrated database: no
        raise StateError(f"an install is not settled: {stuck.describe()}",
                         hint=f"`{cmd('recover', '--root', layout.root)}` settles it first")
    with locked(layout.root):
        crashed = release.watch()
        release.start()
    return release.version, release.check(crashed)


def _require_current(layout: Layout) -> Release:
    found = current_release(layout)
    if found is None:
        raise StateError(f"no current release under {layout.root}",
                         hint="install one with "
                              f"`{cmd('install', 'BUNDLE', '--root', layout.root)}`")
    return found
