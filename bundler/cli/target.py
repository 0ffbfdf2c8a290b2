"""Target-side commands: install, status, history, stop, start, uninstall, trust, receipt,
audit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from bundler.cli import options
from bundler.cli.common import cli, handled, use_root
from bundler.cli.render import emit_json, table
from bundler.errors import UnhealthyError
from bundler.fsutil import human_bytes
from bundler.progname import cmd
from bundler.redact import redact


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
@click.option("--no-reuse", "no_reuse", is_flag=True,
              help="Install every venv and node_modules from the bundle's packages, cloning "
                   "none from an earlier release made from the same inputs (the default "
                   "clones, each file re-hashed: docs/design/reuse.md).")
@options.allow
@options.db_choice
@options.keep_db
@options.json_output
@handled
def install(bundle: Path, trust_path: Path | None, root: Path, allow_downgrade: bool,
            environment: str, allow_degraded: bool, no_reuse: bool, allow: tuple[str, ...],
            db_choice: str | None, as_json: bool) -> None:
    """Verify BUNDLE, install it under ROOT, start it, health-check it, then switch to it.

    BUNDLE may be a .bundle file or a volume set (any part, its .parts index, or base name).
    A ROOT that does not exist yet is created only with --trust (a first install); without
    it, ROOT must be an install root whose trust store has the key.
    """
    from bundler.install import trust as trust_store
    from bundler.install.installer import Options
    from bundler.install.installer import install as do_install

    layout = use_root(root, create=trust_path is not None)
    trusted = trust_store.resolve(trust_path, layout, record=True)
    result = do_install(bundle, trusted, layout, Options(allow_downgrade, environment, db_choice,
                                                         allow_degraded, allow, not no_reuse))
    if as_json:
        emit_json({"ok": True, **result.to_json()})
        return
    for c in result.checks:
        click.echo(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    verb = "already current" if result.status == "unchanged" else "installed and healthy"
    click.echo(f"{result.version} {verb} under {layout.root}")


@cli.command()
@options.root
@options.json_output
@handled
def status(root: Path, as_json: bool) -> None:
    """Show the current release, its services and its health."""
    from bundler.install import boot
    from bundler.install.control import status as get_status

    layout = use_root(root)
    st = get_status(layout)
    at_boot = boot.describe(layout, st.product)
    if as_json:
        emit_json({"ok": True, **st.to_json(), "boot": at_boot.to_json()})
    else:
        if st.current is None:
            click.echo(f"{layout.root}: no current release")
        else:
            c = st.current
            click.echo(f"{st.product} {c.version} (sequence {c.sequence}, {c.status}, "
                       f"installed {c.installed_at}) — {'healthy' if st.healthy else 'UNHEALTHY'}")
            for s in st.services:
                click.echo(f"  service {s.name}: {'running' if s.running else 'STOPPED'}"
                           f" ({redact(s.detail)})")
            for chk in st.checks:
                click.echo(f"  check {chk.name}: {'ok' if chk.ok else 'FAIL'} — {chk.detail}")
        click.echo(f"  boot: {at_boot.detail}")
        if st.pending is not None:
            click.echo(f"PENDING RECOVERY: {st.pending.describe()}; "
                       f"`{cmd('recover', '--root', layout.root)}` settles it")
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

    events = get_history(use_root(root))
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

    click.echo(f"stopped {do_stop(use_root(root))}")


@cli.command()
@options.root
@click.option("--boot", "at_boot", is_flag=True,
              help="As the boot unit runs it: settle an install a power cut interrupted "
                   "(never discarding writes), then start and health-check, and record the "
                   "outcome in the journal (`bundle history`, step `boot`).")
@handled
def start(root: Path, at_boot: bool) -> None:
    """Start the current release's services and health-check them."""
    from bundler.install.control import start as do_start

    layout = use_root(root)
    if at_boot:
        from bundler.install.boot import start_at_boot

        run = start_at_boot(layout)
        if run.recovered:
            click.echo(run.recovered)
        if run.version is None:
            click.echo(f"{layout.root}: nothing installed, nothing to start")
            return
        version, checks = run.version, list(run.checks)
    else:
        version, checks = do_start(layout)
    for c in checks:
        click.echo(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    click.echo(f"started {version}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        _unhealthy(f"{version} started but is unhealthy: check {', '.join(failed)} failed",
                   as_json=False)


@cli.command()
@options.root
@click.option("--purge", is_flag=True,
              help="Also remove releases/, current and bin/ (code, venvs, bundler's own "
                   "command). Databases, data, backups/, shared/ and state/ are kept always.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before --purge removes files.")
@options.json_output
@handled
def uninstall(root: Path, purge: bool, yes: bool, as_json: bool) -> None:
    """Stop the stack and remove its boot unit, keeping databases, data and backups.

    `bundle start` brings it back; the next `bundle install` sets the boot unit up again.
    See docs/boot.md for what is kept."""
    from bundler.errors import PolicyError
    from bundler.install.uninstall import describe_purge
    from bundler.install.uninstall import uninstall as do_uninstall

    layout = use_root(root)
    if purge and not yes:
        if as_json or not sys.stdin.isatty():
            raise PolicyError("--purge removes files and needs confirmation; nothing was "
                              "changed", hint="add --yes to remove releases/, current and bin/ "
                                              "(databases, data and backups are kept)")
        if not click.confirm(describe_purge(layout), default=False, err=True):
            raise PolicyError("not confirmed; nothing was changed",
                              hint=f"`{cmd('uninstall', '--root', layout.root)}` without "
                                   "--purge only stops the stack and removes its boot unit")
    result = do_uninstall(layout, purge)
    if as_json:
        emit_json({"ok": True, **result.to_json()})
        return
    click.echo(f"stopped {result.stopped}" if result.stopped else "nothing was running")
    click.echo(f"removed the boot unit {result.unit}" if result.unit else "no boot unit")
    if result.purged:
        click.echo(f"removed {', '.join(result.purged)}")
    click.echo(f"kept {', '.join(result.kept) or 'nothing else'} under {result.root}; "
               "databases are never touched")


@cli.group()
def trust() -> None:
    """Manage the keys an install root accepts bundles from: loose keys (`add`), or a root of
    trust (`init`) that delegates release keys and rotates them through bundles."""


@trust.command("init")
@click.option("--root-metadata", "root_file", required=True, type=click.Path(path_type=Path),
              help="The root document (N.root.json from `bundle keys init`), signed by the "
                   "threshold of its root keys.")
@options.root
@options.json_output
@handled
def trust_init(root_file: Path, root: Path, as_json: bool) -> None:
    """Initialise ROOT once with a root of trust (created if it does not exist): from then on
    bundles must be signed by release keys it delegates, and trust updates arrive in them."""
    from bundler.install import trust as trust_store

    layout = use_root(root, create=True)
    held = trust_store.init(layout, root_file)
    doc = held.describe()
    if as_json:
        emit_json({"ok": True, **doc})
        return
    r = doc["root"]
    click.echo(f"{layout.root} trusts root version {r['version']} ({r['threshold']} of "
               f"{len(r['keys'])} root keys, expires {r['expires']})")


@trust.command("require")
@click.argument("roles", nargs=-1)
@options.root
@options.json_output
@handled
def trust_require(roles: tuple[str, ...], root: Path, as_json: bool) -> None:
    """Require countersignatures by ROLES (e.g. scanner) on every bundle ROOT installs, besides
    its release signatures; no ROLES: require none."""
    from bundler.install import trust as trust_store

    layout = use_root(root)
    held = trust_store.require(layout, list(roles))
    if as_json:
        emit_json({"ok": True, "required": list(held.required)})
    else:
        click.echo(f"{layout.root} requires countersignatures by "
                   f"{', '.join(held.required) or 'no role'}")


@trust.command("show")
@options.root
@options.json_output
@handled
def trust_show(root: Path, as_json: bool) -> None:
    """Show ROOT's trust: its root of trust and release key delegation, or its loose keys."""
    from bundler.install import trust as trust_store

    layout = use_root(root)
    if not trust_store.has_root(layout):
        keys = [k.keyid for k in trust_store.listed(layout)]
        if as_json:
            emit_json({"ok": True, "mode": "keys", "keys": keys})
        else:
            click.echo(f"{layout.root}: simple mode (loose keys): {', '.join(keys) or 'none'}")
        return
    info = trust_store.held(layout).describe()
    if as_json:
        emit_json({"ok": True, "mode": "root", **info})
        return
    from bundler.bundle.trustroot import summary

    click.echo(f"{layout.root}: root of trust")
    click.echo(summary(info))


@trust.command("add")
@click.argument("key", type=click.Path(path_type=Path))
@options.root
@options.json_output
@handled
def trust_add(key: Path, root: Path, as_json: bool) -> None:
    """Trust KEY (a NAME.pub) for bundles installed under ROOT (created if it does not exist:
    the first step on a new host)."""
    from bundler.install import trust as trust_store

    layout = use_root(root, create=True)
    added = trust_store.add(layout, key)
    if as_json:
        emit_json({"ok": True, "keyid": added.keyid, "path": added.source})
    else:
        click.echo(f"trusted key {added.keyid} for {layout.root}")


@trust.command("list")
@options.root
@options.json_output
@handled
def trust_list(root: Path, as_json: bool) -> None:
    """List the keys ROOT trusts."""
    from bundler.install import trust as trust_store

    layout = use_root(root)
    keys = trust_store.listed(layout)
    if as_json:
        emit_json({"ok": True, "keys": [{"keyid": k.keyid, "path": k.source} for k in keys]})
        return
    for k in keys:
        click.echo(f"{k.keyid}  {k.source}")
    if not keys:
        click.echo(f"{layout.root}: no trusted keys")


@trust.command("remove")
@click.argument("keyid")
@options.root
@handled
def trust_remove(keyid: str, root: Path) -> None:
    """Stop trusting the key KEYID under ROOT."""
    from bundler.install import trust as trust_store

    layout = use_root(root)
    trust_store.remove(layout, keyid)
    click.echo(f"removed key {keyid} from {layout.root}")


@cli.command()
@options.root
@click.option("--to", "to_version", default=None, metavar="VERSION",
              help="Release to return to (default: the one before the current).")
@click.option("--force", is_flag=True,
              help="Allow --to a release that never passed its health checks (its own "
                   "install rolled it back); its checks must pass now.")
@options.allow
@options.db_choice
@options.keep_db
@options.json_output
@handled
def rollback(root: Path, to_version: str | None, force: bool, allow: tuple[str, ...],
             db_choice: str | None, as_json: bool) -> None:
    """Switch back to an earlier release kept on disk, health-checked (the database is kept).

    With an interrupted install pending, finish rolling that install back instead."""
    from bundler.install.layout import locked
    from bundler.install.recovery import rollback as do_rollback

    layout = use_root(root)
    with locked(layout.root):
        result = do_rollback(layout, to_version, db_choice, allow, force=force)
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
    from bundler.install.layout import locked
    from bundler.install.recovery import recover as do_recover

    layout = use_root(root)
    with locked(layout.root):
        message = do_recover(layout, db_choice=db_choice)
    if as_json:
        emit_json({"ok": True, "recovered": message is not None, "message": message})
    else:
        click.echo(message or f"{layout.root}: nothing to recover")


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
    from bundler.bundle import archive
    from bundler.install import doctor as doc
    from bundler.install import trust as trust_store

    # Before a first install (BUNDLE and --trust) the root may not exist yet.
    layout = use_root(root, create=bundle is not None and trust_path is not None)
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


@cli.command()
@options.root
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="The receipt file to write, or a directory (e.g. the stick) to write "
                   "NAME.receipt into.")
@options.json_output
@handled
def receipt(root: Path, out: Path, as_json: bool) -> None:
    """Write a receipt of what ROOT holds (releases, store objects re-hashed, images in the
    engine), signed by this host's key, for `bundle build --against RECEIPT` (docs/delta.md).
    The host key is made by the first install; its public half is printed."""
    from bundler import ui
    from bundler.install import receipts
    from bundler.install.layout import locked

    layout = use_root(root)
    with locked(layout.root):  # no install may change the store while it is hashed
        made = receipts.make(layout, out, ui.note)
    if as_json:
        emit_json({"ok": True, **made.to_json()})
        return
    r = made.receipt
    held = sum(a.size for a in r.artifacts)
    click.echo(f"wrote {made.path}: {r.product} "
               + (f"{r.current.version} (sequence {r.current.sequence})" if r.current
                  else "(no current release)")
               + f", {len(r.kept)} kept release(s), {len(r.artifacts)} artifact(s) "
               f"({human_bytes(held)}), {len(r.images)} image(s)")
    click.echo(f"host key {made.keyid} ({made.host_pub}); build with "
               f"`bundle build PROFILE --against {made.path.name} --host-key host.pub`:")
    click.echo(made.public_key.rstrip())


@cli.command()
@click.option("--root", type=click.Path(path_type=Path), default=None, envvar=options.ROOT_ENV,
              show_envvar=True, help="Install root (holds releases/, current and state/).")
@click.option("--release", "version", default=None, metavar="VERSION",
              help="The release to audit (default: the current one).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Also write the findings, signed by this host's key (as receipts are), "
                   "to this file: for an auditor on the connected side.")
@click.option("--verify-report", "verify_path", type=click.Path(path_type=Path), default=None,
              help="Check a report `--report` wrote against --host-key (no root needed) and "
                   "show it.")
@click.option("--host-key", "host_key", type=click.Path(path_type=Path), default=None,
              help="With --verify-report: the host's public key (state/host.pub; `bundle "
                   "receipt` prints it).")
@options.json_output
@handled
def audit(root: Path | None, version: str | None, report_path: Path | None,
          verify_path: Path | None, host_key: Path | None, as_json: bool) -> None:
    """Compare what a release put on disk (every file re-hashed) and what its stack runs with
    the record made at install and the signed manifest: files changed, added or removed (by
    path, relative to the release), its images replaced or gone in the engine, containers of
    its stack running another image (docs/audit.md). Exit 0: no drift; exit 25: drift
    (--json lists every finding). Changes nothing."""
    if verify_path is not None:
        _verify_report(verify_path, host_key, as_json)
        return
    if host_key is not None:
        raise click.UsageError("--host-key checks the report given with --verify-report")
    if root is None:
        raise click.UsageError("Missing option '--root' (or BUNDLER_ROOT).")
    from bundler import ui
    from bundler.errors import DriftFound
    from bundler.install import audit as drift

    layout = use_root(root)
    ui.step("Auditing" + (f" release {version}" if version else " the current release"))
    report = drift.run(layout, version)
    keyid = drift.write_report(layout, report, report_path) if report_path else None
    if as_json:
        emit_json({"ok": report.clean, **report.to_json(),
                   "report": str(report_path) if report_path else None, "host_key": keyid})
    else:
        for f in report.findings:
            click.echo(f"  {f.line()}")
        for note in report.notes:
            click.echo(f"  note: {note}")
        if report_path:
            click.echo(f"signed report (host key {keyid}): {report_path}")
        if report.clean:
            click.echo(report.summary())
    if not report.clean:
        exc = DriftFound(report.summary())
        if as_json:
            sys.exit(exc.exit_code)
        raise exc


def _verify_report(path: Path, host_key: Path | None, as_json: bool) -> None:
    from bundler.bundle import auditreport
    from bundler.bundle.signing import load_public_key

    if host_key is None:
        raise click.UsageError("--verify-report needs --host-key (the host's host.pub)")
    checked = auditreport.verify(path.read_bytes(), load_public_key(host_key), str(path))
    doc = checked.doc
    if as_json:
        emit_json({"ok": True, "verified": True, "keyid": checked.keyid, **doc})
        return
    click.echo(f"{path}: signed by host key {checked.keyid}; {doc.get('product')} "
               f"{doc.get('version')} under {doc.get('root')}, audited {doc.get('created')}: "
               + ("no drift" if checked.clean else f"{len(checked.findings)} finding(s)"))
    for f in checked.findings:
        click.echo(f"  {f.get('kind', ''):<15} {f.get('path', '')}: {f.get('detail', '')}")
