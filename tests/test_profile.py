from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bundler.build.profile import load_profile
from bundler.errors import ProfileError
from tests.helpers import bundle


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bundle.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_starter_profile_from_init_is_valid(tmp_path: Path) -> None:
    assert bundle("init", tmp_path).rc == 0
    (tmp_path / "app").mkdir()
    (tmp_path / "requirements.txt").write_text("")
    result = bundle("validate", tmp_path / "bundle.yaml", "--json")
    assert result.rc == 0, result.err
    assert json.loads(result.out)["name"] == "myapp"


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert bundle("init", tmp_path).rc == 0
    result = bundle("init", tmp_path)
    assert result.rc == ProfileError.exit_code
    assert "--force" in result.err


def test_demo_profile_is_valid() -> None:
    profile = load_profile(Path(__file__).parent.parent / "profiles" / "demo.yaml")
    assert profile.name == "demo"
    assert profile.runtime.services[0].name == "web"
    assert profile.runtime.health[0].interval_ms == 250


def test_three_mistakes_are_all_reported_with_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        schema: 1
        name: shop
        verison: 1.0.0
        files:
          - src: does-not-exist
            dest: app
        health:
          - name: web
            http: http://127.0.0.1:8000/health
            retries: many
        """)
    result = bundle("validate", path)
    assert result.rc == ProfileError.exit_code
    lines = [ln for ln in result.err.splitlines() if ln.startswith("  ")]
    assert any(":3: profile: unknown key 'verison'" in ln and "did you mean 'version'" in ln
               for ln in lines), result.err
    assert any(":1: profile: missing required key 'version'" in ln for ln in lines)
    assert any(":5: files[0].src: 'does-not-exist' does not exist" in ln for ln in lines)
    assert any(":10: health[0].retries must be a whole number" in ln for ln in lines)
    assert "error: profile has 4 problem(s)" in result.err
    assert "hint:" in result.err


def test_json_output_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        schema: 2
        name: Bad_Name
        version: 1.0.0
        """)
    result = bundle("validate", path, "--json")
    assert result.rc == ProfileError.exit_code
    doc = json.loads(result.out)
    assert doc["error"] == "ProfileError"
    assert [(p["line"], p["message"].split(":")[0]) for p in doc["problems"]] == [
        (1, "schema 2 is not supported"), (2, "name")]


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        schema: 1
        name: shop
        version: [1.0
        """)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    problem = info.value.problems[0]
    assert problem.message.startswith("broken YAML")
    assert problem.line == 4


def test_missing_profile_and_empty_profile(tmp_path: Path) -> None:
    result = bundle("validate", tmp_path / "nope.yaml")
    assert result.rc == ProfileError.exit_code and "profile not found" in result.err
    empty = write(tmp_path, "")
    result = bundle("validate", empty)
    assert result.rc == ProfileError.exit_code and "profile is empty" in result.err


def test_duplicate_keys_and_bad_types(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        schema: 1
        name: shop
        name: shop2
        version: 1.0.0
        target:
          python: 3.11.2
          platform: windows
        services:
          - name: web
            command: ["x"]
          - name: web
            command: ["y"]
          - name: cron
            command: ["z"]
            cwd: ../etc
        health:
          - name: web
            http: not-a-url
            interval: soon
        install:
          keep: 0
        """)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    got = {(p.line, p.message.split(" '")[0].split(":")[0]) for p in info.value.problems}
    assert (3, "profile") in got  # duplicate key
    assert (6, "target.python") in got
    assert (7, "target.platform") in got
    assert (15, "services[2].cwd") in got
    assert (18, "health[0].http") in got
    assert (19, "health[0].interval") in got
    assert (21, "install.keep must be at least 1, got 0") in got
    assert any("service 'web' appears twice" in p.message for p in info.value.problems)


def test_durations_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    path = write(tmp_path, """\
        schema: 1
        name: shop
        version: 2.0.0-rc.1
        expires: 90d
        files:
          - {src: app, dest: srv/app}
        health:
          - {name: web, http: "http://127.0.0.1:1/", timeout: 3s, interval: 1m}
        """)
    profile = load_profile(path)
    assert profile.expires_ms == 90 * 86_400_000
    assert profile.files[0].dest == "srv/app"
    check = profile.runtime.health[0]
    assert (check.timeout_ms, check.interval_ms, check.retries, check.expect_status) == (
        3000, 60_000, 30, 200)
    assert profile.target.python == "3.11" and profile.runtime.install.keep == 3


def test_runtime_cross_checks_are_reported(tmp_path: Path) -> None:
    """Where compose is needed but missing, and malformed tool versions, each with its line."""
    path = write(tmp_path, """\
        schema: 1
        name: shop
        version: 1.0.0
        target: {node: "eighteen", npm: ">=8"}
        database: {url: "${DATABASE_URL}", compose_service: db}
        migrations:
          - {name: schema, sql: db, service: backend}
          - {name: seed, command: [python, seed.py], service: backend, cwd: app}
        """)
    with pytest.raises(ProfileError) as info:
        load_profile(path, check_files=False)
    text = "\n".join(map(str, info.value.problems))
    assert ":4: target.node: 'eighteen' is not a version specifier" in text, text
    assert "database.compose_service names a compose service but the profile has no " \
           "`compose:`" in text
    assert ":7: migrations[0].service is for command migrations only" in text, text
    assert "a migration names a compose `service` but the profile has no `compose:`" in text
    assert ":8: migrations[1].cwd is for command migrations run on the host" in text, text


def test_node_and_service_migration_round_trip(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "docker-compose.yml").write_text("services: {}\n")
    path = write(tmp_path, """\
        schema: 1
        name: shop
        version: 1.0.0
        target: {node: ">=18", npm: ">=8,<11"}
        files: [{src: app, dest: app}]
        compose: {files: [app/docker-compose.yml]}
        database: {url: "${DATABASE_URL}", compose_service: db}
        migrations:
          - {name: schema, command: [python, -m, alembic, upgrade, head], service: backend}
          - {name: prisma, cwd: ./app/, command: [npx, prisma, migrate, deploy]}
        """)
    profile = load_profile(path)
    assert (profile.target.node, profile.target.npm) == (">=18", ">=8,<11")
    mig, prisma = profile.runtime.migrations
    assert mig.service == "backend" and prisma.path == "app" and prisma.service is None
    assert type(mig).from_json(mig.to_json()) == mig
    assert type(profile.target).from_json(profile.target.to_json()) == profile.target


@pytest.mark.parametrize("name", sorted(p.name for p in (
    Path(__file__).parent.parent / "profiles").glob("*.yaml")))
def test_committed_profiles_are_valid(name: str) -> None:
    """Every committed profile (the seeds' and the demo) stays valid as the schema moves;
    files are checked by the end-to-end tests that build them (some come from actions)."""
    path = Path(__file__).parent.parent / "profiles" / name
    profile = load_profile(path, check_files=False)
    assert profile.runtime.health, f"{name}: a profile without health checks"
