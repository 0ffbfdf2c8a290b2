"""Connected-side commands: init, validate, keygen, build."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from bundler.bundle.inspect import split
from bundler.bundle.models import Target
from bundler.cli import options
from bundler.cli.common import cli, handled
from bundler.cli.render import emit_json
from bundler.fsutil import human_bytes

if TYPE_CHECKING:
    from bundler.build.kit import Kit


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@click.option("--force", is_flag=True, help="Overwrite an existing bundle.yaml.")
@handled
def init(directory: Path, force: bool) -> None:
    """Write a commented starter profile, DIRECTORY/bundle.yaml."""
    from bundler.build.starter import STARTER
    from bundler.errors import Problem, ProfileError
    from bundler.fsutil import atomic_write_bytes

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
    from bundler.build.profile import load_profile
    from bundler.build.resolve.wheels import parse_requirements

    loaded = load_profile(profile)
    if loaded.python is not None and loaded.python.requirements is not None:
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
    from bundler.bundle.signing import generate

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
@options.cache_dir
@click.option("--sequence", type=click.IntRange(min=1), default=None,
              help="Monotonic bundle sequence (default: profile's, else build time).")
@click.option("--lock", "lock_path", type=click.Path(path_type=Path), default=None,
              help="Lock file (default: the profile's name with .lock, e.g. bundle.lock).")
@click.option("--frozen", is_flag=True,
              help="Fail instead of re-resolving when the lock is missing or out of date.")
@click.option("--volume-size", default=None, metavar="SIZE",
              help="Split into parts of at most SIZE (e.g. 700M, 4G) with a signed index; "
                   "use --volume-size fat32 for the largest FAT32-safe parts.")
@click.option("--with-kit", is_flag=True,
              help="Also write the target kit (`bundle kit`) for the profile's target next to "
                   "the bundle.")
@click.option("--against", "against_path", type=click.Path(path_type=Path), default=None,
              metavar="RECEIPT|OLD.bundle",
              help="Build a delta bundle: leave out what the host has, as its receipt "
                   "(`bundle receipt`) says, or else an older bundle it installed "
                   "(docs/delta.md).")
@click.option("--host-key", "host_key", type=click.Path(path_type=Path), default=None,
              metavar="HOST.pub",
              help="The host key (`bundle receipt` prints it) the receipt must be signed by; "
                   "without it the receipt is used unauthenticated.")
@click.option("--vulns", "vulns_path", type=click.Path(path_type=Path, exists=True),
              default=None, metavar="SNAPSHOT",
              help="Match the bundle's SBOM against this OSV snapshot (osv.dev's all.zip, a tar "
                   "or a directory of <ID>.json records) and refuse it (exit 26) with findings "
                   "at or above --fail-on; the findings below go into the signed bundle "
                   "(docs/vulns.md).")
@options.fail_on("the bundle (with --vulns)", "high")
@options.json_output
@handled
def build(profile: Path, key_path: Path, out_dir: Path, cache_dir: Path | None,
          sequence: int | None, lock_path: Path | None, frozen: bool, volume_size: str | None,
          with_kit: bool, against_path: Path | None, host_key: Path | None,
          vulns_path: Path | None, fail_on: str | None, as_json: bool) -> None:
    """Resolve, fetch, sign and pack PROFILE into OUT/NAME-VERSION.bundle."""
    from bundler.build.builder import build as do_build
    from bundler.build.cache import Cache, default_cache_dir
    from bundler.build.profile import load_profile
    from bundler.bundle import volumes
    from bundler.bundle.signing import load_private_key

    part_size = None
    if volume_size is not None:
        part_size = (volumes.DEFAULT_PART_SIZE if volume_size.lower() == "fat32"
                     else volumes.parse_size(volume_size))
    loaded = load_profile(profile)
    key = load_private_key(key_path)
    cache = Cache(cache_dir or default_cache_dir())
    against = None
    if against_path is not None:
        from bundler.build import delta
        from bundler.bundle.signing import TrustedKey, key_id

        own = TrustedKey(key_id(key.public_key()), key.public_key(), str(key_path))
        against = delta.load(against_path, host_key, own)
        if not against.authenticated:
            click.echo(f"warning: {against.note}", err=True)
    elif host_key is not None:
        raise click.UsageError("--host-key checks the receipt given with --against")
    gate = None
    if vulns_path is not None:
        from bundler.build.vulngate import Gate
        from bundler.bundle.osv import DEFAULT_FAIL_ON

        gate = Gate(vulns_path, (fail_on or DEFAULT_FAIL_ON).lower())
    elif fail_on is not None:
        raise click.UsageError("--fail-on sets the bar of the snapshot given with --vulns")
    result = do_build(loaded, key, out_dir, cache, sequence, part_size, lock_path, frozen,
                      against, gate)
    made = None
    if with_kit:
        from bundler import ui
        from bundler.build.kit import build_kit

        ui.step("Making the target kit")
        made = build_kit(out_dir, loaded.target, cache, ui.note,
                         index=loaded.python if loaded.python else None,
                         with_compose=loaded.runtime.compose is not None)
    if as_json:
        emit_json({"ok": True, "bundle": str(result.path), "size": result.size,
                   "kit": made.to_json() if made else None,
                   "name": result.manifest.name, "version": result.manifest.version,
                   "sequence": result.manifest.sequence, "keyid": result.keyid,
                   "files": len(result.manifest.files),
                   "parts": [str(p) for p in result.parts],
                   "locked": result.locked, "fetched": result.fetched,
                   "warnings": list(result.warnings), "vulns": result.vulns,
                   "delta": (split(result.manifest) | result.against.to_json()
                             | {"images": result.images.to_json() if result.images else None}
                             if result.against else None)})
    else:
        for w in result.warnings:
            click.echo(f"warning: {w}", err=True)
        click.echo(f"built {result.path} ({result.size} bytes, {len(result.manifest.files)} "
                   f"files, sequence {result.manifest.sequence}, key {result.keyid}); "
                   + (f"fetched {result.fetched} artifact(s)" if result.fetched
                      else "fetched nothing (all from cache)"))
        if result.vulns:
            v = result.vulns
            click.echo(f"vulnerabilities: {v['findings']} finding(s) below {v['fail_on']} "
                       f"recorded in {v['path']} (snapshot of {v['records']} record(s), newest "
                       f"{v['modified'] or 'unknown'})")
        if result.against:
            d = split(result.manifest)
            click.echo(f"delta against {result.against.label}: {d['travel_files']} file(s) "
                       f"travel ({human_bytes(d['travel_bytes'])}), {d['host_files']} the host "
                       f"must supply ({human_bytes(d['host_bytes'])})"
                       + (f"; {result.images.note}" if result.images else ""))
        if made:
            _say_kit(made)


def _say_kit(made: Kit) -> None:
    click.echo(f"wrote {made.path} ({made.size} bytes, CPython {made.python}, "
               f"{made.platform}; {len(made.packages)} packages)")
    click.echo(f"sha256 {made.sha256}  (also in {made.path.name}.sha256: check it on the "
               "target, out of band, before running the kit)")


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("dist"),
              show_default=True, help="Directory for the kit.")
@click.option("--platform", "platform_tag", default=Target.platform, show_default=True,
              metavar="TAG", callback=options.platform_tag,
              help="The target's wheel platform, e.g. manylinux_2_28_aarch64.")
@click.option("--python", "python_version", default=Target.python, show_default=True,
              metavar="X.Y", help="The target's python3 (major.minor).")
@options.cache_dir
@click.option("--index-url", default=None, help="Package index to fetch the wheels from.")
@click.option("--find-links", multiple=True, metavar="DIR|URL",
              help="Also look for wheels here (repeatable).")
@click.option("--no-index", is_flag=True, help="Use only --find-links, no index.")
@click.option("--from-installed", is_flag=True,
              help="Take the dependencies from the environment bundler runs in (no network); "
                   "only for a target with this host's Python and platform.")
@click.option("--with-compose", is_flag=True,
              help="Also carry the modern compose binary (for bundles with a compose project; "
                   "the Docker engine stays a prerequisite).")
@options.json_output
@handled
def kit(out_dir: Path, platform_tag: str, python_version: str, cache_dir: Path | None,
        index_url: str | None, find_links: tuple[str, ...], no_index: bool,
        from_installed: bool, with_compose: bool, as_json: bool) -> None:
    """Write the target kit: ONE file that runs bundler's target commands (trust, verify,
    install, status, rollback, ...) on a host that has only python3."""
    from bundler import ui
    from bundler.build.cache import Cache, default_cache_dir
    from bundler.build.kit import build_kit
    from bundler.build.profile import PYTHON_RE, PythonSpec

    if not PYTHON_RE.match(python_version):
        raise click.BadParameter(f"{python_version!r} is not major.minor (e.g. 3.11)",
                                 param_hint="--python")
    made = build_kit(out_dir, Target(python=python_version, platform=platform_tag),
                     Cache(cache_dir or default_cache_dir()), ui.note,
                     index=PythonSpec(index_url=index_url, find_links=find_links,
                                      no_index=no_index),
                     from_installed=from_installed, with_compose=with_compose)
    if as_json:
        emit_json({"ok": True, **made.to_json()})
    else:
        _say_kit(made)


@cli.command()
@click.argument("profile", type=click.Path(path_type=Path))
@click.option("--lock", "lock_path", type=click.Path(path_type=Path), default=None,
              help="Where to write (default: the profile's name with .lock, e.g. bundle.lock).")
@options.cache_dir
@options.json_output
@handled
def lock(profile: Path, lock_path: Path | None, cache_dir: Path | None, as_json: bool) -> None:
    """Resolve PROFILE for its target and write the lock file (exact versions and hashes)."""
    from bundler.build.builder import lock as do_lock
    from bundler.build.cache import Cache, default_cache_dir
    from bundler.build.lockfile import default_path
    from bundler.build.profile import load_profile

    loaded = load_profile(profile)
    result, fetched = do_lock(loaded, Cache(cache_dir or default_cache_dir()), lock_path)
    path = lock_path or default_path(loaded)
    if as_json:
        emit_json({"ok": True, "lock": str(path), "wheels": [w.to_json() for w in result.wheels],
                   "fetched": fetched})
    else:
        for w in result.wheels:
            click.echo(f"  {w.name}=={w.version}  {w.file}")
        click.echo(f"wrote {path} ({len(result.wheels)} wheel(s))")
