"""The one place secrets are masked, on the build side and the target alike.

Everything bundler shows or stores that may quote a value goes through `redact`: URL
passwords (greedy up to the LAST `@` before the host), password-ish parameters and
`name=value` words, and known secret values, raw, percent-encoded and as a JSON string escapes
them. Which values are secret is decided by `Secrets.add_env` alone, and `release_secrets` is
the one place that says what it applies to for a release (every runtime and report asks it);
the rule and its exceptions: docs/secrets.md.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

MASK = "****"
MIN_SECRET = 4  # shorter values would mask half of every message: never taken as secrets

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|KEY|CREDENTIAL|DSN"
                         r"|(?:^|_)(?:PASS|PW|AUTH|SALT)(?:_|$)|PWD$", re.I)
_NOT_SECRET_NAMES = frozenset({"PWD", "OLDPWD"})  # the shell's working directories

# Values from the shared .env that are plainly not secrets (rule 2 in the module docstring).
_WORDS = ("true|false|yes|no|on|off|none|null|enabled?|disabled?|production|staging"
          "|development|dev|prod|test|testing|local|trace|debug|info|notice|warn|warning"
          "|error|critical|fatal")
_PLAIN = re.compile(
    r"[+-]?\d+(?:\.\d+)*[A-Za-z]{0,2}"             # 8080, 0.5, 1.2.3, 10.0.0.1, 30s, 512M
    rf"|(?i:{_WORDS})"
    r"|[a-z]{1,12}(?:[-_.][a-z]{1,12})*"             # shop, my-app, db.internal (lowercase)
    r"|(?:sqlite:/{0,3})?/[\w.+-]*(?:/[\w.+-]*)*"    # /srv/app/data, sqlite:////srv/app.db
    r"|[a-z][a-z0-9+.-]*://[\w.-]+(?::\d+)?(?:/[\w.-]*)?")  # redis://cache:6379/0

# scheme://user:PASSWORD@host: the user part stops at ":" (or "@"/"/"), the password runs to
# the last "@" before the host (a password with "/", "?", "#" or whitespace is not a URL).
_USERINFO = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^:/@\s?#]*:)[^\s/?#]*(?=@)", re.I)
_PARAM_NAME = (r"(?:[\w.-]*(?:password|passwd|passphrase|secret|token|api[_-]?key"
               r"|access[_-]?key|private[_-]?key|credentials?)[\w.-]*|pwd|pass)")
# ...in a query (?x=, &x=, ;x=) or as a word of its own (`password=x dbname=y`, `DB_PASSWORD=x`)
_PARAM = re.compile(rf"(?P<pre>(?:^|(?<=[?&;\s\"'(,])){_PARAM_NAME}=)(?P<value>[^&\s#\"',;)]*)",
                    re.I | re.M)


def is_secret_name(name: str, secret_names: Iterable[str] = ()) -> bool:
    """A variable whose value must never be shown (rule 1 in the module docstring)."""
    if name in set(secret_names):
        return True
    return name.upper() not in _NOT_SECRET_NAMES and bool(SECRET_NAME.search(name))


def plainly_not_secret(value: str) -> bool:
    """A value from the shared .env that is shown as is (rule 2 in the module docstring)."""
    return len(value) < MIN_SECRET or _PLAIN.fullmatch(value) is not None


def url_passwords(text: str) -> list[str]:
    """Every password written in a URL in `text` (userinfo or a password-ish query param)."""
    found = [m.group(0)[len(m.group("pre")):] for m in _USERINFO.finditer(text)]
    found += [m.group("value") for m in _PARAM.finditer(text)]
    return [p for p in found if p]


def has_plaintext_secret(text: str) -> bool:
    """`text` writes a password out (user:pass@ or ?password=...), rather than `${VAR}`."""
    return any(not re.fullmatch(r"\$\{\w+\}", p) for p in url_passwords(text))


def _json_forms(value: str) -> set[str]:
    """How `value` reads inside a JSON string (a `"`, `\\` or non-ASCII character escaped):
    a report or log written as JSON quotes it so."""
    return {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}


class Secrets:
    """A set of secret values, masked wherever `redact` runs. Thread-safe."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *values: str | None) -> None:
        forms = set()
        for value in values:
            if value and len(value) >= MIN_SECRET:
                forms |= {value, quote(value, safe=""), unquote(value), *_json_forms(value)}
        with self._lock:
            self._values |= {f for f in forms if len(f) >= MIN_SECRET}

    def add_env(self, values: Mapping[str, str], secret_names: Iterable[str] = (),
                from_file: Iterable[str] = ()) -> None:
        """The secret values among `values` (the rule in the module docstring): `secret_names`
        are the profile's `env.secret`, `from_file` the names whose value came from the
        operator's shared .env."""
        names, env_file = set(secret_names), set(from_file)
        for name, value in values.items():
            if is_secret_name(name, names) or (
                    name in env_file and not plainly_not_secret(value)):
                self.add(value)
            self.add(*url_passwords(value))

    def add_env_file(self, values: Mapping[str, str]) -> None:
        """Every value read from a shared .env (all of them from the operator's file)."""
        self.add_env(values, from_file=values)

    def values(self) -> list[str]:
        with self._lock:
            return sorted(self._values, key=len, reverse=True)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


KNOWN = Secrets()  # what this process learnt: the release environment's secrets


def remember(*values: str | None) -> None:
    KNOWN.add(*values)


def release_secrets(values: Mapping[str, str], secret_names: Iterable[str] = (),
                    shared: Mapping[str, str] | None = None) -> list[str]:
    """What is secret for a release (the rule above), longest first: among its environment
    `values`, what the rule picks given the profile's `env.secret` (`secret_names`), a name
    the operator's shared .env sets counting as read from that file; and the shared .env's
    own values (`shared`, as read from the file)."""
    found = Secrets()
    found.add_env(shared or {}, from_file=shared or {})
    found.add_env(values, secret_names, from_file=shared or {})
    return found.values()


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every password in a URL, password-ish parameter and known secret value
    (those in `secrets` and those remembered by this process) replaced by `****`."""
    if not text:
        return text
    out = _USERINFO.sub(lambda m: m.group("pre") + MASK, text)
    out = _PARAM.sub(lambda m: m.group("pre") + (MASK if m.group("value") else ""), out)
    extra = Secrets()
    extra.add(*secrets)
    for value in sorted({*KNOWN.values(), *extra.values()}, key=len, reverse=True):
        out = out.replace(value, MASK)
    return out


def redact_tree(node: object, secrets: Iterable[str | None] = ()) -> object:
    """A JSON-like value (dicts, lists, strings, numbers) with every string, keys included,
    passed through `redact`: masked before it is serialized, so that no escaping (a `"` or
    `\\` inside a secret) hides a value from the masking."""
    values = [s for s in secrets if s]
    if isinstance(node, str):
        return redact(node, values)
    if isinstance(node, dict):
        return {redact(str(k), values): redact_tree(v, values) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact_tree(v, values) for v in node]
    return node
