"""The npm artifact kind: lock → verified tarballs in the cache (build side), and
`npm ci --offline` from those tarballs alone (target side, under `unshare -n`).

Real npm everywhere: the packages are made with `npm pack`, served by a local registry on
127.0.0.1 (tests/npm_registry.py), and the locks are written by `npm install
--package-lock-only` against it. Nothing here needs a public registry.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from bundler.build.cache import Cache
from bundler.build.resolve import npm as npmmod
from bundler.build.resolve import npm_tree
from bundler.build.resolve.npm import NpmFetched, NpmPackage, NpmSpec, fetch
from bundler.errors import BuildError
from tests.helpers import offline, unavailable
from tests.npm_registry import LocalPackage, LocalRegistry, local_registry, make_project

pytestmark = pytest.mark.slow


def _require_node() -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        unavailable("node and npm are not installed")


def _index(body: str) -> dict[str, str]:
    return {"index.js": textwrap.dedent(body)}


APP_PACKAGES = (
    LocalPackage("tiny-base", "1.0.0", _index("exports.base = () => 'base';\n")),
    LocalPackage("@acme/x", "1.2.0",
                 _index("exports.x = () => 'x+' + require('tiny-base').base();\n"),
                 {"dependencies": {"tiny-base": "^1.0.0"}}),
    LocalPackage("tiny-devtool", "0.1.0", _index("exports.dev = true;\n")),
    LocalPackage("tiny-darwin-only", "1.0.0", _index("exports.mac = true;\n"),
                 {"os": ["darwin"]}),
    LocalPackage("tiny-linux-x64", "1.0.0", _index("exports.native = 'linux-x64';\n"),
                 {"os": ["linux"], "cpu": ["x64"], "libc": ["glibc"]}),
    LocalPackage("tiny-linux-x64-musl", "1.0.0", _index("exports.native = 'musl';\n"),
                 {"os": ["linux"], "cpu": ["x64"], "libc": ["musl"]}),
)
APP_MANIFEST = {
    "dependencies": {"@acme/x": "^1.2.0"},
    "devDependencies": {"tiny-devtool": "0.1.0"},
    "optionalDependencies": {"tiny-darwin-only": "1.0.0", "tiny-linux-x64": "1.0.0",
                             "tiny-linux-x64-musl": "1.0.0"},
}
PRODUCTION = {("@acme/x", "1.2.0"), ("tiny-base", "1.0.0"), ("tiny-linux-x64", "1.0.0")}

# Named like packages whose install scripts download binaries; their scripts only print.
_SAY = {"say.js": "console.log('install script ran');\n"}
SCRIPT_PACKAGES = (
    LocalPackage("@prisma/engines", "5.0.0", _SAY,
                 {"scripts": {"postinstall": "node say.js"}}),
    LocalPackage("puppeteer", "22.0.0", _SAY, {"scripts": {"postinstall": "node say.js"}}),
    LocalPackage("esbuild", "0.20.0", _SAY,
                 {"scripts": {"postinstall": "node say.js"},
                  "optionalDependencies": {"@esbuild/linux-x64": "0.20.0",
                                           "@esbuild/darwin-arm64": "0.20.0"}}),
    LocalPackage("@esbuild/linux-x64", "0.20.0", fields={"os": ["linux"], "cpu": ["x64"]}),
    LocalPackage("@esbuild/darwin-arm64", "0.20.0",
                 fields={"os": ["darwin"], "cpu": ["arm64"]}),
    LocalPackage("tiny-native", "1.0.0", {"binding.gyp": "{}\n"},
                 {"scripts": {"install": "node-gyp rebuild"}}),
)
# An install script that needs the network unless told to skip (like PUPPETEER_SKIP_DOWNLOAD).
FETCHER = LocalPackage("tiny-fetcher", "1.0.0", {"fetch.js": textwrap.dedent("""\
    if (process.env.TINY_SKIP_DOWNLOAD === '1') process.exit(0);
    require('http').get('http://127.0.0.1:9/binary', () => process.exit(0))
      .on('error', (e) => { console.error('download failed: ' + e.message); process.exit(1); });
    """)}, {"scripts": {"postinstall": "node fetch.js"}})
SCRIPT_MANIFEST = {"dependencies": {"@prisma/engines": "5.0.0", "puppeteer": "22.0.0",
                                    "esbuild": "0.20.0", "tiny-native": "1.0.0"}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    _require_node()
    with local_registry(tmp_path_factory.mktemp("registry"),
                        (*APP_PACKAGES, *SCRIPT_PACKAGES, FETCHER)) as reg:
        yield reg


@pytest.fixture(scope="module")
def projects(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Path]:
    """Lock files made by real npm: without `resolved` (this machine's setting) and with."""
    base = tmp_path_factory.mktemp("projects")
    return {
        "no-resolved": make_project(base / "app", registry, APP_MANIFEST),
        "resolved": make_project(base / "app-resolved", registry, APP_MANIFEST, resolved=True),
        "scripts": make_project(base / "scripts", registry, SCRIPT_MANIFEST),
        "fetcher": make_project(base / "fetcher", registry,
                                {"dependencies": {"tiny-fetcher": "1.0.0"}}),
    }


def copy_project(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(src / name, dest / name)
    return dest


def lock_packages(project: Path) -> dict[str, Any]:
    packages: dict[str, Any] = json.loads(
        (project / "package-lock.json").read_text())["packages"]
    return packages


def sri(algo: str, data: bytes) -> str:
    return f"{algo}-{base64.b64encode(hashlib.new(algo, data).digest()).decode()}"


def do_fetch(project: Path, registry: LocalRegistry, cache: Path, **kw: Any) -> NpmFetched:
    lines: list[str] = []
    return fetch(NpmSpec(project, registry=registry.url, **kw), Cache(cache), lines.append)


# --- build side --------------------------------------------------------------------------

@pytest.mark.parametrize("lock", ["no-resolved", "resolved"])
def test_fetch_takes_exactly_the_production_packages_for_the_target(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path, lock: str) -> None:
    project = projects[lock]
    locked = lock_packages(project)
    assert all(("resolved" in e) == (lock == "resolved") for k, e in locked.items() if k)
    registry.clear_requests()
    fetched = do_fetch(project, registry, tmp_path / "cache")
    cache = Cache(tmp_path / "cache")

    assert {(p.name, p.version) for p in fetched.packages} == PRODUCTION
    for pkg in fetched.packages:
        data = cache.path(pkg.sha256).read_bytes()
        # the bytes in the cache are the ones the lock names: its sha512 integrity holds
        assert pkg.integrity == locked[f"node_modules/{pkg.name}"]["integrity"]
        assert sri("sha512", data) == pkg.integrity
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (pkg.sha256, pkg.size)
        assert data == registry.tarball(pkg.name, pkg.version)
    paths = {p.name: p.tarball for p in fetched.packages}
    assert paths == {"@acme/x": "npm/tarballs/@acme+x-1.2.0.tgz",
                     "tiny-base": "npm/tarballs/tiny-base-1.0.0.tgz",
                     "tiny-linux-x64": "npm/tarballs/tiny-linux-x64-1.0.0.tgz"}
    # dev, darwin-only and musl tarballs were never even requested
    assert sorted(registry.tarball_requests()) == [
        "/@acme/x/-/x-1.2.0.tgz", "/tiny-base/-/tiny-base-1.0.0.tgz",
        "/tiny-linux-x64/-/tiny-linux-x64-1.0.0.tgz"]
    assert fetched.warnings == ()
    for (sha, size), name in ((fetched.package_json, "package.json"),
                              (fetched.package_lock, "package-lock.json")):
        assert cache.path(sha).read_bytes() == (project / name).read_bytes()
        assert size == (project / name).stat().st_size


def test_dev_dependencies_come_along_when_asked_and_platform_follows_the_target(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    with_dev = do_fetch(projects["no-resolved"], registry, tmp_path / "c1", omit_dev=False)
    assert {p.name for p in with_dev.packages} == {n for n, _ in PRODUCTION} | {"tiny-devtool"}
    musl = do_fetch(projects["no-resolved"], registry, tmp_path / "c2", libc="musl")
    assert {p.name for p in musl.packages} == {"@acme/x", "tiny-base", "tiny-linux-x64-musl"}
    mac = do_fetch(projects["no-resolved"], registry, tmp_path / "c3", os="darwin",
                   cpu="arm64")
    assert {p.name for p in mac.packages} == {"@acme/x", "tiny-base", "tiny-darwin-only"}


def test_a_second_fetch_downloads_nothing(projects: dict[str, Path], registry: LocalRegistry,
                                          tmp_path: Path) -> None:
    first = do_fetch(projects["no-resolved"], registry, tmp_path / "cache")
    registry.clear_requests()
    again = do_fetch(projects["no-resolved"], registry, tmp_path / "cache")
    assert (first.downloaded, again.downloaded) == (3, 0)
    assert dataclasses.replace(again, downloaded=3) == first
    assert registry.tarball_requests() == []


@pytest.mark.parametrize(("name", "why"), [
    ("no-resolved", "tiny-darwin-only is built for a particular platform"),
    ("fetcher", "tiny-fetcher has an install script")])
def test_trees_that_depend_on_the_target_are_not_pre_built(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path, name: str,
        why: str) -> None:
    fetched = do_fetch(projects[name], registry, tmp_path / "cache")
    lines: list[str] = []
    assert npm_tree.build(projects[name], fetched.packages, True, Cache(tmp_path / "cache"),
                          lines.append) is None
    assert lines == [f"npm: node_modules not pre-built ({why}): the target runs npm ci"]


def test_tampered_tarball_is_refused_naming_the_package(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    # The registry now serves another real tarball under tiny-base's name and version.
    other = registry.tarball("tiny-devtool", "0.1.0")
    with registry.tampered("tiny-base", "1.0.0", other), pytest.raises(BuildError) as err:
        do_fetch(projects["no-resolved"], registry, tmp_path / "cache")
    assert "integrity mismatch for tiny-base@1.0.0" in err.value.message
    assert "\n" not in err.value.message and "tiny-base@1.0.0" in err.value.hint
    # the bad bytes never entered the cache
    bad = hashlib.sha256(other).hexdigest()
    assert not Cache(tmp_path / "cache").has(bad)


def test_a_busy_registry_is_retried_after_the_wait_it_asks_for(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    """503 with Retry-After: 2 once: the download waits those 2 s (urllib3's own backoff
    before a first retry is 0 s, so the gap shows the header was honoured), then succeeds
    over the same shared connection pool."""
    registry.request_times.clear()
    with registry.busy_once("tiny-base", "1.0.0", retry_after="2"):
        fetched = do_fetch(projects["no-resolved"], registry, tmp_path / "cache")
    assert {p.name for p in fetched.packages} == {n for n, _ in PRODUCTION}
    hits = [t for path, t in registry.request_times if path == "/tiny-base/-/tiny-base-1.0.0.tgz"]
    assert len(hits) == 2  # the 503, then the retry
    assert 2.0 <= hits[1] - hits[0] < 4.0
    data = Cache(tmp_path / "cache").path(
        next(p.sha256 for p in fetched.packages if p.name == "tiny-base")).read_bytes()
    assert data == registry.tarball("tiny-base", "1.0.0")


def test_package_missing_from_the_registry_is_named(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    with registry.withdrawn("tiny-base"), pytest.raises(BuildError) as err:
        do_fetch(projects["no-resolved"], registry, tmp_path / "cache")
    assert err.value.message.startswith("tiny-base is not in the registry")


def test_sha1_only_integrity_is_verified(projects: dict[str, Path], registry: LocalRegistry,
                                         tmp_path: Path) -> None:
    project = copy_project(projects["no-resolved"], tmp_path / "old")
    lock = json.loads((project / "package-lock.json").read_text())
    data = registry.tarball("tiny-base", "1.0.0")
    lock["packages"]["node_modules/tiny-base"]["integrity"] = sri("sha1", data)
    (project / "package-lock.json").write_text(json.dumps(lock))
    fetched = do_fetch(project, registry, tmp_path / "cache")
    assert {p.name: p.integrity for p in fetched.packages}["tiny-base"] == sri("sha1", data)
    with registry.tampered("tiny-base", "1.0.0", data + b"\0"), \
            pytest.raises(BuildError, match=re.escape("integrity mismatch for tiny-base@1.0.0")):
        do_fetch(project, registry, tmp_path / "cache2")


def test_install_scripts_that_download_binaries_are_warned_with_the_fix(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    project = projects["scripts"]
    locked = lock_packages(project)
    assert locked["node_modules/puppeteer"]["hasInstallScript"] is True
    fetched = do_fetch(project, registry, tmp_path / "cache")
    by_pkg = {w.split(" ", 1)[0]: w for w in fetched.warnings}
    assert sorted(by_pkg) == ["@prisma/engines@5.0.0", "puppeteer@22.0.0", "tiny-native@1.0.0"]
    assert "postinstall: `node say.js`" in by_pkg["puppeteer@22.0.0"]
    assert "PUPPETEER_SKIP_DOWNLOAD=1" in by_pkg["puppeteer@22.0.0"]
    assert "PUPPETEER_EXECUTABLE_PATH" in by_pkg["puppeteer@22.0.0"]
    prisma = by_pkg["@prisma/engines@5.0.0"]
    assert 'engineType = "client"' in prisma and 'engine: "js"' in prisma
    # a Prisma set-up bundler checked (resolve.prisma): its download attempts are harmless
    quiet = do_fetch(project, registry, tmp_path / "cache",
                     harmless_scripts=("@prisma/engines",))
    assert sorted(w.split(" ", 1)[0] for w in quiet.warnings) == [
        "puppeteer@22.0.0", "tiny-native@1.0.0"]
    assert "node-gyp rebuild" in by_pkg["tiny-native@1.0.0"]
    # esbuild's binary comes as its optional @esbuild/linux-x64 package: carried, no warning
    assert ("@esbuild/linux-x64", "0.20.0") in {(p.name, p.version) for p in fetched.packages}
    # ...but a target with no platform package of its own gets the warning
    arm = do_fetch(project, registry, tmp_path / "cache", cpu="arm64")
    assert any(w.startswith("esbuild@0.20.0 ") and "@esbuild/" in w for w in arm.warnings)


def test_missing_lock_is_a_build_error_with_the_command_to_make_one(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text('{"name": "x", "version": "1.0.0"}')
    with pytest.raises(BuildError) as err:
        fetch(NpmSpec(tmp_path, registry="http://127.0.0.1:9/"), Cache(tmp_path / "c"),
              print)
    assert "has no package-lock.json" in err.value.message
    assert "npm install --package-lock-only" in err.value.hint


def _write_lock(project: Path, lock: dict[str, Any], manifest: dict[str, Any] | None = None
                ) -> Path:
    project.mkdir(parents=True, exist_ok=True)
    (project / "package.json").write_text(json.dumps(manifest or {"name": "p"}))
    (project / "package-lock.json").write_text(json.dumps(lock))
    return project


def test_lockfile_v1_asks_for_npm_7(tmp_path: Path) -> None:
    project = _write_lock(tmp_path / "p", {"name": "p", "lockfileVersion": 1,
                                           "dependencies": {}})
    with pytest.raises(BuildError) as err:
        fetch(NpmSpec(project, registry="http://127.0.0.1:9/"), Cache(tmp_path / "c"), print)
    assert "lockfileVersion 1" in err.value.message and "npm >= 7" in err.value.hint


def test_lock_out_of_sync_with_package_json(projects: dict[str, Path], registry: LocalRegistry,
                                            tmp_path: Path) -> None:
    project = copy_project(projects["no-resolved"], tmp_path / "p")
    manifest = json.loads((project / "package.json").read_text())
    manifest["dependencies"]["left-pad-ng"] = "^1.0.0"
    (project / "package.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="left-pad-ng is not in the lock"):
        do_fetch(project, registry, tmp_path / "cache")


def test_a_lock_npm_ci_would_refuse_fails_the_build_not_the_install(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    # npm sometimes writes locks that lack entries (other platforms' optional packages);
    # here a transitive dependency is gone. `npm ci` on the target would refuse the lock.
    project = copy_project(projects["no-resolved"], tmp_path / "p")
    lock = json.loads((project / "package-lock.json").read_text())
    del lock["packages"]["node_modules/tiny-base"]
    (project / "package-lock.json").write_text(json.dumps(lock))
    registry.clear_requests()
    with pytest.raises(BuildError) as err:
        do_fetch(project, registry, tmp_path / "cache")
    assert err.value.message.endswith("it lacks tiny-base, which npm would have to look up in "
                                      "the registry")
    assert "npm install" in err.value.hint
    assert registry.tarball_requests() == []  # refused before downloading anything


def test_npm_ci_accepting_a_lock_is_remembered_for_exactly_those_inputs(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm build does not ask npm again about a lock it accepted (about a second), but
    any change to what decides the answer asks again, and a refusal is never remembered."""
    asked: list[Path] = []
    real_run = npmmod.proc.run

    def run(args: Any, **kw: Any) -> Any:
        if "--dry-run" in args:
            asked.append(kw["cwd"])
        return real_run(args, **kw)

    monkeypatch.setattr(npmmod.proc, "run", run)
    project = copy_project(projects["no-resolved"], tmp_path / "p")
    cache = tmp_path / "cache"
    first = do_fetch(project, registry, cache)
    assert len(asked) == 1
    assert do_fetch(project, registry, cache) == dataclasses.replace(first, downloaded=0)
    assert len(asked) == 1
    do_fetch(project, registry, cache, omit_dev=False)  # another question
    assert len(asked) == 2
    lock = json.loads((project / "package-lock.json").read_text())
    del lock["packages"]["node_modules/tiny-base"]
    (project / "package-lock.json").write_text(json.dumps(lock))
    for n in (3, 4):
        with pytest.raises(BuildError, match="it lacks tiny-base"):
            do_fetch(project, registry, cache)
        assert len(asked) == n


@pytest.mark.parametrize("entry,what", [
    ({"resolved": "git+ssh://git@example.invalid/a.git#abc", "version": "1.0.0",
      "integrity": "sha512-AAAA"}, "not from a registry"),
    ({"link": True, "resolved": "packages/a"}, "local link"),
    ({"version": "1.0.0"}, "no usable integrity"),
])
def test_what_cannot_cross_the_gap_is_refused(tmp_path: Path, entry: dict[str, Any],
                                              what: str) -> None:
    project = _write_lock(tmp_path / "p", {"lockfileVersion": 3, "packages": {
        "": {"dependencies": {"a": "*"}}, "node_modules/a": entry}},
        {"name": "p", "dependencies": {"a": "*"}})
    with pytest.raises(BuildError, match=what):
        fetch(NpmSpec(project, registry="http://127.0.0.1:9/"), Cache(tmp_path / "c"), print)


def test_tarball_paths_are_flat_and_safe() -> None:
    assert npmmod.tarball_path("@acme/x", "1.2.0-rc.1+b5") == \
        "npm/tarballs/@acme+x-1.2.0-rc.1+b5.tgz"
    assert npmmod.tarball_path("Legacy~name!", "1.0.0") == \
        "npm/tarballs/Legacy=7Ename=21-1.0.0.tgz"


@pytest.mark.parametrize("fields,ok", [
    ({}, True),
    ({"os": ["linux"], "cpu": ["x64"], "libc": ["glibc"]}, True),
    ({"os": ["darwin", "win32"]}, False),
    ({"os": ["!win32"]}, True),
    ({"os": ["!linux"]}, False),
    ({"cpu": "arm64"}, False),
    ({"libc": ["musl"]}, False),
    ({"os": ["any"]}, True),
])
def test_platform_rule_is_npms(fields: dict[str, Any], ok: bool) -> None:
    assert npmmod.platform_ok(fields, "linux", "x64", "glibc") is ok


# --- target side, with no network at all ---------------------------------------------------

DRIVER = textwrap.dedent('''\
    """Runs install_offline inside the network namespace; prints the error as JSON."""
    import json, sys
    from pathlib import Path
    from bundler.errors import BundlerError
    from bundler.install.npm_env import install_offline
    from bundler.build.resolve.npm import NpmPackage

    args = json.loads(sys.argv[1])
    try:
        install_offline(Path(args["project"]), Path(args["tarballs"]),
                        [NpmPackage(**p) for p in args["packages"]], Path(args["cache"]),
                        lambda line: print(line, file=sys.stderr),
                        omit_dev=args["omit_dev"], env=args["env"])
    except BundlerError as exc:
        print(json.dumps(exc.to_dict()))
        sys.exit(1)
    ''')
# Proves the namespace has no network: even the registry on the host's loopback is gone.
PROBE = ("import socket,sys\n"
         "try:\n socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)\n"
         "except OSError:\n sys.exit(0)\nsys.exit(1)\n")


def stage(fetched: NpmFetched, cache: Path, dest: Path) -> tuple[Path, Path]:
    """Lay out what a bundle would carry: the project files and the tarballs."""
    objects = Cache(cache)
    app, tarballs = dest / "app", dest / "tarballs"
    app.mkdir(parents=True)
    tarballs.mkdir()
    shutil.copyfile(objects.path(fetched.package_json[0]), app / "package.json")
    shutil.copyfile(objects.path(fetched.package_lock[0]), app / "package-lock.json")
    for pkg in fetched.packages:
        shutil.copyfile(objects.path(pkg.sha256), tarballs / Path(pkg.tarball).name)
    return app, tarballs


def install_argv(tmp_path: Path, app: Path, tarballs: Path,
                 packages: tuple[NpmPackage, ...] | list[NpmPackage],
                 env: dict[str, str] | None = None) -> list[str]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return [sys.executable, str(driver), json.dumps({
        "project": str(app), "tarballs": str(tarballs), "cache": str(tmp_path / "npm-cache"),
        "packages": [asdict(p) for p in packages], "omit_dev": True, "env": env})]


@pytest.mark.netns
@pytest.mark.parametrize("lock", ["no-resolved", "sha1-only"])
def test_offline_install_gives_working_node_modules(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path, lock: str) -> None:
    project = projects["no-resolved"]
    if lock == "sha1-only":  # a lock of very old packages: npm's cache keys on sha512
        project = copy_project(project, tmp_path / "old")
        data = lock_packages(project)
        for name in ("tiny-base", "@acme/x"):
            data[f"node_modules/{name}"]["integrity"] = sri(
                "sha1", registry.tarball(name, data[f"node_modules/{name}"]["version"]))
        (project / "package-lock.json").write_text(json.dumps(
            {**json.loads((project / "package-lock.json").read_text()), "packages": data}))
    fetched = do_fetch(project, registry, tmp_path / "cache")
    app, tarballs = stage(fetched, tmp_path / "cache", tmp_path / "target")
    lock_before = (app / "package-lock.json").read_bytes()
    check = ("const x = require('@acme/x'); const n = require('tiny-linux-x64');"
             "console.log(JSON.stringify([x.x(), n.native]))")
    probe, install, node = offline(
        [sys.executable, "-c", PROBE, str(registry.port)],
        install_argv(tmp_path, app, tarballs, fetched.packages),
        ["sh", "-c", f"cd '{app}' && node -e \"{check}\""],
    )
    assert probe.rc == 0, "the namespace reached the registry: it is not offline"
    assert install.rc == 0, install.out + install.err
    assert node.rc == 0, node.err
    assert json.loads(node.out) == ["x+base", "linux-x64"]
    installed = {p.name for p in (app / "node_modules").iterdir()}
    assert installed == {"@acme", "tiny-base", "tiny-linux-x64", ".package-lock.json"}
    assert (app / "package-lock.json").read_bytes() == lock_before  # put back as shipped


@pytest.mark.netns
def test_offline_install_names_what_the_bundle_lacks(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    fetched = do_fetch(projects["no-resolved"], registry, tmp_path / "cache")
    app, tarballs = stage(fetched, tmp_path / "cache", tmp_path / "target")
    partial = [p for p in fetched.packages if p.name != "tiny-base"]
    (install,) = offline(install_argv(tmp_path, app, tarballs, partial))
    assert install.rc == 1, install.out + install.err
    error = json.loads(install.out)
    assert error["error"] == "InstallError"
    assert error["message"] == "npm could not find tiny-base in the bundled packages"
    assert "rebuild the bundle" in error["hint"]
    assert not (app / "node_modules" / "tiny-base").exists()


@pytest.mark.netns
def test_an_install_script_that_needs_the_network_is_named_and_env_fixes_it(
        projects: dict[str, Path], registry: LocalRegistry, tmp_path: Path) -> None:
    fetched = do_fetch(projects["fetcher"], registry, tmp_path / "cache")
    (warning,) = fetched.warnings
    assert warning.startswith("tiny-fetcher@1.0.0 (postinstall: `node fetch.js`) runs on the "
                              "target during `npm ci`")
    app, tarballs = stage(fetched, tmp_path / "cache", tmp_path / "target")
    failed, fixed = offline(
        install_argv(tmp_path, app, tarballs, fetched.packages),
        install_argv(tmp_path, app, tarballs, fetched.packages, {"TINY_SKIP_DOWNLOAD": "1"}))
    assert failed.rc == 1, failed.out + failed.err
    error = json.loads(failed.out)
    assert error["message"] == ("the install script of tiny-fetcher failed offline: "
                                "node fetch.js")
    assert fixed.rc == 0, fixed.out + fixed.err
    assert (app / "node_modules" / "tiny-fetcher" / "fetch.js").is_file()
