"""StrictModes, as sshd has them: what bundler trusts on the target must be safe from other users.

bundler runs as root and trusts what it reads under the install root: the root itself, the
state directory and `state.db` (the journal recovery acts on), the trust store (the keys a
bundle may be signed with) and `shared/`, `shared/.env` (the environment its commands run
with). Any of them owned by another user, or writable by group or others, would let a local
user plant a trusted key or an `LD_PRELOAD` and have code run as root: refused (StateError,
exit 14) before anything is read from it or changed.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from bundler.errors import StateError
from bundler.install.layout import Layout


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def problem(path: Path) -> str | None:
    """Why `path` may not be trusted, or None (also when it does not exist)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    me = os.geteuid()
    if st.st_uid not in (0, me):
        return f"is owned by {_owner_name(st.st_uid)}, not {_owner_name(me)}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for w, bit in (("its group", stat.S_IWGRP),
                                            ("others", stat.S_IWOTH)) if st.st_mode & bit)
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check(*items: tuple[Path, str]) -> None:
    """Refuse if any (path, what it is) is owned by another user or group/other-writable."""
    bad = [(path, what, why) for path, what in items if (why := problem(path)) is not None]
    if not bad:
        return
    path, what, why = bad[0]
    more = f" (and {len(bad) - 1} more: {', '.join(str(p) for p, _, _ in bad[1:])})" \
        if len(bad) > 1 else ""
    paths = " ".join(str(p) for p, _, _ in bad)
    user = _owner_name(os.geteuid())
    raise StateError(
        f"{path} ({what}) {why}: another user could make bundler run their code{more}",
        hint=f"if that is not intended, make it yours and not writable by others: "
             f"chown {user}: {paths} && chmod go-w {paths}")


def check_target(root: Path) -> None:
    """Everything bundler trusts under an install root (what exists of it): the root,
    `state/`, `state.db`, the trust store and its keys, `shared/` and `shared/.env`. Called
    wherever any of them is read, so every target command checks before it acts."""
    layout = Layout(root)
    store = layout.trust_dir
    keys = sorted(store.glob("*.pub")) if store.is_dir() else []
    check((root, "the install root"), (layout.state_dir, "the state directory"),
          (layout.db, "the state database"), (store, "the trust store"),
          *((k, "a trusted key") for k in keys), (layout.shared, "the shared directory"),
          (layout.env_file, "the shared environment file"))
