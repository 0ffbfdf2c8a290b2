"""Testing hook for crash recovery: BUNDLER_FAULT=ACTION:POINT.

`kill` dies by SIGKILL at POINT (a power cut), `int` sends SIGINT (Ctrl+C), `fill` fills the
filesystem holding BUNDLER_FAULT_FILL until a write fails with ENOSPC, `corrupt` makes
`corrupt_point(POINT)` true for data faults the code injects itself. The points:
docs/design/recovery.md, "Tested".
"""

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
