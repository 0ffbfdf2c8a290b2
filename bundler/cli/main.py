"""The `bundle` command: the group, with every command module registered."""

from __future__ import annotations

from bundler.cli import authoring, inspection, keys, target, transfer  # noqa: F401 - registers the commands
from bundler.cli.common import cli


def main() -> None:
    cli(prog_name="bundle")
