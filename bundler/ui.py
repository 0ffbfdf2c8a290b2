"""Human output on stderr: step lines, and live progress for long work.

Every line is redacted first; stdout is reserved for results and `--json`. Live progress
(`bytes_progress`, `downloads` + `file_progress`, `activity`) is drawn only on a terminal and
never with `--json`, plain lines elsewhere; thread-safe (one shared rich `Live`).
See docs/design/contributing.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from bundler.redact import redact

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

Log = Callable[[str], None]

_made: Console | None = None
_quiet = False
_plain = False  # --json: plain lines only, no live progress, no colour
_lock = threading.RLock()
_live: Progress | None = None
_live_users = 0


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def set_plain(plain: bool) -> None:
    """No live progress and no styling (`--json`: the output is for programs)."""
    global _plain
    _plain = plain


def _console() -> Console:
    """rich's console on stderr, made when first needed: importing rich takes about a tenth
    of a second, which plain output (a pipe, --json, CI) never needs."""
    global _made
    with _lock:
        if _made is None:
            from rich.console import Console

            _made = Console(stderr=True, highlight=False)
        return _made


def _terminal() -> bool:
    """rich's `is_terminal` for stderr, without importing rich when its answer is known: no
    tty and neither of the variables rich lets force one (TTY_COMPATIBLE, FORCE_COLOR)."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr: rich says no too
        tty = False
    if not tty and "TTY_COMPATIBLE" not in os.environ and "FORCE_COLOR" not in os.environ:
        return False
    return _console().is_terminal


def live() -> bool:
    """Whether progress is drawn: on a terminal, not quiet, not --json."""
    return not _quiet and not _plain and _terminal()


def step(text: str) -> None:
    """One line of progress: what bundler is doing now."""
    if not _quiet:
        text = redact(text)
        if live():
            _console().print(f"[bold cyan]==>[/] {text}", markup=True, soft_wrap=True)
        else:
            print(f"==> {text}", file=sys.stderr, flush=True)


def note(text: str) -> None:
    if not _quiet:
        if live():
            _console().print(f"    {redact(text)}", markup=False, soft_wrap=True)
        else:
            print(f"    {redact(text)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _shared() -> Iterator[Progress]:
    """The one live display, started by its first user and stopped by its last (threads
    share it: concurrent install steps show one row each)."""
    global _live, _live_users
    with _lock:
        if _live is None:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            _live = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                             BarColumn(bar_width=30), TextColumn("{task.fields[amount]}"),
                             TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                             console=_console(), transient=True, refresh_per_second=8)
            _live.start()
        _live_users += 1
        progress = _live
    try:
        yield progress
    finally:
        with _lock:
            _live_users -= 1
            if _live_users == 0 and _live is not None:
                _live.stop()
                _live = None


@contextlib.contextmanager
def bytes_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n)` callable; draws a bar on a terminal, nothing elsewhere."""
    if not live():
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("    {task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=_console(),
                  transient=True) as bar:
        task = bar.add_task(redact(label), total=total)
        yield lambda n: bar.advance(task, n)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# Off a terminal, an activity whose detail changes says so at most this often (seconds): a
# pipe or a CI log sees a long health wait go on, not a silence.
PLAIN_EVERY = 5.0


class Activity:
    """A spinner row: what is running, for how long, and (`update`) the latest detail such as
    an attempt count. Off a terminal (a pipe, --json), a plain line with the latest detail
    every PLAIN_EVERY seconds instead (`update` and `tick` print it when due)."""

    def __init__(self, progress: Progress | None, task: TaskID | None, label: str,
                 plain: bool = False) -> None:
        self._progress = progress
        self._task = task
        self._label = label
        self._plain = plain
        self._began = self._said = time.monotonic()
        self._detail = ""

    def update(self, detail: str) -> None:
        self._detail = detail
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=redact(f"{self._label} ({detail})"))
        self.tick()

    def tick(self) -> None:
        """Print the latest detail as a plain line if one is due (off a terminal only)."""
        now = time.monotonic()
        if self._plain and self._detail and now - self._said >= PLAIN_EVERY:
            self._said = now
            note(f"{self._label}: {self._detail} ({now - self._began:.0f}s)")


@contextlib.contextmanager
def activity(label: str) -> Iterator[Activity]:
    """A spinner with elapsed time while the block runs (terminal only; elsewhere the
    periodic plain lines of `Activity`)."""
    if not live():
        yield Activity(None, None, label, plain=not _quiet)
        return
    with _shared() as progress:
        task = progress.add_task(redact(f"    {label}"), total=None, amount="", speed="")
        try:
            yield Activity(progress, task, f"    {label}")
        finally:
            progress.remove_task(task)


class FileBar:
    """One file's row while it downloads; `retrying` is an http on_retry callback."""

    def __init__(self, progress: Progress | None, task: TaskID | None, label: str) -> None:
        self._progress = progress
        self._task = task
        self._label = label
        self._done = 0
        self._total: int | None = None

    def total(self, size: int | None) -> None:
        self._total = size
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=size, completed=0)
            self._show()

    def restart(self) -> None:
        self._done = 0
        if self._progress is not None and self._task is not None:
            self._progress.reset(self._task, total=self._total)
            self._show()

    def advance(self, n: int) -> None:
        self._done += n
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)
            self._show()

    def retrying(self, attempt: int, why: str, waited: float) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=redact(
                f"    {self._label} (attempt {attempt}: {why}, waited {waited:.1f}s)"))

    def _show(self) -> None:
        assert self._progress is not None and self._task is not None
        amount = _size(self._done) + (f"/{_size(self._total)}" if self._total else "")
        # `tasks` is a list: a task's id is not its index once other rows were removed
        speed = next((t.speed for t in self._progress.tasks if t.id == self._task), None)
        self._progress.update(self._task, amount=amount,
                              speed=f"{_size(speed)}/s" if speed else "")


class Downloads:
    """A row counting files (`n/N files`), under which each file in flight has its own."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self.progress = progress
        self.task = task

    def file_done(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, 1)
            t = self.progress.tasks[[x.id for x in self.progress.tasks].index(self.task)]
            self.progress.update(self.task, amount=f"{int(t.completed)}/{int(t.total or 0)} "
                                                   "files")


@contextlib.contextmanager
def downloads(label: str, files: int) -> Iterator[Downloads]:
    if not live() or files == 0:
        yield Downloads(None, None)
        return
    with _shared() as progress:
        task = progress.add_task(redact(f"    {label}"), total=files,
                                 amount=f"0/{files} files", speed="")
        try:
            yield Downloads(progress, task)
        finally:
            progress.remove_task(task)


@contextlib.contextmanager
def file_progress(group: Downloads | None, label: str) -> Iterator[FileBar]:
    """A row for one file of `group` (none when the group draws nothing)."""
    if group is None or group.progress is None:
        yield FileBar(None, None, label)
        return
    progress = group.progress
    task = progress.add_task(redact(f"    {label}"), total=None, amount="", speed="")
    try:
        yield FileBar(progress, task, label)
        group.file_done()
    finally:
        progress.remove_task(task)


__all__ = ["Activity", "Downloads", "FileBar", "Log", "activity",
           "bytes_progress", "downloads", "file_progress", "live", "note", "set_plain",
           "set_quiet", "step"]
