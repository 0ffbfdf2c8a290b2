"""Human output on stderr: step lines, and a progress bar for long byte-counted work.

Every line goes through `bundler.redact` first: no secret reaches the console.
stdout is reserved for results (and for `--json`), so automation can parse it while a person
still sees progress. Progress bars are drawn only on a terminal; elsewhere, plain lines.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from bundler.redact import redact

Log = Callable[[str], None]

_console = Console(stderr=True, highlight=False)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def step(text: str) -> None:
    """One line of progress: what bundler is doing now."""
    if not _quiet:
        text = redact(text)
        _console.print(f"[bold cyan]==>[/] {text}", markup=True, soft_wrap=True) \
            if _console.is_terminal else print(f"==> {text}", file=sys.stderr, flush=True)


def note(text: str) -> None:
    if not _quiet:
        print(f"    {redact(text)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def bytes_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n)` callable; draws a bar on a terminal, nothing elsewhere."""
    if _quiet or not _console.is_terminal:
        yield lambda n: None
        return
    with Progress(TextColumn("    {task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=_console,
                  transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
