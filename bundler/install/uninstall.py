"""`bundle uninstall --root DIR`: stop the stack and remove its boot unit (docs/boot.md).

What it never touches: databases (no DROP, no compose volume, no SQLite file), `backups/`,
`shared/` (the operator's .env), `state/` (the journal, the trust store, and the last accepted
sequence: a purged root still refuses an older bundle), and any other file under the root
(an application's data). `bundle start` brings the stack back; the next `bundle install` sets
the boot unit up again.

`purge` (destructive: the CLI asks, or wants --yes) also removes what bundler can rebuild
from a bundle: `releases/` (code, venvs, Node trees), `current`, `bin/`, the content store
(`store/`: the artifacts the releases linked) and staging leftovers.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from bundler import ui
from bundler.errors import StateError
from bundler.install import boot
from bundler.install.layout import Layout, locked
from bundler.install.recovery import pending
from bundler.install.release import Release
from bundler.install.state import State, new_txn


def _purged(layout: Layout) -> tuple[Path, ...]:
    """What --purge removes: what bundler can rebuild from a bundle."""
    return layout.current, layout.releases, layout.bin, layout.store


def _kept(layout: Layout) -> tuple[Path, ...]:
    """What uninstall always keeps (when present)."""
    return layout.state_dir, layout.shared, layout.backups, layout.data


@dataclass(frozen=True)
class UninstallResult:
    root: str
    product: str | None
    stopped: str | None     # the release whose services were stopped
    unit: str | None        # the boot unit removed
    purged: tuple[str, ...]
    kept: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"root": self.root, "product": self.product, "stopped": self.stopped,
                "unit_removed": self.unit, "purged": list(self.purged),
                "kept": list(self.kept)}


def _check(layout: Layout) -> str | None:
    """The product installed under the root; StateError if there is nothing to uninstall or
    an interrupted install is not settled (its database restore must not be lost)."""
    if not layout.root.is_dir():
        raise StateError(f"{layout.root} is not an install root (no such directory)",
                         hint="check --root")
    state = State.open_readonly(layout.db)
    if state is None:
        raise StateError(f"no bundler state under {layout.root}",
                         hint="nothing was installed under this --root")
    try:
        stuck = pending(state)
        product = state.product()
    finally:
        state.close()
    if stuck is not None:
        raise StateError(f"an install is not settled: {stuck.describe()}",
                         hint=f"`bundle recover --root {layout.root}` settles it first")
    return product[0] if product else None


def uninstall(layout: Layout, purge: bool = False,
              systemd: boot.Systemd | None = None) -> UninstallResult:
    product = _check(layout)
    # The unit first, without the lock: its ExecStop is `bundle stop`, which takes the lock.
    unit = boot.remove(layout, product, systemd)
    if unit:
        ui.step(f"Removed the boot unit {unit}")
    with locked(layout.root):
        version = layout.current_version()
        if version is not None:
            ui.step(f"Stopping {version}")
            release = Release.load(layout, version)
            if release is not None:
                release.stop()
        purged = _purge(layout) if purge else ()
        state = State.open(layout.db, create=False)
        try:
            with state.tx():
                if purge:
                    for row in state.releases():
                        if row.status in ("active", "superseded", "rolled_back"):
                            state.set_status(row.version, "pruned", "bundle uninstall --purge")
                state.event(new_txn(), version or "-", "uninstall", "done", "; ".join(
                    [f"stopped {version}" if version else "nothing running",
                     f"unit {unit} removed" if unit else "no boot unit",
                     f"purged {', '.join(purged)}" if purge else "files kept"]))
        finally:
            state.close()
    kept = tuple(k.name for k in _kept(layout) if k.exists())
    return UninstallResult(str(layout.root), product, version, unit, purged, kept)


def _purge(layout: Layout) -> tuple[str, ...]:
    """Remove releases/, current, bin/, store/ and staging leftovers: only those, by name."""
    removed = []
    for path in _purged(layout):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path.name)
    for leftover in layout.staging_dirs():
        shutil.rmtree(layout.removable_staging(leftover), ignore_errors=True)
    return tuple(removed)


def describe_purge(layout: Layout) -> str:
    """The confirmation question: what goes, what stays."""
    return (f"Remove {', '.join(map(str, _purged(layout)))} (the releases: code, venvs, "
            f"bundler's own command, the stored artifacts)? Databases, data, backups/, "
            "shared/ and state/ are kept")
