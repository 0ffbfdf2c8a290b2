"""The command an operator types to run bundler here: one fact, set once at startup.

On the connected side and wherever bundler is installed as a package it is `bundle`. On a
target it is usually the kit (`python3 -I -S /media/usb/bundler-kit-....pyz`), which has no
`bundle` on PATH: every hint and message that tells the operator what to run next names the
command through `cmd()`, so it is one they can paste. Commands that only exist on the
connected side (`bundle build`, `bundle keygen`, `bundle kit`) keep the literal `bundle`.

The kit's bootstrap sets it (`bundler.bundle.kitboot.invocation`); a copy of the kit installed into
an install root can set its own path the same way.
"""

from __future__ import annotations

import os
import shlex

DEFAULT = "bundle"

_prog = DEFAULT


def set_prog(invocation: str) -> None:
    """Name the command (shell words, already quoted where needed). Called once, at startup."""
    global _prog
    _prog = invocation.strip() or DEFAULT


def prog() -> str:
    return _prog


def cmd(*words: str | os.PathLike[str]) -> str:
    """The command line that runs bundler with `words` here, each word quoted for the shell
    where it needs it: cmd("status", "--root", root) -> "bundle status --root /srv/app"."""
    return " ".join([_prog, *(shlex.quote(os.fspath(w)) for w in words)])
