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
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bundler import archive, ui
from bundler.errors import (
    BundlerError,
    InstallError,
    Interrupted,
    RollbackFailedError,
    RolledBackError,
)
from bundler.fsutil import atomic_symlink, atomic_write_bytes, require_space
from bundler.install import environ, health, policy, process_runtime, python_env
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, ReleaseDir, locked
from bundler.install.state import ReleaseRow, State, new_txn, now
from bundler.manifest import IMAGES_PATH, Manifest
from bundler.models import NpmProject
from bundler.signing import TrustedKey, Verified

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


def space_needed(manifest: Manifest) -> int:
    wheels = sum(f.size for f in manifest.files if f.kind == "wheel")
    return manifest.payload_size + wheels * VENV_FACTOR + (VENV_BASE if wheels else 0)


def install(source: Path, trusted: list[TrustedKey], root: Path,
            allow_downgrade: bool = False, environment: str = "production") -> InstallResult:
    layout = Layout(root.resolve())
    with archive.open_bundle(source, trusted) as reader:
        ui.step(f"Verifying signature of {reader.label}")
        verified = reader.read_envelope()
        m = verified.manifest
        ui.note(f"{m.name} {m.version} (sequence {m.sequence}), signed by key {verified.keyid}")
        decision = policy.decide(m, verified.digest, layout, allow_downgrade)
        env = environ.release_env(layout, m.runtime.env, environment)
        environ.check_required(env, m.runtime.env, layout)
        if decision.already_current:
            return _ensure_running(layout, m, environment)
        require_space(layout.root, space_needed(m), f"installing {m.name} {m.version}")
        with _fresh_root(layout.root) as created_root, locked(layout.root):
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=layout.root))
            try:
                ui.step(f"Verifying and staging {len(m.files)} file(s)")
                with ui.bytes_progress("verifying", m.payload_size) as advance:
                    reader.extract(staging, advance)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                if created_root:
                    with contextlib.suppress(OSError):
                        layout.root.rmdir()
                raise
            return _install_staged(layout, verified, staging, decision, env)


@contextlib.contextmanager
def _fresh_root(root: Path) -> Iterator[bool]:
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    yield created


def _ensure_running(layout: Layout, m: Manifest, environment: str) -> InstallResult:
    """This exact bundle is current already: start anything that is down, and check it."""
    ui.step(f"{m.name} {m.version} is already the current release")
    rel = ReleaseDir(layout.release(m.version))
    with locked(layout.root):
        process_runtime.start(m.runtime.services, layout, rel, m.runtime.env, environment)
    checks = health.run_all(m.runtime.health,
                            environ.release_env(layout, m.runtime.env, environment))
    return InstallResult(m.version, None, "unchanged", tuple(checks))


def _install_staged(layout: Layout, verified: Verified, staging: Path,
                    decision: policy.Decision, env: environ.ReleaseEnv) -> InstallResult:
    m = verified.manifest
    state = State.open(layout.db)
    txn = new_txn()
    journal = _Journal(state, txn, m.version)
    previous = layout.current_version()
    prev_manifest = _load_manifest(layout, previous) if previous else None
    prev_env = read_environment(layout, previous) if previous else env.environment
    rel = ReleaseDir(layout.release(m.version))
    started = False
    try:
        with state.tx():
            state.upsert_release(ReleaseRow(m.version, m.name, m.sequence, verified.digest,
                                            verified.keyid, "installing", now()))
            journal.record("verify", "done", f"sequence {m.sequence}, key {verified.keyid}")
            if decision.downgrade:
                journal.record("downgrade", "allowed",
                               f"sequence {m.sequence} accepted with --allow-downgrade")
        _place(layout, rel, staging, verified, previous)
        atomic_write_bytes(rel.meta / "environment", env.environment.encode())
        if m.images:
            with journal.step("images", f"Loading {len(m.images)} image(s) into the engine"):
                from bundler.install import images as image_loader
                from bundler.resolve.images import ImageRecord

                image_loader.load(rel.path / IMAGES_PATH,
                                  [ImageRecord(i.ref, i.image_id) for i in m.images], ui.note)
        if m.python_lock and decision.python is not None:
            with journal.step("python", "Installing Python packages offline"):
                python_env.create_venv(decision.python, rel.venv, rel.path / "python" / "wheels",
                                       rel.path / m.python_lock, rel.logs / "pip-install.log")
        for project in m.npm:
            with journal.step(f"npm:{project.dest}",
                              f"Installing npm packages offline into files/{project.dest}"):
                _install_npm(rel, m, project)
        if prev_manifest is not None and previous is not None:
            with journal.step("stop-previous", f"Stopping {previous}"):
                process_runtime.stop(prev_manifest.runtime.services,
                                     ReleaseDir(layout.release(previous)))
        started = True
        with journal.step("start", f"Starting {len(m.runtime.services)} service(s)"):
            process_runtime.start(m.runtime.services, layout, rel, m.runtime.env,
                                  env.environment)
        ui.step("Health-checking")
        checks = health.run_all(m.runtime.health, env)
        _write_report(rel, m, checks, "healthy" if all(c.ok for c in checks) else "unhealthy")
        failed = [c for c in checks if not c.ok]
        if failed:
            journal.record("health", "failed", failed[0].detail)
            raise _HealthFailed(f"health check {failed[0].name!r} failed: {failed[0].detail}")
        journal.record("health", "done", "; ".join(c.detail for c in checks))
        with state.tx():
            atomic_symlink(os.path.join("releases", m.version), layout.current)
            if previous and previous != m.version:
                state.set_status(previous, "superseded")
            state.set_status(m.version, "active")
            state.accept_sequence(m.name, m.sequence)
            journal.record("commit", "done", f"current -> {m.version}")
        _prune(layout, state, m.runtime.install.keep)
        return InstallResult(m.version, previous, "installed", tuple(checks))
    except BaseException as exc:
        reason = _reason(exc)
        _undo(layout, state, journal, m, rel, previous, prev_manifest, started, reason,
              prev_env)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted("interrupted; the new release was removed and the previous one "
                              "restored") from None
        if started:
            raise RolledBackError(f"{m.version} failed and was rolled back"
                                  f"{' to ' + previous if previous else ''}: {reason}") from None
        raise
    finally:
        state.close()


def _install_npm(rel: ReleaseDir, m: Manifest, project: NpmProject) -> None:
    from bundler.install import npm_env
    from bundler.resolve.npm import NpmPackage

    dest = rel.files / project.dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(rel.path / project.bundle_dir / name, dest / name)
    by_path = {f.path: f for f in m.files}
    packages = [NpmPackage(p.name, p.version, p.integrity, p.tarball,
                           by_path[p.tarball].sha256, by_path[p.tarball].size)
                for p in project.packages]
    npm_env.install_offline(dest, rel.path / "npm" / "tarballs", packages,
                            rel.path / "npm-cache", ui.note, project.omit_dev, dict(project.env))


class _HealthFailed(BundlerError):
    pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BundlerError):
        return exc.message.splitlines()[0]
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl+C)"
    return f"{type(exc).__name__}: {exc}"


def _place(layout: Layout, rel: ReleaseDir, staging: Path, verified: Verified,
           previous: str | None) -> None:
    """Move the verified staging tree to releases/<version>, replacing a dead earlier try."""
    layout.releases.mkdir(exist_ok=True)
    if rel.path.exists():
        if previous == rel.path.name:
            raise InstallError(f"version {rel.path.name} is current and this bundle differs "
                               "from it", hint="bump the version in the profile and build again")
        shutil.rmtree(rel.path)
    os.chmod(staging, 0o755)  # mkdtemp made it 0700
    os.replace(staging, rel.path)
    rel.meta.mkdir()
    atomic_write_bytes(rel.meta / "manifest.json", verified.manifest_bytes)


def read_environment(layout: Layout, version: str) -> str:
    """The environment a release was installed for (production when not recorded)."""
    path = ReleaseDir(layout.release(version)).meta / "environment"
    try:
        return path.read_text().strip() or "production"
    except OSError:
        return "production"


def _load_manifest(layout: Layout, version: str) -> Manifest | None:
    from bundler.manifest import parse_manifest

    path = ReleaseDir(layout.release(version)).meta / "manifest.json"
    try:
        return parse_manifest(path.read_bytes())
    except OSError:
        return None


def _undo(layout: Layout, state: State, journal: _Journal, m: Manifest, rel: ReleaseDir,
          previous: str | None, prev_manifest: Manifest | None, started: bool,
          reason: str, prev_env: str) -> None:
    """Put the host back: stop the new release, restart the previous one, check it."""
    ui.step(f"Rolling back: {reason}")
    try:
        process_runtime.stop(m.runtime.services, rel)
        if started and prev_manifest is not None and previous is not None:
            prev = ReleaseDir(layout.release(previous))
            process_runtime.start(prev_manifest.runtime.services, layout, prev,
                                  prev_manifest.runtime.env, prev_env)
            checks = health.run_all(prev_manifest.runtime.health, environ.release_env(
                layout, prev_manifest.runtime.env, prev_env))
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
        if not started:
            shutil.rmtree(rel.path, ignore_errors=True)
    except RollbackFailedError:
        raise
    except BaseException as exc:
        raise RollbackFailedError(f"rollback after '{reason}' failed: {_reason(exc)}") from exc


def _prune(layout: Layout, state: State, keep: int) -> None:
    """Keep the current release and the newest `keep - 1` others (rollback targets)."""
    current = layout.current_version()
    old = [r for r in state.releases()
           if r.version != current and r.status in ("superseded", "rolled_back")]
    for row in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(layout.release(row.version), ignore_errors=True)
        with state.tx():
            state.set_status(row.version, "pruned", row.detail)


def _write_report(rel: ReleaseDir, m: Manifest, checks: list[CheckResult], outcome: str) -> None:
    report = {"product": m.name, "version": m.version, "sequence": m.sequence,
              "outcome": outcome, "finished": now(), "checks": [c.to_json() for c in checks]}
    atomic_write_bytes(rel.path / "report.json", json.dumps(report, indent=2).encode())


class _Journal:
    """Records each step's start and end in the state database, and prints it."""

    def __init__(self, state: State, txn: str, version: str) -> None:
        self.state = state
        self.txn = txn
        self.version = version

    def record(self, step: str, status: str, detail: str = "") -> None:
        self.state.event(self.txn, self.version, step, status, detail)

    @contextlib.contextmanager
    def step(self, name: str, text: str) -> Iterator[None]:
        ui.step(text)
        self.record(name, "started")
        try:
            yield
        except BaseException as exc:
            self.record(name, "failed", _reason(exc))
            raise
        self.record(name, "done")

