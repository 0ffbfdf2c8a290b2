"""Options shared by several commands, defined once (as pip-tools does)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

json_output = click.option("--json", "as_json", is_flag=True,
                           help="Print a machine-readable JSON result on stdout.")
# The install root: --root, else BUNDLER_ROOT (set it once in a shell that works on one root).
ROOT_ENV = "BUNDLER_ROOT"
root = click.option("--root", type=click.Path(path_type=Path), required=True, envvar=ROOT_ENV,
                    show_envvar=True,
                    help="Install root (holds releases/, current and state/).")
trust_root = click.option("--root", type=click.Path(path_type=Path), default=None,
                          envvar=ROOT_ENV, show_envvar=True,
                          help="Use the trust store of this install root (when no --trust).")
trust = click.option("--trust", "trust_path", type=click.Path(path_type=Path), default=None,
                     help="Trusted public key (NAME.pub), or a directory of *.pub keys. "
                          "Default: the install root's trust store (`bundle trust add`).")
db_choice = click.option(
    "--restore-db", "db_choice", flag_value="restore", default=None,
    help="An interrupted install left a database restore pending and the database was written "
         "to since: restore the backup anyway (the current contents are saved first).")
keep_db = click.option(
    "--keep-db", "db_choice", flag_value="keep",
    help="An interrupted install left a database restore pending: keep the database as it is.")
cache_dir = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                         help="Content-addressed download cache, also where kits are built "
                              "and kept (default: XDG cache dir).")


def platform_tag(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`--platform TAG`, checked where it enters (bundler.bundle.platforms)."""
    from bundler.bundle.platforms import parse_platform

    try:
        return str(parse_platform(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a Linux wheel platform (e.g. "
                                 "manylinux_2_28_x86_64, musllinux_1_2_aarch64)") from None


def _check_allow(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
                 ) -> tuple[str, ...]:
    from bundler.bundle.hostreq import grant_parse

    for v in values:
        grant_parse(v, click.BadParameter)
    return values


allow = click.option(
    "--allow", "allow", multiple=True, metavar="KIND[=VALUE]", callback=_check_allow,
    help="Allow the release to ask this of the host, for this command only, beyond the root's "
         "policy.yaml (repeatable): privileged, cap=NAME, host-mount=PATH, host-network, "
         "host-pid, host-ipc, host-userns, host-uts, host-cgroup, device=PATH, "
         "security-opt=OPT, join-container=NAME, volume-driver=NAME, user=NAME. "
         "See docs/host-policy.md.")


def _fail_on() -> Any:  # a click.Choice (generic in newer click only)
    from bundler.bundle.osv import FAIL_ON

    return click.Choice(FAIL_ON, case_sensitive=False)


def fail_on(what: str, default: str) -> Callable[[F], F]:
    """`--fail-on SEVERITY` (docs/vulns.md), for `build --vulns` and `vulns`."""
    return click.option("--fail-on", "fail_on", type=_fail_on(), default=None,
                        help=f"The lowest severity that refuses {what} (exit 26); any: every "
                             f"finding; none: report only. Default: {default}.")
