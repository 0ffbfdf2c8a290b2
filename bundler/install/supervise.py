"""The supervisor of one service: runs it, restarts it when it crashes, stops it on SIGTERM.

Started detached by the process runtime as `python -m bundler.install.supervise SPEC.json`,
so services outlive the `bundle install` that started them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from bundler import proc
from bundler.errors import CommandError
from bundler.fsutil import atomic_write_bytes
from bundler.redact import redact

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
    # The release's account (the service runs as it; this supervisor stays root, so the
    # account cannot touch its pidfile or spec). Looked up now: it is checked before start.
    user = proc.lookup_user(spec["user"]) if spec.get("user") else None
    if spec.get("user") and user is None:
        print(f"[supervisor] {spec['name']}: user {spec['user']} does not exist",
              file=sys.stderr)
        return 1
    stopping = threading.Event()

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    atomic_write_bytes(pidfile, f"{os.getpid()} {start_time(os.getpid())}\n".encode())
    backoff = 1.0
    log_fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                     0o644)
    state_path = pidfile.with_suffix(".state")
    restarts = 0
    code: int | None = None
    error: str | None = None
    exited_at: float | None = None

    def record(child: int | None) -> None:
        # What `bundle status` and the health checks read: is the service up, and how and
        # when (wall clock: the installer compares it with when it started the release) it
        # last exited. The last exit stays while a restarted child runs. A full disk must not
        # kill the supervisor (the service would run on unsupervised): then it is not written.
        with contextlib.suppress(OSError):
            atomic_write_bytes(state_path, json.dumps(
                {"child": child, "restarts": restarts, "last_exit": code, "error": error,
                 "exited_at": exited_at}).encode(), mode=0o644)

    def say(text: str) -> None:
        with contextlib.suppress(OSError):  # the log's filesystem may be full
            os.write(log_fd, text.encode())

    try:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                child = proc.popen(spec["argv"], cwd=Path(spec["cwd"]), env=spec["env"],
                                   log_fh=log_fd, user=user)
            except CommandError as exc:
                why = redact(exc.message.splitlines()[0], spec.get("secrets", ()))
                say(f"[supervisor] {spec['name']}: {why}\n")
                code, error = None, why
            else:
                record(child.pid)
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
                code, error = child.returncode, None
            if time.monotonic() - started > STABLE_AFTER:
                backoff = 1.0
            restarts += 1
            exited_at = time.time()
            # The log line first: whoever sees the exit in the state file finds the run's
            # output ended by this line (see process_runtime.crashed).
            say(f"[supervisor] {spec['name']} "
                f"{'exited with ' + str(code) if error is None else 'did not start'}"
                f"; restarting in {backoff:.0f}s\n")
            record(None)
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stopping.is_set():
                stopping.wait(0.2)
            backoff = min(backoff * 2, MAX_BACKOFF)
    finally:
        os.close(log_fd)
        pidfile.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
