"""Profile: the YAML an author writes, loaded into frozen dataclasses.

Validation walks the YAML node tree (not the parsed dict) so that every problem carries its
file:line, and it collects every problem before raising, so one run of `bundle validate`
shows all of them. Unknown keys are errors: a typo must never pass silently.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bundler.bundle.imageref import REF_HINT, canonical_tag, ref_problem
from bundler.bundle.manifest import COMPOSE_PROJECT_RE
from bundler.bundle.models import (
    CHECK_KINDS,
    COMPOSE_TOOLS,
    DATA_BACKUP,
    DATABASE_KINDS,
    MIGRATION_KINDS,
    NAME_RE,
    PLACEHOLDERS,
    RUNTIME_VERSION_RE,
    USER_RE,
    VERSION_RE,
    ComposeSpec,
    DatabaseSpec,
    DataDir,
    DbKind,
    EnvSpec,
    HealthCheck,
    InstallPolicy,
    MigrationSpec,
    Runtime,
    RuntimesSpec,
    Service,
    Target,
    data_mode,
    url_scheme,
)
from bundler.bundle.platforms import PLATFORM_RE
from bundler.errors import Problem, ProfileError
from bundler.redact import has_plaintext_secret

SCHEMA_VERSION = 1

PYTHON_RE = re.compile(r"^3\.\d{1,2}$")
DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_USER_HINT = ("a user name on the target: lowercase letters, digits, '_' and '-', starting "
              "with a letter or '_' (e.g. myapp); create it there with `useradd --system NAME`")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

T = TypeVar("T")


RESOLVERS = ("uv", "pip-tools")


@dataclass(frozen=True)
class PythonSpec:
    """Exactly one source of requirements: a pinned file, a loose `.in` list, or a pyproject."""

    requirements: Path | None = None       # pinned name==version (hashes honoured)
    requirements_in: Path | None = None    # loose: bundler locks it (pip-tools / uv)
    pyproject: Path | None = None          # [project].dependencies, locked like a .in list
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    resolver: str = "uv"                   # what locks a loose list: "uv" or "pip-tools"

    def index_args(self) -> list[str]:
        """Where to look for packages, as pip / pip-compile / uv options: from the profile
        only (host pip configuration is never used)."""
        args: list[str] = ["--no-index"] if self.no_index else []
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        return args


@dataclass(frozen=True)
class FileSpec:
    src: Path               # a file, a directory, or a glob pattern (then dest is a directory)
    dest: str
    exclude: tuple[str, ...] = ()

    @property
    def is_glob(self) -> bool:
        return is_glob(str(self.src))


def is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


@dataclass(frozen=True)
class NpmSpecProfile:
    """A Node project: its package.json + package-lock.json are installed on the target with
    `npm ci --offline` into files/<dest> (where `files:` usually puts its sources)."""

    project: Path
    dest: str
    include_dev: bool = False
    registry: str | None = None
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ImageSpecProfile:
    """A container image to carry: from the build host's engine, a registry, or a file."""

    ref: str
    source: str = "engine"
    archive: Path | None = None
    tls_verify: bool = True


@dataclass(frozen=True)
class Action:
    """A command run on the build machine before anything is resolved (e.g. `npm run build`,
    `docker build`); what it produces is then picked up as files or images."""

    name: str
    run: tuple[str, ...]
    cwd: Path
    env: tuple[tuple[str, str], ...] = ()
    timeout_ms: int = 30 * 60_000  # the default when the profile gives none


@dataclass(frozen=True)
class Profile:
    path: Path
    schema: int
    name: str
    version: str
    sequence: int | None
    expires_ms: int | None
    target: Target
    python: PythonSpec | None
    files: tuple[FileSpec, ...]
    runtime: Runtime
    actions: tuple[Action, ...] = ()
    npm: tuple[NpmSpecProfile, ...] = ()
    images: tuple[ImageSpecProfile, ...] = ()
    runtimes: RuntimesSpec | None = None  # runtimes the bundle carries (Node.js)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


class _Checker:
    """Collects problems while reading typed values out of YAML nodes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[Problem] = []

    def add(self, node: Node | None, message: str, hint: str = "") -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(Problem(str(self.path), line, message, hint))

    def mapping(
        self, node: Node, where: str, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> dict[str, Node] | None:
        if not isinstance(node, MappingNode):
            self.add(node, f"{where} must be a mapping", "write `key: value` lines under it")
            return None
        allowed = required + optional
        out: dict[str, Node] = {}
        for key_node, value in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.add(key_node, f"{where}: keys must be strings")
                continue
            if key in out:
                self.add(key_node, f"{where}: duplicate key '{key}'", "keep only one of them")
                continue
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
                self.add(key_node, f"{where}: unknown key '{key}'", hint)
                continue
            out[key] = value
        for key in required:
            if key not in out:
                self.add(node, f"{where}: missing required key '{key}'")
        return out

    def scalar(self, node: Node, where: str) -> str | None:
        if not isinstance(node, ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            self.add(node, f"{where} must be a single value")
            return None
        return str(node.value)

    def string(self, node: Node, where: str, pattern: re.Pattern[str] | None = None,
               hint: str = "") -> str | None:
        value = self.scalar(node, where)
        if value is None:
            return None
        if pattern is not None and not pattern.match(value):
            self.add(node, f"{where}: '{value}' is not valid", hint)
            return None
        return value

    def specifier(self, node: Node, where: str) -> str | None:
        """A version specifier (PEP 440 syntax: ">=18", ">=18,<21", "==20.*")."""
        value = self.scalar(node, where)
        if value is None:
            return None
        try:
            SpecifierSet(value)
        except InvalidSpecifier:
            self.add(node, f"{where}: '{value}' is not a version specifier",
                     "e.g. \">=18\" or \">=18,<21\"")
            return None
        return value

    def integer(self, node: Node, where: str, minimum: int = 0) -> int | None:
        value = self.scalar(node, where)
        if value is None:
            return None
        if node.tag != "tag:yaml.org,2002:int" and not value.isdigit():
            self.add(node, f"{where} must be a whole number, got '{value}'")
            return None
        number = int(value)
        if number < minimum:
            self.add(node, f"{where} must be at least {minimum}, got {number}")
            return None
        return number

    def boolean(self, node: Node, where: str) -> bool | None:
        value = self.scalar(node, where)
        if value is None:
            return None
        if node.tag != "tag:yaml.org,2002:bool":
            self.add(node, f"{where} must be true or false, got '{value}'")
            return None
        return value.lower() in ("true", "yes", "on")

    def duration_ms(self, node: Node, where: str) -> int | None:
        value = self.scalar(node, where)
        if value is None:
            return None
        match = DURATION_RE.match(value)
        if not match:
            self.add(node, f"{where}: '{value}' is not a duration", "write e.g. 500ms, 2s, 5m, 90d")
            return None
        return int(match.group(1)) * _UNIT_MS[match.group(2)]

    def sequence(self, node: Node, where: str, item: Callable[[Node, str], T | None]
                 ) -> list[T]:
        if not isinstance(node, SequenceNode):
            self.add(node, f"{where} must be a list", "write one `- item` per line")
            return []
        items = (item(child, f"{where}[{i}]") for i, child in enumerate(node.value))
        return [x for x in items if x is not None]

    def string_list(self, node: Node, where: str) -> list[str]:
        return self.sequence(node, where, self.scalar)

    def string_map(self, node: Node, where: str) -> dict[str, str]:
        if not isinstance(node, MappingNode):
            self.add(node, f"{where} must be a mapping of names to values")
            return {}
        out: dict[str, str] = {}
        for key_node, value in node.value:
            key = self.scalar(key_node, f"{where} key")
            val = self.scalar(value, f"{where}.{key}")
            if key is not None and val is not None:
                out[key] = val
        return out


def _compose(path: Path) -> Node:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError([Problem(str(path), 0, "profile not found",
                                    "check the path, or create one with `bundle init DIR`")]
                           ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError([Problem(str(path), 0, f"cannot read profile: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise ProfileError([Problem(str(path), line, f"broken YAML: {exc.problem}",
                                    "check indentation and quoting on this line")]) from None
    except yaml.YAMLError as exc:
        raise ProfileError([Problem(str(path), 0, f"broken YAML: {exc}")]) from None
    if node is None:
        raise ProfileError([Problem(str(path), 1, "profile is empty",
                                    "start from `bundle init DIR`")])
    return node


def load_profile(path: Path, *, check_files: bool = True) -> Profile:
    """Load and validate a profile, raising ProfileError with every problem found."""
    path = path.resolve()
    root = _compose(path)
    c = _Checker(path)
    top = c.mapping(
        root, "profile",
        required=("schema", "name", "version"),
        optional=("sequence", "expires", "target", "actions", "python", "npm", "images",
                  "files", "env", "compose", "database", "databases", "migrations", "services",
                  "health", "install", "user", "runtimes", "data"),
    )
    if top is None:
        raise ProfileError(c.problems)

    schema = c.integer(top["schema"], "schema", minimum=1) if "schema" in top else None
    if schema is not None and schema != SCHEMA_VERSION:
        c.add(top["schema"], f"schema {schema} is not supported",
              f"this bundler reads schema {SCHEMA_VERSION}")
    name = c.string(top["name"], "name", NAME_RE,
                    "lowercase letters, digits and '-'") if "name" in top else None
    version = c.string(top["version"], "version", VERSION_RE,
                       "letters, digits and . _ + - (e.g. 1.4.0)") if "version" in top else None
    sequence = c.integer(top["sequence"], "sequence", 1) if "sequence" in top else None
    user = c.string(top["user"], "user", USER_RE, _USER_HINT) if "user" in top else None
    expires = c.duration_ms(top["expires"], "expires") if "expires" in top else None

    target = Target()
    if "target" in top:
        t = c.mapping(top["target"], "target", (), ("python", "platform", "node", "npm"))
        if t is not None:
            py = c.string(t["python"], "target.python", PYTHON_RE,
                          "write the quoted major.minor, e.g. \"3.11\"") if "python" in t else None
            plat = c.string(t["platform"], "target.platform", PLATFORM_RE,
                            "e.g. manylinux_2_28_x86_64") if "platform" in t else None
            tools = {k: c.specifier(t[k], f"target.{k}") or "" if k in t else ""
                     for k in ("node", "npm")}
            target = Target(python=py or target.python, platform=plat or target.platform,
                            node=tools["node"], npm=tools["npm"])

    python = _python_spec(c, top["python"], path.parent, check_files) if "python" in top else None
    runtimes = _runtimes(c, top["runtimes"], target) if "runtimes" in top else None
    files = tuple(c.sequence(top["files"], "files",
                             lambda n, w: _file_spec(c, n, w, path.parent, check_files))
                  ) if "files" in top else ()
    actions = tuple(c.sequence(top["actions"], "actions",
                               lambda n, w: _action(c, n, w, path.parent, check_files))
                    ) if "actions" in top else ()
    npm = tuple(c.sequence(top["npm"], "npm",
                           lambda n, w: _npm(c, n, w, path.parent, check_files))
                ) if "npm" in top else ()
    images = tuple(c.sequence(top["images"], "images",
                              lambda n, w: _image(c, n, w, path.parent, check_files))
                   ) if "images" in top else ()
    services = tuple(c.sequence(top["services"], "services",
                                lambda n, w: _service(c, n, w))) if "services" in top else ()
    health = tuple(c.sequence(top["health"], "health",
                              lambda n, w: _health(c, n, w))) if "health" in top else ()
    env = _env(c, top["env"]) if "env" in top else EnvSpec()
    compose = _compose_spec(c, top["compose"]) if "compose" in top else None
    database = _database(c, top["database"]) if "database" in top else None
    databases = tuple(c.sequence(top["databases"], "databases",
                                 lambda n, w: _database(c, n, w, named=True))
                      ) if "databases" in top else ()
    migrations = tuple(c.sequence(top["migrations"], "migrations",
                                  lambda n, w: _migration(c, n, w))) if "migrations" in top else ()
    if "database" in top and "databases" in top:
        c.add(top["databases"], "give either `database:` or `databases:`, not both",
              "move the single database into the `databases:` list")
    if "databases" in top and not databases and not c.problems:
        c.add(top["databases"], "databases must list at least one database")
    _unique(c, [d.name or "" for d in databases], top.get("databases"), "database name")
    for spec, key in [(database, "database")] + [(d, "databases") for d in databases]:
        if spec is not None and spec.compose_service and compose is None:
            c.add(top[key], f"{key}.compose_service names a compose service but the "
                  "profile has no `compose:`", "add compose: {files: [...]} with that service, "
                  "or drop compose_service for a database reached by URL alone")
    db_names = {d.name for d in databases}
    for mg in migrations:
        if mg.database is not None and mg.database not in db_names:
            c.add(top["migrations"], f"migration {mg.name!r} names database "
                  f"{mg.database!r}, which `databases:` does not list",
                  f"one of: {', '.join(sorted(n for n in db_names if n)) or '(none)'}")
    if any(x.service for x in migrations) and compose is None:
        c.add(top["migrations"], "a migration names a compose `service` but the profile has "
              "no `compose:`", "add compose: {files: [...]}, or drop the migration's service")
    if migrations and database is None and not databases:
        c.add(top["migrations"], "migrations need a `database:` (what to back up and migrate)",
              "add database: {url: ${DATABASE_URL}}")
    keep = 3
    if "install" in top:
        inst = c.mapping(top["install"], "install", (), ("keep",))
        if inst is not None and "keep" in inst:
            keep = c.integer(inst["keep"], "install.keep", 1) or keep

    data = tuple(c.sequence(top["data"], "data", lambda n, w: _data_dir(c, n, w))
                 ) if "data" in top else ()
    _unique(c, [d.name for d in data], top.get("data"), "data directory")
    _confined_to_files(c, top, files, npm, services, migrations)
    _placeholders(c, root, {d.name for d in data})
    _unique(c, [s.name for s in services], top.get("services"), "service")
    _unique(c, [h.name for h in health], top.get("health"), "health check")
    _unique(c, [f.dest for f in files], top.get("files"), "files dest")
    _unique(c, [n.dest for n in npm], top.get("npm"), "npm dest")
    _unique(c, [canonical_tag(i.ref) for i in images], top.get("images"), "image")

    if c.problems:
        raise ProfileError(c.problems)
    assert schema is not None and name is not None and version is not None
    return Profile(
        path=path, schema=schema, name=name, version=version, sequence=sequence,
        expires_ms=expires, target=target, python=python, files=files,
        runtime=Runtime(services=services, health=health, install=InstallPolicy(keep=keep),
                        env=env, compose=compose, database=database, databases=databases,
                        migrations=migrations, user=user, data=data),
        actions=actions,
        npm=npm,
        images=images,
        runtimes=runtimes,
    )


def _inside(path: str, dests: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dests)


def _confined_to_files(c: _Checker, top: dict[str, Node], files: tuple[FileSpec, ...],
                       npm: tuple[NpmSpecProfile, ...], services: tuple[Service, ...],
                       migrations: tuple[MigrationSpec, ...]) -> None:
    """What can only fail on the target, refused here: a migration directory or a working
    directory that no `files` (or `npm`) entry puts into the release."""
    dests = [f.dest for f in files] + [n.dest for n in npm]
    hint = f"`files` puts only these into the release: {', '.join(dests) or 'nothing'}"
    for i, mg in enumerate(migrations):
        if mg.path and not mg.service and not _inside(mg.path, dests):
            what = "cwd" if mg.kind == "command" else mg.kind
            c.add(_item(top.get("migrations"), i), f"migrations[{i}].{what}: '{mg.path}' is "
                  "not in the release's files", hint)
    for i, svc in enumerate(services):
        if svc.cwd != "." and not _inside(svc.cwd, dests):
            c.add(_item(top.get("services"), i), f"services[{i}].cwd: '{svc.cwd}' is not in "
                  "the release's files", hint)


def _item(node: Node | None, i: int) -> Node | None:
    if isinstance(node, SequenceNode) and i < len(node.value):
        item: Node = node.value[i]
        return item
    return node


_BRACED = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# `{data:NAME}` and its misspellings (`{dta:uploads}`); not `${VAR:-default}` (shell).
_BRACED_ARG = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*):([^{}\s]*)\}")


def _placeholders(c: _Checker, node: Node | None, data: set[str]) -> None:
    """A misspelt placeholder (`{venvv}`) would reach the target as literal text, and a
    `{data:NAME}` that names no `data:` entry would be a directory nobody created."""
    if isinstance(node, ScalarNode) and isinstance(node.value, str):
        known = [p.strip("{}") for p in PLACEHOLDERS]
        for word in _BRACED.findall(node.value):
            if word == "data" and not data:
                c.add(node, "placeholder {data} but the profile declares no `data:` "
                      "directory", "declare one, e.g. data: [uploads], and use {data:uploads}")
            if word in known:
                continue
            close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
            if close:
                c.add(node, f"unknown placeholder {{{word}}}",
                      f"did you mean {{{close[0]}}}? placeholders: {', '.join(PLACEHOLDERS)}")
        for word, arg in _BRACED_ARG.findall(node.value):
            if word != "data":
                if difflib.get_close_matches(word, ["data"], n=1, cutoff=0.6):
                    c.add(node, f"unknown placeholder {{{word}:{arg}}}",
                          f"did you mean {{data:{arg}}}?")
            elif arg not in data:
                c.add(node, f"placeholder {{data:{arg}}} names no data directory",
                      f"declared under `data:`: {', '.join(sorted(data)) or 'none'}")
    elif isinstance(node, MappingNode):
        for _key, value in node.value:
            _placeholders(c, value, data)
    elif isinstance(node, SequenceNode):
        for value in node.value:
            _placeholders(c, value, data)


_DATA_MODE_HINT = ("an octal mode with owner rwx and no group or world write, quoted or not: "
                   "0750 (the default), 0700, 0755")


def _data_dir(c: _Checker, node: Node, where: str) -> DataDir | None:
    """`- uploads` or `- {name: uploads, mode: 0700, backup: always}`: a writable directory
    `<root>/data/<name>/` on the target. Where it lives is fixed: it has no path."""
    if isinstance(node, ScalarNode):
        name = c.string(node, where, NAME_RE, "a directory name: lowercase letters, digits "
                        "and '-' (it lives at <root>/data/NAME/ on the target)")
        return DataDir(name) if name else None
    m = c.mapping(node, where, ("name",), ("mode", "backup"))
    if m is None:
        return None
    name = c.string(m["name"], f"{where}.name", NAME_RE, "lowercase letters, digits and '-' "
                    "(it lives at <root>/data/NAME/ on the target)") if "name" in m else None
    mode: int | None = 0o750
    if "mode" in m:
        text = c.scalar(m["mode"], f"{where}.mode")
        mode = data_mode(text) if text is not None else None
        if text is not None and mode is None:
            c.add(m["mode"], f"{where}.mode: '{text}' is not valid", _DATA_MODE_HINT)
    backup = c.string(m["backup"], f"{where}.backup", re.compile(f"^({'|'.join(DATA_BACKUP)})$"),
                      "migrate (before an upgrade that migrates, the default), always (before "
                      "every upgrade) or never") if "backup" in m else "migrate"
    if name is None or mode is None or backup is None:
        return None
    return DataDir(name, mode, backup)


def _unique(c: _Checker, names: list[str], node: Node | None, what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            c.add(node, f"{what} '{n}' appears twice", "names must be unique")
        seen.add(n)


def _rel_path(c: _Checker, node: Node, where: str, base: Path, check: bool,
              allow_glob: bool = False) -> Path | None:
    value = c.scalar(node, where)
    if value is None:
        return None
    if allow_glob and is_glob(value):
        if check and not any(base.resolve().glob(value)):
            c.add(node, f"{where}: pattern '{value}' matches nothing (looked in {base})",
                  "patterns are relative to the profile's directory")
            return None
        return base.resolve() / value
    p = (base / value).resolve()
    if check and not p.exists():
        c.add(node, f"{where}: '{value}' does not exist (looked in {base})",
              "paths are relative to the profile's directory")
        return None
    return p


def _dest(c: _Checker, node: Node, where: str) -> str | None:
    value = c.scalar(node, where)
    if value is None:
        return None
    parts = value.replace("\\", "/").split("/")
    if value.startswith("/") or ".." in parts or "\\" in value or not value.strip("./"):
        c.add(node, f"{where}: '{value}' must be a relative path inside the release",
              "no leading '/', no '..'")
        return None
    return "/".join(p for p in parts if p not in ("", "."))


def _python_spec(c: _Checker, node: Node, base: Path, check: bool) -> PythonSpec | None:
    sources = ("requirements", "requirements_in", "pyproject")
    m = c.mapping(node, "python", (), (*sources,
                  "index_url", "extra_index_urls", "find_links", "no_index", "resolver"))
    if m is None:
        return None
    given = [k for k in sources if k in m]
    if len(given) != 1:
        c.add(node, "python: give exactly one of requirements, requirements_in, pyproject"
              + (f" (got {', '.join(given)})" if given else ""),
              "requirements: a pinned file; requirements_in: a loose list bundler locks; "
              "pyproject: a pyproject.toml whose dependencies bundler locks")
        return None
    src = _rel_path(c, m[given[0]], f"python.{given[0]}", base, check)
    index_url = c.scalar(m["index_url"], "python.index_url") if "index_url" in m else None
    extra = c.string_list(m["extra_index_urls"], "python.extra_index_urls") \
        if "extra_index_urls" in m else []
    links: list[str] = []
    for i, ln in enumerate(m["find_links"].value if "find_links" in m and
                           isinstance(m["find_links"], SequenceNode) else []):
        value = c.scalar(ln, f"python.find_links[{i}]")
        if value is None:
            continue
        is_url = "://" in value
        links.append(value if is_url else str((base / value).resolve()))
        if not is_url and check and not (base / value).is_dir():
            c.add(ln, f"python.find_links[{i}]: directory '{value}' does not exist")
    if "find_links" in m and not isinstance(m["find_links"], SequenceNode):
        c.add(m["find_links"], "python.find_links must be a list")
    no_index = bool(c.boolean(m["no_index"], "python.no_index")) if "no_index" in m else False
    resolver = "uv"
    if "resolver" in m:
        resolver = c.string(m["resolver"], "python.resolver",
                            re.compile(f"^({'|'.join(RESOLVERS)})$"),
                            f"one of: {', '.join(RESOLVERS)} (uv resolves for any target; "
                            "pip-tools only for this host's Python and platform)") or "uv"
        if given[0] == "requirements":
            c.add(m["resolver"], "python.resolver: python.requirements is pinned already, "
                  "there is nothing to resolve", "drop `resolver`, or use requirements_in")
    if src is None:
        return None
    return PythonSpec(**{given[0]: src}, index_url=index_url,
                      extra_index_urls=tuple(extra), find_links=tuple(links), no_index=no_index,
                      resolver=resolver)


def _file_spec(c: _Checker, node: Node, where: str, base: Path, check: bool) -> FileSpec | None:
    m = c.mapping(node, where, ("src", "dest"), ("exclude",))
    if m is None:
        return None
    src = _rel_path(c, m["src"], f"{where}.src", base, check, allow_glob=True) \
        if "src" in m else None
    dest = _dest(c, m["dest"], f"{where}.dest") if "dest" in m else None
    exclude = c.string_list(m["exclude"], f"{where}.exclude") if "exclude" in m else []
    if src is None or dest is None:
        return None
    return FileSpec(src=src, dest=dest, exclude=tuple(exclude))


def _compose_spec(c: _Checker, node: Node) -> ComposeSpec | None:
    m = c.mapping(node, "compose", ("files",), ("project", "tool"))
    if m is None:
        return None
    files = [f for i, n in enumerate(m["files"].value if isinstance(m["files"], SequenceNode)
                                     else [])
             if (f := _dest(c, n, f"compose.files[{i}]")) is not None]
    if not isinstance(m["files"], SequenceNode) or not files:
        c.add(m["files"], "compose.files must list the compose file(s), as their `files` dest",
              "e.g. [app/docker-compose.yml]")
        return None
    project = c.string(m["project"], "compose.project", COMPOSE_PROJECT_RE,
                       "lowercase letters, digits, '-' and '_'") if "project" in m else None
    tool = c.string(m["tool"], "compose.tool", re.compile(f"^({'|'.join(COMPOSE_TOOLS)})$"),
                    f"one of: {', '.join(COMPOSE_TOOLS)} (a named compose, never a path)"
                    ) if "tool" in m else None
    return ComposeSpec(tuple(files), project, tool)


_DB_URL_RE = re.compile(r"^(\$\{\w+\}|" + "|".join(k.url_regex() for k in DbKind) + ")$")


def _database(c: _Checker, node: Node, where: str = "database", *,
              named: bool = False) -> DatabaseSpec | None:
    m = c.mapping(node, where, ("name", "kind", "url") if named else ("url",),
                  ("compose_service",))
    if m is None:
        return None
    url = c.string(m["url"], f"{where}.url", _DB_URL_RE,
                   "write ${DATABASE_URL} (set on the target) or sqlite:///abs/path.db")
    if url and has_plaintext_secret(url):
        c.add(m["url"], f"{where}.url holds a password", "use ${DATABASE_URL} and put the URL "
              "in the target's shared .env: bundles must not carry secrets")
    service = c.scalar(m["compose_service"], f"{where}.compose_service") \
        if "compose_service" in m else None
    name = kind = None
    if named:
        name = c.string(m["name"], f"{where}.name", NAME_RE,
                        "lowercase letters, digits and '-'") if "name" in m else None
        kind = c.string(m["kind"], f"{where}.kind",
                        re.compile(f"^({'|'.join(DATABASE_KINDS)})$"),
                        f"one of: {', '.join(DATABASE_KINDS)} (MariaDB is mysql)"
                        ) if "kind" in m else None
        if url and kind and not url.startswith("${") and DbKind.of_url(url) != kind:
            c.add(m["url"], f"{where}.url is a {url_scheme(url)}:// URL but kind is {kind}")
        if name is None or kind is None:
            return None
    return DatabaseSpec(url, service, name, DbKind(kind) if kind else None) if url else None


def _migration(c: _Checker, node: Node, where: str) -> MigrationSpec | None:
    m = c.mapping(node, where, ("name",), (*MIGRATION_KINDS, "env", "service", "cwd",
                                                    "database"))
    if m is None:
        return None
    kinds = [k for k in MIGRATION_KINDS if k in m]
    if len(kinds) != 1:
        c.add(node, f"{where}: give exactly one of {', '.join(MIGRATION_KINDS)}",
              "alembic: DIR (holding alembic.ini), sql: DIR of *.sql, command: [argv]")
        return None
    name = c.string(m["name"], f"{where}.name", NAME_RE) if "name" in m else None
    kind = kinds[0]
    path = None
    command: tuple[str, ...] = ()
    if kind == "command":
        command = tuple(c.string_list(m["command"], f"{where}.command"))
        # its working directory inside the release's files (e.g. the Node project holding
        # node_modules/.bin/prisma); kept in `path`, unused otherwise for commands
        path = _dest(c, m["cwd"], f"{where}.cwd") if "cwd" in m else None
    else:
        path = _dest(c, m[kind], f"{where}.{kind}")
    env = c.string_map(m["env"], f"{where}.env") if "env" in m else {}
    service = c.scalar(m["service"], f"{where}.service") if "service" in m else None
    if "cwd" in m and (kind != "command" or service is not None):
        c.add(m["cwd"], f"{where}.cwd is for command migrations run on the host",
              "a one-off service container uses its image's working directory")
    if service is not None and kind != "command":
        c.add(m["service"], f"{where}.service is for command migrations only",
              "e.g. {name: schema, service: backend, command: [python, -m, alembic, upgrade, "
              "head]}")
    if name is None or (path is None and not command):
        return None
    database = c.string(m["database"], f"{where}.database", NAME_RE,
                        "the name of one of `databases:`") if "database" in m else None
    return MigrationSpec(name, kind, path, command, tuple(sorted(env.items())), service,
                         database)


ENVIRONMENTS = ("all", "production", "staging", "development")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env(c: _Checker, node: Node) -> EnvSpec:
    m = c.mapping(node, "env", (), ("required", "secret", "defaults"))
    if m is None:
        return EnvSpec()
    required = c.string_list(m["required"], "env.required") if "required" in m else []
    secret = c.string_list(m["secret"], "env.secret") if "secret" in m else []
    for name in (*required, *secret):
        if not _VAR_RE.match(name):
            c.add(node, f"env: '{name}' is not a variable name")
    defaults: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    if "defaults" in m:
        dm = c.mapping(m["defaults"], "env.defaults", (), ENVIRONMENTS)
        for envname, values in (dm or {}).items():
            table = c.string_map(values, f"env.defaults.{envname}")
            defaults.append((envname, tuple(sorted(table.items()))))
            for var, value in sorted(table.items()):
                if has_plaintext_secret(value):
                    c.add(values, f"env.defaults.{envname}.{var} holds a password",
                          f"set {var} in the target's shared .env instead: bundles must not "
                          "carry secrets")
            leaked = sorted(set(table) & set(secret))
            if leaked:
                c.add(values, f"env.defaults.{envname}: secret {leaked[0]} has a default value",
                      "secrets belong in the target's shared .env, never in the bundle")
    return EnvSpec(tuple(required), tuple(secret), tuple(sorted(defaults)))


def _npm(c: _Checker, node: Node, where: str, base: Path, check: bool) -> NpmSpecProfile | None:
    m = c.mapping(node, where, ("project",), ("dest", "include_dev", "registry", "env"))
    if m is None:
        return None
    project = _rel_path(c, m["project"], f"{where}.project", base, check) \
        if "project" in m else None
    if project is not None and check and not (project / "package.json").is_file():
        c.add(m["project"], f"{where}.project: {project} has no package.json",
              "point it at the directory holding package.json and package-lock.json")
    dest = _dest(c, m["dest"], f"{where}.dest") if "dest" in m else (
        project.name if project is not None else None)
    dev = bool(c.boolean(m["include_dev"], f"{where}.include_dev")) \
        if "include_dev" in m else False
    registry = c.scalar(m["registry"], f"{where}.registry") if "registry" in m else None
    env = c.string_map(m["env"], f"{where}.env") if "env" in m else {}
    if project is None or dest is None:
        return None
    return NpmSpecProfile(project=project, dest=dest, include_dev=dev, registry=registry,
                          env=tuple(sorted(env.items())))


_RUNTIME_HINT = ("a Node.js major, major.minor or full version, quoted: e.g. \"20\", "
                 "\"20.19\" or \"20.19.2\"")


def _runtimes(c: _Checker, node: Node, target: Target) -> RuntimesSpec | None:
    """`runtimes: {node: "20", npm: "10", registry: URL}`: the Node.js (and npm) the bundle
    carries for the target, from the npm registry's official builds."""
    m = c.mapping(node, "runtimes", ("node",), ("npm", "registry"))
    if m is None or "node" not in m:
        return None
    version = c.string(m["node"], "runtimes.node", RUNTIME_VERSION_RE, _RUNTIME_HINT)
    npm = c.string(m["npm"], "runtimes.npm", RUNTIME_VERSION_RE,
                   "an npm major, major.minor or full version, quoted: e.g. \"10\"") \
        if "npm" in m else ""
    registry = c.string(m["registry"], "runtimes.registry", re.compile(r"^https?://\S+$"),
                        "an http(s) URL; default: npm's own registry") \
        if "registry" in m else None
    if target.tag.libc == "musl":
        c.add(m["node"], f"runtimes.node: the registry's Node.js builds need glibc; "
              f"target.platform {target.platform} is musl",
              "carry Node.js for a manylinux target, or install it on the musl host")
        return None
    if version is None or npm is None:
        return None
    return RuntimesSpec(node=version, npm=npm, registry=registry)


IMAGE_SOURCES = ("engine", "registry", "archive")  # where the build takes an image from


def _image(c: _Checker, node: Node, where: str, base: Path, check: bool
           ) -> ImageSpecProfile | None:
    m = c.mapping(node, where, ("ref",), ("source", "archive", "tls_verify"))
    if m is None:
        return None
    source = c.string(m["source"], f"{where}.source",
                      re.compile(f"^({'|'.join(IMAGE_SOURCES)})$"),
                      f"one of: {', '.join(IMAGE_SOURCES)}") if "source" in m else "engine"
    ref = c.scalar(m["ref"], f"{where}.ref") if "ref" in m else None
    problem = ref_problem(ref, registry=source == "registry") if ref is not None else None
    if problem is not None:
        c.add(m["ref"], f"{where}.ref: {problem}", REF_HINT)
        ref = None
    archive = _rel_path(c, m["archive"], f"{where}.archive", base, check) \
        if "archive" in m else None
    if source == "archive" and "archive" not in m:
        c.add(node, f"{where}: source archive needs `archive: PATH`")
    if source != "archive" and "archive" in m:
        c.add(m["archive"], f"{where}.archive is only for `source: archive`")
    tls = bool(c.boolean(m["tls_verify"], f"{where}.tls_verify")) if "tls_verify" in m else True
    if ref is None or source is None:
        return None
    return ImageSpecProfile(ref=ref, source=source, archive=archive, tls_verify=tls)


def _action(c: _Checker, node: Node, where: str, base: Path, check: bool) -> Action | None:
    m = c.mapping(node, where, ("name", "run"), ("cwd", "env", "timeout"))
    if m is None:
        return None
    name = c.string(m["name"], f"{where}.name", NAME_RE) if "name" in m else None
    run = c.string_list(m["run"], f"{where}.run") if "run" in m else []
    if "run" in m and isinstance(m["run"], SequenceNode) and not run:
        c.add(m["run"], f"{where}.run is empty", "write the command as a list of words")
    cwd = _rel_path(c, m["cwd"], f"{where}.cwd", base, check) if "cwd" in m else base.resolve()
    env = c.string_map(m["env"], f"{where}.env") if "env" in m else {}
    timeout = c.duration_ms(m["timeout"], f"{where}.timeout") if "timeout" in m \
        else Action.timeout_ms
    if name is None or not run or cwd is None or timeout is None:
        return None
    return Action(name=name, run=tuple(run), cwd=cwd, env=tuple(sorted(env.items())),
                  timeout_ms=timeout)


def _service(c: _Checker, node: Node, where: str) -> Service | None:
    m = c.mapping(node, where, ("name", "command"), ("cwd", "env", "user"))
    if m is None:
        return None
    name = c.string(m["name"], f"{where}.name", NAME_RE) if "name" in m else None
    user = c.string(m["user"], f"{where}.user", USER_RE, _USER_HINT) if "user" in m else None
    command = c.string_list(m["command"], f"{where}.command") if "command" in m else []
    if "command" in m and isinstance(m["command"], SequenceNode) and not command:
        c.add(m["command"], f"{where}.command is empty")
    cwd = _dest(c, m["cwd"], f"{where}.cwd") if "cwd" in m else "."
    env = c.string_map(m["env"], f"{where}.env") if "env" in m else {}
    if name is None or not command or cwd is None:
        return None
    return Service(name=name, command=tuple(command), cwd=cwd,
                   env=tuple(sorted(env.items())), user=user)


def _health(c: _Checker, node: Node, where: str) -> HealthCheck | None:
    m = c.mapping(node, where, ("name",), (*CHECK_KINDS, "expect_status", "json", "timeout",
                                           "retries", "interval"))
    if m is None:
        return None
    kinds = [k for k in CHECK_KINDS if k in m]
    if len(kinds) != 1:
        c.add(node, f"{where}: give exactly one of {', '.join(CHECK_KINDS)}"
              + (f" (got {', '.join(kinds)})" if kinds else ""),
              "e.g. `http: http://127.0.0.1:8000/health` or `tcp: 127.0.0.1:5432`")
        return None
    kind = kinds[0]
    name = c.string(m["name"], f"{where}.name", NAME_RE) if "name" in m else None
    target = ""
    command: tuple[str, ...] = ()
    if kind == "command":
        command = tuple(c.string_list(m["command"], f"{where}.command"))
        if not command:
            c.add(m["command"], f"{where}.command must be a non-empty list")
    else:
        target = c.string(m[kind], f"{where}.{kind}", re.compile(_CHECK_PATTERNS[kind][0]),
                          f"write e.g. {_CHECK_PATTERNS[kind][1]}") or ""
        if has_plaintext_secret(target):
            c.add(m[kind], f"{where}.{kind} holds a password", "write the URL as ${VAR} and set "
                  "VAR in the target's shared .env: bundles must not carry secrets")
    status = c.integer(m["expect_status"], f"{where}.expect_status", 100) \
        if "expect_status" in m else 200
    json_field = json_equals = None
    if "json" in m:
        if kind != "http":
            c.add(m["json"], f"{where}.json only applies to http checks")
        jm = c.mapping(m["json"], f"{where}.json", ("field", "equals"), ())
        if jm is not None and "field" in jm and "equals" in jm:
            json_field = c.scalar(jm["field"], f"{where}.json.field")
            json_equals = c.scalar(jm["equals"], f"{where}.json.equals")
    timeout = c.duration_ms(m["timeout"], f"{where}.timeout") if "timeout" in m \
        else HealthCheck.timeout_ms
    retries = c.integer(m["retries"], f"{where}.retries", 1) if "retries" in m \
        else HealthCheck.retries
    interval = c.duration_ms(m["interval"], f"{where}.interval") if "interval" in m \
        else HealthCheck.interval_ms
    if (name is None or status is None or timeout is None or retries is None
            or interval is None or not (target or command)):
        return None
    return HealthCheck(name=name, kind=kind, target=target, command=command,
                       expect_status=status, json_field=json_field, json_equals=json_equals,
                       timeout_ms=timeout, retries=retries, interval_ms=interval)


_CHECK_PATTERNS = {
    "http": (r"^https?://[^/\s]+\S*$", "http://127.0.0.1:8000/health"),
    "tcp": (r"^[^\s:]+:(\d+|\$\{\w+\})$", "127.0.0.1:5432"),
    DbKind.POSTGRES: (rf"^({DbKind.POSTGRES.url_regex(driver=False)}|\$\{{\w+\}})$",
                      "${DATABASE_URL}"),
    DbKind.MYSQL: (rf"^({DbKind.MYSQL.url_regex(driver=False)}|\$\{{\w+\}})$", "${MYSQL_URL}"),
    "redis": (r"^(rediss?://\S+|\$\{\w+\})$", "redis://127.0.0.1:6379"),
}
