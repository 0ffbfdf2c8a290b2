"""`bundle install`: verify → stage → python → start → health → commit, or roll back.

Order matters for safety:
1. The envelope's signature is checked, and the manifest is checked against this host's
   policy (product, sequence, target Python, disk space), before anything is created.
2. Payloads are verified while streamed into a hidden staging directory; on any mismatch the
   staging directory (and the root, if this run created it) is removed: the host is as before.
3. Only a fully verified tree becomes `releases/<version>`; `current` is switched only after the
   new release is healthy. A failure after start stops it and restarts the previous release.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from bundler import proc, ui
from bundler.bundle import archive, nodetree
from bundler.bundle.manifest import IMAGES_PATH, Manifest
from bundler.bundle.models import MigrationSpec, NpmProject
from bundler.bundle.signing import TrustedKey, Verified
from bundler.errors import (
    BundlerError,
    Cancelled,
    InstallError,
    Interrupted,
    MigrationError,
    RollbackFailedError,
    RolledBackError,
    SpaceError,
    StateError,
    disk_full,
)
from bundler.faults import fault_point
from bundler.fsutil import (
    atomic_symlink,
    atomic_write_bytes,
    free_bytes,
    human_bytes,
    make_dir,
    nearly_full,
    private_dir,
    require_space,
)
from bundler.install import (
    boot,
    database,
    datadirs,
    environ,
    health,
    hostpolicy,
    migrations,
    policy,
    ports,
    python_env,
    recovery,
    runas,
    runtime,
    swarm_runtime,
)
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, ReleaseDir, locked
from bundler.install.state import ReleaseRow, State, new_txn, now

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


# A carried Node.js unpacks to about 4x its tarballs (node 20: 46 MB -> 168 MB).
RUNTIME_FACTOR = 4


def space_needed(manifest: Manifest, root: Path | None = None) -> int:
    """Bytes an install takes; a carried runtime already unpacked under `root` (shared between
    releases) takes none."""
    from bundler.install import node_runtime

    wheels = sum(f.size for f in manifest.files if f.kind == "wheel")
    runtimes = sum(f.size for f in manifest.files if f.kind == "runtime")
    if root is not None and manifest.runtimes is not None \
            and node_runtime.shared_ready(root, manifest):
        runtimes = 0
    return (manifest.payload_size + wheels * VENV_FACTOR + (VENV_BASE if wheels else 0)
            + runtimes * RUNTIME_FACTOR)


def install(source: Path, trusted: list[TrustedKey], root: Path,
            allow_downgrade: bool = False, environment: str = "production",
            db_choice: str | None = None, allow_degraded: bool = False,
            allow: tuple[str, ...] = ()) -> InstallResult:
    """`db_choice`: how to settle a pending database restore left by an interrupted install
    ("restore" / "keep"; None: only when nothing was written since, see recovery).
    `allow_degraded`: on a swarm, go on while some nodes are down (else refused).
    `allow`: what the release may ask of the host beyond the root's policy (`--allow`)."""
    layout = Layout(root.resolve())
    grants = hostpolicy.flag_grants(allow)  # a bad --allow: refused before anything
    try:
        return _install(layout, source, trusted, allow_downgrade, environment, db_choice,
                        allow_degraded, grants)
    except (BundlerError, OSError, sqlite3.Error) as exc:
        if isinstance(exc, (SpaceError, RollbackFailedError, Interrupted)) \
                or not disk_full(exc):
            raise
        raise _disk_full_error(_reason(exc), layout) from exc


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


def _install(layout: Layout, source: Path, trusted: list[TrustedKey],
             allow_downgrade: bool, environment: str, db_choice: str | None,
             allow_degraded: bool, grants: tuple[hostpolicy.Grant, ...]) -> InstallResult:
    with archive.open_bundle(source, trusted) as reader:
        ui.step(f"Verifying signature of {reader.label}")
        verified = reader.read_envelope()
        m = verified.manifest
        ui.note(f"{m.name} {m.version} (sequence {m.sequence}), signed by key {verified.keyid}")
        decision = policy.decide(m, verified.digest, layout, allow_downgrade)
        env = environ.release_env(layout, m.runtime.env, environment, version=m.version)
        environ.check_required(env, m.runtime.env, layout)
        environ.check_references(env, m, layout)
        runas.preflight(m, layout, env)  # the release's `user` exists and can work here
        datadirs.check(layout, m)  # its data directories are usable (never symlinks)
        for db in _databases(m, env):
            database.check_url(db, env.as_dict())  # a bad URL: refused before any write
        if decision.already_current:
            with locked(layout.root):
                return _ensure_running(layout, m, environment, db_choice)
        # What it asks of the host (privileges, host mounts, root), as its manifest says.
        hostpolicy.check_manifest(layout, m, env.as_dict(), grants, _current_manifest(layout))
        down: list[swarm_runtime.NodeState] = []
        if m.runtime.compose is not None and swarm_runtime.configured(layout.root):
            # Every node up and its engine answering, before anything changes.
            down = swarm_runtime.preflight(layout.root, allow_degraded)
        else:
            ports.refuse_foreign(layout, m, env)
            runtime.refuse_foreign_project(layout, m)
        require_space(layout.root, space_needed(m, layout.root) + datadirs.space_needed(layout, m),
                      f"installing {m.name} {m.version}")
        with _fresh_root(layout.root) as created_root, locked(layout.root):
            staging: Path | None = None
            try:
                # Again under the lock: a concurrent install may have accepted a newer
                # sequence (or this very bundle) since the first look.
                decision = policy.decide(m, verified.digest, layout, allow_downgrade)
                if decision.already_current:
                    return _ensure_running(layout, m, environment, db_choice)
                staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=layout.root))
                ui.step(f"Verifying and staging {len(m.files)} file(s)")
                fault_point("extract")
                with ui.bytes_progress("verifying", m.payload_size) as advance:
                    reader.extract(staging, advance)
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
            return _install_staged(layout, verified, staging, decision, env, db_choice, down,
                                   asked)


def _current_manifest(layout: Layout) -> Manifest | None:
    current = layout.current_version()
    return ReleaseDir(layout.release(current)).manifest() if current else None


@contextlib.contextmanager
def _fresh_root(root: Path) -> Iterator[bool]:
    created = not root.exists()
    make_dir(root, 0o755)  # explicit modes, never the umask's
    yield created


def _ensure_running(layout: Layout, m: Manifest, environment: str,
                    db_choice: str | None) -> InstallResult:
    """This exact bundle is current already: start anything that is down, and check it.
    Call under the root lock."""
    ui.step(f"{m.name} {m.version} is already the current release")
    recovery.recover(layout, db_choice=db_choice)
    crashed = runtime.watch(layout, m.version)
    runtime.start(layout, m.version)
    checks = health.run_all(m.runtime.health, environ.release_env(
        layout, m.runtime.env, environment, version=m.version), user=m.runtime.user,
        crashed=crashed)
    with boot.at_commit(layout, m):  # set up again if missing (e.g. after `bundle uninstall`)
        pass
    return InstallResult(m.version, None, "unchanged", tuple(checks))


def _install_staged(layout: Layout, verified: Verified, staging: Path,
                    decision: policy.Decision, env: environ.ReleaseEnv,
                    db_choice: str | None, down: list[swarm_runtime.NodeState],
                    asked: hostpolicy.Outcome) -> InstallResult:
    m = verified.manifest
    # Only now, with the new bundle verified: a refused bundle must change nothing at all.
    try:
        recovery.recover(layout, keep=staging, db_choice=db_choice)
    except BaseException:
        shutil.rmtree(layout.removable_staging(staging), ignore_errors=True)
        raise
    state = State.open(layout.db)
    txn = new_txn()
    journal = _Journal(state, txn, m.version)
    previous = layout.current_version()
    prev_rel = ReleaseDir(layout.release(previous)) if previous else None
    prev_manifest = prev_rel.manifest() if prev_rel else None
    prev_env = prev_rel.environment() if prev_rel else env.environment
    rel = ReleaseDir(layout.release(m.version))
    started = False
    undo = _UndoDb()
    report_checks: list[CheckResult] = []
    try:
        with state.tx():
            state.bind_product(m.name)  # at the first attempt, not the first success
            state.upsert_release(ReleaseRow(m.version, m.name, m.sequence, verified.digest,
                                            verified.keyid, "installing", now(), txn=txn))
            journal.record("verify", "done", f"sequence {m.sequence}, key {verified.keyid}")
            if decision.downgrade:
                journal.record("downgrade", "allowed",
                               f"sequence {m.sequence} accepted with --allow-downgrade")
            if asked.allowed:
                journal.record("host-policy", "allowed", asked.journal())
                ui.note(f"host policy allows: {asked.journal()}")
            if down:
                journal.record("degraded", "allowed", "--allow-degraded with node(s) down: "
                               + "; ".join(f"{n.name} ({n.state})" for n in down))
        _place(layout, rel, staging, verified, previous)
        atomic_write_bytes(rel.meta / "environment", env.environment.encode())
        if down:
            atomic_write_bytes(runtime.degraded_marker(rel),
                               ", ".join(n.name for n in down).encode())
        _install_packages(journal, rel, m, decision, layout)
        dbs = _databases(m, env)
        services = tuple(d.compose_service for d in dbs if d.compose_service)
        for db in dbs:
            if db.compose_service:
                # The running release's project serves the database; on a first install (or
                # after `bundle stop`) it is started alone, so it can be backed up and migrated.
                host = previous if runtime.uses_compose(layout, previous) else m.version
                assert host is not None
                with journal.step("database-service",
                                  f"Checking the database service {db.compose_service}"):
                    if runtime.ensure_database(layout, host, db, env.as_dict()):
                        undo.service_started = True
        migrating = bool(m.runtime.migrations) and bool(dbs)
        if migrating and previous is not None and runtime.uses_swarm(layout, previous) \
                and not _work_pending(m, rel, env, dbs):
            # Nothing to migrate: a rolling update with the previous release serving
            # throughout. Its writes after the backup (a safety copy) are never restored over.
            migrating = False
        if migrating and prev_manifest is not None and previous is not None:
            # Data first: nothing may write between the backup and the migrations, or a
            # restore would discard those writes. The database services themselves stay up.
            started = True  # the running services are touched: undo restarts them
            with journal.step("stop-previous", f"Stopping {previous} (no writes during the "
                                               "backup and migrations)"):
                runtime.quiesce(layout, previous, keep=services)
        for db in dbs:
            # Every database before any migration: a failure in the last one restores them all.
            with journal.step("backup", f"Backing up the database {db.label}"):
                taken = database.backup(db, layout.root / "backups", env.as_dict(), ui.note,
                                        exec_in_service=runtime.service_exec(layout, m.version,
                                                                             db))
            undo.backups.append((db, taken))
            journal.record("backup", "file", json.dumps(_backup_json(db, taken)))
        if not started and prev_manifest is not None and previous is not None:
            started = True  # from here on the running services are touched: undo restarts them
            with journal.step("stop-previous", f"Stopping {previous}"):
                # A compose project is updated in place by the new release's `up`.
                runtime.stop(layout, previous, keep_compose=m.runtime.compose is not None)
        started = True
        # The data directories, with the previous release stopped: created and owned right,
        # then backed up (before a migration, or always when asked): restored with the
        # databases if this install fails.
        datadirs.prepare(layout, m)
        for spec in datadirs.due(m, migrating):
            with journal.step("data-backup", f"Backing up the data directory {spec.name}"):
                made = datadirs.backup(layout, spec)
            undo.data.append(made)
            journal.record("data-backup", "file", json.dumps(made.to_json()))
        if migrating:
            # What each database looks like as migrations begin: a later recovery restores a
            # backup by itself only if nothing has written to that database since.
            for db in dbs:
                journal.record("db-state", _state_key("before-migrate", db), database.fingerprint(
                    db, env.as_dict(), exec_in_service=runtime.service_exec(layout, m.version,
                                                                            db)))
            undo.migrating = True
            by_name = {d.name: d for d in dbs}
            with journal.step("migrate", f"Running {len(m.runtime.migrations)} migration(s)"):
                results: list[migrations.MigrationResult] = []
                for target_db, group in _migration_groups(m, by_name):
                    results += migrations.run(
                        _migration_steps(m, group, env),
                        target_db, rel.files, rel.venv if rel.venv.is_dir() else None,
                        _with_node(env.as_dict(), rel),
                        ui.note, runtime.oneoff_runner(layout, m.version),
                        db_exec=runtime.service_exec(layout, m.version, target_db))
            journal.record("migrate", "applied", "; ".join(
                f"{r.name}: {', '.join(r.applied) or 'nothing new'}" for r in results))
        crashed = runtime.watch(layout, m.version)
        with journal.step("start", f"Starting {m.version}"):
            runtime.start(layout, m.version)
        ui.step("Health-checking")
        fault_point("health")  # started, not yet checked
        checks = health.run_all(m.runtime.health, env, user=m.runtime.user, crashed=crashed)
        report_checks = checks
        failed = [c for c in checks if not c.ok]
        if failed:
            journal.record("health", "failed", failed[0].detail)
            # The cause, not only the symptom: what the runtime says (with the service's last
            # output), unless the check gave up on that very evidence and says it already.
            why = [] if failed[0].evidence else _cause(crashed, layout, m.version)
            raise _HealthFailed(f"health check {failed[0].name!r} failed: {failed[0].detail}"
                                + (f"; {'; '.join(why)}" if why else ""))
        journal.record("health", "done", "; ".join(c.detail for c in checks))
        # bin/ and the boot unit go in with the switch, and back out if it fails (boot.py)
        with boot.at_commit(layout, m, journal.record), state.tx():
            atomic_symlink(os.path.join("releases", m.version), layout.current)
            fault_point("commit")  # switched, not yet recorded: recovery must finish it
            if previous and previous != m.version:
                state.set_status(previous, "superseded")
            state.set_status(m.version, "active")
            state.accept_sequence(m.name, m.sequence)
            journal.record("commit", "done", f"current -> {m.version}")
        fault_point("committed")
    except BaseException as exc:
        reason = _reason(exc)
        root_full = nearly_full(layout.root)
        undo.disk_full = disk_full(exc) or root_full
        if undo.disk_full:
            state.release_reserve()  # room to journal the rollback
        try:
            _undo(layout, state, journal, m, rel, previous, prev_manifest, started, reason,
                  prev_env, undo, env)
        finally:
            if rel.path.is_dir():
                _write_report(rel, m, state, journal, report_checks,
                              "rolled back" if started else "failed", reason, undo, env)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted("interrupted; the new release was removed and the previous one "
                              "restored") from None
        if undo.disk_full:
            what = (f"{m.version} failed and was rolled back"
                    f"{' to ' + previous if previous else ''}: {reason}") if started else reason
            raise _disk_full_error(what, layout, root_full) from exc
        if started:
            # A failed migration keeps its own exit code: the release is rolled back either
            # way, but automation should know the database was what failed.
            kind = MigrationError if isinstance(exc, MigrationError) else RolledBackError
            raise kind(f"{m.version} failed and was rolled back"
                       f"{' to ' + previous if previous else ''}: {reason}") from None
        raise
    else:
        # Committed: nothing from here on may undo it (a full disk fails the report only).
        _write_report(rel, m, state, journal, checks, "installed", "", undo, env)
        _prune(layout, state, m.runtime.install.keep)
        state.make_reserve()
        return InstallResult(m.version, previous, "installed", tuple(checks))
    finally:
        state.close()


def _install_packages(journal: _Journal, rel: ReleaseDir, m: Manifest,
                      decision: policy.Decision, layout: Layout) -> None:
    """Load the images, fill the venv and install each npm project (after the carried
    Node.js, which they run): these do not depend on each other, so they run at the same time,
    each journaled as its own step. The first failure stops the others (their commands are
    terminated, steps not yet begun never begin; an image load in flight is waited for) and
    is raised; Ctrl+C likewise."""
    tasks: list[tuple[str, Callable[[], None]]] = []
    if m.images:
        def images() -> None:
            with journal.step("images", f"Loading {len(m.images)} image(s) into the engine"), \
                    ui.activity("images: docker load"):
                from bundler.bundle.imagearchive import ImageRecord
                from bundler.install import images as image_loader

                records = [ImageRecord(i.ref, i.image_id) for i in m.images]
                if m.runtime.compose is not None and swarm_runtime.configured(layout.root):
                    # Into every node's engine, each checked there, before anything starts.
                    loaded = swarm_runtime.load_images(layout.root, rel.path / IMAGES_PATH,
                                                       records, ui.note)
                    journal.record("images", "nodes", ", ".join(loaded))
                else:
                    image_loader.load(rel.path / IMAGES_PATH, records, ui.note)
        tasks.append(("images", images))
    if m.python_lock and decision.python is not None:
        python, python_lock = decision.python, m.python_lock

        def python_step() -> None:
            with journal.step("python", "Installing Python packages offline"), \
                    ui.activity("python: uv pip install (offline)"):
                made = python_env.create_venv(python, rel.venv, rel.path / "python" / "wheels",
                                              rel.path / python_lock, rel.logs, ui.note)
                ui.note(f"venv ready; log: {made}")
        tasks.append(("python", python_step))
    node_ready = threading.Event()
    if m.runtimes is not None:
        runtimes = m.runtimes

        def node() -> None:
            with journal.step("runtime:node", f"Unpacking Node.js {runtimes.node.version} "
                                              "(carried in the bundle)"):
                from bundler.install import node_runtime

                node_runtime.install(rel.path, m, ui.note, layout.root)
            node_ready.set()
        tasks.append(("runtime:node", node))
    else:
        node_ready.set()
    for project in m.npm:
        def npm_step(project: NpmProject = project) -> None:
            while not node_ready.wait(0.1):
                scope.check()  # the runtime step failed: never begin
            scope.check()
            how = "pre-built node_modules" if project.tree else "npm ci --offline"
            with journal.step(f"npm:{project.dest}",
                              f"Installing npm packages offline into files/{project.dest}"), \
                    ui.activity(f"npm:{project.dest}: {how}"):
                _install_npm(rel, m, project)
        tasks.append((f"npm:{project.dest}", npm_step))
    if not tasks:
        return
    scope = proc.CancelScope()

    def run(task: Callable[[], None]) -> None:
        with proc.cancel_scope(scope):
            scope.check()
            task()

    if len(tasks) == 1:
        tasks[0][1]()
        return
    with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="install") as pool:
        futures = [pool.submit(run, task) for _, task in tasks]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl+C while the steps run: stop them, then roll back
            scope.cancel("interrupted")
            wait(futures)
            raise
        failed = [(name, f.exception()) for (name, _), f in zip(tasks, futures, strict=True)
                  if f.done() and f.exception() is not None]
        if failed:
            first_name, first = next(((n, e) for n, e in failed
                                      if not isinstance(e, Cancelled)), failed[0])
            scope.cancel(f"{first_name} failed")
            wait(futures)
            assert first is not None
            raise first


def _install_npm(rel: ReleaseDir, m: Manifest, project: NpmProject) -> None:
    from bundler.bundle.npmlock import NpmPackage
    from bundler.install import npm_env

    dest = rel.files / project.dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(rel.path / project.bundle_dir / name, dest / name)
    by_path = {f.path: f for f in m.files}
    if project.tree is not None and not (dest / nodetree.ROOT).exists():
        # Pre-built at build time (no install scripts, nothing platform-bound): written from
        # the one verified payload instead of running npm ci, whose time is all unpacking.
        entry = by_path[project.tree]
        files = nodetree.extract(rel.path / project.tree, entry.sha256, entry.size, dest)
        ui.note(f"npm: node_modules written from the bundle's pre-built tree ({files} files)")
        return
    packages = [NpmPackage(p.name, p.version, p.integrity, p.tarball,
                           by_path[p.tarball].sha256, by_path[p.tarball].size)
                for p in project.packages]
    npm_env.install_offline(dest, rel.path / "npm" / "tarballs", packages,
                            rel.path / "npm-cache", ui.note, project.omit_dev, dict(project.env),
                            release=rel.path, user=runas.maybe(m.runtime.user))


def _with_node(env: dict[str, str], rel: ReleaseDir) -> dict[str, str]:
    """The release's carried Node.js first on PATH (command migrations run it)."""
    from bundler.install import node_runtime

    return node_runtime.on_path(env, rel.path)


class _HealthFailed(BundlerError):
    pass


def _cause(crashed: health.Crashed, layout: Layout, version: str) -> list[str]:
    """Why the release's units are not up, for the error line (best effort: [] if unknown)."""
    try:
        return crashed() or runtime.failures(layout, version)
    except BundlerError:
        return []


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BundlerError):
        return exc.message.splitlines()[0]
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl+C)"
    return f"{type(exc).__name__}: {exc}"


def _place(layout: Layout, rel: ReleaseDir, staging: Path, verified: Verified,
           previous: str | None) -> None:
    """Move the verified staging tree to releases/<version>, replacing a dead earlier try."""
    make_dir(layout.releases, 0o755)
    private_dir(layout.root / "shared")  # where the operator's .env goes: 0700
    if rel.path.exists():
        if previous == rel.path.name:
            raise InstallError(f"version {rel.path.name} is current and this bundle differs "
                               "from it", hint="bump the version in the profile and build again")
        shutil.rmtree(layout.removable_release(rel.path))
    os.chmod(staging, 0o755)  # mkdtemp made it 0700
    os.replace(staging, rel.path)
    rel.meta.mkdir()
    os.chmod(rel.meta, 0o755)
    atomic_write_bytes(rel.meta / "manifest.json", verified.manifest_bytes)


@dataclasses.dataclass
class _UndoDb:
    """What the database part of an undo needs: the backups (one per database, in profile
    order), whether migrations began, whether this run started a database's compose service,
    and which databases were restored (by name; None: the single `database:`)."""

    backups: list[tuple[database.Database, database.Backup]] = dataclasses.field(
        default_factory=list)
    migrating: bool = False
    service_started: bool = False
    disk_full: bool = False  # the failure was a full disk: free what this install wrote
    restored_dbs: set[str | None] = dataclasses.field(default_factory=set)
    # The data directories backed up by this attempt, and those its undo put back.
    data: list[datadirs.DataBackup] = dataclasses.field(default_factory=list)
    data_restored: set[str] = dataclasses.field(default_factory=set)

    @property
    def backup(self) -> database.Backup | None:
        return self.backups[0][1] if self.backups else None

    @property
    def restored(self) -> bool:
        return bool(self.backups) and all(d.name in self.restored_dbs for d, _ in self.backups)


def _databases(m: Manifest, env: environ.ReleaseEnv) -> list[database.Database]:
    """Every database of the release, in profile order (one for a single `database:`)."""
    owner = runas.db_owner(m)
    return [database.Database(env.expand(spec.url), spec.compose_service, spec.name, owner)
            for spec in m.runtime.all_databases()]


def _migration_steps(m: Manifest, group: list[MigrationSpec], env: environ.ReleaseEnv
                     ) -> list[migrations.Migration]:
    return [migrations.Migration(x.name, x.kind, x.path, tuple(env.expand(a) for a in x.command),
                                 tuple((k, env.expand(v)) for k, v in x.env), x.service,
                                 user=m.runtime.user)
            for x in group]


def _work_pending(m: Manifest, rel: ReleaseDir, env: environ.ReleaseEnv,
                  dbs: list[database.Database]) -> bool:
    """Will the release's migrations change anything? SQL files not in the ledger, alembic
    heads not current; a command migration always may. Unknown (the database cannot be read
    from here): yes, the safe answer."""
    by_name = {d.name: d for d in dbs}
    venv = rel.venv if rel.venv.is_dir() else None
    try:
        for target_db, group in _migration_groups(m, by_name):
            steps = _migration_steps(m, group, env)
            if any(x.kind == "command" for x in steps):
                return True
            for r in migrations.pending(steps, target_db, rel.files, venv,
                                        _with_node(env.as_dict(), rel)):
                if r.applied:
                    return True
    except Exception:  # any doubt means: stop the writers
        return True
    return False


def _backup_json(db: database.Database, made: database.Backup) -> dict[str, object]:
    """The journaled `backup`/`file` detail: the Backup, plus the database's name if named."""
    return made.to_json() | ({"database": db.name} if db.name else {})


def _state_key(what: str, db: database.Database) -> str:
    """The `db-state` status a fingerprint is journaled under: per database when named."""
    return f"{what}:{db.name}" if db.name else what


def _migration_groups(m: Manifest, by_name: dict[str | None, database.Database]
                      ) -> list[tuple[database.Database, list[MigrationSpec]]]:
    """The release's migrations in profile order, cut into runs against one database each."""
    groups: list[tuple[database.Database, list[MigrationSpec]]] = []
    for x in m.runtime.migrations:
        spec = m.runtime.database_of(x)
        assert spec is not None
        db = by_name[spec.name]
        if groups and groups[-1][0] is db:
            groups[-1][1].append(x)
        else:
            groups.append((db, [x]))
    return groups


def _undo(layout: Layout, state: State, journal: _Journal, m: Manifest, rel: ReleaseDir,
          previous: str | None, prev_manifest: Manifest | None, started: bool,
          reason: str, prev_env: str, undo: _UndoDb, env: environ.ReleaseEnv) -> None:
    """Put the host back: stop the new release, restore the database if migrations began,
    restart the previous release, check it."""
    ui.step(f"Rolling back: {reason}")
    try:
        if layout.current_version() == m.version and previous != m.version:
            # Failed between the switch and its record (a full disk at commit): point
            # `current` back before anything restarts.
            if previous is not None:
                atomic_symlink(os.path.join("releases", previous), layout.current)
            else:
                layout.current.unlink()
        if undo.disk_full:
            _free_payloads(rel)
        dbs = _databases(m, env)
        services = tuple(d.compose_service for d in dbs if d.compose_service)
        prev_compose = runtime.uses_compose(layout, previous)
        # The compose project is shared by all releases: before `start` it is the previous
        # release's, running, and must be left alone (but for a database service started here).
        touched = m.runtime.compose is not None and (started or undo.service_started)
        # Nothing may write to the databases while they are restored; they stay up. A stack
        # with nothing to restore is left serving (the swarm may have rolled it back already).
        if touched and not (runtime.uses_swarm(layout, m.version) and not undo.migrating):
            runtime.quiesce(layout, m.version, keep=services)
        else:
            runtime.stop(layout, m.version, keep_compose=True)  # its processes, if any ran
        if undo.migrating and undo.backups:
            for db, made in undo.backups:
                ui.step(f"Restoring the database {db.label} from {made.path.name}")
                if db.compose_service:
                    runtime.ensure_database(layout, m.version, db, env.as_dict())
                database.restore(db, made, env.as_dict(), ui.note,
                                 exec_in_service=runtime.service_exec(layout, m.version, db))
                undo.restored_dbs.add(db.name)
                if len(undo.backups) > 1:
                    journal.record("restore", f"done:{db.name}", made.path.name)
            journal.record("restore", "done", ", ".join(b.path.name for _, b in undo.backups))
        datadirs.restore_taken(layout, undo.data, journal.record, undo.data_restored)
        if touched and not (prev_compose and started):
            # Nobody else's: the previous release (if any) does not use compose, or is not
            # being restarted. Put the project back the way it was found.
            if prev_compose:
                runtime.quiesce(layout, m.version)  # only the database service is left
            else:
                runtime.stop(layout, m.version)
        if started and prev_manifest is not None and previous is not None:
            crashed = runtime.watch(layout, previous)
            runtime.start(layout, previous)
            checks = health.run_all(prev_manifest.runtime.health, environ.release_env(
                layout, prev_manifest.runtime.env, prev_env, version=previous),
                user=prev_manifest.runtime.user, crashed=crashed)
            bad = [c for c in checks if not c.ok]
            if bad:
                journal.record("rollback", "failed", bad[0].detail)
                raise RollbackFailedError(
                    f"{m.version} failed ({reason}) and the previous release {previous} is "
                    f"unhealthy after restart: {bad[0].detail}")
        status = "rolled_back" if started else "failed"
        with state.tx():
            state.set_status(m.version, status, reason)
            journal.record("rollback", "done", reason)
        if not started or undo.disk_full:
            # Nothing to keep: it never ran, or it is a partial tree left by a full disk
            # (the journal holds what happened).
            shutil.rmtree(layout.removable_release(rel.path), ignore_errors=True)
    except RollbackFailedError:
        _left_pending(layout, state, journal, m, env, undo, reason)
        raise
    except BaseException as exc:
        _left_pending(layout, state, journal, m, env, undo, reason)
        raise RollbackFailedError(f"rollback after '{reason}' failed: {_reason(exc)}") from exc


def _free_payloads(rel: ReleaseDir) -> None:
    """The disk filled: give back the space of what this failed release unpacked (payloads,
    venv, caches) before anything else is written, the database restore first of all. Its
    manifest and files/ (compose files) stay until the undo is done."""
    for part in ("venv", "python", "npm", "npm-cache", "images", ".uv-unpack"):
        shutil.rmtree(rel.path / part, ignore_errors=True)


def _left_pending(layout: Layout, state: State, journal: _Journal, m: Manifest,
                  env: environ.ReleaseEnv, undo: _UndoDb, reason: str) -> None:
    """The undo itself failed: leave this attempt for recovery (`bundle status` shows it), with
    what the database looks like now if its restore did not happen, so that a later recovery
    can tell whether anything wrote to it since. Best effort: the first failure is the news."""
    with contextlib.suppress(Exception), state.tx():
        state.set_status(m.version, "rollback_failed", reason)
    datadirs.record_left(layout, undo.data, undo.data_restored, journal.record)
    if undo.migrating and not undo.restored:
        for db, _ in undo.backups:
            if db.name in undo.restored_dbs:
                continue
            with contextlib.suppress(Exception):
                journal.record("db-state", _state_key("after-failed-rollback", db),
                               database.fingerprint(
                                   db, env.as_dict(),
                                   exec_in_service=runtime.service_exec(layout, m.version, db)))


def _prune(layout: Layout, state: State, keep: int) -> None:
    """Keep the current release, the newest `keep - 1` others that passed their checks
    (rollback targets), and the newest one that never did, for inspection (its logs and
    REPORT.md): a failed release never takes a good one's slot. Older failed ones go. Runs
    after the commit: a failure here is reported, never undoes the installed release."""
    try:
        _prune_old(layout, state, keep)
    except (OSError, sqlite3.Error, BundlerError) as exc:
        ui.note(f"old releases not pruned ({_reason(exc)}); the next install prunes them")


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
    from bundler.install import node_runtime

    node_runtime.prune(layout.root, ui.note)  # the shared runtimes no release left links to


def _write_report(rel: ReleaseDir, m: Manifest, state: State, journal: _Journal,
                  checks: list[CheckResult], outcome: str, reason: str, undo: _UndoDb,
                  env: environ.ReleaseEnv) -> None:
    """report.json for automation and REPORT.md, a checklist like the ones operators used to
    tick by hand: every step and check of this install with its result. Best effort: on a
    full disk the journal in state.db still holds every step."""
    try:
        _write_report_files(rel, m, state, journal, checks, outcome, reason, undo, env)
    except (OSError, sqlite3.Error) as exc:
        ui.note(f"install report not written ({_reason(exc)}); `bundle history` has every step")


def _write_report_files(rel: ReleaseDir, m: Manifest, state: State, journal: _Journal,
                        checks: list[CheckResult], outcome: str, reason: str, undo: _UndoDb,
                        env: environ.ReleaseEnv) -> None:
    rows = state.conn.execute(
        "SELECT ts, step, status, detail FROM events WHERE txn=? ORDER BY id",
        (journal.txn,)).fetchall()
    steps = [{"ts": ts, "step": step, "status": status, "detail": env.redact(detail)}
             for ts, step, status, detail in rows]
    report = {"product": m.name, "version": m.version, "sequence": m.sequence,
              "environment": env.environment, "outcome": outcome, "reason": env.redact(reason),
              "finished": now(), "steps": steps, "checks": [c.to_json() for c in checks],
              "backup": undo.backup.to_json() if undo.backup else None}
    if len(undo.backups) > 1:  # only then: single-database reports keep their shape
        report["backups"] = [_backup_json(d, b) for d, b in undo.backups]
    if undo.data:
        report["data_backups"] = [b.to_json() for b in undo.data]
    atomic_write_bytes(rel.path / "report.json", json.dumps(report, indent=2).encode())
    lines = [f"# {m.name} {m.version}: {outcome}", "",
             f"- environment: {env.environment}; sequence {m.sequence}; finished {now()}"]
    if reason:
        lines.append(f"- reason: {env.redact(reason)}")
    for db, made in undo.backups:
        lines.append(f"- database backup{' of ' + db.name if db.name else ''}: {made.path}")
    lines += [f"- data directory backup of {b.name}: {b.path}" for b in undo.data]
    lines += ["", "## Steps", ""]
    final: dict[str, tuple[str, str]] = {}
    for st in steps:
        final[st["step"]] = (st["status"], st["detail"])
    for step, (status, detail) in final.items():
        mark = "x" if status not in ("failed", "started") else " "
        lines.append(f"- [{mark}] {step}: {status}{' — ' + detail if detail else ''}")
    lines += ["", "## Post-deploy checks", ""]
    lines += [f"- [{'x' if c.ok else ' '}] {c.name} ({c.kind}): {c.detail}" for c in checks]
    if not checks:
        lines.append("- (no checks ran)")
    atomic_write_bytes(rel.path / "REPORT.md", ("\n".join(lines) + "\n").encode())


class _Journal:
    """Records each step's start and end in the state database, and prints it. Steps may run
    in several threads at once (see _install_packages): one lock serializes the records."""

    def __init__(self, state: State, txn: str, version: str) -> None:
        self.state = state
        self.txn = txn
        self.version = version
        self._lock = threading.RLock()

    def record(self, step: str, status: str, detail: str = "") -> None:
        with self._lock:
            self.state.event(self.txn, self.version, step, status, detail)

    @contextlib.contextmanager
    def step(self, name: str, text: str) -> Iterator[None]:
        ui.step(text)
        with self._lock:  # a crash at the fault point leaves this step the journal's last
            self.record(name, "started")
            fault_point(name)
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):  # the failure itself is the news
                self.record(name, "failed", _reason(exc))
            raise
        self.record(name, "done")

