"""Work on files in a directory an unprivileged account can write, with that account's access.

A SQLite database the release's `user` writes lives in a directory that account can write. As
root, SQLite would follow a symlink the account planted there (the database file, or a
`-journal` that does not exist yet) and write a backup's pages, or a journal, wherever it
points: /etc/shadow, another product's database. Linux keeps the filesystem uid and gid per
thread (setfsuid(2), setfsgid(2); glibc does not broadcast them to the other threads), and a
thread whose fsuid is not 0 also loses CAP_DAC_OVERRIDE and the other filesystem
capabilities. So `call` runs the work in a fresh thread switched to the account: symlinks or
not, it reaches only what the account itself can write. Files root opened beforehand stay
usable there (an open descriptor is not checked again).

The thread keeps root's supplementary groups (setgroups is process-wide in glibc); the files
the account creates carry its own groups, so that gives it nothing of the account's.
"""

from __future__ import annotations

import ctypes
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bundler import proc, progname
from bundler.errors import InstallError

T = TypeVar("T")
_QUERY = 0xFFFFFFFF  # (uid_t)-1: change nothing, return the current value


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _switch(user: proc.RunAs) -> None:
    """Switch this thread's filesystem ids to `user` and prove it took effect (the calls
    report no error; reading the value back is the only check)."""
    libc = _libc()
    libc.setfsgid(user.gid)
    libc.setfsuid(user.uid)
    if libc.setfsuid(_QUERY) != user.uid or libc.setfsgid(_QUERY) != user.gid:
        raise InstallError(f"cannot take the file access of user {user.name} "
                           f"(uid {user.uid}) to work on its database",
                           hint=f"run `{progname.prog()}` as root (sudo)")


def call(user: proc.RunAs | None, fn: Callable[[], T]) -> T:
    """`fn()` with `user`'s file access (in a thread of its own), or as is when `user` is None
    or is who bundler already runs as. Returns its value; re-raises its exception."""
    if user is None or not user.switches or os.geteuid() != 0:
        return fn()
    out: list[T] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            _switch(user)
            out.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=work, name=f"as-{user.name}", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out[0]


def can(user: proc.RunAs, st: os.stat_result, bits: int) -> bool:
    """Would `user` get `bits` (4 read, 2 write, 1 search) on a file with this stat? (Mode
    bits only, as the kernel checks them without ACLs.)"""
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid in user.groups or st.st_gid == user.gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def group_dir(path: Path, user: proc.RunAs, mode: int) -> None:
    """`path` a directory root:<user's group> with `mode` (created when missing)."""
    path.mkdir(parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InstallError(f"{path} is not a directory", hint="remove it and start again")
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (0, user.gid, mode):
        os.chown(path, 0, user.gid)
        os.chmod(path, mode)


def own_tree(top: Path, uid: int, gid: int, mask: int = 0o7777, *,
             owned_by: int | None = None) -> None:
    """Give `top` and everything under it to uid:gid, modes cut to `mask`, never through a
    symlink: the tree may be written by an account running at the same time (it can swap a
    directory for a symlink to /etc while root walks it). os.fwalk opens each directory
    relative to its parent and checks it is the one listed; each entry is then changed through
    a descriptor opened without following symlinks (a symlink itself: only its owner).
    `owned_by`: change only what that uid owns (a file the account hard-linked in from
    elsewhere is left alone, and `foreign_entries` names it)."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _own(fd, uid, gid, mask, owned_by)
    finally:
        os.close(fd)
    for _, dirs, files, dir_fd in os.fwalk(top, follow_symlinks=False):
        for name in (*dirs, *files):
            _own_entry(name, dir_fd, uid, gid, mask, owned_by)


def _own(fd: int, uid: int, gid: int, mask: int, owned_by: int | None) -> None:
    st = os.fstat(fd)
    if owned_by is not None and st.st_uid != owned_by:
        return
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.fchown(fd, uid, gid)
    if stat.S_IMODE(st.st_mode) & ~mask:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & mask)


def _own_entry(name: str, dir_fd: int, uid: int, gid: int, mask: int,
               owned_by: int | None) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return  # removed meanwhile
    except OSError:  # a symlink (ELOOP) or a socket (ENXIO): the entry itself, not a target
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if owned_by is None or st.st_uid == owned_by:
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        return
    try:
        _own(fd, uid, gid, mask, owned_by)
    finally:
        os.close(fd)


def foreign_entries(top: Path, uid: int, gid: int, mask: int = 0o7777) -> list[str]:
    """Entries under `top` (itself included) not owned by uid:gid or with mode bits outside
    `mask` (symlinks: owner only), relative to `top`: what `own_tree` left undone."""
    found = []
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return []
    if (st.st_uid, st.st_gid) != (uid, gid) or stat.S_IMODE(st.st_mode) & ~mask:
        found.append(".")
    for dirpath, dirs, files, dir_fd in os.fwalk(top, follow_symlinks=False):
        for name in (*dirs, *files):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            bad_mode = not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & ~mask
            if (st.st_uid, st.st_gid) != (uid, gid) or bad_mode:
                found.append(os.path.relpath(os.path.join(dirpath, name), top))
    return found
