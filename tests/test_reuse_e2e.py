"""Reuse end to end (bundler.install.reuse): real builds, installs under `unshare -n`, real
uv venvs and a real pre-built node_modules. A release whose wheels (or tree) equal an installed
one's clones it (hard links); the clone equals a fresh install at the same path; a failed
release that wrote in place into its clone (so into every release sharing that file) leaves
the release it rolls back to as it was: that tree is installed again before it starts."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.errors import RolledBackError
from bundler.install import python_env, reuse
from tests.helpers import (
    REPO,
    SERVER_PY,
    Project,
    bundle,
    bundle_argv,
    free_port,
    make_wheel,
    offline,
    tree_digest,
    unavailable,
)
from tests.npm_registry import LocalPackage, LocalRegistry, local_registry, make_project

pytestmark = [pytest.mark.slow, pytest.mark.netns]

# An app that, before it fails, writes in place into a file of its venv (or node_modules):
# what a hard link shared with the previous release would carry over to it.
SCRIBBLE_PY = "import tinygreet\nopen(tinygreet.__file__, 'ab').write(b'# scribbled\\n')\n"


def _digest(path: Path, out: Path) -> list[str]:
    """argv that writes tree_digest(path) as JSON to `out` (run between installs)."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from pathlib import Path; from tests.helpers import tree_digest; "
            f"Path({str(out)!r}).write_text(json.dumps(tree_digest(Path({str(path)!r}))))")
    return [sys.executable, "-c", code]


def _now(path: Path) -> object:
    """tree_digest(path) as it reads back from JSON (lists for tuples)."""
    return json.loads(json.dumps(tree_digest(path)))


def _report(root: Path, version: str) -> list[dict[str, str]]:
    steps: list[dict[str, str]] = json.loads(
        (root / "releases" / version / "report.json").read_text())["steps"]
    return steps


def _steps(root: Path, version: str, step: str) -> dict[str, str]:
    return {s["status"]: s["detail"] for s in _report(root, version) if s["step"] == step}


def _build(project: Project, keys: tuple[Path, Path], cache: Path, version: str,
           app: str, **kw: object) -> Path:
    (project.dir / "app" / "server.py").write_text(app)
    profile = project.profile(version, **kw)  # type: ignore[arg-type]
    result = bundle("build", profile, "--key", keys[0], "--out", project.dir / "dist",
                    "--cache-dir", cache, "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


def test_same_wheels_reuse_the_venv_and_a_rollback_leaves_it_alone(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    v1 = _build(project, keys, cache_dir, "1.0.0", SERVER_PY, sequence=1)
    v2 = _build(project, keys, cache_dir, "1.1.0", "# app code changed\n" + SERVER_PY,
                sequence=2)
    v3 = _build(project, keys, cache_dir, "1.2.0", SCRIBBLE_PY + SERVER_PY, sequence=3,
                healthy=False)
    root = tmp_path / "target"
    roots.extend([root, tmp_path / "first"])
    trust = ["--trust", keys[1], "--root", root]
    venv1, venv2 = root / "releases/1.0.0/venv", root / "releases/1.1.0/venv"
    r1, r2, _, _, r3, _, back, stop = offline(
        bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust),
        _digest(venv1, tmp_path / "venv1.json"), _digest(venv2, tmp_path / "venv2.json"),
        bundle_argv("install", v3, *trust),
        _digest(venv1, tmp_path / "venv1-after.json"),
        bundle_argv("rollback", "--root", root, "--to", "1.0.0"),
        bundle_argv("stop", "--root", root))
    assert (r1.rc, r2.rc, back.rc, stop.rc) == (0, 0, 0, 0), r1.err + r2.err + back.err
    installed = _steps(root, "1.0.0", "python")["installed"]
    reused = _steps(root, "1.1.0", "python")["reused"]
    assert reused.startswith("reused the venv of release 1.0.0"), reused
    assert f"venv {reused}" in r2.err
    # 1.2.0 cloned 1.1.0's venv (the current one), wrote into it, failed: rolled back
    assert r3.rc == RolledBackError.exit_code, r3.err
    assert _steps(root, "1.2.0", "python")["reused"].startswith(
        "reused the venv of release 1.1.0")
    scribbled = next((root / "releases/1.2.0/venv").glob("lib/python*/site-packages/"
                                                         "tinygreet/__init__.py"))
    assert scribbled.read_text().endswith("# scribbled\n")
    # The three venvs share their files (hard links): the scribble reached 1.1.0's and
    # 1.0.0's too. The rollback installed 1.1.0's again before starting it; 1.0.0's was
    # installed again when `bundle rollback` returned to it.
    assert any(s["step"] == "rollback" and s["status"] == "repaired"
               and s["detail"].startswith("venv of 1.1.0: ") for s in _report(root, "1.2.0"))
    assert "installing it again from its wheels" in r3.err
    first = json.loads((tmp_path / "venv1.json").read_text())
    assert json.loads((tmp_path / "venv1-after.json").read_text()) != first  # shared, written
    assert "venv of 1.0.0: " in back.err and "installing it again" in back.err
    before = json.loads((tmp_path / "venv2.json").read_text())
    assert _now(venv2) == before
    assert _now(venv1) == first
    # the reused venv equals a fresh install of 1.1.0 at the same path
    shutil.move(root, tmp_path / "first")
    (fresh, stop) = offline(bundle_argv("install", v2, *trust),
                            bundle_argv("stop", "--root", root))
    assert fresh.rc == 0, fresh.err
    assert "installed" in _steps(root, "1.1.0", "python")
    assert _now(venv2) == before
    seconds = [float(re.search(r"in ([\d.]+) s", d)[1])  # type: ignore[index]
               for d in (installed, reused)]
    print(f"\nvenv: installed in {seconds[0]} s, reused in {seconds[1]} s")


def _wheel(project: Project, name: str, version: str, files: dict[str, str]) -> None:
    """`name` at `version` in the wheelhouse, and in requirements.txt instead of any other."""
    whl = make_wheel(project.wheelhouse, name, version, files)
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    reqs = project.dir / "requirements.txt"
    kept = [ln for ln in reqs.read_text().splitlines() if not ln.startswith(f"{name}==")]
    reqs.write_text("\n".join([*kept, f"{name}=={version} --hash=sha256:{sha}"]) + "\n")


GREET = "import tinygreet; print(tinygreet.greet())"


def test_one_changed_wheel_is_all_an_upgrade_installs_and_a_rollback_finds_the_old_one(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    _wheel(project, "helper", "1.0", {"helper/__init__.py": "H = 1\n",
                                      "helper/more.py": "M = 2\n"})
    v1 = _build(project, keys, cache_dir, "1.0.0", SERVER_PY, sequence=1)
    _wheel(project, "tinygreet", "1.1", {
        "tinygreet/__init__.py": "def greet():\n    return 'hello from 1.1'\n"})
    v2 = _build(project, keys, cache_dir, "1.1.0", SERVER_PY, sequence=2)
    # an added wheel that ships a file of the unchanged `helper`: never written through the
    # clone's hard link; 1.2.0's venv is installed from every wheel instead
    _wheel(project, "clash", "1.0", {"clash.py": "", "helper/more.py": "M = 'clash'\n"})
    v3 = _build(project, keys, cache_dir, "1.2.0", SERVER_PY, sequence=3)
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    venv1, venv2 = root / "releases/1.0.0/venv", root / "releases/1.1.0/venv"
    r1, _, r2, _, greet1, greet2, back, greet_back, r3, stop = offline(
        bundle_argv("install", v1, *trust), _digest(venv1, tmp_path / "venv1.json"),
        bundle_argv("install", v2, *trust), _digest(venv1, tmp_path / "venv1-after.json"),
        [venv1 / "bin/python", "-c", GREET], [venv2 / "bin/python", "-c", GREET],
        bundle_argv("rollback", "--root", root, "--to", "1.0.0"),
        [venv1 / "bin/python", "-c", GREET],
        bundle_argv("install", v3, *trust), bundle_argv("stop", "--root", root))
    assert (r1.rc, r2.rc, back.rc, r3.rc, stop.rc) == (0, 0, 0, 0, 0), \
        r1.err + r2.err + back.err + r3.err
    installed = _steps(root, "1.0.0", "python")["installed"]
    partly = _steps(root, "1.1.0", "python")["reused"]
    assert partly.startswith("reused the venv of release 1.0.0 except 1 changed distribution "
                             "(tinygreet 1.0 -> 1.1): "), partly
    assert "1 wheel(s) installed" in partly and f"venv {partly}" in r2.err
    assert (greet1.out, greet2.out, greet_back.out) == (
        "hello from a wheel\n", "hello from 1.1\n", "hello from a wheel\n")
    # 1.0.0's venv: as its record says, file for file, before and after 1.1.0 was installed
    assert json.loads((tmp_path / "venv1-after.json").read_text()) == \
        json.loads((tmp_path / "venv1.json").read_text())
    rec = reuse.Record.load(python_env.record_path(root / "releases/1.0.0"))
    assert rec is not None and reuse.shared_doubt(rec) is None
    assert "repaired" not in json.dumps(_report(root, "1.1.0"))
    # the collision: noted, and 1.2.0 installed from all its wheels, healthy
    assert "venv of 1.0.0 not partly reused (" in r3.err and "helper/more.py" in r3.err, r3.err
    assert "installed" in _steps(root, "1.2.0", "python")
    assert reuse.shared_doubt(rec) is None
    seconds = [float(re.search(r"in ([\d.]+) s", d)[1])  # type: ignore[index]
               for d in (installed, partly)]
    print(f"\nvenv: installed in {seconds[0]} s, partly reused in {seconds[1]} s")


SERVER_JS = textwrap.dedent("""\
    const http = require('http');
    const { greet } = require('tiny-greeter');
    http.createServer((req, res) => {
      res.writeHead(200, {'Content-Type': 'application/json'});
      res.end(JSON.stringify({greeting: greet()}));
    }).listen(Number(process.argv[2]), '127.0.0.1');
    """)
SCRIBBLE_JS = ("require('fs').appendFileSync(require.resolve('tiny-greeter'), '// scribbled\\n');"
               "\nprocess.exit(3);\n")


def _node_bundles(tmp_path: Path, keys: tuple[Path, Path], registry: LocalRegistry,
                  backend: Path, name: str, servers: list[str], check: str = "") -> list[Path]:
    """One bundle per server.js in `servers` (versions 1.0.0, 1.1.0, ...): the npm project
    `backend` run by node as the service `api`, health-checked over HTTP (`check`: more of
    the check's YAML, e.g. a json condition)."""
    port = free_port()
    bundles = []
    for n, server in enumerate(servers, 1):
        (backend / "server.js").write_text(server)
        profile = backend.parent / f"1.{n - 1}.0.yaml"
        profile.write_text(textwrap.dedent(f"""\
            schema: 1
            name: {name}
            version: 1.{n - 1}.0
            sequence: {n}
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
                retries: 20
                interval: 250ms
            """) + check)
        built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                       "--cache-dir", tmp_path / "cache", "--json")
        assert built.rc == 0, built.err
        bundles.append(Path(json.loads(built.out)["bundle"]))
    return bundles


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        unavailable("node and npm are not installed")
    packages = [LocalPackage("tiny-greeter", "1.2.0",
                             {"index.js": "exports.greet = () => 'hello from npm';\n"})]
    with local_registry(tmp_path / "registry", packages) as reg:
        yield reg


def test_the_same_prebuilt_tree_is_reused_and_a_rollback_leaves_it_alone(
        tmp_path: Path, registry: LocalRegistry, keys: tuple[Path, Path],
        roots: list[Path]) -> None:
    app = tmp_path / "app"
    backend = make_project(app / "backend", registry,
                           {"dependencies": {"tiny-greeter": "^1.2.0"}})
    bundles = _node_bundles(tmp_path, keys, registry, backend, "insights",
                            [SERVER_JS, "// changed\n" + SERVER_JS, SCRIBBLE_JS])
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    tree1 = root / "releases/1.0.0/files/backend/node_modules"
    tree2 = root / "releases/1.1.0/files/backend/node_modules"
    r1, r2, _, r3 = offline(*(bundle_argv("install", b, *trust) for b in bundles[:2]),
                            _digest(tree2, tmp_path / "tree2.json"),
                            bundle_argv("install", bundles[2], *trust))
    assert (r1.rc, r2.rc) == (0, 0), r1.err + r2.err
    assert "unpacked" in _steps(root, "1.0.0", "npm:backend")
    reused = _steps(root, "1.1.0", "npm:backend")["reused"]
    assert reused.startswith("reused the node_modules of release 1.0.0"), reused
    assert r3.rc == RolledBackError.exit_code, r3.err
    assert "reused" in _steps(root, "1.2.0", "npm:backend")
    scribbled = root / "releases/1.2.0/files/backend/node_modules/tiny-greeter/index.js"
    assert scribbled.read_text().endswith("// scribbled\n")
    before = json.loads((tmp_path / "tree2.json").read_text())
    assert _now(tree2) == before  # installed again before 1.1.0 started
    assert any(s["step"] == "rollback" and s["status"] == "repaired"
               and s["detail"].startswith("node_modules of 1.1.0 (backend): ")
               for s in _report(root, "1.2.0"))
    # 1.0.0's shares the file too: installed again when something returns to it (see the
    # venv's test)
    assert (tree1 / "tiny-greeter/index.js").read_text().endswith("// scribbled\n")


# A package whose install script writes a file into its own directory: the bundle cannot carry
# a pre-built tree for it, so the target runs `npm ci`.
SCRIPTED = LocalPackage(
    "tiny-greeter", "1.3.0",
    {"index.js": "exports.greet = () => require('fs').readFileSync("
                 "require('path').join(__dirname, 'built.txt'), 'utf8');\n",
     "build.js": "require('fs').writeFileSync(require('path').join(__dirname, 'built.txt'), "
                 "'hello from a postinstall');\n"},
    {"scripts": {"postinstall": "node build.js"}})


def test_the_same_npm_ci_tree_is_reused_and_equals_a_fresh_npm_ci(
        tmp_path: Path, keys: tuple[Path, Path], roots: list[Path]) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        unavailable("node and npm are not installed")
    with local_registry(tmp_path / "registry", [SCRIPTED]) as registry:
        backend = make_project(tmp_path / "app" / "backend", registry,
                               {"dependencies": {"tiny-greeter": "^1.3.0"}})
        bundles = _node_bundles(
            tmp_path, keys, registry, backend, "scripted",
            [SERVER_JS, "// changed\n" + SERVER_JS],
            "    json: {field: greeting, equals: hello from a postinstall}\n")
    reused_root, fresh_root = tmp_path / "reused", tmp_path / "fresh"
    roots.extend([reused_root, fresh_root])
    runs = offline(
        bundle_argv("install", bundles[0], "--trust", keys[1], "--root", reused_root),
        bundle_argv("install", bundles[1], "--trust", keys[1], "--root", reused_root),
        bundle_argv("stop", "--root", reused_root),
        bundle_argv("install", bundles[0], "--trust", keys[1], "--root", fresh_root),
        bundle_argv("install", bundles[1], "--trust", keys[1], "--root", fresh_root,
                    "--no-reuse"),
        bundle_argv("stop", "--root", fresh_root))
    assert all(r.rc == 0 for r in runs), [r.err for r in runs]
    assert _steps(reused_root, "1.0.0", "npm:backend")["installed"].startswith("npm ci")
    reused = _steps(reused_root, "1.1.0", "npm:backend")["reused"]
    assert reused.startswith("reused the node_modules of release 1.0.0 (same packages"), reused
    assert _steps(fresh_root, "1.1.0", "npm:backend")["installed"].startswith("npm ci")
    tree = "releases/1.1.0/files/backend/node_modules"
    assert (reused_root / tree / "tiny-greeter/built.txt").is_file()
    assert _now(reused_root / tree) == _now(fresh_root / tree)
