"""The release environment: profile defaults per environment, service env, and the
operator's shared `.env` (kept across releases, never in the bundle), in that order.

Secrets are never printed: every message that may carry a value goes through
`bundler.redact`, which learns the release environment's secret values when `release_env`
reads it. Which values are secret is redact's rule alone: the profile's `env.secret`, names
that say password, and every value from the shared .env that is not plainly harmless.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from bundler.bundle.manifest import Manifest
from bundler.bundle.models import PLACEHOLDER_RE, EnvSpec
from bundler.errors import BundlerError, EnvError
from bundler.install import strict
from bundler.install.layout import Layout, ReleaseDir
from bundler.redact import redact, release_secrets, remember

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENVIRONMENTS = ("production", "staging", "development")


def shared_env_file(layout: Layout) -> Path:
    return layout.env_file


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, read exactly as docker compose (v2 and v1) reads its `--env-file`.

    Only the syntax both compose versions read the same way (and this function with them) is
    accepted: `export`, `#` comment lines, blank lines, unquoted values (a ` #` starts a
    comment), and single- or double-quoted values on one line (a `#` comment may follow).
    Anything compose would read differently is refused with an EnvError naming file:line:
    `$` in an unquoted or double-quoted value (compose interpolates it), backslash escapes
    in quotes, a quote left open (a multi-line value), text after a closing quote, tabs and
    control characters, lines that are not assignments. Variables that change how programs
    load code (`LD_PRELOAD`, `PYTHONPATH`, `NODE_OPTIONS`, ...) are refused too: bundler runs
    commands with this environment as root.
    """
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    except UnicodeDecodeError as exc:
        raise EnvError(f"{path}: not UTF-8 text ({exc.reason})",
                       hint="save the file as UTF-8 (KEY=value lines)") from None
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip(" \t") or line.lstrip(" \t").startswith("#"):
            continue
        m = _ASSIGN.match(line)
        if not m:
            _refuse(path, number, "not a KEY=value line",
                    "write NAME=value (NAME: letters, digits, '_'), or comment it out with #")
        name = m.group(1)
        if _loader_variable(name):
            raise EnvError(f"{path}:{number}: {name} may not be set in the shared .env: it "
                           "changes how programs load code, and bundler runs commands with "
                           "this environment as root",
                           hint=f"remove {name} from {path}; set what the application needs "
                                "in its own configuration")
        values[name] = _env_value(path, number, m.group(2))
    return values


_ASSIGN = re.compile(r"^[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)$")
_QUOTE_HINT = ("put the value in single quotes on one line, with no backslash or single quote "
               "inside: compose reads that literally, as bundler does")


def _refuse(path: Path, number: int, why: str, hint: str = _QUOTE_HINT) -> NoReturn:
    raise EnvError(f"{path}:{number}: {why}: docker compose would read this line differently "
                   "from bundler", hint=hint)


def _env_value(path: Path, number: int, value: str) -> str:
    value = value.rstrip(" ")
    if any(ord(c) < 32 and c != "\t" for c in value):
        _refuse(path, number, "a control character in the value")
    if value[:1] in ("'", '"'):
        quote = value[0]
        if "\\" in value:
            _refuse(path, number, "a backslash inside quotes (compose reads escapes there)")
        end = value.find(quote, 1)
        if end < 0:
            _refuse(path, number, f"the {quote} quote is not closed on this line")
        inner, rest = value[1:end], value[end + 1:].lstrip(" \t")
        if rest and not rest.startswith("#"):
            _refuse(path, number, "text after the closing quote")
        if quote == '"' and "$" in inner:
            _refuse(path, number, "a $ inside double quotes (compose interpolates it)")
        return inner
    if "\t" in value:
        _refuse(path, number, "a tab in an unquoted value")
    if "$" in value:
        _refuse(path, number, "a $ in an unquoted value (compose interpolates it)")
    comment = value.find(" #")
    return value[:comment].rstrip(" ") if comment >= 0 else value


# Variables that make a program load other code than it would (the dynamic loader, language
# runtimes, shells, iconv): refused in the shared .env. A few harmless PYTHON* are allowed.
_LOADER_PREFIXES = ("LD_", "DYLD_", "PYTHON", "PERL5", "NODE_OPTIONS", "RUBY")
_LOADER_NAMES = frozenset({
    "NODE_PATH", "NODE_REPL_EXTERNAL_MODULE", "PERLLIB", "PERL5LIB", "PERL5OPT", "BASH_ENV",
    "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "GCONV_PATH", "LOCPATH", "NLSPATH",
    "HOSTALIASES", "RESOLV_HOST_CONF", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS", "CLASSPATH", "GIT_EXEC_PATH", "GIT_SSH", "GIT_SSH_COMMAND",
    "OPENSSL_CONF", "OPENSSL_ENGINES", "SSLKEYLOGFILE", "TCLLIBPATH", "LUA_PATH", "LUA_CPATH",
    "GEM_PATH", "GEM_HOME", "BUNDLE_GEMFILE", "R_PROFILE", "R_PROFILE_USER",
})
_HARMLESS = frozenset({"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
                       "PYTHONUTF8", "PYTHONHASHSEED", "PYTHONFAULTHANDLER"})


def _loader_variable(name: str) -> bool:
    upper = name.upper()
    if upper in _HARMLESS:
        return False
    return upper in _LOADER_NAMES or upper.startswith(_LOADER_PREFIXES)


def placeholders(layout: Layout, version: str | None) -> dict[str, str]:
    """What `{root}`, `{release}`, `{files}`, `{venv}` and `{data}` mean for release
    `version`: the same in every string a profile may put them in (service commands and env,
    env.defaults, the database URL, migrations, health checks). `{data:NAME}` is `{data}/NAME`
    (see `_place`)."""
    out = {"{root}": str(layout.root), "{data}": str(layout.data)}
    if version is not None:
        rel = ReleaseDir(layout.release(version))
        out.update({"{release}": str(rel.path), "{files}": str(rel.files),
                    "{venv}": str(rel.venv)})
    return out


def _place(text: str, places: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        word = m.group(0)
        if word.startswith("{data:") and "{data}" in places:
            return f"{places['{data}']}/{word[6:-1]}"  # a NAME_RE name: stays under data/
        return places.get(word, word)

    return PLACEHOLDER_RE.sub(one, text)


@dataclass(frozen=True)
class ReleaseEnv:
    environment: str
    values: tuple[tuple[str, str], ...]
    secret: frozenset[str]
    places: tuple[tuple[str, str], ...] = ()
    from_file: frozenset[str] = frozenset()  # names whose value is the shared .env's

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)

    def expand(self, text: str) -> str:
        """Placeholders, then `${VAR}` from the release environment; an unknown variable is an
        error."""
        env = self.as_dict()
        text = _place(text, dict(self.places))

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise EnvError(f"${{{m.group(1)}}} is used but not set",
                               hint="set it in the root's shared .env or the profile's "
                                    "env.defaults")
            return env[m.group(1)]

        return _REF.sub(sub, text)

    def secrets(self) -> list[str]:
        """The values that must never be shown (bundler.redact.release_secrets)."""
        shared = {k: v for k, v in self.values if k in self.from_file}
        return release_secrets(self.as_dict(), self.secret, shared)

    def redact(self, text: str) -> str:
        """`bundler.redact.redact`, knowing this environment's secret values."""
        return redact(text, self.secrets())


def release_env(layout: Layout, spec: EnvSpec, environment: str,
                service_env: dict[str, str] | None = None, *,
                version: str | None = None) -> ReleaseEnv:
    if environment not in ENVIRONMENTS:
        raise EnvError(f"unknown environment {environment!r}",
                       hint=f"use one of: {', '.join(ENVIRONMENTS)}")
    places = placeholders(layout, version)
    strict.check_target(layout.root)  # StrictModes, before reading it
    shared = read_env_file(shared_env_file(layout))
    values = {k: _place(v, places) for k, v in {
        **spec.defaults_for(environment), **(service_env or {}), **shared}.items()}
    env = ReleaseEnv(environment, tuple(sorted(values.items())), frozenset(spec.secret),
                     tuple(sorted(places.items())), frozenset(shared))
    remember(*env.secrets())  # masked in every message from now on
    return env


def remember_shared(layout: Layout) -> None:
    """Learn the shared .env's secrets (for commands that show what earlier runs stored, such
    as `history`: rows written before a value became secret are masked when shown). A file
    that cannot be read is left alone: whatever reads it for real reports why."""
    try:
        strict.check_target(layout.root)
        shared = read_env_file(shared_env_file(layout))
    except (BundlerError, OSError):
        return
    remember(*release_secrets({}, shared=shared))


def references(m: Manifest, environment: str) -> list[str]:
    """Every `${VAR}` the release's manifest uses (services, health checks, database,
    migrations, the environment's env defaults), in order of first use."""
    doc = m.to_json()
    found: dict[str, None] = {}

    def walk(node: object) -> None:
        if isinstance(node, str):
            found.update((name, None) for name in _REF.findall(node))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for key in ("services", "health", "database", "migrations"):
        walk(doc.get(key))
    walk(m.runtime.env.defaults_for(environment))
    return list(found)


def check_references(env: ReleaseEnv, m: Manifest, layout: Layout) -> None:
    """Every variable the release uses is set, before anything is created (EnvError naming
    all missing ones at once): not found half-way through an install."""
    have = set(env.as_dict())
    for svc in m.runtime.services:  # a service's own env is set for its command
        have.update(k for k, _ in svc.env)
    missing = [name for name in references(m, env.environment) if name not in have]
    if missing:
        raise EnvError(f"variable(s) used by {m.name} {m.version} but not set: "
                       f"{', '.join(missing)}",
                       hint=f"add them to {shared_env_file(layout)} (KEY=value lines) or the "
                            "profile's env.defaults, then run the install again")


def check_required(env: ReleaseEnv, spec: EnvSpec, layout: Layout) -> None:
    """Every required variable set (non-empty): all missing ones named at once, values never."""
    have = env.as_dict()
    missing = [name for name in spec.required if not have.get(name)]
    if missing:
        raise EnvError(f"required variable(s) not set for {env.environment}: "
                       f"{', '.join(missing)}",
                       hint=f"add them to {shared_env_file(layout)} (KEY=value lines), "
                            "then run the install again")
