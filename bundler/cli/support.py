"""`bundle support`: the diagnostic archive of an install root (written on the target, read
back on the connected side with --show). docs/support.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from bundler.cli import options
from bundler.cli.common import cli, handled, use_root
from bundler.cli.render import emit_json
from bundler.fsutil import human_bytes


def _max_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from bundler.install.support import parse_size

    size = parse_size(value)
    if size is None:
        raise click.BadParameter(f"{value!r} is not a size of 1M or more (e.g. 50M, 1G)")
    return size


@cli.command()
@click.option("--root", type=click.Path(path_type=Path), default=None, envvar=options.ROOT_ENV,
              show_envvar=True, help="Install root to collect from (not with --show).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="The archive to write: NAME.tar.gz, or NAME.tar.zst for zstd.")
@click.option("--max-size", "max_size", default="50M", show_default=True,
              callback=_max_size, help="Bound on the archive's size; what does not fit is cut "
                                       "(logs keep their last lines) and MANIFEST.json says so.")
@click.option("--show", "show", type=click.Path(path_type=Path), default=None,
              help="Read an archive written by `bundle support` (on the connected side) and "
                   "summarise it: the host, releases, last failures, what was cut.")
@options.json_output
def support(root: Path | None, out: Path | None, max_size: int, show: Path | None,
            as_json: bool) -> None:
    """Collect a diagnostic archive of ROOT to carry out of the air gap, every secret masked:
    status, doctor, history, install reports, service log tails, versions, host facts, the
    host policy, trusted key ids, SBOM summaries. Changes nothing under ROOT."""
    if show is not None and out is not None:
        raise click.UsageError("--show reads an archive and --out writes one: give one of them")
    if show is None and (out is None or root is None):
        raise click.UsageError("give --root DIR and --out FILE (or --show FILE)")
    if out is not None:
        _check_out(out)
    _run(root=root, out=out, max_size=max_size, show=show, as_json=as_json)


def _check_out(out: Path) -> None:
    """--out names a file to write, in a directory this process can write (the archive is
    written beside it under a temporary name first)."""
    if out.is_dir():
        raise click.BadParameter(f"{out} is a directory: name the archive file, e.g. "
                                 f"{out / 'support.tar.gz'}", param_hint="--out")
    if not out.name.endswith((".tar.gz", ".tgz", ".tar.zst")):
        raise click.BadParameter(f"{out.name}: name it NAME.tar.gz (or .tgz), or NAME.tar.zst "
                                 "for zstd", param_hint="--out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # made on the way (like every directory bundler writes into)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write in {parent} (a read-only stick, or "
                                 "permissions)", param_hint="--out")


@handled
def _run(root: Path | None, out: Path | None, max_size: int, show: Path | None,
         as_json: bool) -> None:
    if show is not None:
        _show(show, as_json)
        return
    assert root is not None and out is not None
    from bundler.install import support as collector

    result = collector.collect(use_root(root), out, max_size)
    if as_json:
        emit_json({"ok": True, **result.to_json()})
        return
    click.echo(f"wrote {result.path}: {result.members} member(s), {human_bytes(result.size)}")
    for c in result.cut:
        click.echo(f"  cut {c['member']}: {c['why']}")
    for e in result.errors:
        click.echo(f"  section {e['section']} not collected: {e['detail']}")


def _show(path: Path, as_json: bool) -> None:
    from bundler.bundle import supportfile
    from bundler.install.support import summary

    doc = summary(supportfile.read(path))
    if as_json:
        emit_json({"ok": True, **doc})
        return
    h = doc["host"]
    click.echo(f"{h['hostname']} ({h['os']}), bundler {h['bundler']}, root {h['root']}, "
               f"collected {h['created']}")
    health = {True: "healthy", False: "UNHEALTHY", None: "health unknown"}[doc["healthy"]]
    click.echo(f"current release: {doc['current'] or 'none'} ({health})")
    for r in doc["releases"]:
        click.echo(f"  release {r['version']}: {r['status']} (installed {r['installed_at']})")
    _lines("last failures", [f"{e['ts']} {e['version']} {e['step']} {e['status']}: "
                             f"{e['detail']}" for e in doc["failures"]])
    _lines("doctor FAIL rows", [f"{r['check']}: {r['detail']}" for r in doc["doctor_failures"]])
    _lines("cut", [f"{c['member']}: {c['why']}" for c in doc["cut"]])
    _lines("sections not collected", [f"{s['section']}: {s['detail']}"
                                      for s in doc["section_errors"]])
    click.echo(f"{doc['members']} member(s)")


def _lines(title: str, lines: list[Any]) -> None:
    if lines:
        click.echo(f"{title}:")
        for line in lines:
            click.echo(f"  {line}")
