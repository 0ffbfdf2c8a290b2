"""Where bundler finds the static tools it carries, one way each (build and target side).

uv: `BUNDLER_UV` if set (an operator's or the kit's choice; it must be an executable file),
else the binary of the `uv` Python package (its wheel ships it; `uv.find_uv_bin()` also finds
it in a `pip install --target` layout such as the kit's), else `uv` on PATH. None: no uv here,
and the caller falls back to what the host has (pip), saying so.

A host's own tool (node, npm) is named by `host_tool`: what PATH finds, as it is now.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bundler.errors import InstallError

UV_ENV = "BUNDLER_UV"


def host_tool(name: str) -> tuple[str, int, int, int] | None:
    """The file PATH finds for `name` (symlinks resolved), with its inode, size and
    modification time: a package upgrade changes one of them. None: not found."""
    found = shutil.which(name)
    if found is None:
        return None
    real = os.path.realpath(found)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return real, st.st_ino, st.st_size, st.st_mtime_ns


def find_uv() -> Path | None:
    """The uv binary to run, or None. A `BUNDLER_UV` that is not an executable file is an
    error, not a silent fallback: it was set on purpose."""
    chosen = os.environ.get(UV_ENV)
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise InstallError(f"{UV_ENV}={chosen} is not an executable file",
                               hint=f"point {UV_ENV} at uv's binary, or unset it to use the "
                                    "one bundler carries")
        return path
    try:
        import uv
    except ImportError:
        pass
    else:
        try:
            return Path(uv.find_uv_bin())
        except FileNotFoundError:  # the package without its binary (e.g. inside a zip)
            pass
    found = shutil.which("uv")
    return Path(found) if found else None
