"""What the bundled compose files promise, checked on the connected side.

The target has no registry and builds nothing, so a service whose image the bundle does not
carry can only fail there, late; a `database.compose_service` or migration `service` that
names no service, the same. Both are caught here, at build time. The host ports the files
publish are recorded in the manifest for `bundle doctor`, and what they ask of the host
(privileges, host mounts, namespaces: bundler.bundle.hostreq) for `bundle inspect`; what a host
policy cannot evaluate exactly (`extends`, `include`) is refused here already.

Values that compose interpolates (`${TAG}`) are only known on the target: they are skipped
here, and the installer's own checks (every image in the engine before `up`) still apply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bundler.bundle import hostreq
from bundler.bundle.imageref import canonical_ref
from bundler.errors import BuildError

_PORT = re.compile(r"^(?:(?:\[[^\]]*\]|[^:\[\]]+):)?(\d+):\d+(?:/(?:tcp|udp|sctp))?$")


@dataclass(frozen=True)
class ComposeFacts:
    services: tuple[str, ...]
    images: dict[str, str]  # service -> literal image ref (interpolated ones left out)
    built: tuple[str, ...]  # services with `build:` and no image: nothing to run offline
    ports: tuple[int, ...]  # literal published host ports
    host: dict[str, Any] = field(default_factory=dict)  # hostreq.excerpt (signed)


def _identity(ref: str) -> str:
    """How Docker reads `ref` (bundler.bundle.imageref); an invalid ref stays as written, so it is
    reported as not carried rather than crashing the check."""
    try:
        return canonical_ref(ref)
    except ValueError:
        return ref


def _published(entry: Any) -> int | None:
    if isinstance(entry, dict):  # long syntax
        published = str(entry.get("published"))
        return int(published) if published.isdigit() else None
    match = _PORT.match(str(entry))
    return int(match.group(1)) if match else None  # "8000" alone: an ephemeral host port


def inspect(paths: Sequence[tuple[str, Path]]) -> ComposeFacts:
    """Merge the compose files (as `-f a -f b` would: services are unioned)."""
    services: dict[str, dict[str, Any]] = {}
    docs: list[tuple[str, dict[str, Any]]] = []
    for name, path in paths:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise BuildError(f"compose file {name} cannot be read: {exc}".splitlines()[0],
                             hint="fix the compose file; `docker compose config` shows "
                                  "what compose makes of it") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("services", {}), dict):
            raise BuildError(f"compose file {name} has no `services:` mapping",
                             hint="a compose file is a mapping with `services:`")
        docs.append((name, doc))
        for svc, spec in (doc.get("services") or {}).items():
            merged = services.setdefault(str(svc), {})
            merged.update(spec if isinstance(spec, dict) else {})
    images = {svc: str(spec["image"]) for svc, spec in services.items()
              if spec.get("image") and "$" not in str(spec["image"])}
    built = tuple(sorted(svc for svc, spec in services.items()
                         if spec.get("build") and not spec.get("image")))
    ports = sorted({p for spec in services.values() for p in map(_published,
                                                                  spec.get("ports") or ())
                    if p is not None})
    try:
        host = hostreq.excerpt(docs)
    except hostreq.Unevaluable as exc:
        raise BuildError(str(exc), hint="the target checks what every service asks of the "
                                        "host (docs/host-policy.md) and refuses what it cannot "
                                        "evaluate exactly as compose will") from None
    return ComposeFacts(tuple(sorted(services)), images, built, tuple(ports), host)


def check(facts: ComposeFacts, carried: Iterable[str],
          needed_services: Iterable[tuple[str, str]]) -> None:
    """BuildError unless every service the profile names exists and every image is carried.
    `needed_services`: (service, what names it) pairs."""
    for svc, what in needed_services:
        if svc not in facts.services:
            raise BuildError(f"{what} names compose service {svc!r}, which the compose files "
                             f"do not define (they have: {', '.join(facts.services) or 'none'})",
                             hint="fix the service name in the profile or the compose file")
    if facts.built:
        raise BuildError(f"compose service(s) {', '.join(facts.built)} have `build:` and no "
                         "`image:`: the target builds nothing",
                         hint="build the image here (`docker build -t NAME:TAG .`), give the "
                              "service `image: NAME:TAG` and list it under the profile's images")
    have = {_identity(r) for r in carried}
    missing = sorted({(img, svc) for svc, img in facts.images.items()
                      if _identity(img) not in have})
    if missing:
        listed = ", ".join(f"{img} (service {svc})" for img, svc in missing)
        raise BuildError(f"the compose files use image(s) the bundle does not carry: {listed}; "
                         "the target has no registry to pull them from",
                         hint="add them to the profile's `images:` (source: engine, registry "
                              "or archive)")
