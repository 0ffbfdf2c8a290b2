"""The `bundle` command as the target kit carries it: the target-side commands only (no
build, lock, init, validate or keygen, and none of their modules or dependencies)."""

from __future__ import annotations

from bundler import progname
from bundler.cli import inspection, support, target, vulns  # noqa: F401 - registers the commands
from bundler.cli.common import cli


def main(invocation: str = progname.DEFAULT) -> None:
    """`invocation`: how the operator runs this kit (kitboot.invocation); every hint that
    names a command, and click's usage lines, say it."""
    progname.set_prog(invocation)
    cli(prog_name=progname.prog())
