"""A Node stack end to end: npm packages from a registry on 127.0.0.1 are bundled, the build
is repeated with no network from the warm cache, and the install side (`npm ci --offline`,
a supervised `node` service, an HTTP health check) runs under `unshare -n`."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.errors import PolicyError
from tests.helpers import bundle, bundle_argv, free_port, offline, unavailable
from tests.npm_registry import LocalPackage, LocalRegistry, local_registry, make_project

pytestmark = pytest.mark.slow

SERVER_JS = textwrap.dedent("""\
    const http = require('http');
    const { greet } = require('tiny-greeter');
    http.createServer((req, res) => {
      res.writeHead(200, {'Content-Type': 'application/json'});
      res.end(JSON.stringify({greeting: greet(), node: process.version}));
    }).listen(Number(process.argv[2]), '127.0.0.1');
    """)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        unavailable("node and npm are not installed")
    packages = [LocalPackage("tiny-greeter", "1.2.0",
                             {"index.js": "exports.greet = () => 'hello from npm';\n"}),
                LocalPackage("tiny-devtool", "0.1.0")]
    with local_registry(tmp_path / "registry", packages) as reg:
        yield reg


def test_node_stack_builds_offline_from_cache_and_installs_offline(
        tmp_path: Path, registry: LocalRegistry, keys: tuple[Path, Path],
        roots: list[Path]) -> None:
    app = tmp_path / "app"
    backend = make_project(app / "backend", registry,
                           {"dependencies": {"tiny-greeter": "^1.2.0"},
                            "devDependencies": {"tiny-devtool": "0.1.0"}})
    (backend / "server.js").write_text(SERVER_JS)
    port = free_port()
    profile = app / "bundle.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: insights
        version: 1.0.0
        target: {{node: ">=18", npm: ">=8"}}
        npm:
          - project: backend
            registry: {registry.url}
        files:
          - {{src: backend, dest: backend, exclude: [node_modules]}}
        services:
          - name: api
            cwd: backend
            command: ["node", "server.js", "{port}"]
        health:
          - name: api
            http: http://127.0.0.1:{port}/health
            retries: 40
            interval: 250ms
        """))
    args = ["build", profile, "--key", keys[0], "--out", tmp_path / "out", "--cache-dir",
            tmp_path / "cache", "--json"]
    first = bundle(*args)
    assert first.rc == 0, first.err
    assert json.loads(first.out)["fetched"] == 1  # tiny-greeter; the dev tool is left out
    root = tmp_path / "target"
    roots.append(root)
    rebuilt, install, status = offline(
        bundle_argv(*args),
        bundle_argv("install", tmp_path / "out" / "insights-1.0.0.bundle", "--trust", keys[1],
                    "--root", root),
        bundle_argv("status", "--root", root, "--json"))
    assert rebuilt.rc == 0, rebuilt.err
    assert json.loads(rebuilt.out)["fetched"] == 0
    assert install.rc == 0, install.err
    st = json.loads(status.out)
    assert st["healthy"] is True, status.out
    modules = root / "releases/1.0.0/files/backend/node_modules"
    assert (modules / "tiny-greeter").is_dir() and not (modules / "tiny-devtool").exists()
    # No install scripts, nothing platform-bound: node_modules was pre-built at build time
    # and written from that one payload, not by npm ci (whose only trace is its hidden lock).
    assert "written from the bundle's pre-built tree (2 files)" in install.err
    assert not (modules / ".package-lock.json").exists()
    events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
    assert ("npm:backend", "done") in [(e["step"], e["status"]) for e in events]

    # A bundle for a newer Node than the host has: doctor says so, install refuses it before
    # creating anything (exit 8), and the running release is untouched.
    newer = app / "newer.yaml"
    newer.write_text(profile.read_text().replace("version: 1.0.0", "version: 1.0.1")
                     .replace('node: ">=18"', 'node: ">=999"'))
    built = bundle("build", newer, "--key", keys[0], "--out", tmp_path / "out", "--cache-dir",
                   tmp_path / "cache", "--sequence", "4000000000", "--json")  # newer, always
    assert built.rc == 0, built.err
    doctor, refused = offline(
        bundle_argv("doctor", json.loads(built.out)["bundle"], "--trust", keys[1], "--root",
                    root, "--json"),
        bundle_argv("install", json.loads(built.out)["bundle"], "--trust", keys[1], "--root",
                    root))
    rows = {r["check"]: r for r in json.loads(doctor.out)["checks"]}
    assert rows["node/npm"]["status"] == "fail" and "needs node >=999" in rows["node/npm"][
        "detail"], rows
    assert refused.rc == PolicyError.exit_code, refused.err
    assert "this bundle needs node >=999; this host has node" in refused.err
    assert not (root / "releases" / "1.0.1").exists()
