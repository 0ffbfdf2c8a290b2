"""Exit codes the tests name that no class of bundler.errors stands for (the others are
`SomeError.exit_code`)."""

from __future__ import annotations

import click

from bundler.bundle.kitboot import REFUSED as KIT_REFUSED

USAGE = click.UsageError.exit_code  # a command line the CLI does not take
__all__ = ["KIT_REFUSED", "USAGE"]
