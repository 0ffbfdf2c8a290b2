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
import platform
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from bundler import proc, timeouts, tools
from bundler.bundle import nodetree
from bundler.bundle.npmlock import (
    NpmPackage,
    npm_env,
    npm_last_error,
    npm_not_cached,
    package_name,
    parse_sri,
)
from bundler.errors import BuildError, CommandError, InstallError
from bundler.fsutil import CHUNK, sha256_file
from bundler.install import fsowner, node_runtime, reuse

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
    user = runs_as(user)
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


def runs_as(user: proc.RunAs | None) -> proc.RunAs | None:
    """The account npm runs as: None when bundler already runs as it (or is not root)."""
    if user is not None and not (user.switches and os.geteuid() == 0):
        return None
    return user


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



# --- reuse: a pre-built node_modules an installed release unpacked from the same payload -----

_TREE_FORMAT = 1  # bump when how a tree is unpacked changes (bundler.bundle.nodetree)


def tree_record(release: Path, dest: str) -> Path:
    """Where the record of project `dest`'s node_modules is kept in a release."""
    key = hashlib.sha256(dest.encode()).hexdigest()[:16]
    return release / "bundle" / f"node_modules-{key}.record.json"


def provide_tree(payload: Path, sha256: str, size: int, project_dir: Path, release: Path,
                 dest: str, releases: Sequence[Path], link: bool,
                 log: Callable[[str], None]) -> str:
    """`project_dir/node_modules` from the pre-built tree whose payload has `sha256`: cloned
    from the first of `releases` that unpacked the same payload and still holds exactly what
    it unpacked (a tree does not depend on where it is: nothing is rewritten), else unpacked
    (nodetree.extract). Its record is written either way; returns what was done."""
    fp = hashlib.sha256(f"bundler node_modules, format {_TREE_FORMAT}\n{sha256}\n".encode()
                        ).hexdigest()
    top = project_dir / nodetree.ROOT
    done = _clone_earlier(fp, top, release, dest, releases, link, log, "same pre-built tree")
    if done is not None:
        return done
    files = nodetree.extract(payload, sha256, size, project_dir)
    try:
        reuse.scan(top, fp).write(tree_record(release, dest))
    except reuse.Doubt as exc:
        log(f"npm: this node_modules cannot be reused by a later release: {exc}")
    return f"node_modules written from the bundle's pre-built tree ({files} files)"


def _clone_earlier(fp: str, top: Path, release: Path, dest: str, releases: Sequence[Path],
                   link: bool, log: Callable[[str], None], why: str
                   ) -> str | None:
    """`top` cloned from the first of `releases` whose record of a node_modules has this
    fingerprint and whose tree still is what the record says (absolute symlinks into that
    release pointed at this one); its record written. None: nothing reusable."""
    for old in releases:
        for path in sorted((old / "bundle").glob("node_modules-*.record.json")):
            rec = reuse.Record.load(path)
            if rec is None or rec.fingerprint != fp or not Path(rec.top).is_relative_to(old):
                continue
            try:
                done = reuse.clone(rec, top, fp, {}, link,
                                   relink=(f"{old}/", f"{release}/"))
            except reuse.Doubt as exc:
                log(f"npm: node_modules of {old.name} not reused ({exc}): installing it")
                continue
            done.record.write(tree_record(release, dest))
            how = (f"{done.linked} file(s) hard-linked, {done.copied} copied" if done.linked
                   else f"{done.copied} file(s) copied")
            return f"reused the node_modules of release {old.name} ({why}): {how}"
    return None


# --- reuse: a node_modules `npm ci` made in an installed release from the same inputs -------

_CI_FORMAT = 1  # bump when how `npm ci` is run changes (install_offline)


def ci_fingerprint(project_dir: Path, packages: Sequence[NpmPackage], omit_dev: bool,
                   env: Mapping[str, str], release: Path, user: proc.RunAs | None) -> str:
    """What an `npm ci` tree is made from: the project's package.json and lock (as the bundle
    ships them), every tarball's signed sha256, the options and the install scripts'
    environment, the npm and node that run (the carried runtime's tree, or the host's
    binaries as they are now), the account the scripts run as and the machine. The release's
    path is not in it: a tree naming its path is never recorded (`record_ci_tree`)."""
    h = hashlib.sha256(f"bundler npm ci, format {_CI_FORMAT}\n".encode())
    for name in ("package.json", "package-lock.json"):
        h.update(f"{name} {sha256_file(project_dir / name)[0]}\n".encode())
    for p in sorted(packages, key=lambda p: (p.name, p.version, p.sha256)):
        h.update(f"tarball {p.name}@{p.version} {p.sha256}\n".encode())
    h.update(json.dumps({"omit_dev": omit_dev, "env": sorted(env.items()),
                         "npm": _npm_identity(release),
                         "user": None if user is None else [user.name, user.uid, user.gid],
                         "machine": platform.machine()}).encode())
    return h.hexdigest()


def _npm_identity(release: Path) -> list[object]:
    """The carried runtime's shared tree (named by its key), else the host's node and npm
    files (a package upgrade changes their inode, size or time)."""
    if node_runtime.npm_argv(release) is not None:
        return ["carried", os.path.basename(os.readlink(node_runtime.home(release)))]
    return ["host", tools.host_tool("node"), tools.host_tool("npm")]


def reuse_ci_tree(fp: str, project_dir: Path, release: Path, dest: str,
                  releases: Sequence[Path], link: bool,
                  log: Callable[[str], None]) -> str | None:
    """`project_dir/node_modules` cloned from an earlier release's `npm ci` tree made from the
    same inputs (`ci_fingerprint`), every file re-hashed against its record; None: run npm."""
    return _clone_earlier(fp, project_dir / nodetree.ROOT, release, dest, releases, link,
                          log, "same packages, npm and install scripts")


def outside_tree(project_dir: Path) -> dict[str, tuple[int, int, int]]:
    """What the project directory holds besides node_modules (path: mode, size, mtime; the
    lock, which install_offline rewrites and puts back, by size only): compared before and
    after `npm ci`, to see whether an install script wrote beside the tree."""
    out: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(project_dir):
        if dirpath == str(project_dir):
            dirnames[:] = [d for d in dirnames if d != nodetree.ROOT]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, project_dir)
            mtime = 0 if rel == "package-lock.json" or stat.S_ISDIR(st.st_mode) \
                else st.st_mtime_ns
            out[rel] = (st.st_mode, st.st_size, mtime)
    return out


def record_ci_tree(fp: str, project_dir: Path, release: Path, dest: str,
                   before: Mapping[str, tuple[int, int, int]], log: Callable[[str], None]
                   ) -> None:
    """Record the tree `npm ci` just made, for a later release to clone: only when nothing it
    holds names the release's path and nothing beside it changed (what its install scripts
    did is then all inside node_modules, and would be the same at another path)."""
    top = project_dir / nodetree.ROOT
    if not top.is_dir():
        return
    why = ""
    if outside_tree(project_dir) != before:
        why = "an install script wrote beside node_modules"
    else:
        try:
            rec = reuse.scan(top, fp, anchor=str(release))
        except reuse.Doubt as exc:
            why = str(exc)
        else:
            named = [e.path for e in rec.entries if e.holds_path]
            if named:
                why = f"{named[0]} names the release's path"
            else:
                rec.write(tree_record(release, dest))
                return
    log(f"npm: this node_modules cannot be reused by a later release: {why}")
