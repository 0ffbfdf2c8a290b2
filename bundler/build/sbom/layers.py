"""What is installed inside each image of the bundle's image archive: OS packages (dpkg,
apk), Python distributions and npm packages, each with the layer it came from.

Two streaming passes over the zstd docker-save archive (the one the bundle carries): the
first learns the images (manifest.json / OCI index, configs), the second reads each layer tar
once, as a stream inside the stream, keeping only the package databases it meets (bounded
reads, in memory) and the layer's whiteouts. Nothing is extracted; memory does not grow with
the image. Then each image's layers are applied bottom-up, so a later layer's file or
whiteout hides an earlier one's: the database that counts is the topmost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bundler.build.sbom import pkgdb
from bundler.bundle.imagearchive import SMALL, Scan, config_facts, norm_member
from bundler.bundle.imagedelta import tar_stream
from bundler.fsutil import CHUNK, atomic_write_bytes

# The most bytes read of one database file (real dpkg status files are a few MB); a larger
# one is skipped and said so.
LIMITS = {"dpkg": 64 * 1024 * 1024, "apk": 64 * 1024 * 1024, "pypi": 1024 * 1024,
          "npm": 1024 * 1024, "os": 64 * 1024}
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
DPKG_STATUS = "var/lib/dpkg/status"
DPKG_STATUS_D = "var/lib/dpkg/status.d/"
APK_DB = "lib/apk/db/installed"
OS_RELEASE = ("etc/os-release", "usr/lib/os-release")


def classify(path: str) -> str | None:
    """Which database a layer's file is, by its path (normalised, no leading "/")."""
    if path in (DPKG_STATUS, APK_DB):
        return "dpkg" if path == DPKG_STATUS else "apk"
    if path.startswith(DPKG_STATUS_D) and "/" not in path[len(DPKG_STATUS_D):] \
            and not path.endswith(".md5sums"):
        return "dpkg"
    if path in OS_RELEASE:
        return "os"
    if path.endswith((".dist-info/METADATA", ".egg-info/PKG-INFO")):
        return "pypi"
    parts = path.split("/")
    if parts[-1] == "package.json" and len(parts) >= 3 and (
            (parts[-3] == "node_modules" and not parts[-2].startswith("@"))
            or (len(parts) >= 4 and parts[-4] == "node_modules" and parts[-3].startswith("@"))):
        return "npm"
    return None


@dataclass(frozen=True)
class Found:
    """One database file of a layer and what it lists."""

    kind: str
    packages: tuple[pkgdb.Package, ...] = ()
    os: tuple[str, str] = ("", "")


@dataclass
class LayerFacts:
    files: dict[str, Found] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # whiteouts: paths hidden below
    opaque: list[str] = field(default_factory=list)   # directories emptied below
    skipped: list[str] = field(default_factory=list)  # what could not be read, and why


@dataclass(frozen=True)
class Located:
    package: pkgdb.Package
    layer: str  # "sha256:<diff_id>": the lowest layer since which it has been there


@dataclass(frozen=True)
class ImageContents:
    image_id: str
    tags: tuple[str, ...]
    os: tuple[str, str]  # os-release ID, VERSION_ID ("", "" unknown)
    packages: tuple[Located, ...]
    skipped: tuple[str, ...]


def _parse(kind: str, data: bytes) -> Found:
    if kind == "os":
        return Found(kind, os=pkgdb.os_release(data))
    if kind == "dpkg":
        return Found(kind, tuple(pkgdb.dpkg_status(data)))
    if kind == "apk":
        return Found(kind, tuple(pkgdb.apk_installed(data)))
    one = pkgdb.python_metadata(data) if kind == "pypi" else pkgdb.npm_package_json(data)
    return Found(kind, (one,) if one is not None else ())


def scan_layer(fh: IO[bytes]) -> LayerFacts:
    """The databases and whiteouts of one layer tar (plain or gzip), read as a stream."""
    facts = LayerFacts()
    try:
        with tarfile.open(fileobj=fh, mode="r|*", bufsize=CHUNK) as tf:
            for member in tf:
                _note(tf, member, facts)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        facts.skipped.append(f"a layer could not be read as a tar: {exc}")
    return facts


def _note(tf: tarfile.TarFile, member: tarfile.TarInfo, facts: LayerFacts) -> None:
    try:
        path = norm_member(member.name)
    except ValueError:
        return
    head, _, base = path.rpartition("/")
    if base == OPAQUE:
        facts.opaque.append(head)
        return
    if base.startswith(WHITEOUT):
        facts.removed.append(f"{head}/{base[len(WHITEOUT):]}".lstrip("/"))
        return
    kind = classify(path)
    if kind is None or not member.isreg():
        return
    if member.size > LIMITS[kind]:
        facts.skipped.append(f"{path}: {member.size} bytes, over the {LIMITS[kind]} read")
        return
    fh = tf.extractfile(member)
    if fh is not None:
        facts.files[path] = _parse(kind, fh.read())


def _layout(path: Path) -> Scan:
    scan = Scan()
    with tar_stream(path) as tf:
        for member in tf:
            if member.issym() or member.islnk():
                scan.note_link(member)
            elif member.isreg() and member.size <= SMALL:
                for _ in scan.read(tf, member, hash_all=True):
                    pass
    return scan


def scan_archive(path: Path) -> list[ImageContents]:
    """Every image of the zstd docker-save archive at `path`, with what is installed in it.
    ValueError / tarfile.TarError / zstandard.ZstdError when it is no such archive."""
    scan = _layout(path)
    images = scan.layout()
    wanted = {layer for img in images for layer in img.layers}
    per_layer: dict[str, LayerFacts] = {}
    with tar_stream(path) as tf:
        for member in tf:
            if not member.isreg():
                continue
            name = norm_member(member.name)
            if name in wanted and name not in per_layer:
                fh = tf.extractfile(member)
                per_layer[name] = scan_layer(fh) if fh is not None else LayerFacts()
    out = []
    for img in images:
        config = scan.docs[img.config]
        diff_ids = config_facts(config)[0]
        layers = [(f"sha256:{d}", per_layer.get(m, LayerFacts()))
                  for d, m in zip(diff_ids, img.layers, strict=True)]
        out.append(compose(f"sha256:{scan.hashes[img.config]}", img.tags, layers))
    return out


def scan_cached(path: Path, sha256: str, cache_dir: Path) -> list[ImageContents]:
    """`scan_archive`, remembered in `cache_dir` by the archive's sha256 and this scanner's own
    code (a change to how databases are read scans again): an upgrade that changed no image
    does not read every layer again. An unreadable entry is scanned again."""
    key = hashlib.sha256(Path(__file__).read_bytes() + Path(pkgdb.__file__).read_bytes())
    entry = cache_dir / f"{sha256}-{key.hexdigest()[:16]}.json"
    try:
        return [_contents(doc) for doc in json.loads(entry.read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = scan_archive(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(entry, json.dumps([dataclasses.asdict(c) for c in found]).encode(),
                       mode=0o644)
    return found


def _contents(doc: dict[str, object]) -> ImageContents:
    packages = doc["packages"]
    assert isinstance(packages, list)
    return ImageContents(
        str(doc["image_id"]), tuple(doc["tags"]), tuple(doc["os"]),  # type: ignore[arg-type]
        tuple(Located(pkgdb.Package(**p["package"]), str(p["layer"])) for p in packages),
        tuple(doc["skipped"]))  # type: ignore[arg-type]


def compose(image_id: str, tags: tuple[str, ...],
            layers: list[tuple[str, LayerFacts]]) -> ImageContents:
    """Apply the layers bottom-up (whiteouts first, then the layer's own files) and name, for
    each package of the top, the lowest layer since which it has been present unchanged."""
    state: dict[str, tuple[Found, str]] = {}
    since: dict[tuple[str, str, str], str] = {}
    skipped: list[str] = []
    for layer_id, facts in layers:
        for gone in facts.removed:
            _drop(state, gone, itself=True)
        for directory in facts.opaque:
            _drop(state, directory, itself=False)
        state.update({p: (f, layer_id) for p, f in facts.files.items()})
        skipped += facts.skipped
        now = {(p.type, p.name, p.version) for f, _ in state.values() for p in f.packages}
        since = {k: since.get(k, layer_id) for k in now}
    found: dict[tuple[str, str, str], pkgdb.Package] = {}
    os_id: tuple[str, str] = ("", "")
    for path in sorted(state):
        f = state[path][0]
        if f.kind == "os" and (os_id == ("", "") or path == OS_RELEASE[0]):
            os_id = f.os
        for p in f.packages:
            found.setdefault((p.type, p.name, p.version), p)
    located = tuple(Located(p, since[k]) for k, p in sorted(found.items()))
    return ImageContents(image_id, tags, os_id, located, tuple(skipped))


def _drop(state: dict[str, tuple[Found, str]], path: str, *, itself: bool) -> None:
    prefix = f"{path}/" if path else ""
    for key in [k for k in state if (itself and k == path) or k.startswith(prefix)]:
        del state[key]
