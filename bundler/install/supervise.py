"""The supervisor of one service: runs it, restarts it when it crashes, stops it on SIGTERM.

Started detached by the process runtime as `python -m bundler.install.supervise SPEC.json`,
so services outlive the `bundle install` that started them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from bundler import proc
from bundler.fsutil import atomic_write_bytes

MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0
STOP_GRACE = 10.0


def start_time(pid: int) -> str | None:
    """Kernel start time of a pid: with the pid, it names a process uniquely (no reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    pidfile = Path(spec["pidfile"])
    stopping = threading.Event()

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    atomic_write_bytes(pidfile, f"{os.getpid()} {start_time(os.getpid())}\n".encode())
    backoff = 1.0
    log_fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while not stopping.is_set():
            started = time.monotonic()
            child = proc.popen(spec["argv"], cwd=Path(spec["cwd"]), env=spec["env"],
                               log_fh=log_fd)
            while child.poll() is None and not stopping.is_set():
                stopping.wait(0.2)
            if stopping.is_set():
                child.terminate()
                try:
                    child.wait(STOP_GRACE)
                except Exception:
                    child.kill()
                    child.wait()
                break
            code = child.returncode
            if time.monotonic() - started > STABLE_AFTER:
                backoff = 1.0
            os.write(log_fd, f"[supervisor] {spec['name']} exited with {code}; restarting in "
                             f"{backoff:.0f}s\n".encode())
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stopping.is_set():
                stopping.wait(0.2)
            backoff = min(backoff * 2, MAX_BACKOFF)
    finally:
        os.close(log_fd)
        pidfile.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
