"""The `bundle` command: the group, with every command module registered."""

from __future__ import annotations

from bundler.cli import (  # noqa: F401 - registers the commands
    authoring,
    inspection,
    keys,
    support,
    target,
    transfer,
    vulns,
)
from bundler.cli.common import cli


def main() -> None:
    cli(prog_name="bundle")
