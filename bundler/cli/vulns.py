"""`bundle vulns`: re-scan an install root against a newer signed OSV snapshot (target side,
in the kit), and `bundle vulns sign` to sign a snapshot on the connected side
(docs/vulns.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bundler.cli import options
from bundler.cli.common import cli, handled, use_root
from bundler.cli.render import emit_json, table


@cli.group(invoke_without_command=True)
@click.option("--root", type=click.Path(path_type=Path), default=None, envvar=options.ROOT_ENV,
              show_envvar=True, help="Install root (holds releases/, current and state/).")
@click.option("--snapshot", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="The OSV snapshot (osv.dev's all.zip, or a tar of <ID>.json records).")
@click.option("--signature", type=click.Path(path_type=Path), default=None, metavar="FILE.sig",
              help="Its signature (`bundle vulns sign`; default: FILE.sig next to it).")
@options.trust
@options.fail_on("the scan", "none (findings are listed, exit 0)")
@options.json_output
@click.pass_context
@handled
def vulns(ctx: click.Context, root: Path | None, snapshot: Path | None,
          signature: Path | None, trust_path: Path | None, fail_on: str | None,
          as_json: bool) -> None:
    """Match what ROOT has installed (every kept release's SBOM) against a newer OSV snapshot
    signed by a trusted key: findings by release, component and severity; no rebuild, no
    network, nothing changed. Exit 26 with --fail-on when a finding reaches it."""
    if ctx.invoked_subcommand is not None:
        if any(v is not None for v in (root, snapshot, signature, trust_path, fail_on)):
            raise click.UsageError("the options before a subcommand are for the scan")
        return
    if root is None or snapshot is None:
        raise click.UsageError("Missing option '--root' (or BUNDLER_ROOT) or '--snapshot'.")
    from bundler.bundle.osv import describe, signature_path
    from bundler.errors import VulnerableError
    from bundler.install import trust as trust_store
    from bundler.install import vulns as scan
    from bundler.progname import cmd

    layout = use_root(root)
    trusted = trust_store.resolve(trust_path, layout)
    report = scan.run(layout, snapshot, signature or signature_path(snapshot), trusted)
    refused = report.refusing(fail_on.lower()) if fail_on else ()
    if as_json:
        emit_json({"ok": not refused, "fail_on": fail_on, **report.to_json()})
    else:
        _show(report)
    if refused:
        exc = VulnerableError(describe(refused, str(fail_on), f"{layout.root}"),
                              hint="install a release with the fixed versions; "
                                   f"`{cmd('vulns')} --json` lists every finding "
                                   "(docs/vulns.md)")
        if as_json:
            sys.exit(exc.exit_code)
        raise exc


def _show(report: object) -> None:
    from bundler.install.vulns import Report

    assert isinstance(report, Report)
    snap = report.snapshot
    click.echo(f"snapshot {snap.statement.name} (sha256 {snap.statement.sha256[:16]}..., "
               f"{report.records} record(s), newest {report.modified or 'unknown'}), signed by "
               f"key {snap.keyid} at {snap.statement.signed}")
    for rel in report.releases:
        mark = " (current)" if rel.current else ""
        if rel.sbom != "ok":
            click.echo(f"release {rel.version}{mark}: not scanned: SBOM {rel.sbom}")
            continue
        built = rel.at_build
        click.echo(f"release {rel.version}{mark}: {len(rel.findings)} finding(s)" + (
            f" (at build: {built['findings']} below {built['fail_on']}, snapshot of "
            f"{built['snapshot'].get('modified') or 'unknown date'})" if built else ""))
        if rel.findings:
            table(["SEVERITY", "ID", "COMPONENT", "VERSION", "FIXED IN", "WHERE"],
                  [[f.severity, f.id, f.component.shown or f.component.name,
                    f.component.version, ", ".join(f.fixed) or "-", f.component.where]
                   for f in rel.findings])
        for note in rel.notes:
            click.echo(f"  not matched: {note}")
    counts = ", ".join(f"{n} {s.lower()}" for s, n in reversed(report.counts().items()) if n)
    click.echo(f"{len(report.findings)} finding(s)" + (f": {counts}" if counts else ""))


@vulns.command("sign")
@click.argument("snapshot", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True,
              help="Signing key (NAME.key from `bundle keygen`); the host must trust NAME.pub.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the signature (default: SNAPSHOT.sig next to it).")
@options.json_output
@handled
def vulns_sign(snapshot: Path, key_path: Path, out: Path | None, as_json: bool) -> None:
    """Sign an OSV snapshot file (connected side) so a host accepts it for `bundle vulns`:
    SNAPSHOT.sig names its sha256 and size; the snapshot itself is not changed."""
    from bundler.bundle import osv
    from bundler.bundle.signing import load_private_key, sign_payload
    from bundler.fsutil import atomic_write_bytes

    key = load_private_key(key_path)
    sha = osv.file_digest(snapshot)
    statement = osv.Statement(snapshot.name, sha, snapshot.stat().st_size, _now())
    target = out or osv.signature_path(snapshot)
    atomic_write_bytes(target, sign_payload(statement.to_bytes(), osv.SIG_PAYLOAD_TYPE, key))
    if as_json:
        emit_json({"ok": True, "signature": str(target), "sha256": sha,
                   "size": statement.size, "signed": statement.signed})
    else:
        click.echo(f"wrote {target}: {snapshot.name} sha256 {sha} signed {statement.signed}")


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
