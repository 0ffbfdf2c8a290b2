"""Rendering results and errors for people (stderr/stdout text) and machines (--json)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from bundler.errors import BundlerError, ProfileError
from bundler.redact import redact, redact_tree


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on stdout: boxed on a terminal, plain aligned columns elsewhere (pipes, logs)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=False)
    grid = Table(*headers, box=box.SIMPLE_HEAD if console.is_terminal else None,
                 show_header=True, header_style="bold", pad_edge=False)
    for row in rows:
        grid.add_row(*row)
    console.print(grid)


_context: dict[str, str] = {}  # fields every JSON document of this command carries (root)
_json_mode = False


def begin(as_json: bool) -> None:
    """A command starts: output for programs or people; no context from an earlier one."""
    global _json_mode
    _json_mode = as_json
    _context.clear()


def json_mode() -> bool:
    return _json_mode


def add_context(**fields: str) -> None:
    """Fields (e.g. the root the command used) every JSON document it prints from now carries,
    its errors included; a document's own field of the same name wins."""
    _context.update(fields)


def emit_json(data: Any) -> None:
    """The one JSON document on stdout (with the command's context, e.g. its root); every
    string in it redacted (bundler.redact)."""
    if isinstance(data, dict):
        data = {**_context, **data}
    sys.stdout.write(json.dumps(redact_tree(data), indent=2, sort_keys=True, default=str) + "\n")


def error(exc: BundlerError, as_json: bool) -> None:
    """The error line(s) and hint, or its JSON document; secrets redacted either way."""
    if as_json:
        emit_json({"ok": False, **exc.to_dict()})
        return
    if isinstance(exc, ProfileError):
        for problem in exc.problems:
            print(f"  {redact(str(problem))}", file=sys.stderr)
        print(f"error: profile has {len(exc.problems)} problem(s)", file=sys.stderr)
    else:
        first, *rest = redact(exc.message).splitlines() or [""]
        for line in rest:
            print(f"  | {line}", file=sys.stderr)
        print(f"error: {first}", file=sys.stderr)
    print(f"hint: {redact(exc.hint)}", file=sys.stderr)
