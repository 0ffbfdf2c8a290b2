"""`bundle install`: verify → stage → the install's steps (bundler.install.steps) → commit, or
roll back.

Order matters for safety:
1. The envelope's signature is checked, and the manifest is checked against this host's
   policy (product, sequence, target Python, disk space, host policy, the runtime's own
   preflight), before anything is created.
2. Payloads are verified while streamed into a hidden staging directory; on any mismatch the
   staging directory (and the root, if this run created it) is removed: the host is as before.
3. Only a fully verified tree becomes `releases/<version>`; `current` is switched only after the
   new release is healthy. A failure unwinds the steps that ran, each with its own undo: the
   new release stops, the databases are restored, the previous release restarts.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bundler import ui
from bundler.bundle import archive
from bundler.bundle.manifest import Manifest
from bundler.bundle.signing import Trust
from bundler.errors import (
    BundlerError,
    Interrupted,
    MigrationError,
    RollbackFailedError,
    RolledBackError,
    SpaceError,
    StateError,
    disk_full,
)
from bundler.faults import fault_point
from bundler.fsutil import free_bytes, human_bytes, make_dir, require_space
from bundler.install import (
    boot,
    datadirs,
    delta,
    environ,
    hostpolicy,
    node_runtime,
    policy,
    recovery,
    report,
    runas,
    steps,
    store,
)
from bundler.install import db as engines
from bundler.install.health import CheckResult
from bundler.install.journal import Journal, reason
from bundler.install.layout import Layout, ReleaseDir, locked
from bundler.install.release import Release
from bundler.install.state import State, new_txn

# A venv plus installed packages take a few times the wheels' size; be generous up front
# rather than fail half-way.
VENV_FACTOR = 4
VENV_BASE = 64 * 1024 * 1024


@dataclass(frozen=True)
class InstallResult:
    version: str
    previous: str | None
    status: str  # "installed" | "unchanged"
    checks: tuple[CheckResult, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "previous": self.previous, "status": self.status,
                "checks": [c.to_json() for c in self.checks]}


@dataclass(frozen=True)
class Options:
    """What the operator asked for, beyond the bundle and its trust.

    `db_choice`: how to settle a pending database restore left by an interrupted install
    ("restore" / "keep"; None: only when nothing was written since, see recovery).
    `allow_degraded`: on a swarm, go on while some nodes are down (else refused).
    `allow`: what the release may ask of the host beyond the root's policy (`--allow`).
    `reuse`: clone a venv or node_modules an earlier release made from the same inputs
    (`--no-reuse`: install them all from the bundle's packages)."""

    allow_downgrade: bool = False
    environment: str = "production"
    db_choice: str | None = None
    allow_degraded: bool = False
    allow: tuple[str, ...] = ()
    reuse: bool = True


# A carried Node.js unpacks to about 4x its tarballs (node 20: 46 MB -> 168 MB).
RUNTIME_FACTOR = 4


def space_needed(manifest: Manifest, root: Path | None = None) -> int:
    """Bytes an install takes; a carried runtime already unpacked under `root` (shared between
    releases) takes none."""
    wheels = sum(f.size for f in manifest.files if f.kind == "wheel")
    runtimes = sum(f.size for f in manifest.files if f.kind == "runtime")
    if root is not None and manifest.runtimes is not None \
            and node_runtime.shared_ready(root, manifest):
        runtimes = 0
    return (manifest.travel_size + wheels * VENV_FACTOR + (VENV_BASE if wheels else 0)
            + runtimes * RUNTIME_FACTOR)


def install(source: Path, trusted: Trust, root: Path | Layout,
            options: Options | None = None) -> InstallResult:
    layout = root if isinstance(root, Layout) else Layout(root.resolve())
    options = options or Options()
    grants = hostpolicy.flag_grants(options.allow)  # a bad --allow: refused before anything
    try:
        return _install(layout, source, trusted, options, grants)
    except (BundlerError, OSError, sqlite3.Error) as exc:
        if isinstance(exc, (SpaceError, RollbackFailedError, Interrupted)) \
                or not disk_full(exc):
            raise
        raise _disk_full_error(reason(exc), layout) from exc


def _disk_full_error(what: str, layout: Layout, root_full: bool = True) -> SpaceError:
    """A write failed for lack of space (staging, venv, bytecode, npm tree, backup, journal,
    logs; or the database's or the engine's disk, `root_full` False): the install stopped and
    was undone. Exit 9, with what is serving now."""
    try:
        serving = layout.current_version()
    except StateError:
        serving = None
    after = "then run the same install again; " + (
        f"{serving} is serving" if serving else "nothing was installed")
    if not root_full:
        return SpaceError(
            f"{what.splitlines()[0]} (a disk ran out of space, not the one holding "
            f"{layout.root}: the database's, the Docker engine's or the temporary directory's)",
            hint=f"free space on the disk the error names (`df -h`), {after}")
    free = human_bytes(free_bytes(layout.root))
    return SpaceError(
        f"{what.splitlines()[0]} (the filesystem of {layout.root} ran out of space; {free} "
        "free after the undo)",
        hint=f"free space there (`df -h {layout.root}`; `du -sh {layout.root}/*` shows "
             f"bundler's share), {after}")


def _install(layout: Layout, source: Path, trusted: Trust, options: Options,
             grants: tuple[hostpolicy.Grant, ...]) -> InstallResult:
    with archive.open_bundle(source, trusted) as reader:
        ui.step(f"Verifying signature of {reader.label}")
        verified = reader.read_envelope()
        m = verified.manifest
        ui.note(f"{m.name} {m.version} (sequence {m.sequence}), signed by key {verified.keyid}")
        decision = policy.decide(m, verified.digest, layout, options.allow_downgrade)
        env = environ.release_env(layout, m.runtime.env, options.environment, version=m.version)
        new = Release.of(layout, m, env.environment)
        _check_release(new, env)
        if decision.already_current:
            with locked(layout.root):
                return _ensure_running(new, options)
        # A delta: what it leaves to the host must be here, intact (re-hashed), before
        # anything is created.
        delta.preflight(layout, m)
        # What it asks of the host (privileges, host mounts, root), as its manifest says.
        hostpolicy.check_manifest(layout, m, env.as_dict(), grants, _current_manifest(layout))
        down = new.runtime.preflight(env, options.allow_degraded)  # nodes, ports: nothing yet
        require_space(layout.root, space_needed(m, layout.root) + datadirs.space_needed(layout, m),
                      f"installing {m.name} {m.version}")
        with _fresh_root(layout.root) as created_root, locked(layout.root):
            staging: Path | None = None
            try:
                # Again under the lock: a concurrent install may have accepted a newer
                # sequence (or this very bundle) since the first look.
                decision = policy.recheck(m, verified.digest, layout, options.allow_downgrade,
                                          decision)
                if decision.already_current:
                    return _ensure_running(new, options)
                staging = layout.new_staging()
                ui.step(f"Verifying and staging {len(m.files)} file(s)")
                fault_point("extract")
                with ui.bytes_progress("verifying", m.travel_size) as advance:
                    reader.extract(staging, advance)
                if m.from_host:
                    ui.step(f"Taking {len(m.from_host)} file(s) the delta leaves to the host "
                            "from the store")
                    store.supply(layout, m, staging)
                # Again on the verified compose files themselves: the manifest's record of
                # them is the signer's word. Refused: only the staging directory goes.
                asked = hostpolicy.check_files(layout, m, env.as_dict(), staging / "files",
                                               grants, _current_manifest(layout))
            except BaseException:
                if staging is not None:
                    shutil.rmtree(layout.removable_staging(staging), ignore_errors=True)
                if created_root:
                    with contextlib.suppress(OSError):
                        layout.root.rmdir()
                raise
            plan = steps.Plan(verified, decision, asked, tuple(down), options.reuse)
            return _install_staged(new, env, staging, plan, options.db_choice)


def _check_release(new: Release, env: environ.ReleaseEnv) -> None:
    """Before anything is created: its environment, accounts, data directories, databases."""
    m, layout = new.manifest, new.layout
    environ.check_required(env, m.runtime.env, layout)
    environ.check_references(env, m, layout)
    runas.preflight(m, layout, env)  # the release's `user` exists and can work here
    datadirs.check(layout, m)  # its data directories are usable (never symlinks)
    for db in new.databases(env):
        engines.check_url(db, env.as_dict())  # a bad URL: refused before any write


def _current_manifest(layout: Layout) -> Manifest | None:
    current = layout.current_version()
    return ReleaseDir(layout.release(current)).manifest() if current else None


@contextlib.contextmanager
def _fresh_root(root: Path) -> Iterator[bool]:
    created = not root.exists()
    make_dir(root, 0o755)  # explicit modes, never the umask's
    yield created


def _ensure_running(new: Release, options: Options) -> InstallResult:
    """This exact bundle is current already: start anything that is down, and check it.
    Call under the root lock."""
    m, layout = new.manifest, new.layout
    ui.step(f"{m.name} {m.version} is already the current release")
    recovery.recover(layout, db_choice=options.db_choice)
    release = Release.require(layout, m.version)  # as installed (its own environment)
    crashed = release.watch()
    release.start()
    checks = new.check(crashed)  # with the environment asked for now
    with boot.at_commit(layout, m):  # set up again if missing (e.g. after `bundle uninstall`)
        pass
    return InstallResult(m.version, None, "unchanged", tuple(checks))


def _install_staged(new: Release, env: environ.ReleaseEnv, staging: Path, plan: steps.Plan,
                    db_choice: str | None) -> InstallResult:
    layout = new.layout
    # Only now, with the new bundle verified: a refused bundle must change nothing at all.
    try:
        recovery.recover(layout, keep=staging, db_choice=db_choice)
    except BaseException:
        shutil.rmtree(layout.removable_staging(staging), ignore_errors=True)
        raise
    state = State.open(layout.db)
    previous = layout.current_version()
    a = steps.Attempt(layout, state, Journal(state, new_txn(), new.version), plan, new, env,
                      staging, previous, Release.load(layout, previous) if previous else None,
                      new.databases(env))
    try:
        try:
            steps.run(a)
        except BaseException as exc:
            error = _failed(a, exc)
            if error is exc:
                raise
            raise error from (exc if a.disk_full else None)
        # Committed: nothing from here on may undo it (a full disk fails the report only).
        report.write(a, "installed")
        _prune(layout, state, new.manifest.runtime.install.keep)
        state.make_reserve()
        return InstallResult(new.version, previous, "installed", tuple(a.checks))
    finally:
        state.close()


def _failed(a: steps.Attempt, exc: BaseException) -> BaseException:
    """The error to raise for `exc`, once its undo ran (the report written either way)."""
    if a.new.dir.path.is_dir():
        report.write(a, "rolled back" if a.started else "failed")
    if isinstance(exc, RollbackFailedError):  # the undo failed: left for recovery
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted("interrupted; the new release was removed and the previous one "
                           "restored")
    rolled = f"{a.version} failed and was rolled back" + (
        f" to {a.previous_version}" if a.previous_version else "") + f": {a.reason}"
    if a.disk_full:
        return _disk_full_error(rolled if a.started else a.reason, a.layout, a.root_full)
    if a.started:
        # A failed migration keeps its own exit code: the release is rolled back either
        # way, but automation should know the database was what failed.
        return (MigrationError if isinstance(exc, MigrationError) else RolledBackError)(rolled)
    return exc


def _prune(layout: Layout, state: State, keep: int) -> None:
    """Keep the current release, the newest `keep - 1` others that passed their checks
    (rollback targets), and the newest one that never did, for inspection (its logs and
    REPORT.md): a failed release never takes a good one's slot. Older failed ones go. Runs
    after the commit: a failure here is reported, never undoes the installed release."""
    try:
        _prune_old(layout, state, keep)
    except (OSError, sqlite3.Error, BundlerError) as exc:
        ui.note(f"old releases not pruned ({reason(exc)}); the next install prunes them")


def _prune_old(layout: Layout, state: State, keep: int) -> None:
    current = layout.current_version()
    old = [r for r in state.releases()
           if r.version != current and r.status in ("superseded", "rolled_back")]
    good = [r for r in old if state.passed_checks(r.version)]
    failed = [r for r in old if r not in good]
    doomed = good[:max(0, len(good) - (keep - 1))] + failed[:-1]
    for row in sorted(doomed, key=old.index):
        try:
            path = layout.removable_release(layout.release(row.version))
        except StateError as exc:  # a row from an older bundler: keep it, say so
            ui.note(f"not pruned: {exc.message}")
            continue
        shutil.rmtree(path, ignore_errors=True)
        with state.tx():
            state.set_status(row.version, "pruned", row.detail)
    node_runtime.prune(layout.root, ui.note)  # the shared runtimes no release left links to
    store.collect(layout, ui.note)  # the store objects no kept release names
