"""The click group and the error handling every command shares."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bundler import __version__, ui
from bundler.cli import render
from bundler.cli.render import error
from bundler.errors import BundlerError, Interrupted, SpaceError, disk_full
from bundler.redact import redact

if TYPE_CHECKING:
    from bundler.install.layout import Layout

F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    """Turn bundler errors into one line + hint and the error's exit code (printed redacted,
    by `render.error`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        render.begin(as_json)
        ui.set_quiet(False)
        ui.set_plain(as_json)  # output for programs: plain lines, no live progress
        try:
            return fn(*args, **kwargs)
        except BundlerError as exc:
            error(exc, as_json)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            exc2 = Interrupted("interrupted")
            error(exc2, as_json)
            sys.exit(exc2.exit_code)
        except Exception as exc:
            if disk_full(exc):  # not a bug: the host's disk is full
                full = SpaceError(f"a disk is full: {type(exc).__name__}: {exc}")
                error(full, as_json)
                sys.exit(full.exit_code)
            # a bug: still one line, with the traceback kept for a report
            import tempfile
            import traceback

            with tempfile.NamedTemporaryFile("w", prefix="bundler-crash-", suffix=".txt",
                                             delete=False) as fh:
                fh.write(redact(traceback.format_exc()))
            internal = BundlerError(f"internal error: {type(exc).__name__}: {exc}",
                                    hint=f"this is a bug in bundler; the traceback is in "
                                         f"{fh.name}")
            error(internal, as_json)
            sys.exit(internal.exit_code)

    return wrapper  # type: ignore[return-value]


def use_root(root: Path, *, create: bool = False) -> Layout:
    """The install root a command works on (--root, else BUNDLER_ROOT), made absolute and said
    once: `==> root: DIR` on stderr for people, a `root` field in every --json document. It
    must be an install root (StateError, exit 14: a misspelt --root is named as such) unless
    the command may create it (`create`: `install --trust`, `trust add`)."""
    from bundler.install.layout import Layout, check_root

    layout = Layout(root.resolve())
    render.add_context(root=str(layout.root))
    if not render.json_mode():
        ctx = click.get_current_context(silent=True)
        from_env = ctx is not None and \
            ctx.get_parameter_source("root") == click.core.ParameterSource.ENVIRONMENT
        ui.step(f"root: {layout.root}" + (" (from BUNDLER_ROOT)" if from_env else "")
                + (" (new)" if create and not layout.root.exists() else ""))
    if not create:
        check_root(layout.root)
    return layout


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bundler")
@click.option("-v", "--verbose", is_flag=True, help="Log every command bundler runs.")
def cli(verbose: bool) -> None:
    """Carry software releases across an air gap.

    \b
    Connected machine:  bundle build PROFILE --key release.key --out dist/
    Air-gapped host:    bundle install dist/NAME-VERSION.bundle --trust release.pub --root /srv/app
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


