"""npm packages for the target, from a project's package-lock.json (lockfileVersion 2 or 3).

Works from name + version + integrity only: keeps what a production install on the TARGET
needs, fetches each tarball over HTTP (integrity checked while it streams into the cache),
checks the lock with `npm ci --dry-run --offline` first, and reports install scripts that
would reach for the network. Why not `npm pack`: docs/design/bundle-format.md, "npm projects".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bundler import proc, timeouts, ui
from bundler.build.cache import Cache
from bundler.bundle.npmlock import (
    NpmPackage,
    npm_env,
    npm_last_error,
    npm_not_cached,
    package_name,
    parse_sri,
    sri_of,
    strongest,
    tarball_path,
)
from bundler.errors import BuildError, CommandError
from bundler.fsutil import CHUNK, atomic_write_bytes

if TYPE_CHECKING:
    from bundler.build.resolve import http

_PACKUMENT_ACCEPT = ("application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, "
                     "*/*")

# npm package names: URL-safe (encodeURIComponent leaves them alone), optionally scoped.
_VERSION_RE = re.compile(r"^[0-9A-Za-z.+\-]+$")
INSTALL_SCRIPTS = ("preinstall", "install", "postinstall")


@dataclass(frozen=True)
class NpmSpec:
    project: Path  # dir with package.json + package-lock.json (lockfileVersion 2 or 3)
    registry: str | None = None  # None: npm's own default registry
    omit_dev: bool = True  # production install on the target
    os: str = "linux"  # the TARGET's (node's process.platform), for optional native packages
    cpu: str = "x64"  # node's process.arch
    libc: str = "glibc"  # "glibc" or "musl"; only meaningful when os is linux
    # packages whose install scripts' downloads are known to fail harmlessly offline (a
    # checked set-up, e.g. resolve.prisma): not warned about
    harmless_scripts: tuple[str, ...] = ()


@dataclass(frozen=True)
class NpmFetched:
    packages: tuple[NpmPackage, ...]
    package_json: tuple[str, int]  # (sha256, size) of the project's package.json, cached
    package_lock: tuple[str, int]  # same for package-lock.json
    warnings: tuple[str, ...]  # e.g. install scripts that download binaries
    downloaded: int = 0  # tarballs fetched from the registry (0: all came from the cache)


# ------------------------------------------------------------------------------------------
# The lock file


@dataclass(frozen=True)
class LockEntry:
    """One package the target needs, as the lock describes it."""

    key: str  # the lock's path, e.g. "node_modules/a/node_modules/b"
    name: str  # the real package name (an alias's target name, not the alias)
    version: str
    integrity: str
    resolved: str | None
    has_install_script: bool
    optional_deps: tuple[str, ...]  # names of its optionalDependencies


@dataclass(frozen=True)
class Selection:
    entries: tuple[LockEntry, ...]  # one per name@version, sorted
    skipped_dev: int
    skipped_platform: tuple[str, ...]  # name@version of optional packages not for the target


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})",
                         hint=f"fix {what}, or regenerate it with npm") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path} is not a JSON object", hint=f"regenerate {what} with npm")
    return data


def platform_ok(entry: Mapping[str, Any], os_: str, cpu: str, libc: str | None) -> bool:
    """npm's own rule (npm-install-checks): every present field must accept the value."""
    def accepts(value: str | None, allowed: Any) -> bool:
        if allowed is None:
            return True
        items = [allowed] if isinstance(allowed, str) else list(allowed)
        if items == ["any"]:
            return True
        if value is None:
            return False
        negated, match = 0, False
        for item in items:
            if isinstance(item, str) and item.startswith("!"):
                negated += 1
                if item[1:] == value:
                    return False
            else:
                match = match or item == value
        return match or negated == len(items)

    return (accepts(os_, entry.get("os")) and accepts(cpu, entry.get("cpu"))
            and accepts(libc, entry.get("libc")))


def select(lock: Mapping[str, Any], spec: NpmSpec, lock_path: Path) -> Selection:
    """What a production (or full) install on the target takes from this lock."""
    version = lock.get("lockfileVersion")
    if version == 1 or (isinstance(version, int) and version < 2):
        raise BuildError(
            f"{lock_path} is lockfileVersion {version} (npm 6 or older); bundler needs 2 or 3",
            hint="regenerate it with npm >= 7: `npm install --package-lock-only`, then commit it")
    if version not in (2, 3):
        raise BuildError(f"{lock_path} has lockfileVersion {version!r}; bundler reads 2 or 3",
                         hint="regenerate it with `npm install --package-lock-only` (npm 7-11)")
    packages = lock.get("packages")
    if not isinstance(packages, dict):
        raise BuildError(f"{lock_path} has no 'packages' section",
                         hint="regenerate it with npm >= 7: `npm install --package-lock-only`")
    libc = spec.libc if spec.os == "linux" else None
    by_id: dict[tuple[str, str], LockEntry] = {}
    skipped_dev = 0
    skipped_platform: set[str] = set()
    for key, entry in packages.items():
        if key == "" or not isinstance(entry, dict):
            continue
        if entry.get("link") or "node_modules/" not in key:
            raise BuildError(
                f"{lock_path}: {key!r} is a local link (a workspace or a file: dependency)",
                hint="bundler carries registry packages only: publish it to your registry "
                     "and depend on it by version")
        if entry.get("inBundle"):
            continue  # shipped inside its parent's tarball
        if spec.omit_dev and entry.get("dev"):
            skipped_dev += 1
            continue
        name = package_name(key, entry)
        ver = entry.get("version")
        if not isinstance(ver, str) or not _VERSION_RE.match(ver):
            raise BuildError(f"{lock_path}: {key!r} has no valid version",
                             hint="regenerate the lock with `npm install --package-lock-only`")
        if not platform_ok(entry, spec.os, spec.cpu, libc):
            if entry.get("optional") or entry.get("devOptional"):
                skipped_platform.add(f"{name}@{ver}")
                continue
            raise BuildError(
                f"{name}@{ver} is not optional and does not run on {_platform(spec)} "
                f"(it wants os={entry.get('os')}, cpu={entry.get('cpu')}, "
                f"libc={entry.get('libc')})",
                hint="check the target's os/cpu/libc in the profile, or replace the package")
        resolved = entry.get("resolved")
        if isinstance(resolved, str) and not resolved.startswith(("http://", "https://")):
            raise BuildError(
                f"{name}@{ver} comes from {resolved.split('#')[0]!r}, not from a registry",
                hint="bundler carries registry packages only: publish it to your registry "
                     "and depend on it by version")
        integrity = entry.get("integrity")
        if not isinstance(integrity, str) or not parse_sri(integrity):
            raise BuildError(
                f"{lock_path}: {name}@{ver} has no usable integrity",
                hint="regenerate the lock with `npm install --package-lock-only` (npm >= 7 "
                     "records an integrity for every registry package)")
        optional = entry.get("optionalDependencies")
        item = LockEntry(key, name, ver, integrity,
                         resolved if isinstance(resolved, str) else None,
                         bool(entry.get("hasInstallScript")),
                         tuple(sorted(optional)) if isinstance(optional, dict) else ())
        seen = by_id.get((name, ver))
        if seen is not None and seen.integrity != integrity:
            raise BuildError(f"{lock_path}: {name}@{ver} appears with two integrities",
                             hint="regenerate the lock with `npm install --package-lock-only`")
        if seen is None or (item.has_install_script and not seen.has_install_script):
            by_id[(name, ver)] = item
    return Selection(tuple(by_id[k] for k in sorted(by_id)), skipped_dev,
                     tuple(sorted(skipped_platform)))


def check_in_sync(package_json: Mapping[str, Any], lock: Mapping[str, Any],
                  lock_path: Path) -> None:
    """Every dependency package.json declares must be in the lock (`npm ci` refuses otherwise,
    and it would refuse on the air-gapped host)."""
    if package_json.get("workspaces"):
        raise BuildError("npm workspaces are not supported yet",
                         hint="bundle each workspace as its own project")
    packages = lock.get("packages") or {}
    root = packages.get("") if isinstance(packages, dict) else None

    def names(doc: Any, field: str) -> set[str]:
        deps = doc.get(field) if isinstance(doc, dict) else None
        return set(deps) if isinstance(deps, dict) else set()

    problems: list[str] = []
    for field in ("dependencies", "optionalDependencies", "devDependencies"):
        declared, locked = names(package_json, field), names(root, field)
        problems += [f"{n} is not in the lock" for n in sorted(declared)
                     if n not in locked or f"node_modules/{n}" not in packages]
        problems += [f"{n} is in the lock's {field} but not in package.json"
                     for n in sorted(locked - declared)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BuildError(
            f"{lock_path} does not match package.json: {problems[0]}{more}",
            hint="run `npm install --package-lock-only` and commit package-lock.json "
                 "(`npm ci` on the target refuses a lock out of sync)")


def _platform(spec: NpmSpec) -> str:
    return f"{spec.os}/{spec.cpu}" + (f"/{spec.libc}" if spec.os == "linux" else "")


# ------------------------------------------------------------------------------------------
# The registry


def default_registry() -> str:
    """npm's own default registry (host configuration ignored): bundler names no host."""
    with tempfile.TemporaryDirectory(prefix="bundler-npmrc-") as tmp:
        try:
            result = proc.run(["npm", "config", "get", "registry"], env=npm_env(Path(tmp)),
                              cwd=Path(tmp), what="npm config get registry",
                              timeout=timeouts.PROBE)
        except CommandError as exc:
            raise BuildError(f"cannot ask npm for its default registry: {exc.message}",
                             hint="install Node.js and npm on the build machine, or set the "
                                  "npm registry in the profile") from None
    url = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    if not url.startswith(("http://", "https://")):
        raise BuildError(f"npm reported {url!r} as its registry",
                         hint="set the npm registry in the profile")
    return url


def registry_url(registry: str) -> str:
    parts = urllib.parse.urlsplit(registry)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BuildError(f"npm registry {registry!r} is not an http(s) URL",
                         hint="give the registry as http(s)://host[:port]/[path/]")
    return registry if registry.endswith("/") else registry + "/"


def conventional_url(registry: str, name: str, version: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return f"{registry}{name}/-/{base}-{version}.tgz"


def _failed(what: str, exc: http.HttpFailed) -> BuildError:
    if exc.status is not None and exc.status < 500 and exc.status != 429:
        return BuildError(exc.message,
                          hint="check the registry URL and that it needs no credentials")
    return BuildError(f"downloading {what} failed: {exc.message}",
                      hint="check the network and the registry, then build again (finished "
                           "downloads stay cached)")


def packument(registry: str, name: str) -> dict[str, Any]:
    """The registry's document for package `name` (every version's metadata), with retries.
    `registry`: a URL ending in "/" (see registry_url)."""
    from bundler.build.resolve import http

    url = registry + name.replace("/", "%2f")
    try:
        data = json.loads(http.get_bytes(url, accept=_PACKUMENT_ACCEPT))
        doc: dict[str, Any] = data if isinstance(data, dict) else {}
    except http.HttpFailed as exc:
        raise _failed(f"the packument of {name}", exc) from None
    except http.NotFound:
        raise BuildError(f"{name} is not in the registry {registry}",
                         hint=f"publish {name} to the registry, or point the build at one "
                              "that has it") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BuildError(f"the registry's document for {name} is not JSON",
                         hint="check the registry URL") from None
    return doc


def _packument_tarball(registry: str, name: str, version: str) -> str:
    doc = packument(registry, name)
    tarball = (((doc.get("versions") or {}).get(version) or {}).get("dist") or {}).get("tarball")
    if not isinstance(tarball, str) or not tarball.startswith(("http://", "https://")):
        raise BuildError(f"{name}@{version} is not in the registry {registry}",
                         hint="the lock names a version the registry does not have (unpublished?"
                              "); update the lock or use a registry that has it")
    return tarball


class _Index:
    """integrity -> (sha256, size) of a verified tarball in the cache, so a rebuild whose
    lock did not change downloads nothing. Every hit is re-verified against the integrity."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.dir = cache.root / "index" / "npm"

    def _file(self, algo: str, digest: bytes) -> Path:
        return self.dir / hashlib.sha256(sri_of(algo, digest).encode()).hexdigest()

    def get(self, integrity: str) -> tuple[str, int] | None:
        algo, digest = strongest(integrity)
        try:
            sha, size_text = self._file(algo, digest).read_text().split()
            size = int(size_text)
        except (OSError, ValueError):
            return None
        obj = self.cache.path(sha)
        try:
            h = hashlib.new(algo)
            with open(obj, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
        except OSError:
            return None
        return (sha, size) if h.digest() == digest and obj.stat().st_size == size else None

    def put(self, integrity: str, sha: str, size: int) -> None:
        algo, digest = strongest(integrity)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache.tmp)
        with os.fdopen(fd, "w") as out:
            out.write(f"{sha} {size}\n")
        os.replace(tmp, self._file(algo, digest))


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.downloaded = 0
        self.bytes = 0
        self.cached = 0


def _download_one(entry: LockEntry, registry: str, cache: Cache, index: _Index,
                  stats: _Stats, progress: ui.Downloads | None = None) -> NpmPackage:
    from bundler.build.resolve import http

    algo, want = strongest(entry.integrity)
    ident = f"{entry.name}@{entry.version}"

    def from_url(url: str) -> tuple[str, int]:
        def into_cache(chunks: Iterator[bytes]) -> tuple[str, int]:
            hasher = hashlib.new(algo)

            def read(_n: int) -> bytes:
                chunk = next(chunks, b"")
                hasher.update(chunk)
                if chunk:
                    bar.advance(len(chunk))
                return chunk

            def check(_sha: str, size: int) -> None:
                got = hasher.digest()
                if got != want:
                    raise BuildError(
                        f"integrity mismatch for {ident}: the lock wants "
                        f"{sri_of(algo, want)[:30]}..., {url} sent {size} bytes hashing "
                        f"to {sri_of(algo, got)[:30]}...",
                        hint=f"the registry served different bytes for {ident} than "
                             "the lock was made from: do not ship it; find out why")

            bar.restart()
            return cache.put_stream(read, check)

        with ui.file_progress(progress, ident) as bar:
            try:
                return http.stream(url, into_cache, on_retry=bar.retrying,
                                   on_length=bar.total)
            except http.HttpFailed as exc:
                raise _failed(ident, exc) from None

    candidates: list[Callable[[], str]] = [
        lambda: conventional_url(registry, entry.name, entry.version),
        lambda: _packument_tarball(registry, entry.name, entry.version),
    ]
    if entry.resolved:
        resolved = entry.resolved
        candidates.append(lambda: resolved)
    tried: set[str] = set()
    first_error: BuildError | None = None
    for candidate in candidates:
        try:
            url = candidate()
        except BuildError as exc:
            first_error = first_error or exc
            continue
        if url in tried:
            continue
        tried.add(url)
        try:
            sha, size = from_url(url)
        except http.NotFound:
            continue
        index.put(entry.integrity, sha, size)
        with stats.lock:
            stats.downloaded += 1
            stats.bytes += size
        return _package(entry, sha, size)
    raise first_error or BuildError(
        f"{ident} is not in the registry {registry}",
        hint=f"publish {ident} to the registry, or point the build at one that has it")


def _package(entry: LockEntry, sha: str, size: int) -> NpmPackage:
    return NpmPackage(entry.name, entry.version, entry.integrity,
                      tarball_path(entry.name, entry.version), sha, size)


def download(entries: Sequence[LockEntry], registry: str, cache: Cache,
             log: Callable[[str], None], workers: int | None = None
             ) -> tuple[list[NpmPackage], int]:
    """Every entry's tarball, verified, in the cache. The first failure stops the rest.
    `workers`: parallel downloads (default: http.MAX_PARALLEL)."""
    index = _Index(cache)
    stats = _Stats()
    started = time.monotonic()
    results: dict[int, NpmPackage] = {}
    # Cached tarballs first, re-hashed on all cores; a warm build stops here, without loading
    # the HTTP stack (urllib3: about a tenth of a second).
    with ThreadPoolExecutor(max_workers=max(1, min(len(entries), os.cpu_count() or 1)),
                            thread_name_prefix="npm-cached") as pool:
        for i, (e, hit) in enumerate(zip(entries, pool.map(lambda e: index.get(e.integrity),
                                                           entries), strict=True)):
            if hit is not None:
                results[i] = _package(e, *hit)
    stats.cached = len(results)
    todo = [(i, e) for i, e in enumerate(entries) if i not in results]
    if todo:
        _fetch_missing(todo, registry, cache, index, stats, results, workers)
    took = time.monotonic() - started
    log(f"npm: {stats.downloaded} tarball(s) downloaded ({stats.bytes / 1e6:.1f} MB), "
        f"{stats.cached} from cache, in {took:.1f}s")
    return [results[i] for i in range(len(entries))], stats.downloaded


def _fetch_missing(todo: list[tuple[int, LockEntry]], registry: str, cache: Cache,
                   index: _Index, stats: _Stats, results: dict[int, NpmPackage],
                   workers: int | None) -> None:
    from bundler.build.resolve import http

    with ThreadPoolExecutor(max_workers=max(1, workers or http.MAX_PARALLEL),
                            thread_name_prefix="npm-fetch") as pool, \
            ui.downloads("npm tarballs", len(todo)) as progress:
        futures: dict[Future[NpmPackage], int] = {
            pool.submit(_download_one, e, registry, cache, index, stats, progress): i
            for i, e in todo}
        http.wait_in_order(futures)
        for f, i in futures.items():
            results[i] = f.result()


# ------------------------------------------------------------------------------------------
# Install scripts that reach for the network


@dataclass(frozen=True)
class _Known:  # hashable: warnings are grouped by it
    downloads: str
    fix: str


_PRISMA = _Known(
    "the Prisma engines",
    "use Prisma 6.19.3 with engineType = \"client\" and prisma.config.ts's engine: \"js\" plus "
    "a driver adapter (see docs/prisma.md): nothing is then downloaded")
_PLAYWRIGHT = _Known(
    "browser builds",
    "set PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 for the install; run `npx playwright install` on "
    "the build side into PLAYWRIGHT_BROWSERS_PATH and bundle that directory")
KNOWN_DOWNLOADERS: dict[str, _Known] = {
    "prisma": _PRISMA,
    "@prisma/engines": _PRISMA,
    "@prisma/client": _PRISMA,
    "puppeteer": _Known(
        "Chrome",
        "set PUPPETEER_SKIP_DOWNLOAD=1 for the install and PUPPETEER_EXECUTABLE_PATH to a "
        "system chromium on the target"),
    "playwright": _PLAYWRIGHT,
    "playwright-core": _PLAYWRIGHT,
    "@playwright/test": _PLAYWRIGHT,
    "playwright-chromium": _PLAYWRIGHT,
    "cypress": _Known(
        "the Cypress app",
        "set CYPRESS_INSTALL_BINARY=0 for the install; bundle the Cypress zip and run "
        "`CYPRESS_INSTALL_BINARY=/path/cypress.zip npx cypress install` on the target"),
    "electron": _Known(
        "the Electron runtime",
        "set ELECTRON_SKIP_BINARY_DOWNLOAD=1 for the install and bundle the Electron build "
        "for the target (ELECTRON_OVERRIDE_DIST_PATH)"),
    "node-sass": _Known(
        "a libsass binding",
        "set SASS_BINARY_PATH to a bundled binding.node built for the target, or move to the "
        "`sass` package (pure JavaScript)"),
    "sharp": _Known(
        "libvips",
        "use sharp >= 0.33, whose binaries are optional @img/sharp-* packages that bundler "
        "carries for the target"),
    "esbuild": _Known(
        "its native binary",
        "keep its optional @esbuild/<os>-<cpu> package in the lock (regenerate it with npm "
        ">= 7, without --no-optional) so bundler carries the target's binary"),
    "chromedriver": _Known(
        "chromedriver",
        "set CHROMEDRIVER_SKIP_DOWNLOAD=true for the install and CHROMEDRIVER_FILEPATH to a "
        "bundled driver"),
    "@sentry/cli": _Known(
        "the sentry-cli binary",
        "set SENTRYCLI_SKIP_DOWNLOAD=1 for the install if the CLI is not needed at run time"),
}
_PREBUILT_TOOLS = ("node-pre-gyp", "prebuild-install", "prebuild ")


def read_manifest(tgz: Path) -> tuple[dict[str, Any], bool]:
    """The package.json inside a tarball (streamed, at most 1 MB) and whether it holds a
    binding.gyp at its top (npm then runs `node-gyp rebuild` implicitly)."""
    manifest: dict[str, Any] = {}
    gyp = False
    try:
        with tarfile.open(tgz, mode="r|gz") as tar:
            for member in tar:
                parts = member.name.lstrip("./").split("/")
                if len(parts) != 2 or not member.isfile():
                    continue
                if parts[1] == "binding.gyp":
                    gyp = True
                elif parts[1] == "package.json" and not manifest and member.size < 1 << 20:
                    fh = tar.extractfile(member)
                    if fh is not None:
                        with contextlib.suppress(ValueError, UnicodeDecodeError):
                            data = json.loads(fh.read())
                            manifest = data if isinstance(data, dict) else {}
    except (tarfile.TarError, OSError, EOFError):
        pass
    return manifest, gyp


def install_script_warnings(entries: Sequence[LockEntry], packages: Sequence[NpmPackage],
                            cache: Cache, harmless: Sequence[str] = ()) -> list[str]:
    """A warning, with its fix, for the kept packages whose install scripts run on the
    air-gapped host and need the network there (one warning per kind of download);
    `harmless`: names left out."""
    kept = {p.name for p in packages}
    by_id = {(p.name, p.version): p for p in packages}
    known_hits: dict[_Known, list[str]] = {}
    warnings: list[str] = []
    for entry in entries:
        known = KNOWN_DOWNLOADERS.get(entry.name)
        if entry.name in harmless or (not entry.has_install_script and known is None):
            continue
        if any(dep in kept for dep in entry.optional_deps):
            continue  # its native binary comes as an optional platform package, carried here
        pkg = by_id[(entry.name, entry.version)]
        manifest, gyp = read_manifest(cache.path(pkg.sha256))
        raw = manifest.get("scripts")
        scripts = {k: v for k, v in (raw.items() if isinstance(raw, dict) else ())
                   if k in INSTALL_SCRIPTS and isinstance(v, str)}
        if not scripts and gyp:
            scripts = {"install": "node-gyp rebuild"}
        if not scripts and not entry.has_install_script:
            continue
        runs = "; ".join(f"{k}: `{v}`" for k, v in sorted(scripts.items())) or "install script"
        ident = f"{entry.name}@{entry.version} ({runs})"
        if known is not None:
            known_hits.setdefault(known, []).append(ident)
        elif any(t in v for v in scripts.values() for t in _PREBUILT_TOOLS):
            warnings.append(
                f"{ident} downloads a prebuilt binary at install time; offline it falls back "
                "to compiling: the target needs python3, make, a C++ compiler and Node headers "
                "(npm_config_nodedir), or bundle the binary")
        elif any("node-gyp" in v for v in scripts.values()):
            warnings.append(
                f"{ident} compiles at install time: the target needs python3, make, a C++ "
                "compiler and Node headers (set npm_config_nodedir, or node-gyp downloads them)")
        else:
            warnings.append(f"{ident} runs on the target during `npm ci`: check that it needs "
                            "no network there")
    for known, idents in known_hits.items():
        verb = "downloads" if len(idents) == 1 else "download"
        warnings.append(
            f"{', '.join(idents)} {verb} {known.downloads} at install time, which fails offline "
            f"(npm ci may still succeed, and the app then fails at run time); fix: {known.fix}")
    return sorted(warnings)


# ------------------------------------------------------------------------------------------
# What npm ci on the target would say about this lock, asked here


_CHECK_FORMAT = "1"  # bump when the check's command changes: earlier verdicts then lapse


def _npm_ci_verdict(npm: str, pj: bytes, lock: bytes, spec: NpmSpec, registry: str,
                    cache: Cache) -> Path:
    """Where npm's acceptance of exactly these inputs is remembered. The check is a function
    of them alone: npm runs on a copy holding only the two files, with no host configuration
    (npm_env), an empty npm cache and --offline; so the key is the files' bytes, the dev
    setting, the registry, and which npm and node run (their resolved paths, sizes and
    mtimes, and npm's own package.json, which holds its version): an upgrade checks again."""
    who: list[object] = []
    for exe in (npm, shutil.which("node")):
        real = os.path.realpath(exe) if exe else ""
        with contextlib.suppress(OSError):
            st = os.stat(real)
            who.append([real, st.st_size, st.st_mtime_ns])
    with contextlib.suppress(OSError):
        who.append(hashlib.sha256((Path(os.path.realpath(npm)).parent.parent
                                   / "package.json").read_bytes()).hexdigest())
    key = hashlib.sha256(json.dumps(
        [_CHECK_FORMAT, hashlib.sha256(pj).hexdigest(), hashlib.sha256(lock).hexdigest(),
         spec.omit_dev, registry, who]).encode()).hexdigest()
    return cache.root / "index" / "npm-ci-check" / key


def check_npm_ci_accepts(pj_path: Path, lock_path: Path, spec: NpmSpec, registry: str,
                         cache: Cache) -> str | None:
    """Run `npm ci --dry-run --offline` on a copy of the project: what npm ci would refuse on
    the target (a lock out of sync with package.json, entries npm dropped) fails the build
    instead. Returns a warning when npm is not installed here, else None.

    An acceptance is remembered in the cache (about a second of npm per build): the same
    inputs are not asked again. A refusal is never remembered."""
    npm = shutil.which("npm")
    if npm is None:
        return ("npm is not installed on the build machine, so the lock was not checked with "
                "`npm ci --dry-run`: the target's npm ci may still refuse it")
    pj, lock = pj_path.read_bytes(), lock_path.read_bytes()  # checked = remembered
    verdict = _npm_ci_verdict(npm, pj, lock, spec, registry, cache)
    if verdict.is_file():
        return None
    cache.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="npm-check-", dir=cache.tmp) as tmp:
        work = Path(tmp) / "project"
        work.mkdir()
        (work / "package.json").write_bytes(pj)
        (work / "package-lock.json").write_bytes(lock)
        args = ["npm", "ci", "--dry-run", "--offline", "--ignore-scripts", "--no-audit",
                "--no-fund", "--no-progress", "--cache", str(Path(tmp) / "npm-cache"),
                "--registry", registry]
        if spec.omit_dev:
            args.append("--omit=dev")
        result = proc.run(args, cwd=work, env=npm_env(Path(tmp) / "home"), check=False,
                          timeout=proc.DEFAULT_TIMEOUT, what="npm ci --dry-run")
    if result.returncode == 0:
        atomic_write_bytes(verdict, b"accepted\n")
        return None
    out = result.output
    wanted = npm_not_cached(out, registry)
    if wanted is not None:
        raise BuildError(
            f"npm ci would refuse {lock_path}: it lacks {wanted}, which npm would have to look "
            "up in the registry",
            hint="run `npm install` in the project and commit package-lock.json")
    if "in sync" in out:
        gaps = [line.removeprefix("npm error").strip() for line in out.splitlines()
                if line.startswith("npm error") and re.search(r"\b(Missing|Invalid):", line)]
        more = f" (and {len(gaps) - 1} more)" if len(gaps) > 1 else ""
        raise BuildError(
            f"npm ci would refuse {lock_path}: "
            f"{gaps[0] if gaps else 'it is out of sync with package.json'}{more}",
            hint="run `npm install` in the project and commit package-lock.json; if the lines "
                 "stay missing, the registry lacks those packages (`npm view NAME@VERSION`)")
    raise BuildError(f"npm ci would refuse {lock_path}: {npm_last_error(out)}",
                     hint="run `npm ci --dry-run` in the project to see npm's full output")


# ------------------------------------------------------------------------------------------
# The entry point


def fetch(spec: NpmSpec, cache: Cache, log: Callable[[str], None]) -> NpmFetched:
    project = spec.project
    pj_path, lock_path = project / "package.json", project / "package-lock.json"
    if not pj_path.is_file():
        raise BuildError(f"{project} has no package.json",
                         hint="point the npm project at the directory holding package.json")
    if not lock_path.is_file():
        raise BuildError(
            f"{project} has no package-lock.json",
            hint=f"run `npm install --package-lock-only` in {project} and commit the lock: "
                 "bundler installs exactly what it names")
    package_json = read_json(pj_path, "package.json")
    lock = read_json(lock_path, "package-lock.json")
    selection = select(lock, spec, lock_path)
    check_in_sync(package_json, lock, lock_path)
    registry = registry_url(spec.registry or default_registry())
    unchecked = check_npm_ci_accepts(pj_path, lock_path, spec, registry, cache)
    log(f"npm: {len(selection.entries)} package(s) for {_platform(spec)} "
        f"({selection.skipped_dev} dev and {len(selection.skipped_platform)} other-platform "
        "package(s) left out)")
    packages, downloaded = download(selection.entries, registry, cache, log)
    warnings = install_script_warnings(selection.entries, packages, cache,
                                       spec.harmless_scripts)
    if unchecked:
        warnings.append(unchecked)
    for w in warnings:
        log(f"warning: {w}")
    return NpmFetched(
        packages=tuple(packages),
        package_json=cache.put_file(pj_path),
        package_lock=cache.put_file(lock_path),
        warnings=tuple(warnings),
        downloaded=downloaded,
    )
