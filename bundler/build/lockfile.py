"""bundle.lock: what the build resolved, exactly (versions, files, hashes), so that later
builds of the same inputs resolve nothing and, with a warm cache, need no network at all."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.build.profile import Profile
from bundler.build.resolve.runtimes import Locked as LockedRuntime
from bundler.build.resolve.wheels import LockedWheel
from bundler.bundle.models import ImageRef, Target
from bundler.errors import BuildError
from bundler.fsutil import atomic_write_bytes

SCHEMA = 1


@dataclass(frozen=True)
class Lock:
    inputs: str  # digest of everything resolution depends on (see inputs_digest)
    target: Target
    wheels: tuple[LockedWheel, ...] = ()
    images: tuple[ImageRef, ...] = ()
    images_archive: tuple[str, int] | None = None  # (sha256, size) of the cached archive
    sources: tuple[tuple[str, str], ...] = ()  # where each kind came from (see sources_of)
    runtimes: tuple[LockedRuntime, LockedRuntime] | None = None  # (node, npm), when carried

    def to_bytes(self) -> bytes:
        doc = {"schema": SCHEMA, "inputs": self.inputs, "target": self.target.to_json(),
               "python": [w.to_json() for w in self.wheels],
               "images": [i.to_json() for i in self.images],
               "images_archive": ({"sha256": self.images_archive[0],
                                   "size": self.images_archive[1]}
                                  if self.images_archive else None),
               "sources": dict(self.sources)}
        if self.runtimes is not None:  # only when set: other locks stay byte-identical
            doc["runtimes"] = {"node": self.runtimes[0].to_json(),
                               "npm": self.runtimes[1].to_json()}
        # Indented on purpose: lock files are reviewed in diffs.
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, path: Path) -> Lock:
        try:
            doc = json.loads(data)
            if doc.get("schema") != SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}")
            archive = doc.get("images_archive")
            rt = doc.get("runtimes")
            return cls(inputs=str(doc["inputs"]), target=Target.from_json(doc["target"]),
                       wheels=tuple(LockedWheel.from_json(w) for w in doc["python"]),
                       images=tuple(ImageRef.from_json(i) for i in doc.get("images", [])),
                       images_archive=(str(archive["sha256"]), int(archive["size"]))
                       if archive else None,
                       sources=tuple(sorted((str(k), str(v))
                                            for k, v in doc.get("sources", {}).items())),
                       runtimes=(LockedRuntime.from_json(rt["node"]),
                                 LockedRuntime.from_json(rt["npm"])) if rt else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise BuildError(f"{path} is not a bundler lock file: {exc}",
                             hint="delete it and run `bundle lock PROFILE` again") from None


def default_path(profile: Profile) -> Path:
    return profile.path.with_suffix(".lock")


def inputs_digest(profile: Profile) -> str:
    """A digest of every input resolution depends on: the whole target, python, npm, images
    and runtimes specs, field by field (read generically from the frozen dataclasses, so a
    field added later is covered without anyone remembering to add it here). Not the version,
    services, files or actions, which are not resolved: bumping the version keeps the lock.

    Files count by content (sha256), directories and other local paths by where they are
    relative to the profile (a checkout elsewhere keeps its lock)."""
    doc = {"target": profile.target, "python": profile.python, "npm": profile.npm,
           "images": profile.images, "runtimes": profile.runtimes}
    canonical = _canonical(doc, profile.base_dir)
    return hashlib.sha256(json.dumps(canonical, sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


def _canonical(value: Any, base: Path) -> Any:
    """JSON-able form of a spec value; refuses a type it does not know rather than guess."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__,
                **{f.name: _canonical(getattr(value, f.name), base)
                   for f in dataclasses.fields(value)}}
    if isinstance(value, Path):
        return _path_input(value, base)
    if isinstance(value, str):
        # an absolute local path (e.g. a find_links directory, resolved when loaded)
        return {"local": os.path.relpath(value, base)} if value.startswith("/") else value
    if isinstance(value, (tuple, list)):
        return [_canonical(v, base) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v, base) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (bool, int)):
        return value
    raise TypeError(f"lock inputs: no canonical form for {type(value).__name__} ({value!r})")


def _path_input(path: Path, base: Path) -> dict[str, str]:
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return {"file": h.hexdigest()}
    return {"path": os.path.relpath(path, base)}


def sources_of(profile: Profile) -> tuple[tuple[str, str], ...]:
    """Where each artifact kind is fetched from, as the profile names it (never host config)."""
    out: list[tuple[str, str]] = []
    if profile.python is not None:
        spec = profile.python
        where = ["no index" if spec.no_index else f"index {spec.index_url or 'pip default'}"]
        where += [f"extra index {u}" for u in spec.extra_index_urls]
        where += [f"find-links {Path(f).name if '://' not in f else f}"
                  for f in spec.find_links]
        out.append(("python", "; ".join(where)))
    for project in profile.npm:
        out.append((f"npm:{project.dest}", f"registry {project.registry or 'npm default'}"))
    if profile.runtimes is not None:
        out.append(("runtime:node", f"registry {profile.runtimes.registry or 'npm default'}"))
    for image in profile.images:
        origin = f"archive {image.archive.name}" if image.archive else image.source
        out.append((f"image:{image.ref}", origin))
    return tuple(sorted(out))


def load_current(profile: Profile, path: Path) -> Lock | None:
    """The lock at `path` if it exists and was made from these exact inputs."""
    if not path.is_file():
        return None
    lock = Lock.parse(path.read_bytes(), path)
    return lock if lock.inputs == inputs_digest(profile) else None


def write(path: Path, lock: Lock) -> None:
    atomic_write_bytes(path, lock.to_bytes())
