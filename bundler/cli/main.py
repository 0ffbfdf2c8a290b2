"""The `bundle` command."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bundler import __version__, ui
from bundler.cli import options
from bundler.cli.render import emit_json, error
from bundler.errors import BundlerError, Interrupted

F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    """Turn bundler errors into one line + hint and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        ui.set_quiet(False)
        try:
            return fn(*args, **kwargs)
        except BundlerError as exc:
            error(exc, as_json)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            exc2 = Interrupted("interrupted")
            error(exc2, as_json)
            sys.exit(exc2.exit_code)
        except Exception as exc:  # a bug: still one line, with the traceback kept for a report
            import tempfile
            import traceback

            with tempfile.NamedTemporaryFile("w", prefix="bundler-crash-", suffix=".txt",
                                             delete=False) as fh:
                traceback.print_exc(file=fh)
            internal = BundlerError(f"internal error: {type(exc).__name__}: {exc}",
                                    hint=f"this is a bug in bundler; the traceback is in "
                                         f"{fh.name}")
            error(internal, as_json)
            sys.exit(internal.exit_code)

    return wrapper  # type: ignore[return-value]


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


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@click.option("--force", is_flag=True, help="Overwrite an existing bundle.yaml.")
@handled
def init(directory: Path, force: bool) -> None:
    """Write a commented starter profile, DIRECTORY/bundle.yaml."""
    from bundler.errors import Problem, ProfileError
    from bundler.fsutil import atomic_write_bytes
    from bundler.starter import STARTER

    target = directory / "bundle.yaml"
    if target.exists() and not force:
        raise ProfileError([Problem(str(target), 0, "already exists",
                                    "pass --force to overwrite it")])
    atomic_write_bytes(target, STARTER.encode())
    click.echo(f"wrote {target}")


@cli.command()
@click.argument("profile", type=click.Path(path_type=Path))
@options.json_output
@handled
def validate(profile: Path, as_json: bool) -> None:
    """Check a profile and report every problem at once (file:line)."""
    from bundler.profile import load_profile
    from bundler.resolve.wheels import parse_requirements

    loaded = load_profile(profile)
    if loaded.python is not None:
        parse_requirements(loaded.python.requirements)
    if as_json:
        emit_json({"ok": True, "name": loaded.name, "version": loaded.version})
    else:
        click.echo(f"{profile}: ok ({loaded.name} {loaded.version})")


@cli.command()
@click.argument("name", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace existing key files.")
@options.json_output
@handled
def keygen(name: Path, force: bool, as_json: bool) -> None:
    """Create an Ed25519 signing key pair: NAME.key (private, 0600) and NAME.pub."""
    from bundler.signing import generate

    priv, pub, kid = generate(name, force)
    if as_json:
        emit_json({"ok": True, "private": str(priv), "public": str(pub), "keyid": kid})
    else:
        click.echo(f"wrote {priv} (keep it secret) and {pub} (copy it to targets); key id {kid}")


@cli.command()
@click.argument("profile", type=click.Path(path_type=Path))
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True,
              help="Signing key (NAME.key from `bundle keygen`).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("dist"),
              show_default=True, help="Directory for the .bundle file.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Content-addressed download cache (default: XDG cache dir).")
@click.option("--sequence", type=click.IntRange(min=1), default=None,
              help="Monotonic bundle sequence (default: profile's, else build time).")
@options.json_output
@handled
def build(profile: Path, key_path: Path, out_dir: Path, cache_dir: Path | None,
          sequence: int | None, as_json: bool) -> None:
    """Resolve, fetch, sign and pack PROFILE into OUT/NAME-VERSION.bundle."""
    from bundler.build import build as do_build
    from bundler.cache import Cache, default_cache_dir
    from bundler.profile import load_profile
    from bundler.signing import load_private_key

    loaded = load_profile(profile)
    key = load_private_key(key_path)
    result = do_build(loaded, key, out_dir, Cache(cache_dir or default_cache_dir()), sequence)
    if as_json:
        emit_json({"ok": True, "bundle": str(result.path), "size": result.size,
                   "name": result.manifest.name, "version": result.manifest.version,
                   "sequence": result.manifest.sequence, "keyid": result.keyid,
                   "files": len(result.manifest.files)})
    else:
        click.echo(f"built {result.path} ({result.size} bytes, {len(result.manifest.files)} "
                   f"files, sequence {result.manifest.sequence}, key {result.keyid})")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@options.trust
@options.json_output
@handled
def verify(bundle: Path, trust_path: Path, as_json: bool) -> None:
    """Check the signature and every file of BUNDLE, in one streaming pass; install nothing."""
    from bundler import archive
    from bundler.signing import load_trust

    trusted = load_trust(trust_path)
    with archive.open_bundle(bundle) as reader:
        verified = reader.read_envelope(trusted)
        m = verified.manifest
        with ui.bytes_progress("verifying", m.payload_size) as advance:
            reader.extract(None, advance)
    if as_json:
        emit_json({"ok": True, "name": m.name, "version": m.version, "sequence": m.sequence,
                   "keyid": verified.keyid, "files": len(m.files)})
    else:
        click.echo(f"{bundle}: OK — {m.name} {m.version}, sequence {m.sequence}, "
                   f"{len(m.files)} files, signed by {verified.keyid}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@options.trust
@options.root
@click.option("--allow-downgrade", is_flag=True,
              help="Accept a bundle whose sequence is not newer than the last installed.")
@options.json_output
@handled
def install(bundle: Path, trust_path: Path, root: Path, allow_downgrade: bool,
            as_json: bool) -> None:
    """Verify BUNDLE, install it under ROOT, start it, health-check it, then switch to it."""
    from bundler.install.installer import install as do_install
    from bundler.signing import load_trust

    result = do_install(bundle, load_trust(trust_path), root, allow_downgrade)
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
                           f"{f' (supervisor pid {s.pid})' if s.pid else ''}")
            for chk in st.checks:
                click.echo(f"  check {chk.name}: {'ok' if chk.ok else 'FAIL'} — {chk.detail}")
    if st.current is not None and not st.healthy:
        sys.exit(1)


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
    if not all(c.ok for c in checks):
        sys.exit(1)


def main() -> None:
    cli(prog_name="bundle")
