"""Prisma in an npm project: refuse, at build time, a set-up that cannot run offline.

`check` names the file and the change for the first thing missing from the set-up that runs
with no network (Prisma 6.19.x, `engineType = "client"`, a JS-engine prisma.config with an
adapter from @prisma/adapter-pg 7.x); it returns the packages whose install-script download
attempts are then harmless. The set-up and why: docs/prisma.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundler.bundle.npmlock import package_name
from bundler.errors import BuildError

SUPPORTED = (6, 19)
PINNED = "6.19.3"
CLI_ADAPTER = "@prisma/adapter-pg"
CLI_ADAPTER_ALIAS = '"prisma-cli-adapter-pg": "npm:@prisma/adapter-pg@7.10.1"'
PRISMA_PACKAGES = ("prisma", "@prisma/client", "@prisma/engines")
CONFIG_NAMES = tuple(f"prisma.config.{ext}" for ext in ("ts", "mts", "cts", "js", "mjs",
                                                         "cjs"))
_HINT_SETUP = "see docs/prisma.md for the whole offline set-up"

_COMMENT = re.compile(r"//[^\n]*")
_BLOCK = re.compile(r"\b(generator|datasource)\s+(\w+)\s*\{([^}]*)\}")
_FIELD = re.compile(r"^\s*(\w+)\s*=\s*\"([^\"]*)\"", re.M)
_IMPORT = re.compile(r"""(?:from\s+|require\(\s*)["']([^"']+)["']""")
_ENGINE_JS = re.compile(r"""\bengine\s*:\s*["']js["']""")
_EXPERIMENTAL_ADAPTER = re.compile(r"\bexperimental\s*:\s*\{[^}]*\badapter\s*:\s*true")
_ADAPTER_FN = re.compile(r"\badapter\s*:\s*(?:async\b|\(|function\b|"
                         r"(?!true\b|false\b)[A-Za-z_$][\w$]*\s*[,}\n])")


def _version(text: str) -> tuple[int, int]:
    m = re.match(r"^(\d+)\.(\d+)\.", text)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def _packages(lock: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """lock key -> (real package name, entry), registry packages only."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, entry in (lock.get("packages") or {}).items():
        if key and isinstance(entry, dict) and "node_modules/" in key and not entry.get("link"):
            try:
                out[key] = (package_name(key, entry), entry)
            except BuildError:
                continue
    return out


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _schema_files(project: Path, config_text: str | None) -> list[Path]:
    """The schema as Prisma finds it: the config's `schema`, package.json's prisma.schema,
    else prisma/schema.prisma (a directory: every *.prisma in it)."""
    where: str | None = None
    if config_text is not None:
        m = re.search(r"""\bschema\s*:\s*["']([^"']+)["']""", config_text)
        where = m[1] if m else None
    if where is None:
        try:
            pj = json.loads((project / "package.json").read_text(encoding="utf-8"))
            where = ((pj.get("prisma") or {}).get("schema") if isinstance(pj, dict) else None)
        except (OSError, ValueError, AttributeError):
            where = None
    path = project / (where if isinstance(where, str) else "prisma/schema.prisma")
    if path.is_dir():
        return sorted(path.rglob("*.prisma"))
    return [path] if path.is_file() else []


def check(project: Path, lock: Mapping[str, Any], lock_path: Path, omit_dev: bool,
          migrates: bool) -> tuple[str, ...]:
    """Refuse a Prisma set-up that cannot run offline (BuildError naming the file and the
    fix). `migrates`: a migration of the profile runs the prisma CLI on the target. Returns
    the Prisma packages to leave out of the install-script warnings (none: no Prisma)."""
    packages = _packages(lock)
    top = {key.removeprefix("node_modules/"): entry for key, (_, entry) in packages.items()
           if key.count("node_modules/") == 1}
    cli, client = top.get("prisma"), top.get("@prisma/client")
    if cli is None and client is None:
        return ()
    for name, entry in (("prisma", cli), ("@prisma/client", client)):
        if entry is None:
            continue
        version = str(entry.get("version", ""))
        if _version(version)[0] >= 7:
            raise BuildError(
                f"{lock_path}: {name} {version} cannot run offline (Prisma 7's CLI downloads "
                "its native schema engine before every migrate and generate)",
                hint=f"pin prisma and @prisma/client to exactly {PINNED} in package.json, run "
                     f"`npm install`, and commit package-lock.json; {_HINT_SETUP}")
        if _version(version) != SUPPORTED:
            raise BuildError(
                f"{lock_path}: {name} {version} is not a Prisma that bundler can run offline "
                f"(it needs {SUPPORTED[0]}.{SUPPORTED[1]}.x: the JavaScript schema engine and "
                "engineType \"client\")",
                hint=f"pin prisma and @prisma/client to exactly {PINNED}; {_HINT_SETUP}")
    if cli is not None and client is not None and cli.get("version") != client.get("version"):
        raise BuildError(f"{lock_path}: prisma {cli.get('version')} and @prisma/client "
                         f"{client.get('version')} differ",
                         hint=f"pin both to exactly {PINNED}")
    if migrates:
        if cli is None:
            raise BuildError(f"{lock_path}: a migration runs prisma, but the lock has no "
                             "prisma package", hint=f'add "prisma": "{PINNED}" to dependencies')
        if omit_dev and cli.get("dev"):
            raise BuildError(
                f"{lock_path}: prisma is a devDependency, so the target's production install "
                "leaves out the CLI its migration runs",
                hint="move prisma from devDependencies to dependencies in package.json, then "
                     "`npm install` (or set include_dev: true on the npm project)")

    config_path = next((project / n for n in CONFIG_NAMES if (project / n).is_file()), None)
    config_text = config_path.read_text(encoding="utf-8") if config_path else None
    schemas = _schema_files(project, config_text)
    if not schemas:
        raise BuildError(f"{project}: the lock has Prisma but no schema was found "
                         "(prisma/schema.prisma, or the config's `schema`)",
                         hint="point prisma.config.ts's `schema` at the schema file")
    provider = None
    for schema in schemas:
        text = _COMMENT.sub("", schema.read_text(encoding="utf-8"))
        for block in _BLOCK.finditer(text):
            fields = dict(_FIELD.findall(block[3]))
            if block[1] == "datasource":
                provider = fields.get("provider", provider)
            elif fields.get("provider") in ("prisma-client-js", "prisma-client") \
                    and fields.get("engineType") != "client":
                raise BuildError(
                    f"{schema}:{_line(text, block.start())}: generator {block[2]} has no "
                    'engineType = "client": its client needs the native query engine, which '
                    "Prisma downloads from its own host",
                    hint='add engineType = "client" to the generator and pass a driver adapter '
                         "to PrismaClient (e.g. new PrismaClient({ adapter: new PrismaPg(...) "
                         f"}}) with @prisma/adapter-pg {PINNED}); {_HINT_SETUP}")

    if not migrates and cli is None:
        return PRISMA_PACKAGES
    shown = config_path or project / "prisma.config.ts"
    fix = ('engine: "js", experimental: { adapter: true } and adapter: async () => new '
           "PrismaPg({ connectionString: process.env.DATABASE_URL })")
    if config_text is None:
        raise BuildError(f"{shown} is missing: prisma migrate would run the native schema "
                         "engine, which Prisma downloads from its own host",
                         hint=f"create it with defineConfig({{ schema, {fix} }}); {_HINT_SETUP}")
    code = _COMMENT.sub("", config_text)
    for pattern, setting in ((_ENGINE_JS, 'engine: "js"'),
                             (_EXPERIMENTAL_ADAPTER, "experimental: { adapter: true }"),
                             (_ADAPTER_FN, "adapter: async () => new PrismaPg(...)")):
        if not pattern.search(code):
            raise BuildError(f"{shown} has no {setting}: prisma migrate would run the native "
                             "schema engine, which Prisma downloads from its own host",
                             hint=f"set {fix} in it; {_HINT_SETUP}")
    if provider == "postgresql":
        adapters = {key.removeprefix("node_modules/"): str(entry.get("version", ""))
                    for key, (name, entry) in packages.items()
                    if name == CLI_ADAPTER and key.count("node_modules/") == 1}
        imported = [m for m in _IMPORT.findall(code) if m in adapters]
        if not imported:
            raise BuildError(
                f"{shown} imports no @prisma/adapter-pg that the lock has, so prisma migrate "
                "has no PostgreSQL driver adapter",
                hint=f"add {CLI_ADAPTER_ALIAS} to dependencies and import PrismaPg from "
                     f'"prisma-cli-adapter-pg" in {shown.name}; {_HINT_SETUP}')
        old = [m for m in imported if _version(adapters[m])[0] < 7]
        if old:
            raise BuildError(
                f"{shown} gives prisma migrate @prisma/adapter-pg {adapters[old[0]]}, which "
                "fails on PostgreSQL's `name` type when it reads the migrations table "
                "(upstream prisma/orm#27403)",
                hint=f"add {CLI_ADAPTER_ALIAS} to dependencies and import PrismaPg from "
                     f'"prisma-cli-adapter-pg" in {shown.name} (the app keeps {PINNED})')
    return PRISMA_PACKAGES
