"""The manifest: the signed statement of what a bundle holds and how to install it.

Emitted deterministically (sorted keys, compact separators, UTF-8, no floats) so the same
inputs give the same bytes, and parsed strictly (duplicate keys, floats and NaN refused)
because the signature covers exact bytes: two parsers must never disagree on their meaning.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bundler.bundle.imageref import parse_ref
from bundler.bundle.models import (
    COMPOSE_TOOLS,
    NAME_RE,
    NODE_PACKAGES,
    NPM_PACKAGE,
    VERSION_RE,
    ComposeSpec,
    DatabaseSpec,
    DataDir,
    EnvSpec,
    HealthCheck,
    ImageRef,
    InstallPolicy,
    MigrationSpec,
    NodeRuntime,
    NpmProject,
    Runtime,
    Service,
    Target,
    is_inner_path,
    user_name,
)
from bundler.bundle.nodetree import TREE_NAME
from bundler.errors import SignatureError

SCHEMA = 1
PAYLOAD_TYPE = "application/vnd.bundler.bundle.manifest+json"

# Member paths are chosen by the builder; the verifier still refuses anything that could
# escape a directory or mean different things on different systems.
_SEGMENT = r"[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*"
PATH_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("wheel", "file", "lock", "npm", "images", "runtime", "sbom")
IMAGES_PATH = "images/images.tar.zst"
# The CycloneDX SBOM (docs/sbom.md): packed first after the envelope, so reading it stops early.
SBOM_PATH = "sbom/bom.cdx.json"
# The build's vulnerability findings (`bundle build --vulns`, docs/vulns.md), kind "sbom" too.
VULNS_PATH = "sbom/vulns.json"
RESERVED = ("envelope.json",)
# Where each kind of payload lives in a release directory (as the builder names them). A
# payload elsewhere could land on the installer's own files (bundle/manifest.json, run/*.pid).
KIND_PREFIX = {"wheel": "python/", "lock": "python/", "file": "files/", "npm": "npm/",
               "images": "images/", "runtime": "runtimes/", "sbom": "sbom/"}
COMPOSE_PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
CHAIN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class HostLayer:
    """A layer a delta's thin image archive leaves out: the target's engine must hold its
    chain (bundler.bundle.imagedelta). `size`: the layer's uncompressed bytes."""

    chain_id: str  # "sha256:<hex>", the OCI ChainID of the image's layers up to this one
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id, "size": self.size}


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    kind: str
    # False: a delta bundle does not carry it; the host supplies it from its store (or, for
    # the images, its engine). Written only when False, so a full manifest keeps its bytes.
    travels: bool = True
    # The images' archive of a layer delta: size and sha256 are the thin archive's, and these
    # are the layers it leaves to the engine (sorted by chain ID). Written only when some
    # are, so a full manifest keeps its bytes.
    host_layers: tuple[HostLayer, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256,
                "kind": self.kind} | ({} if self.travels else {"travels": False}) \
            | ({"host_layers": [x.to_json() for x in self.host_layers]}
               if self.host_layers else {})


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    sequence: int
    created: str
    target: Target
    files: tuple[FileEntry, ...]
    runtime: Runtime = field(default_factory=Runtime)
    expires: str | None = None
    python_lock: str | None = None  # path of the hashed requirements lock among `files`
    npm: tuple[NpmProject, ...] = ()
    images: tuple[ImageRef, ...] = ()  # loaded from IMAGES_PATH (zstd docker-save tar)
    runtimes: NodeRuntime | None = None  # Node.js + npm carried under runtimes/
    builder: str = ""
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "sequence": self.sequence,
            "created": self.created,
            "expires": self.expires,
            "builder": self.builder,
            "target": self.target.to_json(),
            "files": [f.to_json() for f in sorted(self.files, key=lambda f: f.path)],
            "python": {"lock": self.python_lock} if self.python_lock else None,
            "npm": [p.to_json() for p in self.npm],
            "images": [i.to_json() for i in self.images],
            "services": [s.to_json() for s in self.runtime.services],
            "health": [h.to_json() for h in self.runtime.health],
            "install": self.runtime.install.to_json(),
            "env": self.runtime.env.to_json(),
            "compose": self.runtime.compose.to_json() if self.runtime.compose else None,
            "database": self.runtime.database.to_json() if self.runtime.database else None,
            "migrations": [mg.to_json() for mg in self.runtime.migrations],
        } | ({"databases": [d.to_json() for d in self.runtime.databases]}
             if self.runtime.databases else {}) \
            | ({"user": self.runtime.user} if self.runtime.user else {}) \
            | ({"data": [d.to_json() for d in self.runtime.data]} if self.runtime.data else {}) \
            | ({"runtimes": self.runtimes.to_json()} if self.runtimes else {})  # only when set

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def payload_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def travelling(self) -> tuple[FileEntry, ...]:
        """The files the bundle carries (all of them, unless it is a delta)."""
        return tuple(f for f in self.files if f.travels)

    @property
    def from_host(self) -> tuple[FileEntry, ...]:
        """The files a delta bundle leaves to the host (its store, or its engine)."""
        return tuple(f for f in self.files if not f.travels)

    @property
    def travel_size(self) -> int:
        return sum(f.size for f in self.travelling)

    @property
    def host_layers(self) -> tuple[HostLayer, ...]:
        """The image layers a delta's thin archive leaves to the target's engine."""
        return tuple(x for f in self.files if f.kind == "images" for x in f.host_layers)

    @property
    def host_chains(self) -> tuple[str, ...]:
        return tuple(x.chain_id for x in self.host_layers)

    @property
    def is_delta(self) -> bool:
        """It leaves something to the host: files (its store), images or layers (its
        engine)."""
        return bool(self.from_host or self.host_layers)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


_BUILDER_RE = re.compile(r"^bundler (\S+)$")


def required_version(manifest: Manifest) -> str | None:
    """The bundler version a bundle needs on the target: the version that built it (the
    signed `builder`, "bundler X.Y.Z"). None for a manifest that names no bundler builder
    (hand-made ones): nothing to compare."""
    match = _BUILDER_RE.match(manifest.builder)
    return match[1] if match else None


def canonical_json(obj: Any) -> bytes:
    _reject_floats(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _reject_floats(obj: Any) -> None:
    if isinstance(obj, float):
        raise ValueError("floats are not allowed in signed documents")
    if isinstance(obj, dict):
        for v in obj.values():
            _reject_floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _reject_floats(v)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_float(text: str) -> Any:
    raise ValueError(f"float {text} not allowed")


def strict_loads(data: bytes) -> Any:
    """json.loads that refuses duplicate keys, floats, NaN and Infinity, and nesting too deep
    for the parser (a ValueError, like every other refusal, never a RecursionError)."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_float,
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")


def _time(value: Any, what: str) -> str:
    """A UTC timestamp as the builder writes it (2026-01-31T12:00:00Z), checked here so that
    policy can compare it without a parse error half-way through an install."""
    text = _str(value, what)
    try:
        if not _TIME_RE.match(text):
            raise ValueError
        datetime.strptime(text, TIME_FORMAT)
    except ValueError:
        raise ValueError(f"{what} {text[:40]!r} is not a UTC time like "
                         "2026-01-31T12:00:00Z") from None
    return text


def parse_manifest(data: bytes) -> Manifest:
    """Parse signed manifest bytes. Only ever called on bytes whose signature verified."""
    try:
        doc = strict_loads(data)
        return _from_json(doc)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SignatureError(
            f"signed manifest is malformed: {exc}",
            hint="the signer produced an invalid manifest; rebuild it with a current bundler",
        ) from None


def _images(raw: Any, listed: set[str]) -> tuple[ImageRef, ...]:
    images = tuple(ImageRef.from_json(i) for i in raw)
    for image in images:
        parse_ref(image.ref)  # ValueError for a reference Docker would not take
        if not re.match(r"^sha256:[0-9a-f]{64}$", image.image_id):
            raise ValueError(f"image {image.ref!r} has a malformed image_id")
    if images and IMAGES_PATH not in listed:
        raise ValueError(f"images are listed but {IMAGES_PATH} is not")
    return images


def _npm_projects(raw: Any, listed: set[str]) -> tuple[NpmProject, ...]:
    projects = tuple(NpmProject.from_json(p) for p in raw)
    for project in projects:
        if not PATH_RE.match(project.dest):
            raise ValueError(f"unsafe npm dest {project.dest!r}")
        for name in ("package.json", "package-lock.json"):
            if f"{project.bundle_dir}/{name}" not in listed:
                raise ValueError(f"npm project {project.dest!r} lacks {name}")
        if project.tree is not None and (project.tree != f"{project.bundle_dir}/{TREE_NAME}"
                                         or project.tree not in listed):
            raise ValueError(f"npm project {project.dest!r} names an unlisted or misplaced "
                             f"node_modules payload {project.tree!r}")
        for pkg in project.packages:
            if pkg.tarball not in listed:
                raise ValueError(f"npm package {pkg.name}@{pkg.version} names an unlisted "
                                 f"tarball {pkg.tarball!r}")
    return projects


_RUNTIME_VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")


def _runtimes(raw: Any, files: list[FileEntry]) -> NodeRuntime | None:
    """The carried Node.js and npm: the official packages, full versions, tarballs listed as
    files of kind runtime."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"node", "npm"}:
        raise ValueError("runtimes must name exactly node and npm")
    rt = NodeRuntime.from_json(raw)
    kinds = {f.path: f.kind for f in files}
    for ref, names in ((rt.node, tuple(NODE_PACKAGES.values())), (rt.npm, (NPM_PACKAGE,))):
        if ref.name not in names:
            raise ValueError(f"runtime package {ref.name!r} is not one of {', '.join(names)}")
        if not _RUNTIME_VERSION.match(ref.version):
            raise ValueError(f"runtime {ref.name} version {ref.version!r} is not x.y.z")
        if kinds.get(ref.tarball) != "runtime":
            raise ValueError(f"runtime {ref.name}@{ref.version} names {ref.tarball!r}, which "
                             "is not a listed file of kind 'runtime'")
    return rt


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{what} must be an integer")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def _sequence(value: Any) -> int:
    sequence = _int(value, "sequence")
    if sequence < 1:
        raise ValueError(f"sequence {sequence} is not at least 1")
    return sequence


def _matching(value: Any, what: str, pattern: re.Pattern[str]) -> str:
    text = _str(value, what)
    if not pattern.fullmatch(text):
        raise ValueError(f"{what} {text!r} is not valid")
    return text


def _inner(value: Any, what: str) -> str:
    """A path the installer joins to the release's files directory: it must stay inside."""
    text = _str(value, what)
    if not is_inner_path(text):
        raise ValueError(f"{what} {text!r} leaves the release's files")
    return text


def _services(raw: Any) -> tuple[Service, ...]:
    services = []
    for i, data in enumerate(raw):
        # the name names run/<name>.pid and logs/<name>.log; cwd is joined to files/
        _matching(data["name"], f"services[{i}].name", NAME_RE)
        _inner(data.get("cwd", "."), f"services[{i}].cwd")
        services.append(Service.from_json(data))
    names = [s.name for s in services]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"service {name!r} listed twice")
    return tuple(services)


def _compose(raw: Any, listed: set[str]) -> ComposeSpec:
    for i, f in enumerate(raw["files"]):
        _inner(f, f"compose.files[{i}]")
        if f"files/{f}" not in listed:
            raise ValueError(f"compose.files[{i}] {f!r} is not a listed file (files/{f})")
    if not raw["files"]:
        raise ValueError("compose.files is empty")
    if raw.get("project") is not None:
        _matching(raw["project"], "compose.project", COMPOSE_PROJECT_RE)
    tool = raw.get("tool")
    if tool is not None and tool not in COMPOSE_TOOLS:
        raise ValueError(f"compose.tool {tool!r} is not one of {', '.join(COMPOSE_TOOLS)}")
    return ComposeSpec.from_json(raw)


def _migrations(raw: Any) -> tuple[MigrationSpec, ...]:
    out = []
    for i, data in enumerate(raw):
        if data.get("path") is not None:
            _inner(data["path"], f"migrations[{i}].path")
        out.append(MigrationSpec.from_json(data))
    return tuple(out)


def _databases(raw: Any) -> tuple[DatabaseSpec, ...]:
    if not isinstance(raw, list):
        raise ValueError("databases must be a list")
    out = []
    for i, data in enumerate(raw):
        if not isinstance(data, dict) or not data.get("name") or not data.get("kind"):
            raise ValueError(f"databases[{i}] must name its name and kind")
        out.append(DatabaseSpec.from_json(data))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ValueError("two databases have the same name")
    return tuple(out)


def _data_dirs(raw: Any) -> tuple[DataDir, ...]:
    """`data`: each a name (the directory under <root>/data/), mode and backup policy."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("data must be a non-empty list")
    out = tuple(DataDir.from_json(d) for d in raw)
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ValueError("two data directories have the same name")
    return out


def _host_layers(raw: Any, path: str, kind: str, travels: bool) -> tuple[HostLayer, ...]:
    """A thin images archive's layers left to the engine: one form only (a non-empty list
    sorted by chain ID, each chain once, exactly {chain_id, size}), on a travelling file of
    kind images."""
    if kind != "images" or not travels:
        raise ValueError(f"file {path!r}: host_layers belong to a travelling images archive")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"file {path!r}: host_layers must be a non-empty list")
    out = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"chain_id", "size"}:
            raise ValueError(f"file {path!r}: a host layer is not {{chain_id, size}}")
        chain = _matching(item["chain_id"], "host layer chain_id", CHAIN_RE)
        size = _int(item["size"], "host layer size")
        if size < 0:
            raise ValueError(f"file {path!r}: negative host layer size")
        out.append(HostLayer(chain, size))
    chains = [x.chain_id for x in out]
    if chains != sorted(set(chains)):
        raise ValueError(f"file {path!r}: host_layers are not sorted by chain ID, each once")
    return tuple(out)


def _from_json(doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise ValueError("manifest must be an object")
    if _int(doc["schema"], "schema") != SCHEMA:
        raise ValueError(f"unsupported manifest schema {doc['schema']} "
                         f"(this bundler reads {SCHEMA})")
    files = []
    seen: set[str] = set()
    for raw in doc["files"]:
        path = _str(raw["path"], "file path")
        if not PATH_RE.match(path) or path in RESERVED or ".." in path.split("/"):
            raise ValueError(f"unsafe file path {path!r}")
        if path in seen:
            raise ValueError(f"file {path!r} listed twice")
        seen.add(path)
        sha = _str(raw["sha256"], "sha256")
        if not SHA256_RE.match(sha):
            raise ValueError(f"bad sha256 for {path!r}")
        kind = _str(raw["kind"], "kind")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} for {path!r}")
        if not path.startswith(KIND_PREFIX[kind]):
            raise ValueError(f"file {path!r} of kind {kind!r} is not under "
                             f"{KIND_PREFIX[kind]}")
        size = _int(raw["size"], "size")
        if size < 0:
            raise ValueError(f"negative size for {path!r}")
        if set(raw) - {"path", "size", "sha256", "kind", "travels", "host_layers"}:
            raise ValueError(f"file {path!r} has unknown keys")
        # One form only: absent means it travels, so only `false` may be written.
        if "travels" in raw and raw["travels"] is not False:
            raise ValueError(f"file {path!r}: travels may only be false")
        layers = _host_layers(raw["host_layers"], path, kind, "travels" not in raw) \
            if "host_layers" in raw else ()
        files.append(FileEntry(path=path, size=size, sha256=sha, kind=kind,
                               travels="travels" not in raw, host_layers=layers))
    python = doc.get("python")
    lock = _str(python["lock"], "python.lock") if python else None
    if lock is not None and lock not in seen:
        raise ValueError("python.lock names a file that is not listed")
    if any(f.kind == "sbom" and f.path not in (SBOM_PATH, VULNS_PATH) for f in files):
        raise ValueError(f"a file of kind 'sbom' is neither {SBOM_PATH} nor {VULNS_PATH}")
    if lock is not None and next(f.kind for f in files if f.path == lock) != "lock":
        raise ValueError(f"python.lock {lock!r} is not a file of kind 'lock'")
    manifest = Manifest(
        schema=SCHEMA,
        name=_matching(doc["name"], "name", NAME_RE),
        version=_matching(doc["version"], "version", VERSION_RE),
        sequence=_sequence(doc["sequence"]),
        created=_time(doc["created"], "created"),
        expires=None if doc.get("expires") is None else _time(doc["expires"], "expires"),
        builder=_str(doc.get("builder", ""), "builder"),
        target=Target.from_json(doc["target"]),
        files=tuple(files),
        python_lock=lock,
        npm=_npm_projects(doc.get("npm", []), seen),
        images=_images(doc.get("images", []), seen),
        runtimes=_runtimes(doc.get("runtimes"), files),
        runtime=Runtime(
            services=_services(doc.get("services", [])),
            health=tuple(HealthCheck.from_json(h) for h in doc.get("health", [])),
            install=InstallPolicy.from_json(doc.get("install", {})),
            env=EnvSpec.from_json(doc.get("env", {})),
            compose=_compose(doc["compose"], seen) if doc.get("compose") else None,
            database=DatabaseSpec.from_json(doc["database"]) if doc.get("database") else None,
            databases=_databases(doc.get("databases", [])),
            migrations=_migrations(doc.get("migrations", [])),
            user=user_name(doc["user"]) if "user" in doc else None,
            data=_data_dirs(doc["data"]) if "data" in doc else (),
        ),
    )
    runtime = manifest.runtime
    if runtime.databases and runtime.database is not None:
        raise ValueError("a manifest has either database or databases, not both")
    names = {d.name for d in runtime.databases}
    for mg in runtime.migrations:
        if mg.database is not None and mg.database not in names:
            raise ValueError(f"migration {mg.name!r} names an unknown database "
                             f"{mg.database!r}")
    return manifest
