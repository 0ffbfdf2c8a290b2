"""The last words of a failing service, fit for one error line.

A crash's cause is usually the last lines the service printed (`Error: Invalid value for
'--setting'`, an exception's last line). Error lines, the journal and `--json` carry them
condensed: the last few non-empty lines, control characters and colour codes removed, each
line cut, joined with " | ". Callers redact (`bundler.redact`) what they get here.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

LINES = 3       # non-empty lines kept
WIDTH = 160     # characters kept of each
READ = 64 * 1024  # bytes read from the end of a log file

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(line: str, width: int = WIDTH) -> str:
    """One line without colour codes or control characters, at most `width` characters."""
    line = " ".join(_CONTROL.sub(" ", _ANSI.sub("", line)).split())
    return line if len(line) <= width else line[:width - 1] + "…"


def condense(text: str, lines: int = LINES, width: int = WIDTH) -> str:
    """The last `lines` non-empty lines of `text` on one line ("" when there are none)."""
    kept = [c for c in (clean(x, width) for x in text.splitlines()) if c]
    return " | ".join(kept[-lines:])


def read_log(path: Path, limit: int = READ) -> str:
    """The end of a log file bundler's supervisor wrote, or "" when it is not such a file.

    logs/ may be writable by the release's account (see runas): only a regular file owned by
    this process's user with one link is read, opened without following a symlink, so the
    account cannot make root print another file (/etc/shadow) into an error line."""
    return read_tail(path, limit, whole_lines=False)[0]


def read_tail(path: Path, limit: int = READ, whole_lines: bool = True) -> tuple[str, bool]:
    """`read_log`, and whether the file held more than `limit` bytes (then, with
    `whole_lines`, the first, partial line is dropped: a value cut in half there would escape
    the masking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return "", False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            return "", False
        cut = st.st_size > limit
        os.lseek(fd, max(0, st.st_size - limit), os.SEEK_SET)
        data = os.read(fd, limit)
    except OSError:
        return "", False
    finally:
        os.close(fd)
    if cut and whole_lines:
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    return data.decode("utf-8", "replace"), cut
