"""node_modules for the release, from the bundled npm tarballs only: `npm ci --offline`.

For the run, every lock entry whose tarball the bundle carries gets `resolved:
file:<that tarball>` (after bundler checked its size and sha256 against the signed manifest),
so npm reads each package straight from the bundle and still checks the lock's integrity
(EINTEGRITY on a mismatch). Entries the bundle does not carry (optional packages for another
platform) get a `resolved` under a placeholder registry that is never contacted (`.invalid`
cannot resolve, and npm runs with --offline), so npm skips them or names them. Entries whose
lock integrity is only sha1 (very old packages) get the sha512 of the verified bundled
tarball. The original package-lock.json is put back afterwards, byte for byte.

Measured (seed 001's 12 packages, 6,221 files; 2 busy cores): populating a private npm cache
first (`npm cache add`, what bundler did before) took 15–21 s and `npm ci` from it 15–20 s;
`npm ci` from the `file:` tarballs takes 12–18 s, with no cache step at all.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from bundler import proc, timeouts
from bundler.bundle.npmlock import (
    NpmPackage,
    npm_env,
    npm_last_error,
    npm_not_cached,
    package_name,
    parse_sri,
)
from bundler.errors import BuildError, CommandError, InstallError
from bundler.fsutil import CHUNK
from bundler.install import fsowner, node_runtime

# Never contacted: `.invalid` is reserved (RFC 2606) and npm runs with --offline.
OFFLINE_REGISTRY = "https://registry.invalid/"


def install_offline(project_dir: Path, tarballs_dir: Path, packages: Sequence[NpmPackage],
                    npm_cache: Path, log: Callable[[str], None], omit_dev: bool = True,
                    env: Mapping[str, str] | None = None, release: Path | None = None,
                    user: proc.RunAs | None = None) -> None:
    """Install node_modules in `project_dir` (which holds package.json + package-lock.json)
    from the tarballs in `tarballs_dir`, with no network. `env` is added to npm's environment
    (for example PUPPETEER_SKIP_DOWNLOAD=1 for a package's install script). `release`: when
    it carries Node.js (see node_runtime), that node and npm run, for npm and for the
    packages' install scripts; else the host's. `user`: the release's account, which npm and
    the packages' install scripts run as (see `_as_user`)."""
    lock_path = project_dir / "package-lock.json"
    for required in (project_dir / "package.json", lock_path):
        if not required.is_file():
            raise InstallError(f"{required} is missing",
                               hint="the bundle's npm project is incomplete: rebuild it")
    files = _verify_tarballs(tarballs_dir, packages)
    npm_cache.mkdir(parents=True, exist_ok=True)
    if user is not None and not (user.switches and os.geteuid() == 0):
        user = None  # bundler already runs as that account
    with tempfile.TemporaryDirectory(prefix="bundler-npm-") as tmp, \
            _as_user(user, [Path(tmp), npm_cache, project_dir / "node_modules"]):
        npm_env_ = npm_env(Path(tmp), {"NPM_CONFIG_REGISTRY": OFFLINE_REGISTRY, **(env or {})})
        npm_cmd = ["npm"]
        if release is not None and (carried := node_runtime.npm_argv(release)) is not None:
            npm_cmd = carried
            npm_env_ = node_runtime.on_path(npm_env_, release)
        common = ["--offline", "--cache", str(npm_cache), "--registry", OFFLINE_REGISTRY,
                  "--no-audit", "--no-fund", "--no-progress", "--update-notifier=false"]
        original = lock_path.read_bytes()
        lock = _load_lock(lock_path, original)
        with _patched_lock(lock_path, original, _offline_lock(lock, files)):
            args = [*npm_cmd, "ci", *common]
            if omit_dev:
                args.append("--omit=dev")
            log(f"npm ci --offline ({len(packages)} bundled package(s))")
            try:
                result = proc.run(args, cwd=project_dir, env=npm_env_, user=user,
                                  what="npm ci (offline)", timeout=timeouts.PACKAGES)
            except CommandError as exc:
                raise _explain(exc, lock, user) from None
    summary = [line for line in result.output.splitlines() if line.strip()]
    log(f"npm: {summary[-1].strip() if summary else 'done'}")
    if not (project_dir / "node_modules").is_dir() and packages:
        raise InstallError("npm ci reported success but wrote no node_modules",
                           hint="run `npm ci --offline` by hand in the release dir to see why")


@contextlib.contextmanager
def _as_user(user: proc.RunAs | None, writable: Sequence[Path]) -> Iterator[None]:
    """npm and the packages' install scripts (arbitrary code from the bundle) run as the
    release's account, never as root: for the run it owns the directories npm writes (its
    home, its cache, node_modules; the project directory and everything else stay root's),
    and afterwards, whatever happened, those are root's again and not writable by it, as the
    rest of the release is (fsowner.own_tree: safe against an install script that left a
    process behind swapping directories for symlinks)."""
    if user is None:
        yield
        return
    for path in writable:
        path.mkdir(parents=True, exist_ok=True)
        fsowner.own_tree(path, user.uid, user.gid)
    try:
        yield
    finally:
        for path in writable:
            fsowner.own_tree(path, 0, 0, 0o755, owned_by=user.uid)
    for path in writable[1:]:  # (the home is removed with its temporary directory)
        left = fsowner.foreign_entries(path, 0, 0, 0o755)
        if left:
            raise InstallError(
                f"{path} holds entries bundler did not write and could not make root's: "
                f"{', '.join(left[:5])}",
                hint=f"an install script run as {user.name} put them there (a hard link "
                     "to a file of another owner?): check the packages, then install again")


def _verify_tarballs(tarballs_dir: Path, packages: Sequence[NpmPackage]
                     ) -> dict[tuple[str, str], tuple[Path, str]]:
    """{(name, version): (file, its sha512 SRI)} after checking size and sha256 of each."""
    out: dict[tuple[str, str], tuple[Path, str]] = {}
    for pkg in packages:
        base = PurePosixPath(pkg.tarball).name
        path = tarballs_dir / base
        ident = f"{pkg.name}@{pkg.version}"
        if base != PurePosixPath(pkg.tarball).name or "/" in base or base.startswith("."):
            raise InstallError(f"unsafe tarball path for {ident}: {pkg.tarball!r}")
        sha256, sha512, size = hashlib.sha256(), hashlib.sha512(), 0
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    sha256.update(chunk)
                    sha512.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise InstallError(f"the tarball of {ident} is missing: {path}",
                               hint="the bundle was not fully unpacked: install it again"
                               ) from None
        if size != pkg.size or sha256.hexdigest() != pkg.sha256:
            raise InstallError(f"the tarball of {ident} does not match the manifest: {path}",
                               hint="the staged files were changed after verification: "
                                    "install the bundle again")
        out[(pkg.name, pkg.version)] = (
            path, "sha512-" + base64.b64encode(sha512.digest()).decode())
    return out


def _load_lock(path: Path, data: bytes) -> dict[str, Any]:
    try:
        lock = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        lock = None
    if not isinstance(lock, dict) or not isinstance(lock.get("packages"), dict):
        raise InstallError(f"{path} is not a lockfileVersion 2/3 package-lock.json",
                           hint="the bundle's npm project is damaged: rebuild it")
    return lock


def _offline_lock(lock: Mapping[str, Any], files: Mapping[tuple[str, str], tuple[Path, str]]
                  ) -> dict[str, Any] | None:
    """The lock with what npm needs to take every entry from the cache; None if nothing to
    change."""
    patched = json.loads(json.dumps(lock))
    changed = False
    for key, entry in patched["packages"].items():
        if key == "" or not isinstance(entry, dict) or entry.get("link") \
                or entry.get("inBundle") or "node_modules/" not in key:
            continue
        version = entry.get("version")
        try:
            name = package_name(key, entry)
        except BuildError:
            continue
        if not isinstance(version, str):
            continue
        bundled = files.get((name, version))
        if bundled is not None:
            entry["resolved"] = f"file:{bundled[0].resolve()}"
            changed = True
        elif not entry.get("resolved"):
            base = name.rsplit("/", 1)[-1]
            entry["resolved"] = f"{OFFLINE_REGISTRY}{name}/-/{base}-{version}.tgz"
            changed = True
        integrity = entry.get("integrity")
        if bundled is not None and isinstance(integrity, str) \
                and "sha512" not in parse_sri(integrity):
            entry["integrity"] = bundled[1]  # the cache holds content under sha512
            changed = True
    return patched if changed else None


@contextlib.contextmanager
def _patched_lock(path: Path, original: bytes, patched: dict[str, Any] | None
                  ) -> Iterator[None]:
    if patched is None:
        yield
        return
    _atomic_write(path, (json.dumps(patched, indent=2) + "\n").encode())
    try:
        yield
    finally:
        _atomic_write(path, original)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lock-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_SCRIPT_PATH = re.compile(r"^npm error path (\S+)", re.M)
_SCRIPT_CMD = re.compile(r"^npm error command sh -c (.+)$", re.M)
_CODE = re.compile(r"^npm error code (\S+)", re.M)
# node's "Error: EACCES: permission denied, open 'x'", or (when only the tail of the output is
# left) the error object's "code: 'EACCES'" and "path: 'x'" lines
_DENIED = re.compile(r"\bEACCES: (.*)$|code: 'EACCES'", re.M)
_DENIED_PATH = re.compile(r"^\s*path: '([^']*)'", re.M)


def _explain(exc: CommandError, lock: Mapping[str, Any],
             user: proc.RunAs | None = None) -> InstallError:
    """One line saying what npm could not do, and how to fix it."""
    out = exc.message
    denied = _DENIED.search(out) if user is not None else None
    if user is not None and denied is not None:
        where = _DENIED_PATH.search(out)
        what = (f"EACCES: {denied.group(1).strip()}" if denied.group(1) else
                f"EACCES on {where.group(1)}" if where else "EACCES")
        script = _SCRIPT_CMD.search(out)
        return InstallError(
            f"npm ci --offline, run as user {user.name}, was denied writing: {what}"
            + (f" (install script: {script.group(1).strip()})" if script else ""),
            hint=f"npm and the install scripts run as {user.name}, which may write only "
                 "node_modules (the release's other files are root's): make the files a "
                 "script writes at build time (an `actions` step) and ship them")
    name = npm_not_cached(out, OFFLINE_REGISTRY)
    if name is not None:
        platform_pkg = any(
            isinstance(e, dict) and (e.get("os") or e.get("cpu") or e.get("libc"))
            and k.endswith(f"node_modules/{name}")
            for k, e in lock["packages"].items())
        hint = ("it is an optional package for another platform: build the bundle for this "
                "host's os/cpu/libc" if platform_pkg else
                "the bundle does not carry it: rebuild the bundle from the same "
                "package-lock.json")
        return InstallError(f"npm could not find {name} in the bundled packages", hint=hint)
    code = _CODE.search(out)
    script = _SCRIPT_CMD.search(out)
    where = _SCRIPT_PATH.search(out)
    if script and where:
        pkg = where.group(1).rsplit("node_modules/", 1)[-1]
        return InstallError(
            f"the install script of {pkg} failed offline: {script.group(1).strip()}",
            hint="`bundle build` warned about this package and named the fix: set the variables "
                 "it names for the install, or bundle what the script downloads")
    if code and code.group(1) == "EUSAGE" and "in sync" in out:
        return InstallError("package.json and package-lock.json in the bundle are out of sync",
                            hint="run `npm install --package-lock-only` and rebuild the bundle")
    return InstallError(
        f"npm ci --offline failed ({code.group(1) if code else 'see output'}): "
        f"{npm_last_error(out)}",
        hint="run `npm ci --offline` by hand in the release dir to see npm's full output")

