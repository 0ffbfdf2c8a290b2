"""The one place secrets are masked, on the build side and the target alike.

Everything bundler shows or stores that may quote a value (the console, `--json` errors, the
journal in `state.db`, `bundle history`, install reports, compose, health and migration output)
goes through `redact`. It masks:

- the password in a URL's userinfo (`scheme://user:PASSWORD@host`), greedy up to the LAST `@`
  before the host, so an unencoded `@` inside the password is masked whole;
- password-ish parameters (`?password=`, `&token=`, `api_key=`, `client_secret=`, ...), in a URL
  query or as `name=value` words (libpq keyword strings, `KEY=value` dumps);
- known secret values, raw and percent-encoded: those passed in, and those this process learnt
  with `remember` / `remember_env` (the release environment's variables named in the profile's
  `env.secret` or with PASSWORD, SECRET, TOKEN, KEY or CREDENTIAL in their name, and every
  password found in a URL among its values).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

MASK = "****"
MIN_SECRET = 4  # shorter values would mask half of every message: never taken as secrets

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|KEY|CREDENTIAL", re.I)

# scheme://user:PASSWORD@host: the user part stops at ":" (or "@"/"/"), the password runs to
# the last "@" before the host (a password with "/", "?", "#" or whitespace is not a URL).
_USERINFO = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^:/@\s?#]*:)[^\s/?#]*(?=@)", re.I)
_PARAM_NAME = (r"(?:[\w.-]*(?:password|passwd|passphrase|secret|token|api[_-]?key"
               r"|access[_-]?key|private[_-]?key|credentials?)[\w.-]*|pwd|pass)")
# ...in a query (?x=, &x=, ;x=) or as a word of its own (`password=x dbname=y`, `DB_PASSWORD=x`)
_PARAM = re.compile(rf"(?P<pre>(?:^|(?<=[?&;\s\"'(,])){_PARAM_NAME}=)(?P<value>[^&\s#\"',;)]*)",
                    re.I | re.M)


def is_secret_name(name: str, secret_names: Iterable[str] = ()) -> bool:
    """A variable whose value must never be shown."""
    return name in set(secret_names) or bool(SECRET_NAME.search(name))


def url_passwords(text: str) -> list[str]:
    """Every password written in a URL in `text` (userinfo or a password-ish query param)."""
    found = [m.group(0)[len(m.group("pre")):] for m in _USERINFO.finditer(text)]
    found += [m.group("value") for m in _PARAM.finditer(text)]
    return [p for p in found if p]


def has_plaintext_secret(text: str) -> bool:
    """`text` writes a password out (user:pass@ or ?password=...), rather than `${VAR}`."""
    return any(not re.fullmatch(r"\$\{\w+\}", p) for p in url_passwords(text))


class Secrets:
    """A set of secret values, masked wherever `redact` runs. Thread-safe."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *values: str | None) -> None:
        forms = set()
        for value in values:
            if value and len(value) >= MIN_SECRET:
                forms |= {value, quote(value, safe=""), unquote(value)}
        with self._lock:
            self._values |= {f for f in forms if len(f) >= MIN_SECRET}

    def add_env(self, values: Mapping[str, str], secret_names: Iterable[str] = ()) -> None:
        names = set(secret_names)
        for name, value in values.items():
            if is_secret_name(name, names):
                self.add(value)
            self.add(*url_passwords(value))

    def values(self) -> list[str]:
        with self._lock:
            return sorted(self._values, key=len, reverse=True)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


KNOWN = Secrets()  # what this process learnt: the release environment's secrets


def remember(*values: str | None) -> None:
    KNOWN.add(*values)


def remember_env(values: Mapping[str, str], secret_names: Iterable[str] = ()) -> None:
    KNOWN.add_env(values, secret_names)


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
