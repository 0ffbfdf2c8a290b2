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
import threading
from collections.abc import Callable
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
