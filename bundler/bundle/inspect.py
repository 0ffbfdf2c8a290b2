"""`bundle inspect` and `bundle diff`: what a (verified) bundle holds, and what changed."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from bundler.bundle import hostreq
from bundler.bundle.manifest import KIND_PREFIX, FileEntry, Manifest
from bundler.bundle.models import (
    DatabaseSpec,
    DbKind,
    EnvSpec,
    HealthCheck,
    MigrationSpec,
    Runtime,
)
from bundler.bundle.signing import Verified
from bundler.errors import HostPolicyError
from bundler.redact import redact


def split(m: Manifest) -> dict[str, int]:
    """What a bundle carries and what it leaves to the host (a delta), in files and bytes;
    and of a thin image archive (travel_bytes counts it), the image layers the host's engine
    supplies (uncompressed bytes)."""
    return {"travel_files": len(m.travelling), "travel_bytes": m.travel_size,
            "host_files": len(m.from_host), "host_bytes": sum(f.size for f in m.from_host),
            "host_layers": len(m.host_layers),
            "host_layer_bytes": sum(x.size for x in m.host_layers)}


def describe(verified: Verified, parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    m = verified.manifest
    return {
        "name": m.name,
        "version": m.version,
        "sequence": m.sequence,
        "created": m.created,
        "expires": m.expires,
        "keyid": verified.keyid,
        "signatures": [s.to_json() for s in verified.signers],
        "digest": verified.digest,
        "builder": m.builder,
        "target": m.target.to_json(),
        "payload_size": m.payload_size,
        "delta": split(m) if m.is_delta else None,  # what a delta leaves to the host
        "files": [f.to_json() for f in m.files],
        "wheels": _wheels(m),
        "npm": [{"project": p.dest, "omit_dev": p.omit_dev,
                 "packages": [{"name": r.name, "version": r.version} for r in p.packages]}
                for p in m.npm],
        "runtimes": ({"node": m.runtimes.node.version, "npm": m.runtimes.npm.version}
                     if m.runtimes else None),
        "services": [s.name for s in m.runtime.services],
        "health": [h.name for h in m.runtime.health],
        "images": [i.to_json() for i in m.images],
        "compose": m.runtime.compose.to_json() if m.runtime.compose else None,
        "databases": [_database(d) for d in m.runtime.all_databases()],
        "migrations": [_migration(m, x) for x in m.runtime.migrations],
        "user": m.runtime.user,  # the account its processes run as (None: root)
        "data": [d.to_json() for d in m.runtime.data],  # <root>/data/<name>/, kept
        **host_requests(m),
        "parts": parts,
    }


def host_requests(m: Manifest, compose: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the release asks of the host (bundler.bundle.hostreq), from the manifest's record of its
    compose files or from `compose`, the excerpt of the files themselves (`bundle verify`).
    `host_requests_complete` is False for an older bundle that records nothing of them."""
    requests = hostreq.process_requests(m.runtime)
    spec = m.runtime.compose
    ex = compose if compose is not None else spec.host if spec is not None else None
    complete = spec is None or ex is not None
    if spec is not None and ex is not None:
        workdir = spec.files[0].rpartition("/")[0] or "."
        try:
            requests += hostreq.analyse(ex, None, hostreq.Place(workdir))
        except hostreq.Unevaluable as exc:
            raise HostPolicyError(f"the signed manifest's record of what the compose files "
                                  f"ask of the host cannot be read: {exc}",
                                  hint="do not install it; `bundle verify` reads the files "
                                       "themselves") from None
    return {"host_requests": [r.to_json() for r in requests],
            "host_requests_complete": complete}


def _wheels(m: Manifest) -> list[dict[str, str]]:
    out = []
    for f in m.files:
        if f.kind == "wheel":
            key, version = _artifact_key(f)
            out.append({"name": key.removeprefix("wheel:"), "version": version,
                        "file": f.path.rsplit("/", 1)[-1]})
    return sorted(out, key=lambda w: w["name"])


def _database(d: DatabaseSpec) -> dict[str, Any]:
    """Name, kind and service of a database; never its URL (a secret once expanded). The
    single `database:` key has no name, and its kind is its URL's scheme when that is literal."""
    kind = d.kind or DbKind.of_url(d.url)
    return {"name": d.name, "kind": str(kind) if kind else None,
            "compose_service": d.compose_service}


def _migration(m: Manifest, x: MigrationSpec) -> dict[str, Any]:
    """A migration and its steps: the SQL files or alembic revisions the bundle carries."""
    db = m.runtime.database_of(x)
    steps: list[str] = []
    if x.path is not None and x.kind in ("sql", "alembic"):
        base = f"{KIND_PREFIX['file']}{x.path.strip('/')}/".replace("/./", "/")
        for f in m.files:
            rel = f.path.removeprefix(base)
            if rel == f.path:
                continue
            sql = x.kind == "sql" and "/" not in rel and rel.endswith(".sql")
            # alembic: the revision scripts, wherever alembic.ini's script_location puts them
            revision = x.kind == "alembic" and rel.endswith(".py") and "/versions/" in f"/{rel}"
            if sql or revision:
                steps.append(rel)
    steps.sort()
    return {"name": x.name, "kind": x.kind, "database": db.name if db else None,
            "path": x.path, "steps": steps,
            "command": list(x.command) if x.kind == "command" else None}


def _artifact_key(entry: FileEntry) -> tuple[str, str]:
    """(identity, version) of a file: wheels by project name, everything else by path."""
    if entry.kind == "wheel":
        try:
            name, version, _, _ = parse_wheel_filename(entry.path.rsplit("/", 1)[-1])
            return f"wheel:{name}", str(version)
        except InvalidWheelFilename:
            pass
    return entry.path, ""


def diff(old: Manifest, new: Manifest) -> dict[str, Any]:
    # the SBOM file always differs: its components are compared instead (bundle.sbom.diff)
    before = {_artifact_key(f)[0]: f for f in old.files if f.kind != "sbom"}
    after = {_artifact_key(f)[0]: f for f in new.files if f.kind != "sbom"}
    added = [_entry(after[k]) for k in sorted(after.keys() - before.keys())]
    removed = [_entry(before[k]) for k in sorted(before.keys() - after.keys())]
    changed = []
    for key in sorted(before.keys() & after.keys()):
        a, b = before[key], after[key]
        if a.sha256 != b.sha256:
            changed.append({"artifact": key, "kind": b.kind,
                            "from": _artifact_key(a)[1] or a.sha256[:12],
                            "to": _artifact_key(b)[1] or b.sha256[:12],
                            "size_delta": b.size - a.size})
    return {
        "name": [old.name, new.name],
        "version": [old.version, new.version],
        "sequence": [old.sequence, new.sequence],
        "target": None if old.target == new.target else [old.target.to_json(),
                                                           new.target.to_json()],
        "added": added,
        "removed": removed,
        "changed": changed,
        "services": _service_diff(old.runtime, new.runtime),
        "health": _health_diff(old.runtime.health, new.runtime.health),
        "ports": _port_diff(_ports(old), _ports(new)),
        "user": None if old.runtime.user == new.runtime.user else [old.runtime.user,
                                                                     new.runtime.user],
        "env": _env_diff(old.runtime.env, new.runtime.env),
        # NEW as a delta: what it leaves to the host; else what a delta of it built
        # `--against OLD` would carry (the host having installed OLD).
        "delta": split(new) if new.is_delta else split(against(old, new)),
    }


def against(old: Manifest, new: Manifest) -> Manifest:
    """`new` marked as `bundle build --against OLD` would mark it (bundler.build.delta):
    images whole, or not at all when OLD has every Image ID (an old bundle does not tell the
    host's image store, so no layer is left out)."""
    have = {f.sha256 for f in old.files if f.kind != "images"}
    old_ids = {i.image_id for i in old.images}
    images_held = bool(new.images) and all(i.image_id in old_ids for i in new.images)
    return dataclasses.replace(new, files=tuple(
        dataclasses.replace(f, travels=not (images_held if f.kind == "images" else
                                            f.kind != "sbom" and f.sha256 in have))
        for f in new.files))


def _entry(f: FileEntry) -> dict[str, Any]:
    key, version = _artifact_key(f)
    return {"artifact": key, "kind": f.kind, "version": version or None, "size": f.size}


def _service_diff(old: Runtime, new: Runtime) -> dict[str, Any]:
    """Services added and removed, and for each one in both what changed: its command (words
    redacted), working directory, effective user and env KEYS (never values)."""
    a = {s.name: s for s in old.services}
    b = {s.name: s for s in new.services}
    changed = []
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        what: dict[str, Any] = {}
        if x.command != y.command:
            what["command"] = [_words(x.command), _words(y.command)]
        if x.cwd != y.cwd:
            what["cwd"] = [x.cwd, y.cwd]
        if old.service_user(x) != new.service_user(y):
            what["user"] = [old.service_user(x), new.service_user(y)]
        env = _changed_keys(dict(x.env), dict(y.env))
        if any(env.values()):
            what["env"] = env
        if what:
            changed.append({"name": name, **what})
    return {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()),
            "changed": changed}


_CHECK_FIELDS = ("kind", "target", "command", "expect_status", "json_field", "json_equals",
                 "timeout_ms", "retries", "interval_ms")


def _health_diff(old: tuple[HealthCheck, ...], new: tuple[HealthCheck, ...]) -> dict[str, Any]:
    """Checks added and removed, and each changed field of the others ([before, after])."""
    a = {h.name: h.to_json() for h in old}
    b = {h.name: h.to_json() for h in new}
    changed = []
    for name in sorted(a.keys() & b.keys()):
        what = {f: [_shown(a[name][f]), _shown(b[name][f])] for f in _CHECK_FIELDS
                if a[name][f] != b[name][f]}
        if what:
            changed.append({"name": name, **what})
    return {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()),
            "changed": changed}


def _ports(m: Manifest) -> dict[int, str]:
    """port -> what serves or publishes it, as far as the manifest says without the target's
    environment: local http/tcp health checks with a literal port, compose's published ports."""
    out: dict[int, str] = {}
    for h in m.runtime.health:
        if h.kind in ("http", "tcp"):
            netloc = h.target.split("://", 1)[-1].split("/", 1)[0] if h.kind == "http" \
                else h.target
            port = netloc.rpartition(":")[2]
            if port.isdigit():
                out.setdefault(int(port), f"health check {h.name}")
    for p in m.runtime.compose.ports if m.runtime.compose else ():
        out.setdefault(p, "published by the compose files")
    return out


def _env_diff(old: EnvSpec, new: EnvSpec) -> dict[str, Any]:
    """The release environment's KEYS that changed (required ones; defaults per environment,
    a changed value named by its key only)."""
    a, b = dict(old.defaults), dict(new.defaults)
    defaults = {}
    for environment in sorted(a.keys() | b.keys()):
        keys = _changed_keys(dict(a.get(environment, ())), dict(b.get(environment, ())))
        if any(keys.values()):
            defaults[environment] = keys
    return {"required": {"added": sorted(set(new.required) - set(old.required)),
                         "removed": sorted(set(old.required) - set(new.required))},
            "defaults": defaults}


def _port_diff(a: dict[int, str], b: dict[int, str]) -> dict[str, list[dict[str, Any]]]:
    return {"added": [{"port": p, "for": b[p]} for p in sorted(b.keys() - a.keys())],
            "removed": [{"port": p, "for": a[p]} for p in sorted(a.keys() - b.keys())]}


def _changed_keys(a: dict[str, str], b: dict[str, str]) -> dict[str, list[str]]:
    """Keys added, removed, and changed (in both, another value): never the values."""
    return {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()),
            "changed": sorted(k for k in a.keys() & b.keys() if a[k] != b[k])}


def _words(argv: tuple[str, ...]) -> str:
    return redact(shlex.join(argv))


def _shown(value: Any) -> Any:
    """A check's field as shown: URLs and commands redacted (a literal password in a target)."""
    if isinstance(value, list):
        return _words(tuple(value))
    return redact(value) if isinstance(value, str) else value
