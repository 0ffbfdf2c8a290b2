"""npm's lock model as bundler carries it (a package = name + version + integrity + the
bundled tarball), Subresource Integrity strings, and how bundler runs npm with no host
configuration. Shared by the build side (bundler.build.resolve.npm: fetch) and the install side
(bundler.install.npm_env: `npm ci --offline`).
"""

from __future__ import annotations

import base64
import contextlib
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import proc
from bundler.errors import BuildError

TARBALL_DIR = "npm/tarballs"
_NAME_PART = r"[A-Za-z0-9\-._~!*'()]+"
_NAME_RE = re.compile(rf"^(?:@{_NAME_PART}/)?{_NAME_PART}$")
_SAFE_CHAR = re.compile(r"[A-Za-z0-9._+=@,\-]")
_SRI_ALGOS = ("sha512", "sha384", "sha256", "sha1")  # strongest first


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # SRI from the lock, e.g. "sha512-..."
    tarball: str  # bundle-relative path, e.g. "npm/tarballs/@acme+x-1.2.0.tgz"
    sha256: str  # of the tarball bytes, stored in bundler's cache
    size: int


def package_name(key: str, entry: Mapping[str, Any]) -> str:
    """The name to fetch: an aliased dependency (`"x": "npm:y@1"`) records the real name."""
    real = entry.get("name")
    name = real if isinstance(real, str) and real else key.rsplit("node_modules/", 1)[-1]
    if not _NAME_RE.match(name):
        raise BuildError(f"package-lock.json: {key!r} is not a valid npm package name",
                         hint="regenerate the lock with `npm install --package-lock-only`")
    return name


def parse_sri(sri: str) -> dict[str, bytes]:
    """{algorithm: digest} for every hash npm would accept in an SRI string."""
    out: dict[str, bytes] = {}
    for token in sri.split():
        algo, _, rest = token.partition("-")
        if algo not in _SRI_ALGOS or not rest:
            continue
        with contextlib.suppress(ValueError):
            out[algo] = base64.b64decode(rest.split("?", 1)[0], validate=True)
    return out


def strongest(sri: str) -> tuple[str, bytes]:
    hashes = parse_sri(sri)
    algo = next(a for a in _SRI_ALGOS if a in hashes)
    return algo, hashes[algo]


def sri_of(algo: str, digest: bytes) -> str:
    return f"{algo}-{base64.b64encode(digest).decode()}"


def tarball_path(name: str, version: str) -> str:
    """Bundle-relative, flat, and only [A-Za-z0-9._+=@,-]: `@scope/x` becomes `@scope+x`
    (no npm name holds '+'); any other character becomes `=XX` (no name or version holds '=')."""
    safe = "".join(c if _SAFE_CHAR.match(c) else f"={ord(c):02X}"
                   for c in name.replace("/", "+"))
    return f"{TARBALL_DIR}/{safe}-{version}.tgz"


def npm_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment in which npm reads no host configuration (empty user and global
    npmrc under `home`), on top of proc.clean_env (which drops npm_config_* variables)."""
    home.mkdir(parents=True, exist_ok=True)
    user, glob = home / "npmrc", home / "global-npmrc"
    for f in (user, glob):
        f.touch()
    return proc.clean_env({"NPM_CONFIG_USERCONFIG": str(user),
                           "NPM_CONFIG_GLOBALCONFIG": str(glob),
                           "NPM_CONFIG_UPDATE_NOTIFIER": "false",
                           "NPM_CONFIG_FUND": "false",
                           "NPM_CONFIG_AUDIT": "false",
                           **(extra or {})})


def npm_last_error(output: str) -> str:
    """npm's most telling line: the last `npm error` line that is not about its log file."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("npm error").strip() for line in lines
              if line.startswith("npm error") and "complete log" not in line
              and line.strip() != "npm error"]
    return errors[-1] if errors else (lines[-1].strip() if lines else "no output")


_NOT_CACHED = re.compile(r"request to (\S+) failed: cache mode is 'only-if-cached'")


def npm_not_cached(output: str, registry: str) -> str | None:
    """The package an offline npm run wanted from the registry, named as npm names it (or
    the URL, if it is not under `registry`)."""
    found = _NOT_CACHED.search(output)
    if found is None:
        return None
    url = found.group(1)
    if not url.startswith(registry):
        return url
    path = urllib.parse.unquote(url[len(registry):])
    return path.split("/-/")[0]
