"""npm's install scripts are code from the bundle: with a release `user`, `npm ci` and the
packages' lifecycle scripts run as that account, never as root, and the tree they leave is
made root's and read-only to it, as the rest of the release is. npm settings in the caller's
environment, in any letter case, never reach npm."""

from __future__ import annotations

import json
import pwd
import shutil
import stat
import textwrap
from pathlib import Path

import pytest

from bundler.errors import InstallError
from bundler.install import fsowner
from tests.helpers import bundle, bundle_argv, free_port, offline, unavailable
from tests.npm_registry import LocalPackage, local_registry, make_project
from tests.test_run_as_user import run_user, world  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.netns]

# Records who ran it, and whether it could write into the project (root's) or over a file of
# the release; runs from the package's own directory (node_modules/tiny-whoami).
WHO_JS = textwrap.dedent("""\
    const fs = require('fs'), path = require('path');
    const tryWrite = (p) => { try { fs.writeFileSync(p, 'x'); return 'written'; }
                              catch (e) { return e.code; } };
    const project = process.env.INIT_CWD;
    fs.writeFileSync(path.join(__dirname, 'installed-by.json'), JSON.stringify({
      uid: process.getuid(), euid: process.geteuid(), gid: process.getgid(),
      ignore_scripts: process.env.npm_config_ignore_scripts || null,
      project: tryWrite(path.join(project, 'planted.js')),
      release_file: tryWrite(path.join(project, 'server.js')),
    }));
    """)
SERVER_JS = textwrap.dedent("""\
    const http = require('http');
    const who = require('tiny-whoami/installed-by.json');
    http.createServer((req, res) => { res.end(JSON.stringify(who)); })
      .listen(Number(process.argv[2]), '127.0.0.1');
    """)


def _build(base: Path, user: str, keys: tuple[Path, Path], **project: object) -> str:
    """A bundle whose npm project depends on tiny-whoami (`project`: more package.json)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        unavailable("node and npm are not installed")
    packages = [LocalPackage("tiny-whoami", "1.0.0", {"who.js": WHO_JS},
                             {"scripts": {"postinstall": "node who.js"}})]
    src = base / "src"
    with local_registry(base / "registry", packages) as registry:
        backend = make_project(src / "backend", registry,
                               {"dependencies": {"tiny-whoami": "1.0.0"}, **project})
        (backend / "server.js").write_text(SERVER_JS)
        port = free_port()
        profile = src / "bundle.yaml"
        profile.write_text(textwrap.dedent(f"""\
            schema: 1
            name: whoapp
            version: 1.0.0
            user: {user}
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
                http: http://127.0.0.1:{port}/
                retries: 40
                interval: 250ms
            """))
        built = bundle("build", profile, "--key", keys[0], "--out", base / "out",
                       "--cache-dir", base / "cache", "--json")
        assert built.rc == 0, built.err
    return str(json.loads(built.out)["bundle"])


def test_npm_install_scripts_run_as_the_release_user_and_the_tree_is_roots(
        run_user: pwd.struct_passwd, world: Path, keys: tuple[Path, Path],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    built = _build(world, run_user.pw_name, keys)
    root = world / "root"
    # npm reads its settings from the environment in any letter case: none of these may
    # reach the npm bundler runs (ignore-scripts would skip the script this test watches; a
    # registry would be contacted; a script shell would run instead of sh).
    monkeypatch.setenv("Npm_Config_Ignore_Scripts", "true")
    monkeypatch.setenv("NPM_CONFIG_SCRIPT_SHELL", str(world / "no-such-shell"))
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    install, status = offline(
        bundle_argv("install", built, "--trust", keys[1], "--root", root),
        bundle_argv("status", "--root", root, "--json"))
    assert install.rc == 0, install.err
    assert "npm ci --offline" in install.err  # the install script made npm run, not pre-built
    assert json.loads(status.out)["healthy"] is True, status.out
    rel = root / "releases" / "1.0.0"
    modules = rel / "files" / "backend" / "node_modules"
    who = json.loads((modules / "tiny-whoami" / "installed-by.json").read_text())
    uid, gid = run_user.pw_uid, run_user.pw_gid
    assert (who["uid"], who["euid"], who["gid"]) == (uid, uid, gid), who
    assert who["ignore_scripts"] is None, who
    # the project directory and the release's own files stayed root's while the script ran
    assert who["project"] == "EACCES" and who["release_file"] == "EACCES", who
    assert not (rel / "files" / "backend" / "planted.js").exists()
    # afterwards: node_modules and npm's cache are root's, not writable by the account
    for tree in (modules, rel / "npm-cache"):
        assert tree.is_dir()
        assert fsowner.foreign_entries(tree, 0, 0, 0o755) == [], tree
    st = (modules / "tiny-whoami" / "installed-by.json").stat()
    assert (st.st_uid, st.st_gid) == (0, 0) and not st.st_mode & 0o022
    st = (rel / "files" / "backend").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)


def test_a_project_script_writing_outside_node_modules_is_denied_and_named(
        run_user: pwd.struct_passwd, world: Path, keys: tuple[Path, Path]) -> None:  # noqa: F811
    # The project's own postinstall builds into the project directory, which is root's.
    built = _build(world, run_user.pw_name, keys, scripts={
        "postinstall": "node -e \"require('fs').writeFileSync('dist.js', '1')\""})
    root = world / "root"
    (install,) = offline(bundle_argv("install", built, "--trust", keys[1], "--root", root))
    # InstallError: rolled back before going live
    assert install.rc == InstallError.exit_code, install.err
    assert (f"npm ci --offline, run as user {run_user.pw_name}, was denied writing: EACCES "
            "on dist.js (install script: node -e") in install.err
    assert "an `actions` step" in install.err
    # whatever the failure left behind, the account owns nothing under the root
    mine = [p for p in root.rglob("*") if p.lstat().st_uid == run_user.pw_uid]
    assert mine == []
