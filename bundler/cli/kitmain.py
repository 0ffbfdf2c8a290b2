"""The `bundle` command as the target kit carries it: the target-side commands only (no
build, lock, init, validate or keygen, and none of their modules or dependencies)."""

from __future__ import annotations

from bundler.cli import inspection, target  # noqa: F401 - registers the commands
from bundler.cli.common import cli


def main() -> None:
    cli(prog_name="bundle")
