"""The release environment: profile defaults per environment, service env, and the
operator's shared `.env` (kept across releases, never in the bundle), in that order.

Secrets (the profile's `env.secret`, plus anything that looks like a password) are never
printed: every message that may carry a value goes through `redact`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bundler.errors import EnvError
from bundler.install.layout import Layout
from bundler.models import EnvSpec

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|KEY|CREDENTIAL)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@/\s]+)(@)")
ENVIRONMENTS = ("production", "staging", "development")


def shared_env_file(layout: Layout) -> Path:
    return layout.root / "shared" / ".env"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (`export`, comments, single or double quotes), as docker compose reads."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = _LINE.match(raw)
        if not m:
            continue
        value = m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.sub(r"\s+#.*$", "", value)
        values[m.group(1)] = value
    return values


@dataclass(frozen=True)
class ReleaseEnv:
    environment: str
    values: tuple[tuple[str, str], ...]
    secret: frozenset[str]

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)

    def expand(self, text: str) -> str:
        """`${VAR}` from the release environment; an unknown variable is an error."""
        env = self.as_dict()

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise EnvError(f"${{{m.group(1)}}} is used but not set",
                               hint="set it in the root's shared .env or the profile's "
                                    "env.defaults")
            return env[m.group(1)]

        return _REF.sub(sub, text)

    def redact(self, text: str) -> str:
        out = _URL_PASSWORD.sub(r"\1****\3", text)
        for name, value in self.values:
            if value and len(value) >= 4 and (name in self.secret or _SECRETISH.search(name)):
                out = out.replace(value, "****")
        return out


def release_env(layout: Layout, spec: EnvSpec, environment: str,
                service_env: dict[str, str] | None = None) -> ReleaseEnv:
    if environment not in ENVIRONMENTS:
        raise EnvError(f"unknown environment {environment!r}",
                       hint=f"use one of: {', '.join(ENVIRONMENTS)}")
    values = {**spec.defaults_for(environment), **(service_env or {}),
              **read_env_file(shared_env_file(layout))}
    return ReleaseEnv(environment, tuple(sorted(values.items())), frozenset(spec.secret))


def check_required(env: ReleaseEnv, spec: EnvSpec, layout: Layout) -> None:
    """Every required variable set (non-empty): all missing ones named at once, values never."""
    have = env.as_dict()
    missing = [name for name in spec.required if not have.get(name)]
    if missing:
        raise EnvError(f"required variable(s) not set for {env.environment}: "
                       f"{', '.join(missing)}",
                       hint=f"add them to {shared_env_file(layout)} (KEY=value lines), "
                            "then run the install again")
