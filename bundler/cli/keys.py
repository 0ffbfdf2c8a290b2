"""Root of trust authoring (offline, connected side): `bundle keys ...` keeps a trust
directory (N.root.json, targets.json), `bundle sign` adds signatures and trust documents to a
built bundle. The target side of it is `bundle trust init|show` (cli/target.py)."""

from __future__ import annotations

from pathlib import Path

import click

from bundler.cli import options
from bundler.cli.common import cli, handled
from bundler.cli.render import emit_json

_dir = click.argument("directory", type=click.Path(path_type=Path))
_pubs = click.option("--key", "pubs", multiple=True, required=True,
                     type=click.Path(path_type=Path), help="A public key (NAME.pub); repeat.")
_threshold = click.option("--threshold", type=int, default=1, show_default=True,
                          help="How many of the keys must sign.")


_days_root = click.option("--days", type=int, default=365, show_default=True,
                          help="Days until this root version expires.")
_days_delegation = click.option("--days", type=int, default=90, show_default=True,
                                help="Days until this delegation version expires.")


@cli.group()
def keys() -> None:
    """A root of trust: root keys with a threshold delegate release keys per product; new
    versions ride in bundles (docs/key-management.md)."""


@keys.command("init")
@_dir
@_pubs
@_threshold
@_days_root
@options.json_output
@handled
def keys_init(directory: Path, pubs: tuple[Path, ...], threshold: int, days: int,
              as_json: bool) -> None:
    """Write DIRECTORY/1.root.json listing the root keys and THRESHOLD (unsigned: each root key
    holder then runs `bundle keys sign`)."""
    from bundler.build import trustdocs

    path = trustdocs.init_root(directory, list(pubs), threshold, days)
    _done(as_json, path, f"wrote {path}: sign it with {threshold} root keys "
                         "(`bundle keys sign DIR --key ROOT.key`)")


@keys.command("rotate-root")
@_dir
@_pubs
@_threshold
@_days_root
@options.json_output
@handled
def keys_rotate_root(directory: Path, pubs: tuple[Path, ...], threshold: int, days: int,
                     as_json: bool) -> None:
    """Write the next root version with these root keys: it needs the threshold of the old
    root keys AND of the new ones."""
    from bundler.build import trustdocs

    path = trustdocs.rotate_root(directory, list(pubs), threshold, days)
    _done(as_json, path, f"wrote {path}: sign it with the old and the new root keys")


@keys.command("delegate")
@_dir
@click.option("--role", required=True, help="The delegated role's name (e.g. release).")
@click.option("--product", "products", multiple=True, required=True,
              help="A product (manifest name; * globs) the role may sign; repeat.")
@_pubs
@_threshold
@click.option("--countersign", is_flag=True,
              help="A countersigning role (e.g. a scanning station), not a release role.")
@_days_delegation
@options.json_output
@handled
def keys_delegate(directory: Path, role: str, products: tuple[str, ...], pubs: tuple[Path, ...],
                  threshold: int, countersign: bool, days: int, as_json: bool) -> None:
    """Write the next delegation version (targets.json): ROLE's release keys may sign
    PRODUCTs, THRESHOLD of them together (or, --countersign, countersign them after build).
    The root keys then sign it (`sign --targets`)."""
    from bundler.build import trustdocs

    path = trustdocs.delegate(directory, role, list(products), list(pubs), threshold, days,
                              countersign)
    _done(as_json, path, f"wrote {path}: sign it with the root keys "
                         "(`bundle keys sign DIR --targets --key ROOT.key`)")


@keys.command("revoke")
@_dir
@click.argument("keyid")
@_days_delegation
@options.json_output
@handled
def keys_revoke(directory: Path, keyid: str, days: int, as_json: bool) -> None:
    """Write the next delegation version without release key KEYID (recorded as revoked)."""
    from bundler.build import trustdocs

    path = trustdocs.revoke(directory, keyid, days)
    _done(as_json, path, f"wrote {path} without key {keyid}: sign it with the root keys, "
                         "then carry it in the next bundle")


@keys.command("sign")
@_dir
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
              help="A root key (NAME.key, or hsm:KEYID?label=TOKEN).")
@click.option("--targets", "which_targets", is_flag=True,
              help="Sign the delegation (targets.json) instead of the latest root version.")
@options.json_output
@handled
def keys_sign(directory: Path, key_path: Path, which_targets: bool, as_json: bool) -> None:
    """Add a root key's signature to the latest root version or to the delegation (on the
    offline machine that holds that key)."""
    from bundler.build import trustdocs

    done = trustdocs.sign_doc(directory, key_path, which_targets)
    if as_json:
        emit_json({"ok": True, "path": str(done.path), "keyid": done.keyid,
                   "keyids": list(done.keyids), "bundler_keyid": done.bundler_keyid,
                   "signatures": done.signatures, "complete": done.complete,
                   "status": done.detail})
        return
    state = "complete" if done.complete else "needs more signatures"
    named = ", ".join(done.keyids)
    if done.keyids != (done.bundler_keyid,):
        named += f" (bundler: {done.bundler_keyid})"
    click.echo(f"signed {done.path} with {named}: {done.detail} ({state})")


@keys.command("show")
@_dir
@options.json_output
@handled
def keys_show(directory: Path, as_json: bool) -> None:
    """Show the trust directory: root versions, keys, thresholds, signatures, delegation."""
    from bundler.build import trustdocs
    from bundler.bundle.trustroot import summary

    info = trustdocs.show(directory)
    if as_json:
        emit_json({"ok": True, **info})
        return
    click.echo(f"{directory}: root versions {info['root']['versions']} "
               f"({info['root']['status']})")
    click.echo(summary(info))


@keys.command("token-pub")
@click.argument("uri")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Where to write the token key's public key (NAME.pub).")
@options.json_output
@handled
def keys_token_pub(uri: str, out: Path, as_json: bool) -> None:
    """Write the public key of a PKCS#11 token's key (URI: hsm:[KEYID][?label=TOKEN]; the
    module in PYKCS11LIB, the PIN in BUNDLER_PKCS11_PIN), to name it as a root, release or
    countersigning key. Its private key never leaves the token: pass the URI as --key."""
    from bundler.build import trustdocs
    from bundler.fsutil import atomic_write_bytes

    keyid, pem = trustdocs.token_public_key(uri)
    atomic_write_bytes(out, pem, mode=0o644)
    if as_json:
        emit_json({"ok": True, "keyid": keyid, "public": str(out)})
    else:
        click.echo(f"wrote {out}: token key {keyid}")


@cli.command("sign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "key_paths", multiple=True, type=click.Path(path_type=Path),
              help="Add this key's signature (NAME.key, or hsm:KEYID?label=TOKEN); repeat.")
@click.option("--trust-metadata", "trust_dir", type=click.Path(path_type=Path), default=None,
              help="Carry this trust directory's root versions and delegation in the bundle.")
@options.json_output
@handled
def sign(bundle: Path, key_paths: tuple[Path, ...], trust_dir: Path | None,
         as_json: bool) -> None:
    """Add signatures (a second release manager) and trust documents to a built BUNDLE; its
    signed payload and every member stay byte for byte the same.

    BUNDLE may be a .bundle file or a volume set (any part, its .parts index, or base name):
    only the set's head (.000) is rewritten, and the keys sign its part index too."""
    from bundler.build import trustdocs

    done = trustdocs.sign_bundle(bundle, list(key_paths), trust_dir)
    if as_json:
        emit_json({"ok": True, "bundle": str(bundle), "signatures": done.signatures,
                   "added": done.added, "carries": done.carries})
        return
    click.echo(f"{bundle}: signed by {', '.join(done.signatures)}"
               + (f"; carries root {done.carries['root_versions']}, delegation "
                  f"{done.carries['delegation_version']}" if trust_dir else ""))


@cli.command("countersign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--role", required=True, help="The countersigning role (e.g. scanner).")
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
              help="The role's key (NAME.key, or hsm:KEYID?label=TOKEN).")
@options.json_output
@handled
def countersign(bundle: Path, role: str, key_path: Path, as_json: bool) -> None:
    """Countersign BUNDLE as ROLE (a chain-of-custody record: the payload's digest, the role and
    the time are signed); the payload and every member stay byte for byte the same.

    BUNDLE may be a .bundle file or a volume set (any part, its .parts index, or base name):
    only the set's head (.000) is rewritten."""
    from bundler.build import trustdocs

    done = trustdocs.countersign(bundle, key_path, role)
    if as_json:
        emit_json({"ok": True, "bundle": str(bundle), **done})
    else:
        click.echo(f"{bundle}: countersigned as {role} by {done['keyid']} at {done['time']}")


def _done(as_json: bool, path: Path, text: str) -> None:
    if as_json:
        emit_json({"ok": True, "path": str(path)})
    else:
        click.echo(text)
