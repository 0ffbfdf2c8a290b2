"""Testing hook for crash recovery: BUNDLER_FAULT=kill:POINT makes the process die (SIGKILL)
at POINT, the way a power cut or `kill -9` would; BUNDLER_FAULT=int:POINT sends it SIGINT
there, as an operator's Ctrl+C would. Crash tests are so deterministic rather than
timing-based. Points: every journaled install step as it starts (`images`, `python`,
`migrate`, ...), `extract` (staging begins), `python:<command>` (each command of the Python
step), `migrate:applied` (after each SQL file), `health` (started, not yet checked), `commit`
(switched, not yet recorded), `committed` (recorded) and `images-stream` (the engine has
received part of the image archive).

BUNDLER_FAULT=fill:POINT fills the filesystem holding BUNDLER_FAULT_FILL (a file it creates
there) at POINT until a write fails with ENOSPC, as a disk filling up mid-install would;
every later write on that filesystem fails the same way until the test removes the file.

BUNDLER_FAULT=corrupt:POINT makes `corrupt_point(POINT)` true, for data faults the code under
test injects itself: `export-readback` flips one byte of the first bundle file `bundle export`
has written (after its fsync), so the read-back check must catch it."""

from __future__ import annotations

import errno
import os
import signal


def fault_point(point: str) -> None:
    fault = os.environ.get("BUNDLER_FAULT")
    if fault == f"kill:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"int:{point}":
        os.kill(os.getpid(), signal.SIGINT)
    elif fault == f"fill:{point}":
        _fill(os.environ["BUNDLER_FAULT_FILL"])


def _fill(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def corrupt_point(point: str) -> bool:
    return os.environ.get("BUNDLER_FAULT") == f"corrupt:{point}"
