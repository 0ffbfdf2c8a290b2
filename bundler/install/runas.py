"""The unprivileged account a release's own processes run as (the profile's `user`).

bundler itself runs as root (it loads images, writes under the root, restores databases);
the release's services, host-run command and alembic migrations and command health checks
run as `user` instead: its uid, primary gid and supplementary groups, HOME its home
(proc.RunAs). Everything bundler installs stays root's and read-only to that account; what it
must write is opened to its primary group, never handed over:

- the release's logs/ and run/: root:<group>, mode 1775 (group-writable, sticky: the account
  creates its own files there but cannot remove or replace the supervisor's pidfiles, run
  specs and logs, which root opens with O_NOFOLLOW);
- a SQLite database: its directory (created root:<group> 1770 when it does not exist; an
  existing one the account cannot write is refused up front), and the database file and its
  journals (group <group>, g+rw).

The account must exist before anything is created (`preflight`); bundler running as someone
other than root can only "run as" itself.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from bundler import proc, progname
from bundler.bundle import hostneeds
from bundler.bundle.manifest import Manifest
from bundler.errors import BundlerError, InstallError, PolicyError
from bundler.install import db, fsowner
from bundler.install.db import sqlite
from bundler.install.environ import ReleaseEnv
from bundler.install.layout import Layout, ReleaseDir

GROUP_DIR_MODE = 0o1775  # logs/, run/


def names(m: Manifest) -> list[str]:
    """Every account release `m` runs something as, in order of first use."""
    return hostneeds.accounts(m)


def _me() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def account(name: str, error: type[BundlerError] = InstallError) -> proc.RunAs:
    """The account `name` on this host; `error` when it does not exist, or when bundler is
    not root and `name` is not the account it runs as (it could not switch to it)."""
    found = proc.lookup_user(name)
    if found is None:
        raise error(f"the release runs as user {name}, which does not exist on this host",
                    hint=f"create it first: {hostneeds.useradd(name)}")
    if os.geteuid() != 0 and found.switches:
        raise error(f"the release runs as user {name}, but bundler runs as {_me()}, not "
                    "root, and cannot switch to it",
                    hint=f"run `{progname.prog()}` as root (sudo), or build the bundle with "
                         f"`user: {_me()}`")
    return found


def maybe(name: str | None, error: type[BundlerError] = InstallError) -> proc.RunAs | None:
    return account(name, error) if name else None


def _unreachable(user: proc.RunAs, path: Path) -> Path | None:
    """The first existing directory on the way to `path` that `user` cannot search."""
    for d in reversed([path, *path.parents]):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return None
        if not fsowner.can(user, st, 1):
            return d
    return None


def db_owner(m: Manifest) -> proc.RunAs | None:
    """The account whose file access bundler uses for the release's SQLite database: the
    release's `user` when it has one bundler switches to (see fsowner), else None."""
    user = proc.lookup_user(m.runtime.user) if m.runtime.user else None
    return user if user is not None and user.switches else None


def sqlite_file(m: Manifest, env: ReleaseEnv) -> Path | None:
    """The file the release's database lives in (its first that is a file: SQLite), which
    its account must be able to write (None: no such database, or its URL cannot be
    expanded yet)."""
    for spec in m.runtime.all_databases():
        if spec.compose_service:
            continue
        try:
            found = db.owned_file(db.Database(env.expand(spec.url), None))
        except BundlerError:
            continue
        if found is not None:
            return found
    return None


def preflight(m: Manifest, layout: Layout, env: ReleaseEnv) -> list[proc.RunAs]:
    """Every refusal about `user` a host makes before anything is created: the account
    exists (and bundler may switch to it), it can reach the install root, and it could
    write a SQLite database's existing directory. Returns the accounts."""
    users = [account(n, PolicyError) for n in names(m)]
    for user in users:
        blocked = _unreachable(user, layout.root)
        if blocked is not None:
            mode = stat.S_IMODE(os.stat(blocked).st_mode)
            raise PolicyError(f"user {user.name} cannot reach {layout.root}: {blocked} is "
                              f"mode {mode:04o}",
                              hint=f"chmod o+x {blocked}, or install under a root that user "
                                   "can reach (e.g. /srv/NAME)")
    release = account(m.runtime.user, PolicyError) if m.runtime.user else None
    path = sqlite_file(m, env)
    if release is not None and release.switches and path is not None:
        directory = path.parent
        if directory.is_dir() and not fsowner.can(release, directory.stat(), 3):
            raise PolicyError(
                f"user {release.name} cannot write the SQLite database's directory "
                f"{directory}", hint=f"give it its own directory: chgrp {release.group_name()} "
                f"{directory} && chmod 1770 {directory} (or point DATABASE_URL at a directory "
                "that does not exist yet: bundler creates it)")
    return users


def release_dirs(rel: ReleaseDir, user: proc.RunAs | None) -> None:
    """logs/ and run/ of a release, writable by `user`'s group (see the module docstring);
    plain root-owned directories without a user to switch to."""
    for path in (rel.logs, rel.run):
        if user is not None and user.switches and os.geteuid() == 0:
            fsowner.group_dir(path, user, GROUP_DIR_MODE)
        else:
            path.mkdir(parents=True, exist_ok=True)


def sqlite_writable(path: Path, user: proc.RunAs | None) -> None:
    """Let `user` write the SQLite database at `path` (see db.sqlite.writable)."""
    sqlite.writable(path, user)
