"""Carrying a bundle across the gap: `bundle export` (the USB step)."""

from __future__ import annotations

from pathlib import Path

import click

from bundler.cli import options
from bundler.cli.common import cli, handled
from bundler.cli.render import emit_json


@cli.command("export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--kit", "kit_path", type=click.Path(path_type=Path), default=None,
              help="The kit (bundler-kit-VERSION-cpXY-PLATFORM.pyz). Default: the newest one "
                   "for the bundle's target Python and platform in the bundle's directory, "
                   "else one built for the bundle's target (like `bundle kit`) into the "
                   "cache.")
@options.cache_dir
@click.option("--kit-from-installed", is_flag=True,
              help="When a kit is built: take its dependencies from the environment bundler "
                   "runs in (no network; only for a target with this host's Python and "
                   "platform), as `bundle kit --from-installed`.")
@click.option("--pub", "pub_path", type=click.Path(path_type=Path), default=None,
              help="The public key the bundle was signed with (NAME.pub). Default: the *.pub "
                   "that verifies it, in the bundle's directory, beside --key or in the "
                   "current directory.")
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=None,
              help="The signing key (NAME.key): needed only when the bundle must be split "
                   "here, to sign the volume set's part index.")
@click.option("--volume-size", default=None, metavar="SIZE",
              help="Split into parts of at most SIZE (e.g. 700M, 2G, fat32) even where DEST "
                   "could hold one file. Default: split only when DEST cannot (FAT32).")
@options.json_output
@handled
def export_(bundle: Path, dest: Path, kit_path: Path | None, cache_dir: Path | None,
            kit_from_installed: bool, pub_path: Path | None, key_path: Path | None,
            volume_size: str | None, as_json: bool) -> None:
    """Write BUNDLE, its kit, public key and INSTALL.txt onto DEST (a mounted stick or any
    directory), each file read back and checked.

    BUNDLE may be a .bundle file or a volume set (any part, its .parts index, or base name).
    The kit: --kit, else the newest one next to the bundle, else one built for the bundle's
    target (kept in the cache and reused while bundler is unchanged).
    It is split into a volume set when DEST's filesystem cannot hold it as one file (FAT32:
    4 GiB - 1). Free space is checked before anything is written; an existing file of the
    same name is skipped if identical and refused if different.
    """
    from bundler.build.cache import Cache
    from bundler.build.export import export
    from bundler.bundle import volumes
    from bundler.fsutil import human_bytes

    part_size = None
    if volume_size is not None:
        part_size = (volumes.DEFAULT_PART_SIZE if volume_size.lower() == "fat32"
                     else volumes.parse_size(volume_size))
    result = export(bundle, dest, kit_path, pub_path, key_path, part_size,
                    Cache(cache_dir) if cache_dir else None, kit_from_installed)
    if as_json:
        emit_json({"ok": True, **result.to_json()})
        return
    for item in result.items:
        verb = "unchanged" if item.status == "unchanged" else "wrote    "
        click.echo(f"  {verb} {item.name}  {human_bytes(item.size)}  sha256 {item.sha256}")
    if result.kit_source in ("built", "cached"):
        how = "built" if result.kit_source == "built" else "built earlier"
        click.echo(f"  kit {result.kit.name}: {how} for the bundle's target, kept in "
                   f"{result.kit.parent}")
    if result.root_doc:
        click.echo(f"  root of trust {result.root_doc} (the latest root version the bundle "
                   f"carries; signed by key {result.keyid})")
    else:
        click.echo(f"  public key {result.pub} (key id {result.keyid})")
    m = result.manifest
    written = sum(1 for i in result.items if i.status == "written")
    click.echo(f"exported {m.name} {m.version} to {dest} ({result.fs_type}"
               + (f", split into {sum(1 for i in result.items if i.role == 'part')} parts"
                  if result.split else "")
               + f"): {written} file(s) written and read back, "
               f"{len(result.items) - written} already there; see {dest / 'INSTALL.txt'}")
