"""Commands that read bundles without installing them: verify, inspect, diff, sbom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bundler import ui
from bundler.bundle import archive, volumes
from bundler.bundle.hostreq import Request
from bundler.bundle.manifest import Manifest
from bundler.bundle.signing import Trust, Verified
from bundler.cli import options
from bundler.cli.common import cli, handled, use_root
from bundler.cli.render import emit_json
from bundler.errors import PolicyError, SignatureError
from bundler.fsutil import human_bytes
from bundler.install import trust as trust_store


def _trusted(trust_path: Path | None, root: Path | None) -> Trust:
    """--trust, else the trust store of --root (or BUNDLER_ROOT): only then is a root used."""
    if trust_path is not None:
        return trust_store.resolve(trust_path, None)
    return trust_store.resolve(None, use_root(root) if root is not None else None)


def _parts(path: Path, index: volumes.PartIndex | None) -> list[dict[str, Any]] | None:
    """A volume set's files: its head (the envelope, which signing rewrites: no fixed hash)
    and its parts, as the verified index lists them."""
    index_file = volumes.find_index(path)
    if index is None or index_file is None:
        return None
    head = volumes.head_of(index_file)
    out = [{"file": head.name, "size": head.stat().st_size, "sha256": None}
           ] if index.manifest_sha256 else []
    return out + [{"file": p.file, "size": p.size, "sha256": p.sha256} for p in index.parts]


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@options.trust
@options.trust_root
@options.json_output
@handled
def verify(bundle: Path, trust_path: Path | None, root: Path | None, as_json: bool) -> None:
    """Check the signature and every file of BUNDLE in one streaming pass; install nothing.

    BUNDLE may be a .bundle file or a volume set (any part, its .parts index, or base name).
    """
    from bundler.bundle.inspect import host_requests
    from bundler.install.policy import check_bundler_version, check_expiry

    trusted = _trusted(trust_path, root)
    with archive.open_bundle(bundle, trusted) as reader:
        verified = reader.read_envelope()
        m = verified.manifest
        check_bundler_version(m)  # what `install` would refuse first (exit 8), not "OK"
        check_expiry(m)
        compose = [f"files/{f}" for f in m.runtime.compose.files] if m.runtime.compose else []
        with ui.bytes_progress("verifying", m.travel_size) as advance:
            done = reader.extract(None, advance, capture=compose)
    # What the compose files themselves ask of the host, not the manifest's record of it.
    asked = host_requests(m, _compose_excerpt(m, done.captured) if compose else None)
    if as_json:
        emit_json({"ok": True, "name": m.name, "version": m.version, "sequence": m.sequence,
                   "keyid": verified.keyid, "files": len(m.files), "bytes": done.bytes_read,
                   **asked})
    else:
        click.echo(f"{bundle}: OK — {m.name} {m.version}, sequence {m.sequence}, "
                   f"{len(m.files)} files, signed by {verified.keyid}")
        _show_requests(asked)


def _compose_excerpt(m: Manifest, captured: dict[str, bytes]) -> dict[str, Any]:
    from bundler.bundle.hostreq import checked_excerpt

    spec = m.runtime.compose
    assert spec is not None
    return checked_excerpt(((f, captured[f"files/{f}"]) for f in spec.files), spec.host,
                           f"{m.name} {m.version}")


def _show_requests(info: dict[str, Any]) -> None:
    """The host requests of `bundle inspect` / `verify`, one line each."""
    requests = info["host_requests"]
    if not info["host_requests_complete"]:
        click.echo("  asks of the host: its compose files' requests are not recorded in this "
                   "bundle (built by an older bundler): `bundle verify` reads them")
    if not requests:
        if info["host_requests_complete"]:
            click.echo("  asks of the host: nothing beyond confined containers/processes")
        return
    click.echo("  asks of the host:")
    for r in requests:
        who = f"service {r['service']}" if r["service"] else "the release"
        text = Request(r["service"], r["kind"], r["value"], r["source"]).describe()
        if r["pending"]:
            note = "decided at install from the environment, then checked"
        elif r["kind"] == "user" and r["value"] == "root":
            note = ("allowed while the current release runs as root too, "
                    "else --allow user=root")
        elif r["refused_by_default"]:
            note = f"refused unless allowed: --allow {r['allow']}"
        else:
            note = "listed only"
        click.echo(f"    {who}: {text}  [{note}]")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@options.trust
@options.trust_root
@options.json_output
@handled
def inspect(bundle: Path, trust_path: Path | None, root: Path | None, as_json: bool) -> None:
    """Show what BUNDLE holds: contents, sizes, signer, sequence, expiry.

    Only the signed envelope is read (fast); `bundle verify` checks every byte.
    """
    from bundler.bundle.inspect import describe

    trusted = _trusted(trust_path, root)
    with archive.open_bundle(bundle, trusted) as reader:  # one pass: envelope, SBOM, index
        verified, data = archive.sbom_in(reader)
        parts = _parts(bundle, reader.part_index)
    sbom = _sbom_doc_of(bundle, data) if data is not None else None
    info = describe(verified, parts)
    info["sbom"] = _sbom_summary(sbom)
    if as_json:
        emit_json({"ok": True, **info})
        return
    click.echo(f"{info['name']} {info['version']}  sequence {info['sequence']}  "
               f"signed by {info['keyid']} (signature verified)")
    click.echo(f"  created {info['created']}, expires {info['expires'] or 'never'}")
    for sig in info["signatures"]:
        when = f" at {sig['time']}" if sig["time"] else ""
        also = f" (bundler: {sig['bundler_keyid']})" \
            if sig["bundler_keyid"] != sig["keyid"] else ""
        click.echo(f"  signature {sig['keyid']}{also} ({sig['role']}){when}")
    click.echo(f"  target  CPython {info['target']['python']} on {info['target']['platform']}")
    click.echo(f"  payload {human_bytes(info['payload_size'])} in {len(info['files'])} files")
    if info["delta"]:
        _say_delta(info["delta"])
    for f in info["files"]:
        click.echo(f"    {f['kind']:<6} {human_bytes(f['size']):>10}  {f['path']}"
                   + ("  (from the host)" if f.get("travels") is False else "")
                   + (f"  (thin: {len(f['host_layers'])} layer(s) from the host's engine)"
                      if f.get("host_layers") else ""))
    if info["parts"]:
        click.echo(f"  volumes {len(info['parts'])} parts:")
        for p in info["parts"]:
            click.echo(f"    {p['file']}  {human_bytes(p['size'])}")
    if info["wheels"]:
        click.echo(f"  wheels  {len(info['wheels'])}: " + ", ".join(
            f"{w['name']}=={w['version']}" for w in info["wheels"]))
    for p in info["npm"]:
        click.echo(f"  npm     {p['project']}: {len(p['packages'])} packages")
    if info["runtimes"]:
        click.echo(f"  carries Node.js {info['runtimes']['node']}, npm {info['runtimes']['npm']}")
    for i in info["images"]:
        click.echo(f"  image   {i['ref']}  {i['image_id'][:19]}")
    for d in info["databases"]:
        where = f" in compose service {d['compose_service']}" if d["compose_service"] else ""
        click.echo(f"  database {d['name'] or '(database)'}: {d['kind'] or 'from its URL'}{where}")
    for x in info["migrations"]:
        steps = f": {', '.join(x['steps'])}" if x["steps"] else ""
        click.echo(f"  migration {x['name']} ({x['kind']}"
                   f"{', on ' + x['database'] if x['database'] else ''}){steps}")
    click.echo(f"  sbom    {_say_summary(info['sbom'])}")
    click.echo(f"  services: {', '.join(info['services']) or '-'}; "
               f"health checks: {', '.join(info['health']) or '-'}")
    if info.get("user"):
        click.echo(f"  runs as user {info['user']}")
    _show_requests(info)


def _say_delta(d: dict[str, int]) -> None:
    click.echo(f"  delta   {d['travel_files']} file(s) travel ({human_bytes(d['travel_bytes'])}),"
               f" {d['host_files']} the host must supply from its store or engine "
               f"({human_bytes(d['host_bytes'])})")
    if d.get("host_layers"):
        click.echo(f"  layers  the image archive travels thin: {d['host_layers']} layer(s) "
                   f"({human_bytes(d['host_layer_bytes'])}) the host's engine must supply")


@cli.command()
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@options.trust
@options.trust_root
@options.json_output
@handled
def diff(old: Path, new: Path, trust_path: Path | None, root: Path | None,
         as_json: bool) -> None:
    """What changed from bundle OLD to bundle NEW: artifacts, versions, services, checks."""
    from bundler.bundle import sbom
    from bundler.bundle.inspect import diff as compute

    trusted = _trusted(trust_path, root)
    (a, a_doc), (b, b_doc) = _sbom_doc(old, trusted), _sbom_doc(new, trusted)
    result = compute(a.manifest, b.manifest)
    # None when either bundle carries no SBOM (built by an older bundler)
    result["components"] = sbom.diff(a_doc, b_doc) if a_doc and b_doc else None
    if as_json:
        emit_json({"ok": True, **result})
        return
    v, s = result["version"], result["sequence"]
    click.echo(f"{result['name'][1]}: {v[0]} → {v[1]} (sequence {s[0]} → {s[1]})")
    if result["target"]:
        click.echo(f"  target: {result['target'][0]} → {result['target'][1]}")
    for a in result["added"]:
        click.echo(f"  + {a['artifact']}{' ' + a['version'] if a['version'] else ''}")
    for r in result["removed"]:
        click.echo(f"  - {r['artifact']}{' ' + r['version'] if r['version'] else ''}")
    for c in result["changed"]:
        click.echo(f"  ~ {c['artifact']}: {c['from']} → {c['to']}")
    _say_runtime_diff(result)
    if not (result["added"] or result["removed"] or result["changed"]):
        click.echo("  no artifact changes")
    _say_components(result["components"])
    _say_delta(result["delta"])


def _say_runtime_diff(result: dict[str, Any]) -> None:
    """Services, health checks, ports, user and environment keys: what changed in each."""
    for what, label in (("services", "service"), ("health", "health")):
        d = result[what]
        for name in d["added"]:
            click.echo(f"  + {label} {name}")
        for name in d["removed"]:
            click.echo(f"  - {label} {name}")
        for c in d["changed"]:
            click.echo(f"  ~ {label} {c['name']}:")
            for field, change in c.items():
                if field == "name":
                    continue
                if field == "env":
                    click.echo(f"      env keys: {_keys(change)} (values not shown)")
                else:
                    none = "root" if field == "user" else "(none)"
                    click.echo(f"      {field}: {_text(change[0], none)} → "
                               f"{_text(change[1], none)}")
    for p in result["ports"]["added"]:
        click.echo(f"  + port {p['port']} ({p['for']})")
    for p in result["ports"]["removed"]:
        click.echo(f"  - port {p['port']} ({p['for']})")
    if result["user"]:
        click.echo(f"  ~ user: {_text(result['user'][0], 'root')} → "
                   f"{_text(result['user'][1], 'root')}")
    env = result["env"]
    required = env["required"]
    if required["added"] or required["removed"]:
        click.echo("  ~ env required: " + ", ".join(
            [f"+ {k}" for k in required["added"]] + [f"- {k}" for k in required["removed"]]))
    for environment, keys in env["defaults"].items():
        click.echo(f"  ~ env defaults ({environment}): {_keys(keys)} (values not shown)")


def _keys(change: dict[str, list[str]]) -> str:
    return ", ".join([f"+ {k}" for k in change["added"]] + [f"- {k}" for k in change["removed"]]
                     + [f"~ {k}" for k in change["changed"]])


def _text(value: object, none: str = "(none)") -> str:
    return none if value is None else str(value)


def _sbom_doc(path: Path, trusted: Trust) -> tuple[Verified, dict[str, Any] | None]:
    """The verified manifest and the bundle's SBOM (None: it carries none)."""
    verified, data = archive.sbom_of(path, trusted)
    return verified, _sbom_doc_of(path, data) if data is not None else None


def _sbom_doc_of(path: Path, data: bytes) -> dict[str, Any]:
    from bundler.bundle import sbom

    try:
        return sbom.parse(data)
    except ValueError as exc:  # signed, yet unreadable: the builder's fault
        raise SignatureError(f"{path.name}: its signed SBOM cannot be read: {exc}",
                             hint="rebuild the bundle with a current bundler") from None


def _sbom_summary(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    from bundler.bundle import sbom

    return sbom.summary(doc) if doc is not None else None


def _say_summary(info: dict[str, Any] | None) -> str:
    if info is None:
        return "none (built by an older bundler)"
    kinds = ", ".join(f"{n} {k}" for k, n in info["by_kind"].items())
    return (f"CycloneDX {info['spec_version']}, {info['components']} components"
            + (f": {kinds}" if kinds else ""))


def _say_components(d: dict[str, list[dict[str, Any]]] | None) -> None:
    """Component changes (the SBOMs), by kind: + name version, - name version, ~ a → b."""
    if d is None:
        click.echo("  components: not compared (a bundle carries no SBOM)")
        return
    rows = [("+", r, r["to"]) for r in d["added"]] + \
        [("-", r, r["from"]) for r in d["removed"]] + \
        [("~", r, f"{r['from']} → {r['to']}") for r in d["changed"]]
    if not rows:
        click.echo("  no component changes")
        return
    click.echo(f"  components: {len(d['added'])} added, {len(d['removed'])} removed, "
               f"{len(d['changed'])} changed")
    for mark, r, text in sorted(rows, key=lambda x: (x[1]["kind"], x[1]["where"],
                                                     x[1]["name"])):
        where = "" if r["where"] == "bundle" else f" (in {r['where']})"
        click.echo(f"    {mark} {r['kind']}{where} {r['name']} {text}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Write the SBOM to this file instead of stdout.")
@options.trust
@options.trust_root
@options.json_output
@handled
def sbom(bundle: Path, out: Path | None, trust_path: Path | None, root: Path | None,
         as_json: bool) -> None:
    """Print (or write to --out) the CycloneDX SBOM that BUNDLE carries, after checking the
    signature and the SBOM's signed sha256. With --json: a summary (components by kind).

    Only the envelope and the SBOM are read (it is packed first); docs/sbom.md.
    """
    from bundler.fsutil import atomic_write_bytes

    trusted = _trusted(trust_path, root)
    verified, data = archive.sbom_of(bundle, trusted)
    m = verified.manifest
    if data is None:
        raise PolicyError(f"{bundle.name} ({m.name} {m.version}) carries no SBOM: it was "
                          f"built by {m.builder or 'an older bundler'}",
                          hint="rebuild it with this bundler (`bundle build`): every bundle "
                               "it builds carries one")
    summary = _sbom_summary(_sbom_doc_of(bundle, data)) if as_json else None
    if out is not None:
        atomic_write_bytes(out, data, mode=0o644)
    if summary is not None:
        emit_json({"ok": True, "name": m.name, "version": m.version, "keyid": verified.keyid,
                   "out": str(out) if out is not None else None, "bytes": len(data),
                   **summary})
    elif out is not None:
        click.echo(f"wrote {out} ({len(data)} bytes): the SBOM of {m.name} {m.version}, "
                   f"signed by {verified.keyid}")
    else:
        click.echo(data.decode("utf-8"), nl=False)
