"""bundle.lock: what the build resolved, exactly (versions, files, hashes), so that later
builds of the same inputs resolve nothing and, with a warm cache, need no network at all."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.errors import BuildError
from bundler.fsutil import atomic_write_bytes
from bundler.models import ImageRef, Target
from bundler.profile import Profile
from bundler.resolve.runtimes import Locked as LockedRuntime
from bundler.resolve.wheels import LockedWheel

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


def _file_digest(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None


def inputs_digest(profile: Profile) -> str:
    """Resolution depends on the target, the requirement sources and where they come from;
    not on the version, services or files, so bumping the version keeps the lock."""
    py: dict[str, Any] | None = None
    if profile.python is not None:
        spec = profile.python
        py = {"requirements": _file_digest(spec.requirements),
              "requirements_in": _file_digest(spec.requirements_in),
              "pyproject": _file_digest(spec.pyproject),
              "index_url": spec.index_url, "extra_index_urls": list(spec.extra_index_urls),
              "no_index": spec.no_index}
    images = [{"ref": i.ref, "source": i.source, "tls_verify": i.tls_verify,
               "archive": _file_digest(i.archive)} for i in profile.images]
    doc = {"target": profile.target.to_json(), "python": py, "images": images}
    if profile.runtimes is not None:  # only when set: existing locks stay current
        doc["runtimes"] = profile.runtimes.to_json()
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


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
