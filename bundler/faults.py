"""Testing hook for crash recovery: BUNDLER_FAULT=kill:POINT makes the process die (SIGKILL)
at POINT, the way a power cut or `kill -9` would; BUNDLER_FAULT=int:POINT sends it SIGINT
there, as an operator's Ctrl+C would. Crash tests are so deterministic rather than
timing-based. Points: every journaled install step as it starts (`images`, `python`,
`migrate`, ...), `commit` (switched, not yet recorded) and `images-stream` (the engine has
received part of the image archive).

BUNDLER_FAULT=corrupt:POINT makes `corrupt_point(POINT)` true, for data faults the code under
test injects itself: `export-readback` flips one byte of the first bundle file `bundle export`
has written (after its fsync), so the read-back check must catch it."""

from __future__ import annotations

import os
import signal


def fault_point(point: str) -> None:
    fault = os.environ.get("BUNDLER_FAULT")
    if fault == f"kill:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"int:{point}":
        os.kill(os.getpid(), signal.SIGINT)


def corrupt_point(point: str) -> bool:
    return os.environ.get("BUNDLER_FAULT") == f"corrupt:{point}"
