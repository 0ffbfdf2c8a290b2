"""Reuse of an installed release's venv and pre-built node_modules (bundler.install.reuse):
real uv, real venvs, real bytecode; a clone must equal, file for file, a fresh install at the
same path."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import py_compile
import shutil
import stat
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from bundler import tools
from bundler.bundle.manifest import FileEntry, Manifest
from bundler.bundle.models import Target
from bundler.errors import InstallError
from bundler.install import npm_env, packages, python_env, reuse
from bundler.install.layout import Layout
from bundler.install.release import Release
from tests.helpers import make_wheel, tree_digest

LOCK = "python/requirements.lock"


def _wheels(base: Path, greeting: str = "hi") -> tuple[Path, Manifest]:
    """A wheel set with what depends on the venv's path: a console script (its #! line, and
    its RECORD row), bytecode, and a .pyc shipped in the wheel that is compiled again."""
    wheels = base / "wheels"
    make_wheel(wheels, "tinygreet", "1.0", {
        "tinygreet/__init__.py": f"def greet():\n    return {greeting!r}\n",
        "tinygreet/cli.py": "def main():\n    print('cli')\n",
        "tinygreet/__pycache__/cli.cpython-311.pyc": "shipped in the wheel\n",
        "tinygreet-1.0.dist-info/entry_points.txt":
            "[console_scripts]\ntinygreet = tinygreet.cli:main\n"})
    make_wheel(wheels, "other", "2.0", {"other/__init__.py": "X = 1\n"})
    lines, files = [], []
    for whl in sorted(wheels.iterdir()):
        sha = hashlib.sha256(whl.read_bytes()).hexdigest()
        name, version = whl.name.split("-")[:2]
        lines.append(f"{name}=={version} --hash=sha256:{sha}\n")
        files.append(FileEntry(f"python/wheels/{whl.name}", whl.stat().st_size, sha, "wheel"))
    lock = "".join(lines).encode()
    (base / "requirements.lock").write_bytes(lock)
    files.append(FileEntry(LOCK, len(lock), hashlib.sha256(lock).hexdigest(), "lock"))
    m = Manifest("shop", "1", 1, "", Target(python=f"{sys.version_info[0]}."
                                                   f"{sys.version_info[1]}"),
                 tuple(files), python_lock=LOCK)
    return base, m


def _release(root: Path, version: str, inputs: Path) -> Path:
    rel = root / "releases" / version
    for d in ("python", "bundle", "logs"):
        (rel / d).mkdir(parents=True)
    shutil.copytree(inputs / "wheels", rel / "python" / "wheels")
    shutil.copyfile(inputs / "requirements.lock", rel / LOCK)
    return rel


def _python() -> Path:
    return Path(getattr(sys, "_base_executable", sys.executable))


def _provide(rel: Path, m: Manifest, earlier: list[Path], link: bool = False
             ) -> python_env.Made:
    return python_env.provide(_python(), m, rel, earlier, link)


def test_a_reused_venv_equals_a_fresh_install_at_the_same_path(tmp_path: Path) -> None:
    inputs, m = _wheels(tmp_path / "in")
    root = tmp_path / "root"
    first = _release(root, "1.0", inputs)
    assert _provide(first, m, []).reused_from is None
    record = python_env.record_path(first)
    assert stat.S_IMODE(record.stat().st_mode) == 0o644
    version = "1.1"
    second = _release(root, version, inputs)
    made = _provide(second, m, [first])
    assert made.reused_from == "1.0", made
    assert "rewritten for the new path" in made.summary
    clone = tree_digest(second / "venv")
    run = [str(second / "venv" / "bin" / "tinygreet")]
    assert os.popen(" ".join(run)).read() == "cli\n"  # its #! names the new venv
    shutil.move(second, tmp_path / "clone")
    again = _release(root, version, inputs)
    assert _provide(again, m, []).reused_from is None  # no earlier release: installed
    assert tree_digest(again / "venv") == clone
    # the record of the clone says what a fresh install's does (bytecode hashes aside)
    got = reuse.Record.load(python_env.record_path(tmp_path / "clone"))
    want = reuse.Record.load(python_env.record_path(again))
    assert got is not None and want is not None
    assert got.fingerprint == want.fingerprint and got.anchor == want.anchor
    assert [e.path for e in got.entries] == [e.path for e in want.entries]
    # the first release's venv is as it was installed
    assert reuse.Record.load(record) == reuse.scan(first / "venv", got.fingerprint,
                                                   str(first))


def test_a_path_that_changes_the_scripts_form_installs_normally(tmp_path: Path) -> None:
    # a #! line over 127 bytes: uv writes a /bin/sh line that execs the python instead
    inputs, m = _wheels(tmp_path / "in")
    root = tmp_path / "root"
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    notes: list[str] = []
    second = _release(root, "1.1-" + "x" * 120, inputs)
    made = python_env.provide(_python(), m, second, [first], False, notes.append)
    assert made.reused_from is None
    assert any("#! line takes another form" in n for n in notes), notes
    assert os.popen(str(second / "venv" / "bin" / "tinygreet")).read() == "cli\n"


def test_a_changed_wheel_is_installed_into_a_clone_of_the_rest(tmp_path: Path) -> None:
    # (the same version, other bytes: the signed sha256 decides; tests/test_venv_delta.py)
    root = tmp_path / "root"
    inputs, m = _wheels(tmp_path / "in")
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    changed, m2 = _wheels(tmp_path / "in2", greeting="hello")
    second = _release(root, "1.1", changed)
    made = _provide(second, m2, [first])
    assert made.reused_from == "1.0" and made.log is not None
    assert "except 1 changed distribution (tinygreet 1.0 -> 1.0)" in made.summary, made
    greet = "import tinygreet; print(tinygreet.greet())"
    assert os.popen(f"{second}/venv/bin/python -c '{greet}'").read() == "hello\n"
    assert os.popen(f"{first}/venv/bin/python -c '{greet}'").read() == "hi\n"


def test_a_tampered_file_defeats_reuse_and_does_not_propagate(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inputs, m = _wheels(tmp_path / "in")
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    module = next((first / "venv").glob("lib/python*/site-packages/tinygreet/__init__.py"))
    module.write_text("def greet():\n    return 'tampered'\n")
    notes: list[str] = []
    second = _release(root, "1.1", inputs)
    made = python_env.provide(_python(), m, second, [first], True, notes.append)
    assert made.reused_from is None
    assert any("not reused" in n and "tinygreet/__init__.py" in n for n in notes), notes
    fresh = next((second / "venv").glob("lib/python*/site-packages/tinygreet/__init__.py"))
    assert "return 'hi'" in fresh.read_text() and fresh.stat().st_nlink == 1
    assert not list(second.glob(".venv.cloning*")) and not list(second.glob("*.cloning"))


def test_what_an_app_wrote_into_the_venv_is_left_behind(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inputs, m = _wheels(tmp_path / "in")
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    pkg = next((first / "venv").glob("lib/python*/site-packages/other"))
    (pkg / "cache.json").write_text("{}")  # a package's own cache, bytecode of a test dir...
    (pkg / "tests").mkdir()
    second = _release(root, "1.1", inputs)
    assert _provide(second, m, [first]).reused_from == "1.0"
    clone = next((second / "venv").glob("lib/python*/site-packages/other"))
    assert sorted(p.name for p in clone.iterdir()) == ["__init__.py", "__pycache__"]


def test_hard_links_only_where_allowed_and_never_for_rewritten_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inputs, m = _wheels(tmp_path / "in")
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    linked = _release(root, "1.1", inputs)
    copied = _release(root, "1.2", inputs)
    assert "hard-linked" in _provide(linked, m, [first], link=True).summary
    assert "hard-linked" not in _provide(copied, m, [first], link=False).summary
    site = "lib/python{}.{}/site-packages".format(*sys.version_info[:2])
    src = f"{site}/tinygreet/__init__.py"
    assert os.path.samefile(first / "venv" / src, linked / "venv" / src)
    assert not os.path.samefile(first / "venv" / src, copied / "venv" / src)
    # what holds the path (scripts, RECORD) is a new file in every clone
    for rel in ("bin/tinygreet", f"{site}/tinygreet-1.0.dist-info/RECORD"):
        assert (linked / "venv" / rel).stat().st_nlink == 1, rel
    # bundler's bytecode names its sources relative to the venv: the same bytes anywhere,
    # linked (Python replaces a .pyc by renaming a new file, never writing in place)
    pyc = (f"{site}/tinygreet/__pycache__/__init__.cpython-"
           f"{sys.version_info[0]}{sys.version_info[1]}.pyc")
    assert os.path.samefile(first / "venv" / pyc, linked / "venv" / pyc)
    assert str(first).encode() not in (first / "venv" / pyc).read_bytes()
    # a copy keeps its source's mtime: the bytecode's header still matches it
    assert (copied / "venv" / src).stat().st_mtime_ns == (first / "venv" / src).stat(
        ).st_mtime_ns


def test_a_record_that_names_another_place_is_not_trusted(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inputs, m = _wheels(tmp_path / "in")
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    record = python_env.record_path(first)
    data = json.loads(record.read_text())
    data["top"] = str(tmp_path / "elsewhere" / "venv")
    record.write_text(json.dumps(data))
    second = _release(root, "1.1", inputs)
    assert _provide(second, m, [first]).reused_from is None


# --- bytecode --------------------------------------------------------------------------------

def _compiled(where: Path, source: str) -> bytes:
    where.mkdir(parents=True)
    (where / "mod.py").write_text(source)
    out = where / "mod.pyc"
    py_compile.compile(str(where / "mod.py"), cfile=str(out), doraise=True)
    return out.read_bytes()


@pytest.mark.parametrize("new_len", [10, 300])
def test_patched_bytecode_is_what_compiling_at_the_new_path_writes(tmp_path: Path,
                                                                  new_len: int) -> None:
    source = "def f():\n    def g():\n        return 1\n    return g\nclass C:\n    x = 2\n"
    old, new = tmp_path / "a", tmp_path.joinpath(*["b" * 9] * (new_len // 10))
    at_old, at_new = _compiled(old, source), _compiled(new, source)
    patched = python_env.patch_pyc(at_old, str(old), str(new))
    assert patched is not None
    assert patched[:8] + patched[12:] == at_new[:8] + at_new[12:]


def test_bytecode_with_the_path_outside_a_string_start_is_not_patched(tmp_path: Path) -> None:
    old = tmp_path / "a"
    data = _compiled(old, f"X = 'see {old}/mod.py'\n")
    assert python_env.patch_pyc(data, str(old), str(tmp_path / "b")) is None


# --- node_modules ------------------------------------------------------------------------------

def _tree_payload(base: Path) -> tuple[Path, str, int]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, data: bytes = b"", link: str = "",
                mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
            tar.addfile(info, io.BytesIO(data))
        add("node_modules", tarfile.DIRTYPE, mode=0o755)
        add("node_modules/left-pad", tarfile.DIRTYPE, mode=0o755)
        add("node_modules/left-pad/index.js", tarfile.REGTYPE, b"module.exports = 1;\n")
        add("node_modules/left-pad/cli.js", tarfile.REGTYPE, b"#!/usr/bin/env node\n",
            mode=0o755)
        add("node_modules/.bin", tarfile.DIRTYPE, mode=0o755)
        add("node_modules/.bin/left-pad", tarfile.SYMTYPE, link="../left-pad/cli.js")
    payload = base / "node_modules.tar.zst"
    base.mkdir(parents=True)
    payload.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    data = payload.read_bytes()
    return payload, hashlib.sha256(data).hexdigest(), len(data)


def _tree(rel: Path, payload: tuple[Path, str, int], earlier: list[Path],
          link: bool = False, notes: list[str] | None = None) -> str:
    project = rel / "files" / "web"
    project.mkdir(parents=True)
    (rel / "bundle").mkdir(exist_ok=True)
    return npm_env.provide_tree(*payload, project, rel, "web", earlier, link,
                                (notes if notes is not None else []).append)


def test_a_prebuilt_tree_is_cloned_and_equals_a_fresh_unpack(tmp_path: Path) -> None:
    payload = _tree_payload(tmp_path / "in")
    root = tmp_path / "root" / "releases"
    first, second, fresh = root / "1.0", root / "1.1", root / "1.2"
    assert _tree(first, payload, []).startswith("node_modules written")
    done = _tree(second, payload, [first], link=True)
    assert done.startswith("reused the node_modules of release 1.0"), done
    assert _tree(fresh, payload, []).startswith("node_modules written")
    tree = "files/web/node_modules"
    assert tree_digest(second / tree) == tree_digest(fresh / tree) == tree_digest(first / tree)
    assert os.path.samefile(first / tree / "left-pad/index.js", second / tree /
                            "left-pad/index.js")
    # tampered: unpacked again from the payload, and the tampering stays where it was
    (first / tree / "left-pad/index.js").write_text("evil\n")
    notes: list[str] = []
    third = root / "1.3"
    assert _tree(third, payload, [first], notes=notes).startswith("node_modules written")
    assert any("not reused" in n for n in notes), notes
    assert (third / tree / "left-pad/index.js").read_text() == "module.exports = 1;\n"


def test_a_different_tree_is_unpacked(tmp_path: Path) -> None:
    root = tmp_path / "root" / "releases"
    _tree(root / "1.0", _tree_payload(tmp_path / "in"), [])
    path, _, size = _tree_payload(tmp_path / "in2")
    other = (path, "0" * 64, size)  # another payload digest: no match (and extract refuses)
    with pytest.raises(Exception, match="does not match the manifest"):
        _tree(root / "1.1", other, [root / "1.0"])


@pytest.mark.slow
def test_a_venv_made_by_the_pip_fallback_is_reused_equal_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pip's venv names its path in pyvenv.cfg and its own scripts; pip writes its bytecode
    monkeypatch.setattr(tools, "find_uv", lambda: None)
    inputs, m = _wheels(tmp_path / "in")
    root = tmp_path / "root"
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    second = _release(root, "1.1", inputs)
    assert _provide(second, m, [first]).reused_from == "1.0"
    assert str(second / "venv") in (second / "venv" / "pyvenv.cfg").read_text()
    clone = tree_digest(second / "venv")
    shutil.move(second, tmp_path / "clone")
    again = _release(root, "1.1", inputs)
    assert _provide(again, m, []).reused_from is None
    assert tree_digest(again / "venv") == clone


def test_a_shared_file_written_in_place_is_found_and_its_tree_installed_again(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    inputs, m = _wheels(tmp_path / "in")
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    second = _release(root, "1.1", inputs)
    assert "hard-linked" in _provide(second, m, [first], link=True).summary
    record = reuse.Record.load(python_env.record_path(first))
    assert record is not None and reuse.shared_doubt(record) is None
    before = tree_digest(first / "venv")
    src = "lib/python{}.{}/site-packages/tinygreet/__init__.py".format(*sys.version_info[:2])
    with open(second / "venv" / src, "ab") as fh:  # 1.1 writes in place, as root may
        fh.write(b"# scribbled\n")
    assert (first / "venv" / src).read_bytes().endswith(b"# scribbled\n")
    why = reuse.shared_doubt(record)
    assert why is not None and src in why, why
    notes: list[str] = []
    release = Release.of(Layout(root), dataclasses.replace(m, version="1.0"), "production")
    fixed = packages.repair(release, notes.append)
    assert len(fixed) == 1 and fixed[0].startswith("venv of 1.0: ") and src in fixed[0]
    assert any("installing it again from its wheels" in n for n in notes), notes
    assert tree_digest(first / "venv") == before  # as its own install left it
    assert not os.path.samefile(first / "venv" / src, second / "venv" / src)
    # 1.1's file now has one link: what 1.1 wrote is its own, found when a release clones it
    assert packages.repair(release, notes.append) == []
    later = _release(root, "1.2", inputs)
    assert _provide(later, m, [second], link=True).reused_from is None


def test_a_written_shared_venv_with_no_python_left_is_refused_with_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    inputs, m = _wheels(tmp_path / "in")
    first = _release(root, "1.0", inputs)
    _provide(first, m, [])
    second = _release(root, "1.1", inputs)
    _provide(second, m, [first], link=True)
    src = "lib/python{}.{}/site-packages/tinygreet/__init__.py".format(*sys.version_info[:2])
    with open(second / "venv" / src, "ab") as fh:
        fh.write(b"# scribbled\n")
    monkeypatch.setattr(python_env, "find_python", lambda target: None)
    release = Release.of(Layout(root), dataclasses.replace(m, version="1.0"), "production")
    with pytest.raises(InstallError) as err:
        packages.repair(release, lambda _: None)
    assert err.value.message.startswith("the venv of 1.0 was changed (") and src in \
        err.value.message and "no Python" in err.value.message
    assert err.value.hint
    assert (first / "venv" / src).exists()  # nothing removed before the refusal


# --- npm ci trees (npm_env.ci_fingerprint / record_ci_tree / reuse_ci_tree) ------------------

def _ci_release(root: Path, version: str) -> tuple[Path, Path]:
    """A release's npm project before `npm ci`: its package files and the app."""
    rel = root / "releases" / version
    project = rel / "files" / "web"
    project.mkdir(parents=True)
    (rel / "bundle").mkdir(parents=True)
    (project / "package.json").write_text('{"name": "web"}\n')
    (project / "package-lock.json").write_text('{"lockfileVersion": 3}\n')
    (project / "server.js").write_text("// app\n")
    return rel, project


def _npm_ci(project: Path, script_out: str = "built\n") -> None:
    """What npm ci and one install script write (the test's stand-in for npm itself): a
    package, a file its script wrote (`script_out`), a relative .bin link."""
    tree = project / "node_modules"
    (tree / "left" / "build").mkdir(parents=True)
    (tree / ".bin").mkdir()
    (tree / "left" / "index.js").write_text("module.exports = 1;\n")
    (tree / "left" / "build" / "out.txt").write_text(script_out)
    os.symlink("../left/index.js", tree / ".bin" / "left")


_PKGS = [npm_env.NpmPackage("left", "1.0.0", "sha512-x", "npm/tarballs/left-1.0.0.tgz",
                            "a" * 64, 10)]


def _fp(project: Path, rel: Path, env: dict[str, str] | None = None) -> str:
    return npm_env.ci_fingerprint(project, _PKGS, True, env or {}, rel, None)


def test_an_npm_ci_tree_is_recorded_and_cloned_for_the_same_inputs(tmp_path: Path) -> None:
    notes: list[str] = []
    rel1, p1 = _ci_release(tmp_path, "1.0")
    before = npm_env.outside_tree(p1)
    _npm_ci(p1)
    fp1 = _fp(p1, rel1)
    npm_env.record_ci_tree(fp1, p1, rel1, "web", before, notes.append)
    assert npm_env.tree_record(rel1, "web").is_file(), notes
    rel2, p2 = _ci_release(tmp_path, "1.1")
    fp2 = _fp(p2, rel2)
    assert fp2 == fp1  # the release's path is not an input
    done = npm_env.reuse_ci_tree(fp2, p2, rel2, "web", [rel1], False, notes.append)
    assert done is not None and done.startswith("reused the node_modules of release 1.0"), notes
    assert tree_digest(p2 / "node_modules") == tree_digest(p1 / "node_modules")
    assert npm_env.tree_record(rel2, "web").is_file()  # the next release can clone this one
    # Other inputs (a variable for the install scripts): npm runs
    assert _fp(p2, rel2, {"SKIP": "1"}) != fp1
    rel3, p3 = _ci_release(tmp_path, "1.2")
    assert npm_env.reuse_ci_tree(_fp(p3, rel3, {"SKIP": "1"}), p3, rel3, "web", [rel1],
                                 False, notes.append) is None
    # A changed lock: another fingerprint
    (p3 / "package-lock.json").write_text('{"lockfileVersion": 3, "x": 1}\n')
    assert _fp(p3, rel3) != fp1


def test_a_tampered_npm_ci_tree_is_not_cloned(tmp_path: Path) -> None:
    notes: list[str] = []
    rel1, p1 = _ci_release(tmp_path, "1.0")
    before = npm_env.outside_tree(p1)
    _npm_ci(p1)
    npm_env.record_ci_tree(_fp(p1, rel1), p1, rel1, "web", before, notes.append)
    (p1 / "node_modules/left/build/out.txt").write_text("changed after the install\n")
    rel2, p2 = _ci_release(tmp_path, "1.1")
    assert npm_env.reuse_ci_tree(_fp(p2, rel2), p2, rel2, "web", [rel1], False,
                                 notes.append) is None
    assert any("not reused" in n for n in notes), notes
    assert not (p2 / "node_modules").exists()  # nothing half-cloned left for npm to meet


@pytest.mark.parametrize("how", ["names the path", "wrote beside"])
def test_an_npm_ci_tree_that_depends_on_its_place_is_never_recorded(
        tmp_path: Path, how: str) -> None:
    notes: list[str] = []
    rel1, p1 = _ci_release(tmp_path, "1.0")
    before = npm_env.outside_tree(p1)
    if how == "names the path":  # e.g. a script that wrote its absolute path into a config
        _npm_ci(p1, script_out=f"prefix={p1}/node_modules\n")
    else:  # a script (run as root, no `user`) that wrote into the project beside the tree
        _npm_ci(p1)
        (p1 / "generated.js").write_text("// by a postinstall\n")
    npm_env.record_ci_tree(_fp(p1, rel1), p1, rel1, "web", before, notes.append)
    assert not npm_env.tree_record(rel1, "web").exists()
    assert any("cannot be reused by a later release" in n for n in notes), notes
