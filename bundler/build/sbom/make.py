"""Assemble the SBOM: one component per wheel, npm package, carried runtime and image, and
per image its OS, Python and npm packages (with the layer each came from); dependencies
bundle -> its artifacts and images, image -> its packages."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cyclonedx.factory.license import LicenseFactory
from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot7
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL
from packaging.utils import canonicalize_name, parse_wheel_filename

from bundler.build.sbom import layers, sources
from bundler.build.sbom.pkgdb import Package
from bundler.bundle.manifest import FileEntry
from bundler.bundle.models import ImageRef, NodeRuntime, NpmProject, NpmRef
from bundler.bundle.sbom import KIND, LAYER, WHERE
from bundler.errors import BuildError

SPEC = SchemaVersion.V1_7
_NAMESPACE = uuid.UUID("6f6e0c1e-5b0e-4d57-9a43-2f4c1b6a9d21")  # bundler's serial numbers


@dataclass(frozen=True)
class Release:
    """What the SBOM describes: the release and the artifacts the build gathered."""

    name: str
    version: str
    sequence: int
    created: int  # seconds since the epoch (SOURCE_DATE_EPOCH when set)
    files: Sequence[FileEntry]
    sources: Mapping[str, Path]  # bundle path -> cached file
    npm: Sequence[NpmProject] = ()
    runtimes: NodeRuntime | None = None
    images: Sequence[ImageRef] = ()
    images_archive: Path | None = None  # the full zstd docker-save archive
    images_sha256: str = ""  # its sha256
    scan_cache: Path | None = None  # where what is inside each archive is remembered


def _props(kind: str, where: str = "bundle", **more: str) -> list[Property]:
    out = [Property(name=KIND, value=kind), Property(name=WHERE, value=where)]
    return out + [Property(name=f"bundler:{k}", value=v) for k, v in sorted(more.items()) if v]


def _licenses(text: str) -> list[object]:
    return [LicenseFactory().make_from_string(text)] if text else []


def _wheel(entry: FileEntry, source: Path) -> Component:
    file = entry.path.rsplit("/", 1)[-1]
    name, version, _, _ = parse_wheel_filename(file)
    return Component(
        name=str(name), version=str(version), bom_ref=f"wheel/{file}",
        purl=PackageURL("pypi", name=canonicalize_name(name), version=str(version)),
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=entry.sha256)],
        licenses=_licenses(sources.wheel_license(source)),  # type: ignore[arg-type]
        properties=_props("wheel", file=entry.path))


def _npm_purl(name: str, version: str) -> PackageURL:
    scope, _, base = name.rpartition("/")
    return PackageURL("npm", namespace=scope or None, name=base, version=version)


def _integrity(value: str) -> list[HashType]:
    """An SRI `sha512-<base64>` as a CycloneDX hash (hex)."""
    algo, _, b64 = value.partition("-")
    algs = {"sha512": HashAlgorithm.SHA_512, "sha256": HashAlgorithm.SHA_256,
            "sha1": HashAlgorithm.SHA_1}
    try:
        return [HashType(alg=algs[algo], content=base64.b64decode(b64, validate=True).hex())]
    except (KeyError, ValueError):
        return []


def _npm(ref: NpmRef, kind: str, source: Path | None) -> Component:
    return Component(
        name=ref.name, version=ref.version, bom_ref=f"{kind}/{ref.name}@{ref.version}",
        type=ComponentType.PLATFORM if kind == "runtime" else ComponentType.LIBRARY,
        purl=_npm_purl(ref.name, ref.version), hashes=_integrity(ref.integrity),
        licenses=_licenses(  # type: ignore[arg-type]
            sources.npm_license(source) if source is not None else ""),
        properties=_props(kind, file=ref.tarball))


def _contained(pkg: Package, image: layers.ImageContents, where: str,
               parent: str) -> Component:
    os_id, os_version = image.os
    if pkg.type in ("deb", "apk"):
        distro = f"{os_id}-{os_version}" if os_id and os_version else ""
        purl = PackageURL(pkg.type, namespace=os_id or ("debian" if pkg.type == "deb"
                                                        else "alpine"),
                          name=pkg.name, version=pkg.version,
                          qualifiers={k: v for k, v in (("arch", pkg.arch),
                                                        ("distro", distro),
                                                        ("upstream", pkg.source)) if v})
    elif pkg.type == "npm":
        purl = _npm_purl(pkg.name, pkg.version)
    else:
        purl = PackageURL("pypi", name=canonicalize_name(pkg.name), version=pkg.version)
    return Component(
        name=pkg.name, version=pkg.version, purl=purl,
        bom_ref=f"{parent}/{pkg.type}/{pkg.name}@{pkg.version}",
        licenses=_licenses(pkg.license),  # type: ignore[arg-type]
        properties=_props(f"image-{pkg.type}", where, **{"source-version": pkg.source_version}))


def _images(bom: Bom, root: Component, release: Release) -> None:
    if release.images_archive is None:
        return
    try:
        scanned = layers.scan_archive(release.images_archive) \
            if release.scan_cache is None or not release.images_sha256 \
            else layers.scan_cached(release.images_archive, release.images_sha256,
                                    release.scan_cache)
        found = {c.image_id: c for c in scanned}
    except Exception as exc:
        raise BuildError(f"the SBOM cannot read the image archive: {exc}",
                         hint="rebuild the images (`bundle lock PROFILE`) and build again"
                         ) from None
    refs: dict[str, list[str]] = {}
    for ref in release.images:
        refs.setdefault(ref.image_id, []).append(ref.ref)
    images = []
    for image_id, names in sorted(refs.items()):
        contents = found.get(image_id)
        image = Component(
            name=names[0], version=image_id, type=ComponentType.CONTAINER,
            bom_ref=f"image/{names[0]}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=image_id.split(":")[-1])],
            properties=_props("image", tags=" ".join(names),
                              os=" ".join(contents.os).strip() if contents else ""))
        inside = []
        for item in contents.packages if contents else ():
            c = _contained(item.package, contents, names[0], str(image.bom_ref))  # type: ignore[arg-type]
            c.properties.add(Property(name=LAYER, value=item.layer))
            inside.append(c)
        bom.components.update([image, *inside])
        bom.register_dependency(image, inside)
        images.append(image)
    bom.register_dependency(root, images)


def make(release: Release) -> bytes:
    """The SBOM's JSON bytes, valid against the CycloneDX schema (else BuildError: a bug)."""
    created = datetime.fromtimestamp(release.created, UTC)
    root = Component(name=release.name, version=release.version, bom_ref="bundle",
                     type=ComponentType.APPLICATION,
                     properties=[Property(name="bundler:sequence", value=str(release.sequence))])
    bom = Bom(serial_number=uuid.uuid5(_NAMESPACE, f"{release.name}/{release.version}/"
                                                   f"{release.sequence}/{release.created}"),
              metadata=BomMetaData(component=root, timestamp=created))
    direct = [_wheel(e, release.sources[e.path]) for e in release.files if e.kind == "wheel"]
    npm = {(r.name, r.version): r for p in release.npm for r in p.packages}
    direct += [_npm(r, "npm", release.sources.get(r.tarball)) for _, r in sorted(npm.items())]
    if release.runtimes is not None:
        direct += [_npm(r, "runtime", release.sources.get(r.tarball))
                   for r in (release.runtimes.node, release.runtimes.npm)]
    bom.components.update(direct)
    bom.register_dependency(root, direct)
    _images(bom, root, release)
    text = JsonV1Dot7(bom).output_as_string(indent=1)
    problem = JsonStrictValidator(SPEC).validate_str(text)
    if problem is not None:
        raise BuildError(f"the SBOM made does not validate against CycloneDX {SPEC.to_version()}"
                         f": {problem}")
    return text.encode() + b"\n"
