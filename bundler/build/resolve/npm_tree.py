"""Pre-build a project's node_modules once, here, when the tree cannot depend on the target.

Only when no package has an install script, none is os/cpu/libc-bound and the tree holds no
native code; cached by the inputs that decide the tree. The target then writes one verified
payload (bundler/bundle/nodetree.py) instead of `npm ci --offline`, or falls back to it.
See docs/design/bundle-format.md, "Pre-built node_modules".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bundler import proc, timeouts
from bundler.build.cache import Cache
from bundler.bundle import nodetree
from bundler.bundle.npmlock import NpmPackage, npm_env, npm_last_error, package_name
from bundler.errors import BuildError, CommandError

_FORMAT = "1"  # bump when what is packed changes: old cache entries are then ignored
_PROJECT_SCRIPTS = ("preinstall", "install", "postinstall", "preprepare", "prepare",
                    "postprepare")


def portable_reason(package_json: Mapping[str, Any], lock: Mapping[str, Any]) -> str | None:
    """Why the tree npm builds here might not be the target's; None when it cannot differ."""
    scripts = package_json.get("scripts")
    if isinstance(scripts, dict):
        own = sorted(s for s in _PROJECT_SCRIPTS if s in scripts)
        if own:
            return f"the project runs {', '.join(own)} scripts"
    for key, entry in lock.get("packages", {}).items():
        if key == "" or not isinstance(entry, dict):
            continue
        if entry.get("hasInstallScript"):
            return f"{key.rsplit('node_modules/', 1)[-1]} has an install script"
        if any(entry.get(f) for f in ("os", "cpu", "libc")):
            return f"{key.rsplit('node_modules/', 1)[-1]} is built for a particular platform"
    return None


def build(project: Path, packages: Sequence[NpmPackage], omit_dev: bool, cache: Cache,
          log: Callable[[str], None]) -> tuple[str, int] | None:
    """(sha256, size) of the cached node_modules payload, or None when the target must run
    `npm ci` itself (logged with the reason)."""
    pj_bytes = (project / "package.json").read_bytes()
    lock_bytes = (project / "package-lock.json").read_bytes()
    key = hashlib.sha256(json.dumps(
        [_FORMAT, hashlib.sha256(pj_bytes).hexdigest(), hashlib.sha256(lock_bytes).hexdigest(),
         omit_dev, sorted(p.sha256 for p in packages)]).encode()).hexdigest()
    memo = cache.root / "index" / "npm-tree" / f"{key}.json"
    if memo.is_file():
        known = json.loads(memo.read_text())
        if known.get("sha256") and cache.has(known["sha256"]):
            return str(known["sha256"]), int(known["size"])
        if known.get("skip"):
            log(f"npm: node_modules not pre-built ({known['skip']}): the target runs npm ci")
            return None
    reason = portable_reason(json.loads(pj_bytes), json.loads(lock_bytes))
    result = None if reason else _build(project, pj_bytes, lock_bytes, packages, omit_dev,
                                        cache, log)
    if isinstance(result, str):
        reason, result = result, None
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"sha256": result[0], "size": result[1]} if result
                               else {"skip": reason}))
    if reason:
        log(f"npm: node_modules not pre-built ({reason}): the target runs npm ci")
    return result


def _scratch(packages: Sequence[NpmPackage], cache: Cache) -> Path:
    """Where npm ci writes the tree: tmpfs when it has ample room (npm's time is creating
    files: measured here, 7-8.5 s on /dev/shm against 13.5 s on the disk, with 6.8 s of it in
    the kernel), else the cache's temp dir."""
    shm = Path("/dev/shm")
    need = 1024**3 + 20 * sum(p.size for p in packages)
    try:
        st = os.statvfs(shm)
        if shm.is_dir() and os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > need:
            return shm
    except OSError:
        pass
    cache.tmp.mkdir(parents=True, exist_ok=True)
    return cache.tmp


def _build(project: Path, pj_bytes: bytes, lock_bytes: bytes, packages: Sequence[NpmPackage],
           omit_dev: bool, cache: Cache, log: Callable[[str], None]
           ) -> tuple[str, int] | str:
    """npm ci from the cached tarballs in a scratch copy of the project, then pack."""
    lock = json.loads(lock_bytes)
    with tempfile.TemporaryDirectory(prefix="npm-tree-", dir=_scratch(packages, cache)) as tmp:
        # npm takes a `file:` spec for a tarball only by its extension: link the cached
        # objects under .tgz names.
        links = Path(tmp) / "tarballs"
        links.mkdir()
        tarball: dict[tuple[str, str], Path] = {}
        for p in packages:
            link = links / f"{p.sha256}.tgz"
            if not link.exists():
                link.symlink_to(cache.path(p.sha256))
            tarball[(p.name, p.version)] = link
        for key, entry in lock["packages"].items():
            if key == "" or not isinstance(entry, dict) or entry.get("inBundle"):
                continue
            found = tarball.get((package_name(key, entry), str(entry.get("version"))))
            if found is not None:
                entry["resolved"] = f"file:{found}"
        work = Path(tmp) / "project"
        work.mkdir()
        (work / "package.json").write_bytes(pj_bytes)
        (work / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
        # --ignore-scripts: there are none (checked), and none may run on the build machine.
        args = ["npm", "ci", "--offline", "--ignore-scripts", "--no-audit", "--no-fund",
                "--no-progress", "--cache", str(Path(tmp) / "npm-cache")]
        if omit_dev:
            args.append("--omit=dev")
        try:
            proc.run(args, cwd=work, env=npm_env(Path(tmp) / "home"), timeout=timeouts.PACKAGES,
                     what="npm ci (pre-building node_modules)")
        except CommandError as exc:
            raise BuildError(f"npm ci from the fetched tarballs failed: "
                             f"{npm_last_error(exc.message)}",
                             hint="run `npm ci` in the project to see npm's full output"
                             ) from None
        if not (work / nodetree.ROOT).is_dir():
            return "npm ci wrote no node_modules"
        try:
            with cache.writer() as sink:
                files = nodetree.pack(work, sink)  # type: ignore[arg-type]
        except nodetree.NotPortable as exc:
            return str(exc)
    log(f"npm: node_modules pre-built ({files} files, {sink.size / 1e6:.1f} MB compressed)")
    return sink.sha256, sink.size
