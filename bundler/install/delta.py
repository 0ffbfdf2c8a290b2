"""A delta bundle on the target: what it leaves to the host must be here, intact, before
anything changes (docs/delta.md). Files come from the content store (bundler.install.store);
the images, when their archive does not travel, from the engine, which must hold every one of
them by its exact Image ID; and when a thin archive travels, the layer chains it leaves out,
from the engine's (classic) image store."""

from __future__ import annotations

from collections.abc import Sequence

from bundler.bundle.imageref import canonical_tag
from bundler.bundle.manifest import Manifest
from bundler.engine import docker_sdk, engine_client, local_image_ids
from bundler.errors import DeltaError, ImageLoadError
from bundler.install import images as engine_images
from bundler.install import store
from bundler.install.layout import Layout
from bundler.ui import Log


def images_from_host(m: Manifest) -> bool:
    """The images' archive does not travel: the engine must hold them."""
    return bool(m.images) and any(f.kind == "images" for f in m.from_host)


def preflight(layout: Layout, m: Manifest) -> None:
    """Before anything changes: every store object the delta leaves out is present and
    re-hashes to its digest, and every image it leaves out is in the engine. DeltaError
    naming them all otherwise."""
    if not m.is_delta:
        return
    if layout.swarm_file.exists() and (images_from_host(m) or m.host_layers):
        what = "its images" if images_from_host(m) else "some image layers"
        raise DeltaError(f"{m.name} {m.version} leaves {what} to the host, but this root "
                         "runs a swarm, whose nodes each load the release's image archive "
                         "(now, or when a node is replaced); nothing was changed",
                         hint="carry the full bundle (build without --against)")
    lacking = [str(p) for p in store.check(layout, m.from_host)]
    if images_from_host(m):
        engine_images.require_classic(engine_client(DeltaError), f"its {len(m.images)} image(s)")
        lacking += [f"image {x}: not in the engine" for x in _missing_images(m)]
    if lacking:
        raise store.missing_error(lacking, m)
    if m.host_layers:  # DeltaError naming the chains the engine lacks, with the fix
        engine_images.require_layers(engine_client(DeltaError), m.host_chains)


def _image_ids(ids: Sequence[str]) -> dict[str, str | None]:
    found = local_image_ids(ids)
    if found is not None:
        return found
    client = engine_client(DeltaError)
    docker = docker_sdk()
    out: dict[str, str | None] = {}
    for image_id in ids:
        try:
            out[image_id] = str(client.api.inspect_image(image_id)["Id"])
        except docker.errors.ImageNotFound:
            out[image_id] = None
    return out


def _missing_images(m: Manifest) -> list[str]:
    ids = sorted({i.image_id for i in m.images})
    have = _image_ids(ids)
    return [f"{i.ref} ({i.image_id[:19]})" for i in m.images if have.get(i.image_id)
            != i.image_id]


def ensure_images(m: Manifest, log: Log) -> None:
    """The release's images, from the engine: each Image ID present (checked again), each
    tag pointed at it (a tag moved since is moved back)."""
    client = engine_client(ImageLoadError)
    for image in m.images:
        tag = canonical_tag(image.ref)
        try:
            have = str(client.api.inspect_image(image.image_id)["Id"])
        except Exception as exc:
            raise ImageLoadError(f"image {image.ref} ({image.image_id}) is no longer in the "
                                 f"engine: {exc}", hint="carry the full bundle") from None
        if have != image.image_id:
            raise ImageLoadError(f"image {image.ref}: the engine holds {have}, not "
                                 f"{image.image_id}", hint="carry the full bundle")
        try:
            current = str(client.api.inspect_image(tag)["Id"])
        except Exception:
            current = ""
        if current != image.image_id and "@" not in tag:
            repo, _, name = tag.rpartition(":")
            client.api.tag(image.image_id, repo, name)
    log(f"{len(m.images)} image(s) already in the engine (the delta did not carry them)")
