"""Data directories: where a release keeps its own files (profile `data:`).

Each lives at `<root>/data/<name>/`, outside every release, so upgrades, rollbacks and prunes
never touch it. It is owned by the release's `user` (else root), mode as declared (0750 by
default), and the services find it through `{data:NAME}`. Before an upgrade that migrates
(`backup: migrate`, the default) or before every upgrade (`always`) it is backed up, with the
databases, into `<root>/backups/data-<name>-<time>.tar`, and restored with them when the
upgrade fails or is interrupted.

The account owns what is inside, so everything root does there assumes a hostile tree: a
symlink the account planted (to /etc/shadow, to another product's data) is never followed,
and a file it hard-linked from elsewhere is never handed over.

- `<root>/data/` is root's and not group/world-writable, so only bundler names, creates and
  renames what is directly under it; a data directory is opened `O_NOFOLLOW`.
- Inside, nothing is reached by path: the tree is walked with directory descriptors
  (`os.fwalk`, which checks each directory it enters is the one it listed), every entry is
  opened `O_PATH|O_NOFOLLOW` and acted on through that descriptor (`fchownat(AT_EMPTY_PATH)`
  changes a symlink itself, never its target; a file is read through `/proc/self/fd`).
- Re-owning a tree (the release's `user` changed) changes only what the previous owner owned:
  a hard link to root's file (uid 0) stays root's.
- A backup is a PAX tar of directories, regular files and symlinks (sockets, FIFOs and devices
  are skipped), with numeric owners, modes and nanosecond mtimes, streamed (memory stays flat)
  into a 0600 temp file, read back in full and only then renamed into place; its sha256 and
  the tree's digest are journaled.
- A restore extracts into a fresh root-only directory beside the data directory with its own
  strict reader (never by the archive's paths: each name checked, its parent a directory this
  restore made, files created `O_EXCL|O_NOFOLLOW`), checks the archive's sha256 and the tree's
  digest, and only then swaps it in by rename. What it replaces is deleted (a failed install's
  writes, as for its databases) or, in recovery, kept in `<root>/backups/`.

A tree's digest (what "nothing changed" means) is a sha256 over every entry's path, type,
mode, owner, size, mtime (ns) and symlink target: what a restore reproduces exactly.
Extended attributes and ACLs are not kept. The walk, the digest, the tar writer and the
strict extraction are bundler.install.treetar; this module decides what, where and when.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bundler import ui
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import DataDir
from bundler.compat import UTC
from bundler.errors import InstallError, RecoveryPendingError, SpaceError
from bundler.fsutil import human_bytes, private_dir, require_space
from bundler.install import runas, treetar
from bundler.install.layout import Layout

# (step, status, detail): the install journal's record, or recovery's.
Record = Callable[[str, str, str], None]

ABSENT = "absent"  # the digest of a data directory that does not exist
_AT_EMPTY_PATH = 0x1000
_LEFTOVER = (".restore-", ".old-")  # bundler's own names under data/ (a NAME never starts ".")


def base(layout: Layout) -> Path:
    return layout.data


def path(layout: Layout, name: str) -> Path:
    return base(layout) / name


def _owner(m: Manifest) -> tuple[int, int]:
    """(uid, gid) a data directory of release `m` belongs to: its `user`'s, else bundler's."""
    user = runas.maybe(m.runtime.user)
    if user is None or not user.switches:
        return os.geteuid(), os.getegid()
    return user.uid, user.gid


# --------------------------------------------------------------------------- <root>/data/

@contextlib.contextmanager
def _base_fd(layout: Layout, create: bool = True) -> Iterator[int | None]:
    """`<root>/data/` opened as a directory: root's, not group/world-writable, not a symlink
    (InstallError otherwise). None when it does not exist and `create` is false."""
    where = base(layout)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(where, 0o700)
            os.chmod(where, 0o755)  # the account must reach its own directory below
    try:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise
        yield None
        return
    except OSError as exc:
        raise InstallError(f"{where} is not a directory ({exc.strerror})",
                           hint="it must be a plain directory owned by root; move it away"
                           ) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise InstallError(f"{where} is owned by uid {st.st_uid}, mode "
                               f"{stat.S_IMODE(st.st_mode):04o}: only root may create or "
                               "rename what is in it",
                               hint=f"chown root:root {where} && chmod 0755 {where}")
        yield fd
    finally:
        os.close(fd)


def _open_dir(name: str, dir_fd: int) -> int:
    """The data directory `name` under data/, never through a symlink (InstallError)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except (NotADirectoryError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise InstallError(f"data directory {name} is not a directory ({exc.strerror})",
                           hint="it must be a plain directory, never a symlink: move it away "
                                "and install again") from None


def _remove_leftovers(dir_fd: int, layout: Layout) -> None:
    """A restore interrupted before its swap leaves `.restore-*` / `.old-*`: the backup is still
    there and the restore runs again, so they go."""
    for entry in os.listdir(dir_fd):
        if entry.startswith(_LEFTOVER):
            shutil.rmtree(base(layout) / entry, ignore_errors=True)  # never follows symlinks


def check(layout: Layout, m: Manifest) -> None:
    """Refuse, before an install creates anything, data directories it could not use: `data/`
    or one of them a symlink or not a directory, `data/` not root's (InstallError)."""
    if not m.runtime.data:
        return
    with _base_fd(layout, create=False) as dfd:
        if dfd is None:
            return
        for spec in m.runtime.data:
            with contextlib.suppress(FileNotFoundError):
                os.close(_open_dir(spec.name, dfd))


def prepare(layout: Layout, m: Manifest) -> None:
    """Every data directory of release `m` exists, is owned by its `user` (else root) and has
    its declared mode; a tree whose owner changed is re-owned (see `_reown`). Never removes
    anything in it."""
    if not m.runtime.data:
        return
    uid, gid = _owner(m)
    with _base_fd(layout) as dfd:
        assert dfd is not None
        _remove_leftovers(dfd, layout)
        for spec in m.runtime.data:
            try:
                fd = _open_dir(spec.name, dfd)
            except FileNotFoundError:
                os.mkdir(spec.name, 0o700, dir_fd=dfd)
                fd = _open_dir(spec.name, dfd)
                os.fchown(fd, uid, gid)
                ui.note(f"data directory {spec.name} created: {path(layout, spec.name)}")
            try:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    _reown(fd, spec.name, st.st_uid, uid, gid)
                if stat.S_IMODE(os.fstat(fd).st_mode) != spec.mode:
                    os.fchmod(fd, spec.mode)
            finally:
                os.close(fd)


def _fchown(fd: int, uid: int, gid: int) -> None:
    """chown what an O_PATH descriptor refers to (a symlink itself, never its target)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fchownat(fd, b"", uid, gid, _AT_EMPTY_PATH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _reown(top: int, name: str, old_uid: int, uid: int, gid: int) -> None:
    """Hand the tree under `top` from `old_uid` to uid:gid. Only entries `old_uid` owns change:
    whatever else is in there (a hard link to root's file, another account's file) is left as
    it is and counted. The kernel clears set-id bits on a chown."""
    changed = kept = 0
    os.fchown(top, uid, gid)
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top,
                                                         follow_symlinks=False):
        for entry in dirnames + filenames:
            try:
                fd = os.open(entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_uid == old_uid:
                    _fchown(fd, uid, gid)
                    changed += 1
                else:
                    kept += 1
            finally:
                os.close(fd)
    ui.note(f"data directory {name}: owner uid {old_uid} -> {uid}, {changed} entries re-owned"
            + (f", {kept} not owned by uid {old_uid} left as they were" if kept else ""))


def fingerprint(layout: Layout, name: str) -> str:
    """The digest of data directory `name` now (ABSENT when it does not exist)."""
    with _base_fd(layout, create=False) as dfd:
        if dfd is None:
            return ABSENT
        try:
            fd = _open_dir(name, dfd)
        except FileNotFoundError:
            return ABSENT
        try:
            return treetar.tree_digest(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- backup

@dataclass(frozen=True)
class DataBackup:
    """A data directory's backup, as journaled: the tar, its size and sha256, and the digest
    of the tree it holds."""

    name: str
    path: Path
    size: int
    sha256: str
    created: str
    digest: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "path": str(self.path), "size": self.size,
                "sha256": self.sha256, "created": self.created, "digest": self.digest}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DataBackup:
        return cls(str(data["name"]), Path(str(data["path"])), int(data["size"]),
                   str(data["sha256"]), str(data["created"]), str(data["digest"]))


def due(m: Manifest, migrating: bool) -> tuple[DataDir, ...]:
    """The data directories an install of `m` backs up."""
    return tuple(d for d in m.runtime.data
                 if d.backup == "always" or (d.backup == "migrate" and migrating))


def space_needed(layout: Layout, m: Manifest) -> int:
    """Bytes the backups of `m`'s data directories may take (for the up-front space check:
    those backed up before a migration count when `m` has migrations)."""
    total = 0
    with _base_fd(layout, create=False) as dfd:
        if dfd is None:
            return 0
        for spec in due(m, bool(m.runtime.migrations)):
            try:
                fd = _open_dir(spec.name, dfd)
            except FileNotFoundError:
                continue
            try:
                total += treetar.estimate(fd)
            finally:
                os.close(fd)
    return total


def _backup_name(dest: Path, name: str, when: datetime) -> Path:
    stem = f"data-{name}-{when.strftime('%Y%m%dT%H%M%SZ')}"
    found, n = dest / f"{stem}.tar", 1
    while found.exists():
        found, n = dest / f"{stem}-{n}.tar", n + 1
    return found


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SpaceError(f"{what}: the disk is full") from None
        raise InstallError(f"{what} failed: {exc.strerror or exc}",
                           hint="stop whatever still writes to the data directory, or check "
                                "the disk, and run the command again") from None
    except tarfile.TarError as exc:
        raise InstallError(f"{what} failed: {exc}",
                           hint="stop whatever still writes to the data directory and run "
                                "the command again") from None


def backup(layout: Layout, spec: DataDir) -> DataBackup:
    """Back data directory `spec` up into a new tar in `<root>/backups/`: complete and read
    back, or absent."""
    dest = private_dir(layout.backups)  # 0700: the account's files are in there
    when = datetime.now(UTC)
    final = _backup_name(dest, spec.name, when)
    tmp = dest / f".{final.name}.tmp"
    what = f"backing up the data directory {spec.name}"
    with _base_fd(layout) as dfd, _disk_errors(what):
        assert dfd is not None
        top = _open_dir(spec.name, dfd)
        try:
            require_space(dest, treetar.estimate(top), what)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    os.fchmod(fh.fileno(), 0o600)
                    sink = treetar.Hashing(fh)
                    digest = treetar.write_tar(top, sink)
                    fh.flush()
                    os.fsync(fh.fileno())
                _read_back(tmp, sink.sha.hexdigest(), digest)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
        finally:
            os.close(top)
        _fsync_dir(dest)
    ui.note(f"backup of the data directory {spec.name}: {final.name}, "
            f"{human_bytes(sink.size)}")
    return DataBackup(spec.name, final, sink.size, sink.sha.hexdigest(),
                      when.strftime("%Y-%m-%dT%H:%M:%SZ"), digest)


def _read_back(tar_path: Path, sha256: str, digest: str) -> None:
    """The written tar, read in full: the bytes that were written, holding that tree."""
    with open(tar_path, "rb") as fh:
        source = treetar.Hashing(fh)
        found = treetar.archive_digest(source)
        source.drain()
    if source.sha.hexdigest() != sha256 or found != digest:
        raise InstallError(f"the backup {tar_path.name} did not read back as written",
                           hint="check the disk holding <root>/backups/")


def _fsync_dir(where: Path) -> None:
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- restore

def restore(layout: Layout, made: DataBackup, keep_in: Path | None = None) -> Path | None:
    """Put data directory `made.name` back exactly as `made` holds it. What it replaces is
    deleted, or with `keep_in` moved there first (returned). All or nothing: the tree is
    built aside and checked (the archive's sha256, the tree's digest) before the swap."""
    what = f"restoring the data directory {made.name}"
    require_space(base(layout), made.size, what)
    with _base_fd(layout) as dfd, _disk_errors(what):
        assert dfd is not None
        _remove_leftovers(dfd, layout)
        staging = Path(tempfile.mkdtemp(prefix=f".restore-{made.name}-", dir=base(layout)))
        try:
            _extract_into(made, staging)
            old = _swap(dfd, layout, made.name, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if old is None:
        return None
    if keep_in is None:
        shutil.rmtree(old, ignore_errors=True)
        return None
    kept = private_dir(keep_in) / f"data-{made.name}-replaced-" \
        f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    shutil.move(old, kept)
    return kept


def _extract_into(made: DataBackup, staging: Path) -> None:
    sfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with open(made.path, "rb") as fh:
            source = treetar.Hashing(fh)
            job = treetar.Extract(sfd, {})
            with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    job.member(member, tar)
            source.drain()
            job.finish()
        if (source.sha.hexdigest(), source.size) != (made.sha256, made.size):
            raise InstallError(
                f"data backup {made.path} is missing or changed since it was taken (expected "
                f"{made.size} bytes, sha256 {made.sha256[:16]}…)",
                hint=f"the data directory {made.name} was NOT restored; restore it by hand "
                     "from another copy")
        got = treetar.tree_digest(sfd)
        if got != made.digest:
            raise InstallError(f"the data directory {made.name} restored from {made.path.name}"
                               " differs from what was backed up",
                               hint="it was NOT swapped in; check the disk and restore again")
    except FileNotFoundError as exc:
        if exc.filename != str(made.path):
            raise
        raise InstallError(f"data backup {made.path} is missing",
                           hint=f"the data directory {made.name} was NOT restored; restore "
                                "it by hand from another copy") from None
    finally:
        os.close(sfd)


def _swap(dfd: int, layout: Layout, name: str, staging: Path) -> Path | None:
    """The restored tree `staging` becomes data/<name>; the one it replaces (if any) is
    renamed aside and returned. A crash in between leaves the backup to restore again."""
    aside = base(layout) / f".old-{name}-{staging.name.rsplit('-', 1)[-1]}"
    try:
        os.rename(name, aside.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        old: Path | None = aside
    except FileNotFoundError:
        old = None
    os.rename(staging.name, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)
    return old


# --------------------------------------------------------------------------- install's undo

def restore_taken(layout: Layout, taken: Sequence[DataBackup], record: Record,
                  done: set[str]) -> None:
    """A failed install's undo: every data directory backed up by this attempt is put back,
    unless it is unchanged; its writes are discarded, as its databases' are."""
    for made in taken:
        if fingerprint(layout, made.name) == made.digest:
            record("restore-data", f"done:{made.name}", "unchanged since its backup")
        else:
            ui.step(f"Restoring the data directory {made.name} from {made.path.name}")
            restore(layout, made)
            record("restore-data", f"done:{made.name}", made.path.name)
        done.add(made.name)


def record_left(layout: Layout, taken: Sequence[DataBackup], done: set[str],
                record: Record) -> None:
    """The undo failed: what each data directory it did not restore looks like now, so a later
    recovery can tell whether anything wrote to it since. Best effort."""
    for made in taken:
        if made.name not in done:
            with contextlib.suppress(Exception):
                record("data-state", f"after-failed-rollback:{made.name}",
                       fingerprint(layout, made.name))


# --------------------------------------------------------------------------- recovery

@dataclass(frozen=True)
class PendingData:
    """A data directory's backup an interrupted install must still restore, with its digest as
    that attempt's failed rollback left it (None: not recorded, e.g. after a kill -9)."""

    backup: DataBackup
    after: str | None

    def to_json(self) -> dict[str, object]:
        return self.backup.to_json()


def pending_restores(events: Sequence[tuple[str, str, str, str]]) -> tuple[PendingData, ...]:
    """From one install transaction's journal (ts, step, status, detail): each data directory
    it backed up whose restore neither completed nor was declined."""
    done = {(step, status) for _, step, status, _ in events}
    if ("restore", "skipped") in done:
        return ()
    latest: dict[str, DataBackup] = {}
    after: dict[str, str] = {}
    for _, step, status, detail in events:
        if (step, status) == ("data-backup", "file"):
            made = DataBackup.from_json(json.loads(detail))
            latest[made.name] = made
        elif step == "data-state" and status.startswith("after-failed-rollback:"):
            after[status.partition(":")[2]] = detail
    return tuple(PendingData(made, after.get(name)) for name, made in latest.items()
                 if not done & {("restore-data", f"done:{name}"),
                                ("restore-data", f"skipped:{name}")})


@dataclass(frozen=True)
class Plan:
    backup: DataBackup
    changed: bool  # False: the tree equals its backup, nothing to restore


def plan_restores(layout: Layout, pend: Sequence[PendingData], db_choice: str | None,
                  what: str, running: Callable[[], list[str]]) -> list[Plan]:
    """The pending restores that may run: RecoveryPendingError, before anything is touched, if
    one would discard writes made after the interrupted attempt and the operator has not
    chosen (`--restore-db` / `--keep-db` settle the data directories with the databases)."""
    if db_choice == "keep":
        return []
    plans = []
    for pd in pend:
        now = fingerprint(layout, pd.backup.name)
        if now == pd.backup.digest:
            plans.append(Plan(pd.backup, False))
            continue
        if pd.after is not None:
            later = "it was written to since the failed rollback" if now != pd.after else ""
        else:
            names = running()
            later = (f"{', '.join(names)} ran since the interruption and may have written to "
                     "it" if names else "")
        if later and db_choice != "restore":
            raise RecoveryPendingError(
                f"{what}; the data directory {pd.backup.name}: {later}, and restoring its "
                f"backup would discard every change made since {pd.backup.created}; nothing "
                "was changed")
        plans.append(Plan(pd.backup, True))
    return plans


def run_restores(layout: Layout, plans: Sequence[Plan], record: Record) -> None:
    """Recovery's restores: what each replaces is kept in `<root>/backups/`."""
    for plan in plans:
        made = plan.backup
        if not plan.changed:
            record("restore-data", f"done:{made.name}", "unchanged since its backup")
            continue
        ui.step(f"Restoring the data directory {made.name} from {made.path.name}")
        kept = restore(layout, made, keep_in=layout.backups)
        if kept is not None:
            ui.note(f"its contents as they were are kept in {kept}")
            record("restore-data", f"saved:{made.name}", str(kept))
        record("restore-data", f"done:{made.name}", made.path.name)


def skip_restores(pend: Sequence[PendingData], record: Record) -> None:
    for pd in pend:
        record("restore-data", f"skipped:{pd.backup.name}", "kept as it is (--keep-db)")
