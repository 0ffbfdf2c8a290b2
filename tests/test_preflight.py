"""What can only fail on the target is caught before anything is created there: unset
variables anywhere in the manifest, placeholders, files a migration or a service needs, a port
another program holds; and a service that cannot start says why in the error line."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from bundler.errors import EnvError, PolicyError, ProfileError, RolledBackError, StateError
from tests.helpers import Project, bundle, bundle_argv, offline


def build(project: Project, keys: tuple[Path, Path], cache: Path, version: str, seq: int,
          extra: str = "") -> Path:
    result = bundle("build", project.profile(version, sequence=seq, extra=extra),
                    "--key", keys[0], "--out", project.dir / "dist", "--cache-dir", cache,
                    "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


def test_validate_refuses_what_only_the_target_would_find(project: Project) -> None:
    profile = project.profile("1.0.0", extra=textwrap.dedent("""\
        database:
          url: sqlite:///{root}/app.db
        migrations:
          - {name: schema, sql: db/migrations}
        """))
    text = profile.read_text().replace("cwd: app", "cwd: nowhere").replace(
        '"{venv}/bin/python"', '"{venvv}/bin/python"')
    profile.write_text(text)
    result = bundle("validate", profile, "--json")
    assert result.rc == ProfileError.exit_code, result.err
    messages = [p["message"] for p in json.loads(result.out)["problems"]]
    assert "migrations[0].sql: 'db/migrations' is not in the release's files" in messages
    assert "services[0].cwd: 'nowhere' is not in the release's files" in messages
    assert "unknown placeholder {venvv}" in messages


def test_an_unset_variable_anywhere_is_refused_before_anything_is_created(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path) -> None:
    bundle_path = build(project, keys, cache_dir, "1.0.0", 1, extra=textwrap.dedent("""\
        database:
          url: postgresql://app@/shop?host=${PGHOST_DIR}&port=${PGPORT_NUM}
        """))
    root = tmp_path / "target"
    result = bundle("install", bundle_path, "--trust", keys[1], "--root", root)
    assert result.rc == EnvError.exit_code, result.err
    assert "variable(s) used by shop 1.0.0 but not set: PGHOST_DIR, PGPORT_NUM" in result.err
    assert not root.exists()


@pytest.mark.slow
def test_a_port_held_by_another_program_is_named_and_refused(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    root = tmp_path / "target"
    roots.append(root)
    script = tmp_path / "holder.py"
    script.write_text("import socket, sys, time\ns = socket.socket()\n"
                      "s.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen()\ntime.sleep(120)\n")
    started, doctor, refused = offline(
        ["sh", "-c", f"{sys.executable} {script} {project.port} >/dev/null 2>&1 & sleep 1"],
        bundle_argv("doctor", v1, "--trust", keys[1], "--root", root,
                    "--json"),
        bundle_argv("install", v1, "--trust", keys[1], "--root", root))
    assert started.rc == 0, started.err
    rows = {r["check"]: r for r in json.loads(doctor.out)["checks"]}
    port_row = rows[f"port {project.port}"]
    assert port_row["status"] == "fail" and "held by pid" in port_row["detail"]
    assert "holder.py" in port_row["detail"]  # the holder's command line
    assert refused.rc == PolicyError.exit_code, refused.err
    assert f"port {project.port} (health check web) is held by pid" in refused.err
    assert not root.exists()


@pytest.mark.slow
def test_a_service_that_cannot_start_says_why_in_the_error_line(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    profile = project.profile("1.0.0", sequence=1)
    profile.write_text(profile.read_text().replace('"{venv}/bin/python"', '"{files}/app/nope"')
                       .replace("retries: 40", "retries: 8"))
    result = bundle("build", profile, "--key", keys[0], "--out", project.dir / "dist",
                    "--cache-dir", cache_dir, "--json")
    assert result.rc == 0, result.err
    root = tmp_path / "target"
    roots.append(root)
    (failed,) = offline(bundle_argv("install", json.loads(result.out)["bundle"],
                                    "--trust", keys[1], "--root", root))
    assert failed.rc == RolledBackError.exit_code, failed.err
    line = next(ln for ln in failed.err.splitlines() if ln.startswith("error:"))
    assert "health check 'web' failed" in line
    assert "service web could not start (cannot start" in line and "No such file" in line


@pytest.mark.slow
def test_a_release_manifest_changed_on_disk_is_not_acted_on(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    root = tmp_path / "target"
    roots.append(root)
    (installed,) = offline(bundle_argv("install", v1, "--trust", keys[1], "--root", root))
    assert installed.rc == 0, installed.err
    manifest = root / "releases" / "1.0.0" / "bundle" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b" ")  # still valid JSON, other bytes
    stopped, started = offline(bundle_argv("stop", "--root", root),
                               bundle_argv("start", "--root", root))
    assert stopped.rc == 0, stopped.err
    assert started.rc == StateError.exit_code, started.err
    assert "its manifest on disk differs from the one verified at install time" in started.err
