"""`bundle build`: profile → resolved, cached artifacts → signed manifest → bundle file."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler import __version__, archive, ui, volumes
from bundler.cache import Cache
from bundler.errors import BuildError
from bundler.fsutil import require_space
from bundler.manifest import FileEntry, Manifest
from bundler.profile import Profile
from bundler.resolve import files as files_resolver
from bundler.resolve import wheels
from bundler.signing import key_id, sign


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    size: int
    keyid: str
    parts: tuple[Path, ...]  # the volume files, when split


def build_time() -> int:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else now."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return int(time.time())
    if not value.isdigit():
        raise BuildError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds",
                         hint="unset it, or set it to e.g. $(git log -1 --format=%ct)")
    return int(value)


def rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(profile: Profile, key: Ed25519PrivateKey, out_dir: Path, cache: Cache,
          sequence: int | None = None, part_size: int | None = None) -> BuildResult:
    created = build_time()
    entries: list[FileEntry] = []
    sources: dict[str, Path] = {}
    lock_path = None
    if profile.python is not None:
        ui.step("Resolving Python wheels")
        fetched = wheels.fetch(profile.python, profile.target, cache, ui.note)
        entries += [*fetched.entries, fetched.lock]
        sources.update(fetched.sources)
        lock_path = fetched.lock.path
    if profile.files:
        ui.step("Collecting files")
        collected = files_resolver.collect(profile.files, cache)
        entries += collected.entries
        sources.update(collected.sources)
    expires = None
    if profile.expires_ms is not None:
        expires = rfc3339(created + profile.expires_ms // 1000)
    manifest = Manifest(
        name=profile.name,
        version=profile.version,
        # Monotonic by default: the build time. Explicit values win (CLI, then profile).
        sequence=sequence or profile.sequence or created,
        created=rfc3339(created),
        expires=expires,
        builder=f"bundler {__version__}",
        target=profile.target,
        files=tuple(sorted(entries, key=lambda e: e.path)),
        python_lock=lock_path,
        runtime=profile.runtime,
    )
    envelope = sign(manifest, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{profile.name}-{profile.version}.bundle"
    total = manifest.payload_size
    require_space(out_dir, total + len(envelope) + 1024 * 1024, "writing the bundle")
    ui.step(f"Packing {len(entries)} file(s) into {out}"
            + (f" in volumes of at most {part_size} bytes" if part_size else ""))
    with ui.bytes_progress("packing", total) as advance:
        index = archive.pack(out, envelope, [(e, sources[e.path]) for e in entries], created,
                             advance, part_size)
    _remove_stale(out, volume_set=index is not None)
    if index is None:
        return BuildResult(out, manifest, out.stat().st_size, key_id(key.public_key()), ())
    index_file = volumes.write_index(out, index, key)
    parts = tuple(out_dir / p.file for p in index.parts)
    return BuildResult(index_file, manifest, index.total_size, key_id(key.public_key()), parts)


def _remove_stale(out: Path, volume_set: bool) -> None:
    """A bundle and a volume set of the same name must not sit side by side: readers would
    pick the wrong one."""
    if volume_set:
        out.unlink(missing_ok=True)
        return
    volumes.index_path(out).unlink(missing_ok=True)
    for part in out.parent.glob(f"{out.name}.[0-9][0-9][0-9]"):
        part.unlink()
