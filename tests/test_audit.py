"""`bundle audit` (bundler.install.audit, docs/audit.md) on a release laid out by hand: its
payload files (the signed manifest's digests), a venv and a node_modules with their reuse
records, a file only the audit record knows, a carried runtime's shared tree. Each kind of
drift is found by its path; what an app writes at run time is not drift; the records have
their modes; the signed report verifies with the host key and not with another. No engine,
no subprocess: milliseconds each (the engine side: tests/test_audit_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from bundler.bundle import auditreport
from bundler.bundle.manifest import FileEntry, Manifest, parse_manifest
from bundler.bundle.models import NpmProject, Runtime, Service, Target
from bundler.bundle.signing import load_public_key
from bundler.cli.main import cli
from bundler.errors import DriftFound, SignatureError, StateError
from bundler.install import audit, node_runtime, npm_env, python_env, receipts, reuse
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.state import ReleaseRow, State, now

SERVER = b"print('serving')\n"
VERSION = "1.0.0"


def _entry(path: str, data: bytes, kind: str = "file") -> FileEntry:
    return FileEntry(path, len(data), hashlib.sha256(data).hexdigest(), kind)


def _manifest() -> Manifest:
    return Manifest(name="shop", version=VERSION, sequence=1, created="2026-01-01T00:00:00Z",
                    target=Target(),
                    files=(_entry("files/app/server.py", SERVER),
                           _entry("npm/projects/web/package.json", b"{}\n", "npm"),
                           _entry("npm/projects/web/package-lock.json", b"{}\n", "npm")),
                    runtime=Runtime(services=(Service("web", ("sleep", "1")),)),
                    npm=(NpmProject("web", False, (), ()),))


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """Release 1.0.0, current, as an install leaves it just before its record is made."""
    layout = Layout(tmp_path / "root")
    data = _manifest().to_bytes()
    m = parse_manifest(data)
    rel = ReleaseDir(layout.release(VERSION))
    rel.meta.mkdir(parents=True)
    rel.manifest_file.write_bytes(data)
    _write(rel.files / "app" / "server.py", SERVER, 0o444)  # a payload: as the store links it
    for name in ("package.json", "package-lock.json"):
        _write(rel.path / "npm" / "projects" / "web" / name, b"{}\n", 0o444)
    _write(rel.files / "web" / "package.json", b"{}\n")  # copied by the npm step: no payload
    venv = rel.venv
    _write(venv / "lib" / "tinygreet" / "__init__.py", b"def greet(): return 'hi'\n")
    _write(venv / "lib" / "tinygreet" / "__pycache__" / "__init__.cpython-311.pyc", b"pyc")
    _write(venv / "bin" / "app", b"#!/bin/sh\n", 0o755)
    os.symlink("/usr/bin/python3", venv / "bin" / "python")
    reuse.scan(venv, "fp").write(python_env.record_path(rel.path))
    modules = rel.files / "web" / "node_modules"
    _write(modules / "left-pad" / "index.js", b"module.exports = 1\n")
    _write(modules / "left-pad" / "package.json", b"{}\n")
    reuse.scan(modules, "fp").write(npm_env.tree_record(rel.path, "web"))
    layout.switch(VERSION)
    state = State.open(layout.db)
    with state.tx():
        state.bind_product("shop")
        state.upsert_release(ReleaseRow(VERSION, "shop", 1, hashlib.sha256(data).hexdigest(),
                                        "k", "active", now(), txn="t0"))
    state.close()
    audit.record(rel, m, {})
    return layout


def rel_of(layout: Layout) -> ReleaseDir:
    return ReleaseDir(layout.release(VERSION))


def findings(layout: Layout) -> set[tuple[str, str]]:
    report = audit.run(layout, engine=False)
    return {(f.kind, f.path) for f in report.findings}


def test_a_fresh_release_has_no_drift(layout: Layout) -> None:
    report = audit.run(layout)
    assert report.clean, report.findings
    # every entry compared: payload, npm copy, venv (7 below its top), node_modules (4), bundle/
    assert report.files >= 15
    assert "no drift" in report.summary()


def test_the_record_is_written_0644_and_holds_no_payload_digest(layout: Layout) -> None:
    path = audit.record_path(rel_of(layout))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    doc = json.loads(path.read_bytes())
    entries = {e[0]: e for e in doc["entries"]}
    # the payload's digest lives in the signed manifest (one home per fact): mode only here
    assert entries["files/app/server.py"][1:4] == ["f", 0o444, ""]
    # what no manifest lists is hashed here
    assert entries["files/web/package.json"][3] == hashlib.sha256(b"{}\n").hexdigest()
    # the trees with a reuse record are not repeated: named, with their record
    assert doc["trees"] == {"files/web/node_modules": os.path.relpath(
        npm_env.tree_record(rel_of(layout).path, "web"), rel_of(layout).path),
        "venv": "bundle/venv.record.json"}
    assert not any(p.startswith(("venv/", "files/web/node_modules/")) for p in entries)


def test_a_modified_file_in_the_venv_is_found_by_path(layout: Layout) -> None:
    path = rel_of(layout).venv / "lib" / "tinygreet" / "__init__.py"
    path.write_bytes(b"def greet(): return 'pwned'\n")
    assert findings(layout) == {("changed", "venv/lib/tinygreet/__init__.py")}


def test_a_removed_file_in_a_node_modules_tree_is_found_by_path(layout: Layout) -> None:
    (rel_of(layout).files / "web" / "node_modules" / "left-pad" / "index.js").unlink()
    assert findings(layout) == {("removed", "files/web/node_modules/left-pad/index.js")}


def test_an_added_file_is_found_by_path(layout: Layout) -> None:
    _write(rel_of(layout).files / "app" / "backdoor.py", b"import os\n")
    _write(rel_of(layout).venv / "lib" / "evil.pth", b"import os\n")
    assert findings(layout) == {("added", "files/app/backdoor.py"), ("added", "venv/lib/evil.pth")}


def test_a_changed_mode_is_found_by_path(layout: Layout) -> None:
    (rel_of(layout).venv / "bin" / "app").chmod(0o777)
    (rel_of(layout).files / "app").chmod(0o777)
    assert findings(layout) == {("mode", "venv/bin/app"), ("mode", "files/app")}


def test_a_payload_is_compared_with_the_signed_manifest(layout: Layout) -> None:
    server = rel_of(layout).files / "app" / "server.py"
    server.chmod(0o644)
    server.write_bytes(b"print('changed')\n")
    server.chmod(0o444)
    assert findings(layout) == {("changed", "files/app/server.py")}


def test_a_changed_link_and_a_removed_directory(layout: Layout) -> None:
    link = rel_of(layout).venv / "bin" / "python"
    link.unlink()
    os.symlink("/tmp/python3", link)
    modules = rel_of(layout).files / "web" / "node_modules" / "left-pad"
    for child in modules.iterdir():
        child.unlink()
    modules.rmdir()
    # one finding for the directory, not one per file in it
    assert findings(layout) == {("changed", "venv/bin/python"),
                                ("removed", "files/web/node_modules/left-pad")}


def test_what_an_app_writes_at_run_time_is_not_drift(layout: Layout) -> None:
    rel = rel_of(layout)
    _write(rel.files / "app" / "__pycache__" / "server.cpython-311.pyc", b"bytecode")
    _write(rel.venv / "lib" / "tinygreet" / "__pycache__" / "__init__.cpython-311.opt-1.pyc",
           b"bytecode")
    _write(rel.files / "web" / "node_modules" / ".cache" / "babel" / "x.json", b"{}")
    _write(rel.logs / "web.log", b"started\n")
    _write(rel.run / "web.pid", b"42\n")
    _write(rel.files / "app" / ".env", b"SECRET=1\n")
    _write(rel.report_json, b"{}")
    _write(rel.path / "npm-cache" / "_cacache" / "index", b"x")
    assert findings(layout) == set()


def test_bytecode_bundler_compiled_is_still_compared(layout: Layout) -> None:
    pyc = rel_of(layout).venv / "lib" / "tinygreet" / "__pycache__" / "__init__.cpython-311.pyc"
    pyc.write_bytes(b"tampered bytecode")
    assert findings(layout) == {("changed", "venv/lib/tinygreet/__pycache__/"
                                            "__init__.cpython-311.pyc")}


def test_a_changed_manifest_is_drift_and_nothing_is_compared_with_it(layout: Layout) -> None:
    rel = rel_of(layout)
    data = rel.manifest_file.read_bytes()
    rel.manifest_file.write_bytes(data.replace(b'"1.0.0"', b'"1.0.1"'))
    assert ("changed", "bundle/manifest.json") in findings(layout)


def test_a_release_without_a_record_is_refused_with_a_hint(layout: Layout) -> None:
    audit.record_path(rel_of(layout)).unlink()
    with pytest.raises(StateError, match="no audit record") as info:
        audit.run(layout)
    assert info.value.exit_code == 14


def test_an_unknown_release_is_refused(layout: Layout) -> None:
    with pytest.raises(StateError, match="not installed"):
        audit.run(layout, "9.9.9")


def test_the_shared_runtime_is_compared_by_path(tmp_path: Path) -> None:
    """A sealed runtime tree's marker holds its entries; a changed file in it is named
    under runtime/node/."""
    top = tmp_path / "rt"
    _write(top / "bin" / "node", b"ELF", 0o755)
    node_runtime._seal(top)
    marker = {"key": "k", "digest": node_runtime._digest(top),
              "entries": [e.to_json() for e in reuse.scan(top, "k").entries]}
    (top / node_runtime.MARKER).write_text(json.dumps(marker))
    want = node_runtime.recorded_entries(top)
    assert want is not None and {e.path for e in want} == {".", "bin", "bin/node"}
    assert node_runtime.intact(top)
    (top / "bin").chmod(0o755)
    (top / "bin" / "node").chmod(0o755)
    (top / "bin" / "node").write_bytes(b"ELF evil")
    tally = audit._Tally()
    audit._compare_tree(top, "runtime/node/", {e.path: e for e in want if e.path != "."},
                        {node_runtime.MARKER}, frozenset(), tally, {})
    assert {(f.kind, f.path) for f in tally.findings} == {
        ("mode", "runtime/node/bin"), ("changed", "runtime/node/bin/node")}
    assert not node_runtime.intact(top)


# --- the command, and the signed report ------------------------------------------------------

def test_the_command_exits_25_with_one_line_and_json_lists_every_finding(
        layout: Layout, tmp_path: Path) -> None:
    runner = CliRunner()
    clean = runner.invoke(cli, ["audit", "--root", str(layout.root)])
    assert clean.exit_code == 0, clean.output
    assert "no drift" in clean.output
    _write(rel_of(layout).files / "app" / "a.py", b"")
    _write(rel_of(layout).files / "app" / "b.py", b"")
    found = runner.invoke(cli, ["audit", "--root", str(layout.root)])
    assert found.exit_code == DriftFound.exit_code == 25
    assert "error: shop 1.0.0: drift found (2 added); first: added files/app/a.py" \
        in found.output
    assert "hint: " in found.output
    as_json = runner.invoke(cli, ["audit", "--root", str(layout.root), "--json"])
    assert as_json.exit_code == 25
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False and doc["clean"] is False
    assert [(f["kind"], f["path"]) for f in doc["findings"]] == [
        ("added", "files/app/a.py"), ("added", "files/app/b.py")]


def test_the_signed_report_verifies_with_the_host_key_only(layout: Layout,
                                                            tmp_path: Path) -> None:
    _write(rel_of(layout).files / "app" / "a.py", b"")
    out = tmp_path / "audit.report"
    runner = CliRunner()
    made = runner.invoke(cli, ["audit", "--root", str(layout.root), "--report", str(out),
                               "--json"])
    assert made.exit_code == 25, made.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    checked = runner.invoke(cli, ["audit", "--verify-report", str(out), "--host-key",
                                  str(layout.host_pub), "--json"])
    assert checked.exit_code == 0, checked.output
    doc = json.loads(checked.stdout)
    assert doc["verified"] is True and doc["clean"] is False
    assert doc["findings"] == [{"kind": "added", "path": "files/app/a.py",
                                "detail": doc["findings"][0]["detail"]}]
    # another host's key, or a changed byte: refused (exit 2)
    other = Layout(tmp_path / "other")
    receipts.host_key(other)
    with pytest.raises(SignatureError, match="not trusted"):
        auditreport.verify(out.read_bytes(), load_public_key(other.host_pub))
    env = json.loads(out.read_bytes())
    env["payload"] = env["payload"][:-4] + ("AAAA" if env["payload"][-4:] != "AAAA" else "BBBB")
    with pytest.raises(SignatureError):
        auditreport.verify(json.dumps(env).encode(), load_public_key(layout.host_pub))
    refused = runner.invoke(cli, ["audit", "--verify-report", str(out), "--host-key",
                                  str(other.host_pub)])
    assert refused.exit_code == SignatureError.exit_code
