"""Target-side commands: install, status, history, stop, start, trust."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from bundler.cli import options
from bundler.cli.common import cli, handled
from bundler.cli.render import emit_json, table
from bundler.errors import StateError, UnhealthyError


def _unhealthy(message: str, as_json: bool) -> NoReturn:
    """Exit with UnhealthyError's own code (not 1, which means a bug in bundler). The report
    is already printed; with --json it is the one document on stdout, so no second one."""
    exc = UnhealthyError(message)
    if as_json:
        sys.exit(exc.exit_code)
    raise exc


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@options.trust
@options.root
@click.option("--allow-downgrade", is_flag=True,
              help="Accept a bundle whose sequence is not newer than the last accepted one "
                   "(recorded in history).")
@click.option("--environment", "-e", type=click.Choice(["production", "staging", "development"]),
              default="production", show_default=True,
              help="Which env.defaults of the profile apply (the shared .env always wins).")
@click.option("--allow-degraded", is_flag=True,
              help="Swarm (swarm.yaml in ROOT): install while some nodes are down, with the "
                   "nodes that are up (recorded in history); refused otherwise.")
@options.allow
@options.db_choice
@options.keep_db
@options.json_output
@handled
def install(bundle: Path, trust_path: Path | None, root: Path, allow_downgrade: bool,
            environment: str, allow_degraded: bool, allow: tuple[str, ...],
            db_choice: str | None, as_json: bool) -> None:
    """Verify BUNDLE, install it under ROOT, start it, health-check it, then switch to it.

    BUNDLE may be a .bundle file or a volume set (any part, its .parts index, or base name).
    """
    from bundler.install import trust as trust_store
    from bundler.install.installer import install as do_install
    from bundler.install.layout import Layout

    trusted = trust_store.resolve(trust_path, Layout(root.resolve()))
    result = do_install(bundle, trusted, root, allow_downgrade, environment, db_choice,
                        allow_degraded, allow)
    if as_json:
        emit_json({"ok": True, **result.to_json()})
        return
    for c in result.checks:
        click.echo(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    verb = "already current" if result.status == "unchanged" else "installed and healthy"
    click.echo(f"{result.version} {verb} under {root}")


@cli.command()
@options.root
@options.json_output
@handled
def status(root: Path, as_json: bool) -> None:
    """Show the current release, its services and its health."""
    from bundler.install.control import status as get_status
    from bundler.install.layout import Layout

    st = get_status(Layout(root.resolve()))
    if as_json:
        emit_json({"ok": True, **st.to_json()})
    else:
        if st.current is None:
            click.echo(f"{root}: no current release")
        else:
            c = st.current
            click.echo(f"{st.product} {c.version} (sequence {c.sequence}, {c.status}, "
                       f"installed {c.installed_at}) — {'healthy' if st.healthy else 'UNHEALTHY'}")
            for s in st.services:
                click.echo(f"  service {s.name}: {'running' if s.running else 'STOPPED'}"
                           f" ({s.detail})")
            for chk in st.checks:
                click.echo(f"  check {chk.name}: {'ok' if chk.ok else 'FAIL'} — {chk.detail}")
        if st.pending is not None:
            click.echo(f"PENDING RECOVERY: {st.pending.describe()}; `bundle recover --root "
                       f"{root}` settles it")
    if st.current is not None and not st.healthy:
        bad = [f"service {s.name} stopped" for s in st.services if not s.running]
        bad += [f"check {chk.name} failed" for chk in st.checks if not chk.ok]
        _unhealthy(f"{st.product} {st.current.version} is unhealthy"
                   + (f": {', '.join(bad)}" if bad else ""), as_json)


@cli.command()
@options.root
@options.json_output
@handled
def history(root: Path, as_json: bool) -> None:
    """Show the journal of installs, steps and rollbacks."""
    from bundler.install.control import history as get_history
    from bundler.install.layout import Layout

    events = get_history(Layout(root.resolve()))
    if as_json:
        emit_json({"ok": True, "events": [e.__dict__ for e in events]})
        return
    for e in events:
        click.echo(f"{e.ts}  {e.version:<12} {e.step:<14} {e.status:<8} {e.detail}")


@cli.command()
@options.root
@handled
def stop(root: Path) -> None:
    """Stop the current release's services."""
    from bundler.install.control import stop as do_stop
    from bundler.install.layout import Layout

    click.echo(f"stopped {do_stop(Layout(root.resolve()))}")


@cli.command()
@options.root
@handled
def start(root: Path) -> None:
    """Start the current release's services and health-check them."""
    from bundler.install.control import start as do_start
    from bundler.install.layout import Layout

    version, checks = do_start(Layout(root.resolve()))
    for c in checks:
        click.echo(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    click.echo(f"started {version}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        _unhealthy(f"{version} started but is unhealthy: check {', '.join(failed)} failed",
                   as_json=False)


@cli.group()
def trust() -> None:
    """Manage the keys an install root accepts bundles from."""


@trust.command("add")
@click.argument("key", type=click.Path(path_type=Path))
@options.root
@options.json_output
@handled
def trust_add(key: Path, root: Path, as_json: bool) -> None:
    """Trust KEY (a NAME.pub) for bundles installed under ROOT."""
    from bundler.install import trust as trust_store
    from bundler.install.layout import Layout

    added = trust_store.add(Layout(root.resolve()), key)
    if as_json:
        emit_json({"ok": True, "keyid": added.keyid, "path": added.source})
    else:
        click.echo(f"trusted key {added.keyid} for {root}")


@trust.command("list")
@options.root
@options.json_output
@handled
def trust_list(root: Path, as_json: bool) -> None:
    """List the keys ROOT trusts."""
    from bundler.install import trust as trust_store
    from bundler.install.layout import Layout

    keys = trust_store.listed(Layout(root.resolve()))
    if as_json:
        emit_json({"ok": True, "keys": [{"keyid": k.keyid, "path": k.source} for k in keys]})
        return
    for k in keys:
        click.echo(f"{k.keyid}  {k.source}")
    if not keys:
        click.echo(f"{root}: no trusted keys")


@trust.command("remove")
@click.argument("keyid")
@options.root
@handled
def trust_remove(keyid: str, root: Path) -> None:
    """Stop trusting the key KEYID under ROOT."""
    from bundler.install import trust as trust_store
    from bundler.install.layout import Layout

    trust_store.remove(Layout(root.resolve()), keyid)
    click.echo(f"removed key {keyid} from {root}")


@cli.command()
@options.root
@click.option("--to", "to_version", default=None, metavar="VERSION",
              help="Release to return to (default: the one before the current).")
@options.allow
@options.db_choice
@options.keep_db
@options.json_output
@handled
def rollback(root: Path, to_version: str | None, allow: tuple[str, ...],
             db_choice: str | None, as_json: bool) -> None:
    """Switch back to an earlier release kept on disk, health-checked (the database is kept).

    With an interrupted install pending, finish rolling that install back instead."""
    from bundler.install.layout import Layout, locked
    from bundler.install.recovery import rollback as do_rollback

    layout = Layout(root.resolve())
    if not layout.root.is_dir():
        raise StateError(f"{root} is not an install root (no such directory)",
                         hint="check --root")
    with locked(layout.root):
        result = do_rollback(layout, to_version, db_choice, allow)
    if as_json:
        emit_json({"ok": True, **result.to_json()})
        return
    for c in result.checks:
        click.echo(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    click.echo(f"rolled back from {result.from_version} to {result.to_version}")


@cli.command()
@options.root
@options.db_choice
@options.keep_db
@options.json_output
@handled
def recover(root: Path, db_choice: str | None, as_json: bool) -> None:
    """Finish or undo an install that was interrupted (kill -9, power cut, failed rollback).

    A pending database restore runs by itself only when nothing has written to the database
    since; otherwise choose with --restore-db or --keep-db (`bundle status` shows what is
    pending)."""
    from bundler.install.layout import Layout, locked
    from bundler.install.recovery import recover as do_recover

    layout = Layout(root.resolve())
    if not layout.root.is_dir():
        raise StateError(f"{root} is not an install root (no such directory)",
                         hint="check --root")
    with locked(layout.root):
        message = do_recover(layout, db_choice=db_choice)
    if as_json:
        emit_json({"ok": True, "recovered": message is not None, "message": message})
    else:
        click.echo(message or f"{root}: nothing to recover")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@options.root
@options.trust
@click.option("--environment", "-e", type=click.Choice(["production", "staging", "development"]),
              default="production", show_default=True)
@options.json_output
@handled
def doctor(bundle: Path | None, root: Path, trust_path: Path | None, environment: str,
           as_json: bool) -> None:
    """Check this host against BUNDLE (or the current release): engine, compose, disk, ports,
    Python/Node, database, environment. Changes nothing; exit 19 if a check fails."""
    from bundler import archive
    from bundler.install import doctor as doc
    from bundler.install import trust as trust_store
    from bundler.install.layout import Layout

    layout = Layout(root.resolve())
    manifest = None
    if bundle is not None:
        manifest = archive.manifest_of(bundle, trust_store.resolve(trust_path, layout)).manifest
    rows = doc.run(layout, manifest, environment)
    failed = any(r.status == "fail" for r in rows)
    if as_json:
        emit_json({"ok": not failed, "checks": [r.to_json() for r in rows]})
    else:
        table(("status", "check", "detail"), [(r.status.upper(), r.check, r.detail)
                                              for r in rows])
        click.echo("ready" if not failed else "not ready: fix the FAIL rows above")
    if failed:
        names = [r.check for r in rows if r.status == "fail"]
        _unhealthy(f"this host is not ready: {', '.join(names)} failed", as_json)
