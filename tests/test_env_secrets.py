"""The operator's shared .env on the target: every value in it is a secret (unless plainly not
one, see bundler/redact.py), wherever bundler shows or stores it; a PATH in it never decides
which of bundler's own tools run; npm_config_* in any case never reaches npm."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import textwrap
from pathlib import Path

import pytest

from bundler import proc
from bundler.errors import MigrationError, RolledBackError
from bundler.install import fsowner
from bundler.redact import Secrets, is_secret_name, plainly_not_secret, redact
from tests.helpers import bundle, bundle_argv, offline, unavailable
from tests.pg_fixtures import PgCluster

# --- the rule (unit) ---------------------------------------------------------------------------


def test_password_names_are_secret_names() -> None:
    for name in ("SMTP_PASS", "DB_PASS", "PASS", "MYSQL_PWD", "DBPWD", "PGPASSWORD", "DB_PW",
                 "BASIC_AUTH", "PASSWORD_SALT", "SENTRY_DSN", "smtp_pass"):
        assert is_secret_name(name), name
    for name in ("PWD", "OLDPWD", "BYPASS_CACHE", "PASSENGER", "AUTHOR", "PORT", "APP_MODE"):
        assert not is_secret_name(name), name


@pytest.mark.parametrize("value", [
    "1", "on", "8080", "0.5", "1.2.3", "10.0.0.1", "30s", "512M", "true", "FALSE", "production",
    "staging", "INFO", "warning", "shop", "my-app", "db.internal", "/srv/app/data",
    "sqlite:////srv/app/app.db", "redis://cache:6379/0", "https://shop.example.com/"])
def test_plain_env_values_stay_readable(value: str) -> None:
    assert plainly_not_secret(value)
    secrets = Secrets()
    secrets.add_env_file({"APP_SETTING": value})
    assert secrets.values() == []
    assert redact(f"running {value} now", secrets.values()) == f"running {value} now"


@pytest.mark.parametrize("value", [
    "q8Xv2LpQ9rTz", "hunter2x", "Shop", "abcdefghijklmnop", "C.UTF-8", "s3cr3t-value",
    "https://hooks.example.com/services/T0/B0/XyZ", "postgresql://app@db/app?sslmode=require",
    "a b c d", "ops@example.com"])
def test_every_other_env_value_is_masked(value: str) -> None:
    assert not plainly_not_secret(value)
    secrets = Secrets()
    secrets.add_env_file({"APP_SETTING": value})
    assert value in secrets.values()
    assert value not in redact(f"running {value} now", secrets.values())


def test_a_secret_name_masks_even_a_plain_value() -> None:
    secrets = Secrets()
    secrets.add_env_file({"DB_PASS": "sunshine", "PIN_CODE": "1234", "SMTP_PASS": "1234"})
    assert secrets.values() == ["sunshine", "1234"]
    secrets = Secrets()  # not from the .env (a profile default): only secret names count
    secrets.add_env({"APP_CONFIG": "q8Xv2LpQ9rTz", "DB_PASS": "dbPass-5521y"})
    assert secrets.values() == ["dbPass-5521y"]


# --- npm_config_* in any case (npm reads them all alike) ---------------------------------------

def test_npm_config_is_stripped_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NPM_CONFIG_REGISTRY", "npm_config_registry", "Npm_Config_Registry",
                 "nPm_CoNfIg_script_shell"):
        monkeypatch.setenv(name, "http://evil.invalid/")
    monkeypatch.setenv("NPM_TOKEN_NOT_CONFIG", "kept")
    env = proc.clean_env()
    assert not [k for k in env if k.lower().startswith("npm_config_")]
    assert env["NPM_TOKEN_NOT_CONFIG"] == "kept"


# --- bundler's own tools on bundler's own PATH (unit) -------------------------------------------

def _fake_tool(bindir: Path, name: str, marker: Path) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\necho ran >> '{marker}'\necho 'fake {name} 99.0'\n")
    tool.chmod(0o755)


def test_a_path_in_the_child_env_never_picks_bundlers_tool(tmp_path: Path) -> None:
    marker = tmp_path / "fake-ran"
    _fake_tool(tmp_path / "bin", "true", marker)
    env = proc.clean_env({"PATH": f"{tmp_path / 'bin'}:{os.defpath}"})
    assert proc.run(["true"], env=env).returncode == 0
    assert not marker.exists()
    # the release's own command (a migration, a check) is looked up on its environment's PATH
    done = proc.run(["true"], env=env, release_command=True)
    assert done.output.strip() == "fake true 99.0" and marker.exists()


def test_own_path_ignores_relative_entries(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", f":.:bin:{tmp_path}:/usr/bin")
    assert proc.own_path() == f"{tmp_path}:/usr/bin"
    monkeypatch.setenv("PATH", "")
    assert proc.own_path() == os.defpath


# --- fsowner.own_tree never follows a symlink -------------------------------------------------

def test_own_tree_changes_links_not_their_targets(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("giving files to another account needs root")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("x")
    os.chmod(outside / "f", 0o666)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("y")
    os.chmod(tree / "sub" / "file", 0o4777)
    (tree / "link").symlink_to(outside)
    (tree / "sub" / "flink").symlink_to(outside / "f")
    fsowner.own_tree(tree, 65534, 65534)
    assert fsowner.foreign_entries(tree, 65534, 65534) == []
    fsowner.own_tree(tree, 0, 0, 0o755, owned_by=65534)
    assert fsowner.foreign_entries(tree, 0, 0, 0o755) == []
    assert stat.S_IMODE((tree / "sub" / "file").stat().st_mode) == 0o755
    st = (outside / "f").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o666)  # the target is untouched
    os.chown(outside / "f", 1, 1)  # not owned by the account: left alone, and named
    os.link(outside / "f", tree / "sub" / "hard")
    fsowner.own_tree(tree, 0, 0, 0o755, owned_by=65534)
    assert (outside / "f").stat().st_uid == 1
    assert fsowner.foreign_entries(tree, 0, 0, 0o755) == ["sub/hard"]


# --- end to end: a real install whose commands echo every secret ------------------------------

SECRETS = {"SMTP_PASS": "smtp-Pw-7781x", "DB_PASS": "dbPass-5521y", "MYSQL_PWD": "my-Pwd-3390z",
           "APP_CONFIG": "q8Xv2LpQ9rTz",  # named like nothing secret, and still one
           "CACHE_URL_PW": "cache-Pw-4410"}
ECHO = ('echo "smtp=$SMTP_PASS db=$DB_PASS mysql=$MYSQL_PWD config=$APP_CONFIG '
        'cache=$CACHE_URL mode=$APP_MODE port=$APP_PORT"')


def _profile(base: Path, version: str, migration: str, service: str) -> Path:
    alive = base / "root" / "data" / f"alive-{version}"  # the service got going
    (base / "conf").mkdir(exist_ok=True)
    (base / "conf" / "a.ini").write_text("x=1\n")
    path = base / f"app-{version}.yaml"
    path.write_text(textwrap.dedent(f"""\
        schema: 1
        name: leaky
        version: {version}
        sequence: {version[0]}
        files:
          - {{src: conf, dest: conf}}
        env:
          required: [DATABASE_URL, SMTP_PASS]
        database: {{url: '${{DATABASE_URL}}'}}
        migrations:
          - name: schema
            command: [sh, -c, '{migration}']
        services:
          - name: worker
            command: [sh, -c, '{service.format(alive=alive)}']
        health:
          - name: echo
            command: [sh, -c, '{ECHO}; test -f {alive}']
            timeout: 2s
            retries: 8
            interval: 250ms
        """))
    return path


def _scan(root: Path, texts: dict[str, str]) -> list[str]:
    """Where a secret shows: the given outputs, and every file under the root bundler wrote
    (the shared .env itself, the supervisor's 0600 run specs, which hand the environment to
    the service, and the services' own logs excepted)."""
    found = []
    for name, text in texts.items():
        found += [f"{key} in {name}" for key, v in SECRETS.items() if v in text]
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or path.is_symlink() or rel == "shared/.env" or (
                "/run/" in rel and rel.endswith(".json")) or rel.endswith("/logs/worker.log"):
            continue
        data = path.read_bytes()
        found += [f"{key} in {rel}" for key, v in SECRETS.items() if v.encode() in data]
    return found


@pytest.mark.netns
def test_every_env_secret_is_masked_everywhere_bundler_writes(
        tmp_path: Path, keys: tuple[Path, Path], roots: list[Path]) -> None:
    root = tmp_path / "root"
    roots.append(root)
    built = {}
    for version, migration, service in (
            ("1.0.0", f"{ECHO}; {ECHO} >&2", f"{ECHO}; touch {{alive}}; exec sleep 600"),
            # a migration that fails saying them all (stdout and stderr)
            ("2.0.0", f"{ECHO}; {ECHO} >&2; exit 3", "touch {alive}; exec sleep 600"),
            # a service that crashes saying them all: the health check fails
            ("3.0.0", "true", f"{ECHO} >&2; exit 1")):
        result = bundle("build", _profile(tmp_path, version, migration, service),
                        "--key", keys[0], "--out", tmp_path / "out",
                        "--cache-dir", tmp_path / "cache", "--json")
        assert result.rc == 0, result.err
        built[version] = json.loads(result.out)["bundle"]
    (root / "shared").mkdir(parents=True, mode=0o700)
    (root / "shared" / ".env").write_text(
        f"DATABASE_URL=sqlite:///{root}/data/app.db\n"
        + "".join(f"{k}={v}\n" for k, v in SECRETS.items() if k != "CACHE_URL_PW")
        + f"CACHE_URL='redis://:{SECRETS['CACHE_URL_PW']}@127.0.0.1:6379/0'\n"
        "APP_MODE=production\nAPP_PORT=8080\n")
    (root / "data").mkdir()
    trust = ["--trust", keys[1], "--root", root]
    runs = offline(
        bundle_argv("install", built["1.0.0"], *trust, "--json"),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("install", built["2.0.0"], *trust, "--json"),
        bundle_argv("install", built["2.0.0"], *trust),
        bundle_argv("install", built["3.0.0"], *trust, "--json"),
        bundle_argv("history", "--root", root, "--json"))
    first, status, failed_json, failed_text, crashed, history = runs
    assert first.rc == 0, first.err
    assert failed_json.rc == MigrationError.exit_code \
        and failed_text.rc == MigrationError.exit_code, failed_text.err
    assert crashed.rc == RolledBackError.exit_code, crashed.out + crashed.err
    assert history.rc == 0 and status.rc == 0, status.err
    texts = {f"run {i} {stream}": getattr(r, stream)
             for i, r in enumerate(runs) for stream in ("out", "err")}
    assert _scan(root, texts) == []
    # masked, not dropped: the outputs still say what happened, and the plain values stay
    checks = json.loads(first.out)["checks"]
    assert checks[0]["detail"] == ("exit 0: smtp=**** db=**** mysql=**** config=**** "
                                   "cache=redis://:****@127.0.0.1:6379/0 mode=production "
                                   "port=8080")
    assert json.loads(status.out)["checks"][0]["detail"] == checks[0]["detail"]
    assert "migration schema" in failed_text.err and "smtp=****" in failed_text.err
    assert "smtp=****" in (root / "releases" / "2.0.0" / "REPORT.md").read_text()
    events = json.loads(history.out)["events"]
    assert any("config=****" in e["detail"] for e in events), events
    db = sqlite3.connect(root / "state" / "state.db")
    stored = " ".join(str(row) for row in db.execute("SELECT * FROM events"))
    assert "mode=production" in stored and "smtp=****" in stored


# --- end to end: a PATH in the .env and PostgreSQL's client tools ------------------------------

PG_PROFILE = """\
schema: 1
name: pathy
version: {version}
sequence: {sequence}
files:
  - {{src: db, dest: db}}
env:
  required: [DATABASE_URL]
database: {{url: '${{DATABASE_URL}}'}}
migrations:
  - {{name: schema, sql: db}}
health:
  - name: tool
    command: [app-probe]
    timeout: 5s
    retries: 4
    interval: 250ms
"""


@pytest.mark.postgres
@pytest.mark.netns
@pytest.mark.slow
def test_a_path_in_the_env_does_not_choose_bundlers_database_tools(
        tmp_path: Path, keys: tuple[Path, Path], cluster: PgCluster) -> None:
    name = cluster.create_database()
    try:
        url = cluster.url(name)
        marker = tmp_path / "fake-tool-ran"
        fake = tmp_path / "fakebin"
        for tool in ("pg_dump", "pg_restore", "psql", "pg_dumpall"):
            _fake_tool(fake, tool, marker)
        # the release's own command is found on the operator's PATH, as before
        (fake / "app-probe").write_text(f"#!/bin/sh\necho probed >> '{tmp_path}/probed'\n")
        (fake / "app-probe").chmod(0o755)
        (tmp_path / "db").mkdir()
        (tmp_path / "db" / "001.sql").write_text("CREATE TABLE t (x int);\n")
        built = []
        for version, sql in (("1.0.0", None), ("2.0.0", "INSERT INTO t VALUES (1);\n"),
                             ("3.0.0", "INSERT INTO t VALUES (2);\nSELECT no_such();\n")):
            if sql:  # 2.0.0 backs up, 3.0.0 fails and restores (pg_restore, psql)
                (tmp_path / "db" / f"00{version[0]}.sql").write_text(sql)
            profile = tmp_path / f"p-{version}.yaml"
            profile.write_text(PG_PROFILE.format(version=version, sequence=version[0]))
            result = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                            "--cache-dir", tmp_path / "cache", "--json")
            assert result.rc == 0, result.err
            built.append(json.loads(result.out)["bundle"])
        root = tmp_path / "root"
        (root / "shared").mkdir(parents=True, mode=0o700)
        (root / "shared" / ".env").write_text(
            f"DATABASE_URL={url}\nPATH={fake}:/usr/local/bin:/usr/bin:/bin\n")
        first, second, third = offline(
            *(bundle_argv("install", b, "--trust", keys[1], "--root", root) for b in built))
        assert first.rc == 0, first.err
        assert second.rc == 0, second.err
        assert third.rc == MigrationError.exit_code, third.err
        assert "Restoring the database" in third.err
        assert not marker.exists(), marker.read_text()
        assert (tmp_path / "probed").read_text().count("probed") >= 2
        dumps = list((root / "backups").glob("*.pgdump"))
        assert len(dumps) >= 2 and all(d.read_bytes().startswith(b"PGDMP") for d in dumps)
        with cluster.connect(name) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        cluster.drop_database(name)


def test_compose_output_masks_the_env_files_values(tmp_path: Path) -> None:
    from bundler.install import compose_runtime as cr

    env_file = tmp_path / ".env"
    env_file.write_text("APP_CONFIG=q8Xv2LpQ9rTz\nAPP_MODE=production\nSMTP_PASS=sunshine\n")
    project = cr.ComposeProject("p1", (tmp_path / "compose.yaml",), tmp_path, env_file,
                                (("DB_PASS", "dbPass-5521y"), ("PLAIN", "q9Yw3MpR0sUa")))
    text = "q8Xv2LpQ9rTz production sunshine dbPass-5521y q9Yw3MpR0sUa"
    # the env file's values are the operator's .env; project.env (the release's own
    # environment, profile defaults included) counts secret names only
    assert cr._redact(project, text) == "**** production **** **** q9Yw3MpR0sUa"
