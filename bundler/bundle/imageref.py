"""Container image references, read the way Docker reads them: ONE parser and normaliser,
shared by `bundle validate` (the profile's images), the image resolver and the build-time
compose check, the manifest reader and the install-time image checks.

Docker's rules (distribution/reference): the first path component is a registry only when it
holds a "." or ":" or is "localhost"; `index.docker.io` is the old name of `docker.io`; an
image on Docker Hub with a one-component path lives under `library/`. The familiar form drops
the Docker Hub registry and that `library/`. So `postgres:15`, `library/postgres:15`,
`docker.io/postgres:15`, `docker.io/library/postgres:15`, `index.docker.io/postgres:15` and
`index.docker.io/library/postgres:15` are one image, `postgres:15`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HUB = ("docker.io", "index.docker.io")
REF_HINT = ("write [registry[:port]/]name:tag in lowercase (e.g. local/app:1.2, "
            "localhost:5000/app:1), or name@sha256:DIGEST with source: registry")


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str
    digest: str | None = None

    @property
    def tagged(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_ref(ref: str) -> Ref:
    """Split `[registry/]path[:tag][@sha256:hex]`; the tag defaults to `latest`. ValueError
    for anything Docker would not accept."""
    rest, _, digest = ref.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise ValueError(f"bad digest in image reference {ref!r}")
    name, tag = rest, "latest"
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1:]
    if not _NAME_RE.match(name) or not _TAG_RE.match(tag):
        raise ValueError(f"{ref!r} is not a valid image reference (want name:tag)")
    return Ref(name, tag, digest or None)


def ref_problem(ref: str, *, registry: bool) -> str | None:
    """Why `ref` cannot name an image to carry, or None. `registry`: it is pulled from its
    registry, the one source a `@sha256:` digest can pin. The profile check and the build both
    ask this, so `bundle validate` passes exactly what `bundle build` takes."""
    try:
        parsed = parse_ref(ref)
    except ValueError as exc:
        return str(exc)
    if parsed.digest and not registry:
        return f"{ref!r}: a @sha256 digest only works with source: registry"
    return None


def familiar_name(name: str) -> str:
    """A repository name in Docker's familiar form: Docker Hub's registry and `library/`
    dropped (`index.docker.io/library/postgres` -> `postgres`); other registries kept."""
    first, sep, rest = name.partition("/")
    if sep and first in _HUB:
        name = rest
    elif sep and ("." in first or ":" in first or first == "localhost"):
        return name  # another registry: nothing to drop
    if name.startswith("library/") and name.count("/") == 1:
        name = name[len("library/"):]
    return name


def canonical_tag(ref: str) -> str:
    """`name:tag` in the familiar form (a digest is dropped): the tag an image is known by on
    the target, for comparing references spelled differently. ValueError if invalid."""
    r = parse_ref(ref)
    return f"{familiar_name(r.name)}:{r.tag}"


def canonical_ref(ref: str) -> str:
    """Like canonical_tag, but a pinned digest stays part of the identity
    (`app@sha256:...` is not the same as `app:latest`). ValueError if invalid."""
    r = parse_ref(ref)
    tagged = f"{familiar_name(r.name)}:{r.tag}"
    return f"{tagged}@{r.digest}" if r.digest else tagged
