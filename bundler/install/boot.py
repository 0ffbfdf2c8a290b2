"""The stack comes back after a reboot (issue 17 §3; docs/boot.md).

At each install's commit (`at_commit`, around the switch) bundler puts its own command into
`<root>/bin/` (bundler.install.rootbin) and, where systemd runs the host, one unit per root:

    /etc/systemd/system/bundler-<product>-<hash of the root>.service
      Type=oneshot + RemainAfterExit: ExecStart=<root>/bin/bundle start --root ROOT --boot

`start --boot` (`start_at_boot`) settles an install a power cut interrupted (as `bundle
recover` would: a database restore only when nothing wrote to it since), starts the current
release, health-checks it and records the outcome in the journal (`bundle history`: step
`boot`). Restarting a crashed service stays the supervisor's job (or the engine's, for
compose); an unhealthy boot exits 19, which the unit counts as success so that systemd does
not kill the supervisors it started. ExecStop is `bundle stop`: `systemctl stop` (and the
shutdown) stops the stack the way bundler does.

Both changes own their undo: a commit that fails puts the previous unit (or none) and the
previous `bin/` back. A swarm stack gets no unit (the swarm restarts its own services); a host
without systemd gets none either, and install and status say so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bundler import proc, ui
from bundler.bundle.manifest import Manifest
from bundler.errors import BundlerError, InstallError, UnhealthyError
from bundler.fsutil import atomic_write_bytes
from bundler.install import control, recovery, rootbin, runtimes
from bundler.install.health import CheckResult
from bundler.install.layout import Layout, ReleaseDir, locked
from bundler.install.release import Release
from bundler.install.state import State, new_txn

UNIT_DIR = Path("/etc/systemd/system")
BOOTED = Path("/run/systemd/system")  # exists when systemd is PID 1 (sd_booted(3))
WANTED_BY = "multi-user.target"
# Ordering only (After= starts nothing): what a stack may need on the same host comes up first.
AFTER = ("network-online.target", "local-fs.target", "remote-fs.target", "docker.service",
         "postgresql.service", "mariadb.service", "mysql.service", "redis-server.service")
# A root the unit can name as it is: no %, $, quotes, backslashes or blanks to escape.
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9/._+@:-]*$")
SYSTEMCTL_TIMEOUT = 300.0

Record = Callable[[str, str, str], None]
Undo = Callable[[], None]


class Systemd:
    """The host's systemd, at the adapter boundary (unit tests pass a fake)."""

    def __init__(self, unit_dir: Path = UNIT_DIR, booted: Path = BOOTED) -> None:
        self.unit_dir = unit_dir
        self.booted = booted

    def unavailable(self) -> str | None:
        """Why no unit can be set up here, or None."""
        if not self.booted.is_dir():
            return "no systemd"
        if os.geteuid() != 0:
            return "not root: a system unit is root's to install"
        if shutil.which("systemctl") is None:
            return "no systemctl"
        return None

    def _ctl(self, *args: str, check: bool = True) -> proc.Result:
        return proc.run(["systemctl", *args], check=check, timeout=SYSTEMCTL_TIMEOUT,
                        what=f"systemctl {args[0]}")

    def reload(self) -> None:
        self._ctl("daemon-reload")

    def enable(self, unit: str) -> None:
        self._ctl("enable", unit)

    def disable(self, unit: str) -> None:
        self._ctl("disable", unit)

    def stop(self, unit: str) -> None:
        self._ctl("stop", unit)

    def enabled(self, unit: str) -> bool:
        return self._ctl("is-enabled", unit, check=False).output.strip() == "enabled"

    def active(self, unit: str) -> str:
        """active, inactive, failed, activating...: as `systemctl is-active` says."""
        return self._ctl("is-active", unit, check=False).output.strip() or "unknown"


@dataclass(frozen=True)
class BootSetup:
    """How the stack of a root comes back after a reboot."""

    configured: bool
    unit: str | None
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"configured": self.configured, "unit": self.unit, "detail": self.detail}


def unit_name(product: str, root: Path) -> str:
    """One unit per root: the product plus a hash of the resolved root (as compose projects)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", product.lower()).strip("-_") or "app"
    where = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:8]
    return f"bundler-{name}-{where}.service"


def unit_text(root: Path, product: str, command: Path, compose: bool) -> str:
    """The unit file. `compose`: the release runs a compose project (the engine is wanted)."""
    wants = ["network-online.target", *(["docker.service"] if compose else [])]
    return f"""\
# Written by bundler at each `bundle install --root {root}`; `bundle uninstall --root {root}`
# removes it. Edits here are overwritten by the next install (see docs/boot.md).
[Unit]
Description=bundler: {product} under {root}
Wants={' '.join(wants)}
After={' '.join(AFTER)}
RequiresMountsFor={root}

[Service]
Type=oneshot
RemainAfterExit=yes
# Start the current release, health-check it, record the outcome in the journal
# (`bundle history`). An unhealthy stack (exit {UnhealthyError.exit_code}) stays up: its
# supervisors keep restarting what crashed.
ExecStart={command} start --root {root} --boot
ExecStop={command} stop --root {root}
SuccessExitStatus={UnhealthyError.exit_code}
TimeoutStartSec=15min
TimeoutStopSec=5min

[Install]
WantedBy={WANTED_BY}
"""


def _noop() -> None:
    return None


def _unit_path(systemd: Systemd, unit: str) -> Path:
    return systemd.unit_dir / unit


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _apply(systemd: Systemd, unit: str, text: str | None, enabled: bool) -> None:
    """Make the unit file `text` (None: no unit), enabled or not, and systemd aware of it."""
    path = _unit_path(systemd, unit)
    if text is None:
        if path.exists():
            systemd.disable(unit)
            path.unlink()
        systemd.reload()
        return
    atomic_write_bytes(path, text.encode(), mode=0o644)
    systemd.reload()
    if enabled:
        systemd.enable(unit)
    else:
        systemd.disable(unit)


def configure(layout: Layout, m: Manifest, command: Path,
              systemd: Systemd) -> tuple[BootSetup, Undo]:
    """Set the root's unit up for release `m` (or remove it, for a swarm stack); return what
    was done and its undo (the previous unit file and enablement, or none)."""
    root = layout.root
    why = systemd.unavailable()
    if why is not None:
        return BootSetup(False, None, f"not configured ({why}): after a reboot, run "
                                      f"`{command} start --root {root}` (docs/boot.md)"), _noop
    unit = unit_name(m.name, root)
    kind = runtimes.pick(layout, m)
    if not kind.boot_unit:
        text, setup = None, BootSetup(False, None, f"a {kind.kind} stack: the {kind.kind} "
                                                   "restarts its services (no unit)")
    elif not _PLAIN_PATH.match(str(root)):
        return BootSetup(False, None, f"not configured: the root {str(root)!r} has characters "
                                      "a unit file would interpret; choose a plain path "
                                      "(letters, digits, / . _ - + @ :)"), _noop
    else:
        text = unit_text(root, m.name, command, kind.containers)
        setup = BootSetup(True, unit, f"enabled ({unit}: starts the stack at boot, "
                                      "health-checked)")
    path = _unit_path(systemd, unit)
    before = _read(path)
    was_enabled = before is not None and systemd.enabled(unit)
    if before == text and (text is None or was_enabled):
        return setup, _noop
    try:
        _apply(systemd, unit, text, enabled=True)
    except BaseException:
        with contextlib.suppress(Exception):
            _apply(systemd, unit, before, was_enabled)
        raise
    return setup, lambda: _apply(systemd, unit, before, was_enabled)


@contextlib.contextmanager
def at_commit(layout: Layout, m: Manifest, record: Record | None = None,
              systemd: Systemd | None = None) -> Iterator[BootSetup]:
    """Around an install's commit: `<root>/bin/` and the boot unit are put in place before the
    body runs, and put back as they were if it fails. After it, best effort only (the release
    is live): old kits are pruned, the outcome printed once and journaled."""
    systemd = systemd or Systemd()
    how = rootbin.running()
    command, undo_bin = rootbin.place(layout, how)
    try:
        setup, undo_unit = configure(layout, m, command, systemd)
    except BaseException as exc:
        undo_bin()
        if isinstance(exc, Exception) and not isinstance(exc, BundlerError):
            raise InstallError(f"setting up the boot unit failed: {exc}",
                               hint="check `systemctl status` and the unit directory "
                                    f"{systemd.unit_dir}") from exc
        raise
    try:
        yield setup
    except BaseException:
        for undo in (undo_unit, undo_bin):  # each one, whatever the other did
            with contextlib.suppress(Exception):
                undo()
        raise
    try:  # committed: nothing here may fail the install (its undo would undo a live release)
        _after_commit(layout, m, setup, how, command, record)
    except Exception as exc:
        ui.note(f"boot: {setup.detail} (after the commit: {exc})")


def _after_commit(layout: Layout, m: Manifest, setup: BootSetup, how: rootbin.Running,
                  command: Path, record: Record | None) -> None:
    """Prune old kits from bin/, say once what was set up (and warn about compose services
    the engine will not restart), journal it."""
    rootbin.prune(layout, how)
    lines = [f"boot: {setup.detail}", f"this root's own command: {command} " + (
        "(a copy of this kit: the stick is no longer needed)" if how.kit else
        f"(runs this installation's bundler, {how.python})")]
    lines += compose_warnings(layout, m, setup)
    for line in lines:
        ui.note(line)
    if record is not None:
        record("boot", "enabled" if setup.configured else "none", setup.detail)


def compose_warnings(layout: Layout, m: Manifest, setup: BootSetup) -> list[str]:
    """Compose services the engine will not restart by itself (no `restart:` policy)."""
    rel = ReleaseDir(layout.release(m.version))
    missing = Release.of(layout, m, rel.environment()).runtime.unrestarted()
    if not missing:
        return []
    names = ", ".join(missing)
    then = ("the boot unit brings them back after a reboot, but nothing restarts them after "
            "a crash or an engine restart" if setup.configured else
            "they stay down after a reboot or an engine restart until `bundle start`")
    return [f"compose service(s) {names} have no restart policy: {then}; give them "
            "`restart: unless-stopped` in the compose file"]


def describe(layout: Layout, product: str | None, systemd: Systemd | None = None) -> BootSetup:
    """For `bundle status`: is the stack set up to start at boot here?"""
    systemd = systemd or Systemd()
    why = systemd.unavailable()
    if why is not None:
        return BootSetup(False, None, f"not configured ({why})")
    if product is None:
        return BootSetup(False, None, "not configured (nothing installed)")
    unit = unit_name(product, layout.root)
    if not _unit_path(systemd, unit).exists():
        current = Release.current(layout)
        if current is not None and not current.runtime.boot_unit:
            kind = current.runtime.kind
            return BootSetup(False, None, f"a {kind} stack: the {kind} restarts its services")
        return BootSetup(False, None, f"not configured (no unit {unit}: `bundle install` "
                                      "sets it up)")
    if not systemd.enabled(unit):
        return BootSetup(False, unit, f"not configured ({unit} is disabled)")
    return BootSetup(True, unit, f"enabled ({unit}, {systemd.active(unit)})")


def remove(layout: Layout, product: str | None, systemd: Systemd | None = None) -> str | None:
    """For `bundle uninstall`: stop and remove the root's unit; its name, or None if there was
    none. Call WITHOUT the root lock: the unit's ExecStop (`bundle stop`) takes it."""
    systemd = systemd or Systemd()
    if product is None or systemd.unavailable() is not None:
        return None
    unit = unit_name(product, layout.root)
    path = _unit_path(systemd, unit)
    if not path.exists():
        return None
    systemd.stop(unit)
    systemd.disable(unit)
    path.unlink(missing_ok=True)
    systemd.reload()
    return unit


@dataclass(frozen=True)
class BootRun:
    version: str | None
    checks: tuple[CheckResult, ...]
    recovered: str | None = None

    @property
    def healthy(self) -> bool:
        return all(c.ok for c in self.checks)


def start_at_boot(layout: Layout) -> BootRun:
    """What the unit runs at boot (`bundle start --boot`): settle an interrupted install (as
    `bundle recover` does, never discarding writes), start the current release, health-check
    it; each outcome is journaled (step `boot`). Nothing installed: nothing to do."""
    if not layout.db.exists():
        return BootRun(None, ())
    state = State.open(layout.db, create=False)
    txn = new_txn()

    def event(status: str, detail: str = "") -> None:
        with state.tx():
            state.event(txn, layout.current_version() or "-", "boot", status, detail)

    try:
        event("started", "the boot unit starts the stack")
        try:
            with locked(layout.root):
                recovered = recovery.recover(layout)
            if recovered:
                event("recovered", recovered)
            if layout.current_version() is None:
                event("done", "no current release: nothing to start")
                return BootRun(None, (), recovered)
            version, checks = control.start(layout)
        except BundlerError as exc:
            event("failed", exc.message.splitlines()[0])
            raise
        bad = [c for c in checks if not c.ok]
        event("unhealthy" if bad else "healthy",
              "; ".join(f"{c.name}: {'ok' if c.ok else 'FAIL'} {c.detail}" for c in checks)
              or "no health checks")
        return BootRun(version, tuple(checks), recovered)
    finally:
        state.close()
