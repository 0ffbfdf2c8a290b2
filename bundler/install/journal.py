"""The install's journal: each step's start and end in the state database (what recovery acts
on after a crash), printed as it goes."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator

from bundler import ui
from bundler.errors import BundlerError
from bundler.faults import fault_point
from bundler.install.state import State


def reason(exc: BaseException) -> str:
    """A failure in one line, as the journal and the error keep it."""
    if isinstance(exc, BundlerError):
        return exc.message.splitlines()[0]
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl+C)"
    return f"{type(exc).__name__}: {exc}"


class Journal:
    """Records each step's start and end in the state database, and prints it. Steps may run
    in several threads at once (see bundler.install.packages): one lock serializes the
    records."""

    def __init__(self, state: State, txn: str, version: str) -> None:
        self.state = state
        self.txn = txn
        self.version = version
        self._lock = threading.RLock()

    def record(self, step: str, status: str, detail: str = "") -> None:
        with self._lock:
            self.state.event(self.txn, self.version, step, status, detail)

    @contextlib.contextmanager
    def step(self, name: str, text: str) -> Iterator[None]:
        """Journal step `name` (`started`, then `done` or `failed` with why); the fault point
        of the same name fires as it starts (bundler.faults)."""
        ui.step(text)
        with self._lock:  # a crash at the fault point leaves this step the journal's last
            self.record(name, "started")
            fault_point(name)
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):  # the failure itself is the news
                self.record(name, "failed", reason(exc))
            raise
        self.record(name, "done")
