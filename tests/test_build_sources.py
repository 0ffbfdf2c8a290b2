"""Files (directories, globs, excludes) and build-side actions, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from bundler.errors import BuildError, IntegrityError, ProfileError
from tests.helpers import bundle


def test_globs_excludes_and_action_outputs(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    (tmp_path / "migrations").mkdir()
    for name in ("001_init.sql", "002_users.sql", "README.md"):
        (tmp_path / "migrations" / name).write_text(f"-- {name}\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.ini").write_text("x=1\n")
    (tmp_path / "conf" / "app.ini.bak").write_text("old\n")
    (tmp_path / "build.sh").write_text("mkdir -p dist && echo \"built $BUILD_ID\" > dist/app.js\n")
    profile = tmp_path / "bundle.yaml"
    profile.write_text(textwrap.dedent("""\
        schema: 1
        name: site
        version: 1.0.0
        actions:
          - name: frontend
            run: ["sh", "build.sh"]
            env: {BUILD_ID: "42"}
        files:
          - {src: "migrations/*.sql", dest: db/migrations}
          - {src: conf, dest: conf, exclude: ["*.bak"]}
          - {src: dist, dest: web}
        """))
    (tmp_path / "dist").mkdir()  # validate checks the path; the action fills it
    result = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                    "--cache-dir", tmp_path / "cache", "--json")
    assert result.rc == 0, result.err
    info = json.loads(bundle("inspect", json.loads(result.out)["bundle"], "--trust", keys[1],
                             "--json").out)
    assert sorted(f["path"] for f in info["files"]) == [
        "files/conf/app.ini", "files/db/migrations/001_init.sql",
        "files/db/migrations/002_users.sql", "files/web/app.js", "sbom/bom.cdx.json"]


def test_failing_action_stops_the_build_with_its_output(tmp_path: Path,
                                                        keys: tuple[Path, Path]) -> None:
    profile = tmp_path / "bundle.yaml"
    profile.write_text(textwrap.dedent("""\
        schema: 1
        name: site
        version: 1.0.0
        actions:
          - name: frontend
            run: ["sh", "-c", "echo compiling; echo 'ERROR: missing module react' >&2; exit 3"]
        """))
    result = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                    "--cache-dir", tmp_path / "cache")
    assert result.rc == BuildError.exit_code
    assert "  | ERROR: missing module react" in result.err
    assert "error: action frontend failed (exit 3):" in result.err
    assert not (tmp_path / "out").exists()


def test_glob_matching_nothing_is_a_profile_error(tmp_path: Path) -> None:
    profile = tmp_path / "bundle.yaml"
    profile.write_text("schema: 1\nname: site\nversion: 1.0.0\nfiles:\n"
                       "  - {src: 'migrations/*.sql', dest: db}\n")
    result = bundle("validate", profile)
    assert result.rc == ProfileError.exit_code
    assert ":5: files[0].src: pattern 'migrations/*.sql' matches nothing" in result.err


@pytest.mark.parametrize(("a", "b"), [
    ("redis:7-alpine", "docker.io/library/redis:7-alpine"),
    ("postgres", "postgres:latest"),
    ("library/nginx:1.27", "nginx:1.27"),
    ("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest"),
    ("app@sha256:" + "a" * 64, "docker.io/library/app@sha256:" + "a" * 64),
])
def test_image_refs_compare_the_way_docker_reads_them(a: str, b: str) -> None:
    from bundler.bundle.imageref import canonical_ref

    assert canonical_ref(a) == canonical_ref(b)
    assert canonical_ref("redis:7") != canonical_ref("redis:6")


@pytest.mark.slow  # over 4 s (builds and runs bundles): out of the fast loop
def test_a_damaged_cache_object_fails_the_build_and_is_fetched_anew(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The packer hashes what it copies: a cached object whose bytes changed (same size, so
    no cheaper check sees it) fails the build with nothing written, and leaves the cache;
    the next build stores it again and succeeds."""
    data = b"server { listen 80; }\n" * 50
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "site.conf").write_bytes(data)
    profile = tmp_path / "bundle.yaml"
    profile.write_text("schema: 1\nname: site\nversion: 1.0.0\nfiles:\n"
                       "  - {src: conf, dest: conf}\n")
    args = ("build", profile, "--key", keys[0], "--out", tmp_path / "out",
            "--cache-dir", tmp_path / "cache")
    assert bundle(*args).rc == 0
    sha = hashlib.sha256(data).hexdigest()
    obj = tmp_path / "cache" / "objects" / sha[:2] / sha
    obj.chmod(0o644)
    obj.write_bytes(data.replace(b"80", b"81", 1))
    (tmp_path / "out" / "site-1.0.0.bundle").unlink()

    result = bundle(*args)
    assert result.rc == IntegrityError.exit_code, result.err
    assert f"error: {obj} (for files/conf/site.conf) does not hash to its sha256 {sha}" \
        in result.err
    assert "removed from the cache: build again" in result.err
    assert not obj.exists()
    assert list((tmp_path / "out").iterdir()) == []

    assert bundle(*args).rc == 0
    assert obj.read_bytes() == data
    verified = bundle("verify", tmp_path / "out" / "site-1.0.0.bundle", "--trust", keys[1])
    assert verified.rc == 0, verified.err
