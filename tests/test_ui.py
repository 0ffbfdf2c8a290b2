"""Console output: rich is imported only when progress can be drawn (a build's output to a
pipe pays no import for it), and deciding so gives rich's own answer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = """
import sys
from bundler import ui
ui.step("packing"); ui.note("detail")
with ui.bytes_progress("x", 10) as advance:
    advance(10)
print(ui.live(), "rich" in sys.modules)
"""


def _probe(**env: str) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "FORCE_COLOR")}
    done = subprocess.run([sys.executable, "-c", _PROBE], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip(), done.stderr


def test_a_pipe_gets_plain_lines_without_importing_rich() -> None:
    out, err = _probe()
    assert out == "False False"
    assert err == "==> packing\n    detail\n"


@pytest.mark.parametrize(("env", "live"), [
    ({"FORCE_COLOR": "1"}, True), ({"FORCE_COLOR": ""}, False),
    ({"TTY_COMPATIBLE": "1"}, True), ({"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"}, False)])
def test_what_forces_a_terminal_is_still_for_rich_to_decide(env: dict[str, str],
                                                          live: bool) -> None:
    out, _ = _probe(**env)
    assert out == f"{live} True"
