"""The profile's `user`: services, command migrations and command health checks run as an
unprivileged account; a missing account is refused before anything is created."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler import proc
from bundler.bundle.manifest import Manifest, parse_manifest
from bundler.bundle.models import Runtime, Service, Target
from bundler.errors import InstallError, PolicyError, ProfileError, SignatureError
from bundler.install import runas
from tests.helpers import bundle, bundle_argv, offline, unavailable


@pytest.fixture
def run_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway system account, removed afterwards."""
    if os.geteuid() != 0:
        unavailable("creating a system user needs root")
    name = f"bundler-test-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every account can reach (pytest's tmp_path is 0700: an unprivileged
    service could not even enter the install root below it)."""
    base = Path(tempfile.mkdtemp(prefix="bundler-runas-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    pids = []
    for pidfile in base.glob("root/releases/*/run/*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
    deadline = time.monotonic() + 15  # the supervisor stops its service before it exits
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    shutil.rmtree(base, ignore_errors=True)


def write_profile(base: Path, user: str, data: Path, root: Path) -> Path:
    app = base / "app"
    app.mkdir(parents=True, exist_ok=True)
    # The service records who it is in the release's logs/ (which must be writable by it),
    # then stays up.
    (app / "run.sh").write_text(textwrap.dedent("""\
        id -u > "$1/worker.uid"
        echo "$HOME" > "$1/worker.home"
        exec sleep 600
    """))
    logs = root / "releases" / "1.0.0" / "logs"
    profile = base / "bundle.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: runas
        version: 1.0.0
        user: {user}
        files:
          - src: app
            dest: app
        database:
          url: sqlite:///{data}/app.db
        migrations:
          - name: schema
            command: [sh, -c, "id -u > {data}/migration.uid && echo $HOME > {data}/migration.home"]
        services:
          - name: worker
            cwd: app
            command: [sh, run.sh, "{{release}}/logs"]
        health:
          - name: worker
            command: [sh, -c, "test -s {logs}/worker.uid && id -u > {data}/check.uid"]
            timeout: 2s
            retries: 40
            interval: 250ms
    """))
    return profile


def build(profile: Path, keys: tuple[Path, Path], out: Path) -> Path:
    result = bundle("build", profile, "--key", keys[0], "--out", out,
                    "--cache-dir", out / "cache", "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_service_migration_and_check_run_as_the_user(run_user: pwd.struct_passwd,
                                                      world: Path,
                                                      keys: tuple[Path, Path]) -> None:
    root, data = world / "root", world / "data"
    path = build(write_profile(world / "src", run_user.pw_name, data, root), keys,
                 world / "dist")
    (install,) = offline(bundle_argv("install", path, "--trust", keys[1], "--root", root))
    assert install.rc == 0, install.err
    uid, gid = str(run_user.pw_uid), run_user.pw_gid
    rel = root / "releases" / "1.0.0"
    # The command migration, the service and the command check each ran as the user, HOME
    # its home (not root's).
    assert (data / "migration.uid").read_text().strip() == uid
    assert (data / "migration.home").read_text().strip() == run_user.pw_dir
    assert (rel / "logs" / "worker.uid").read_text().strip() == uid
    assert (rel / "logs" / "worker.home").read_text().strip() == run_user.pw_dir
    assert (data / "check.uid").read_text().strip() == uid
    # The supervised process itself: real, effective, saved and fs uid, and its gid.
    supervisor = int((rel / "run" / "worker.pid").read_text().split()[0])
    assert _status(supervisor)["Uid"].split() == ["0"] * 4  # the supervisor stays root
    (child,) = _children(supervisor)
    assert _status(child)["Uid"].split() == [uid] * 4
    assert _status(child)["Gid"].split() == [str(gid)] * 4
    # What it may write is opened to its group (sticky); the rest stays root's, read-only.
    for d in (rel / "logs", rel / "run"):
        st = d.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o1775), d
    st = data.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o1770)
    # The database file is the account's own: bundler created it with the account's file
    # access (fsowner), never as root in a directory the account can write.
    db = (data / "app.db").stat()
    assert (db.st_uid, db.st_gid) == (int(uid), gid), db
    for p in (rel, rel / "files", rel / "files" / "app", rel / "files" / "app" / "run.sh",
              rel / "bundle" / "manifest.json"):
        st = p.lstat()
        assert st.st_uid == 0 and st.st_gid != gid and not st.st_mode & 0o022, p
    # The pidfiles and run specs are root's: the user cannot replace them (sticky run/).
    assert (rel / "run" / "worker.pid").stat().st_uid == 0
    # doctor shows the user
    doctor = bundle("doctor", "--root", root, "--json")
    rows = {r["check"]: r for r in json.loads(doctor.out)["checks"]}
    assert rows["user"]["status"] == "ok" and run_user.pw_name in rows["user"]["detail"]


@pytest.mark.slow
def test_missing_user_is_refused_before_anything_is_created(world: Path,
                                                            keys: tuple[Path, Path]) -> None:
    name = f"bundler-test-missing-{secrets.token_hex(3)}"
    root, data = world / "root", world / "data"
    path = build(write_profile(world / "src", name, data, root), keys, world / "dist")
    shown = bundle("inspect", path, "--trust", keys[1], "--json")
    assert shown.rc == 0 and json.loads(shown.out)["user"] == name, shown.err
    # a root that does not exist stays absent
    result = bundle("install", path, "--trust", keys[1], "--root", root)
    assert result.rc == PolicyError.exit_code, result.err
    assert f"error: the release runs as user {name}, which does not exist on this host" \
        in result.err.splitlines()
    assert f"hint: create it first: useradd --system {name}" in result.err.splitlines()
    assert not root.exists() and not data.exists()
    # a root that exists is left exactly as it was
    root.mkdir()
    (root / "keep.txt").write_text("x")
    before = sorted((p.relative_to(root), p.stat().st_mode) for p in root.rglob("*"))
    result = bundle("install", path, "--trust", keys[1], "--root", root)
    assert result.rc == PolicyError.exit_code, result.err
    assert sorted((p.relative_to(root), p.stat().st_mode) for p in root.rglob("*")) == before
    # bundle doctor names it too, with the hint
    doctor = bundle("doctor", path, "--trust", keys[1], "--root", root, "--json")
    row = {r["check"]: r for r in json.loads(doctor.out)["checks"]}["user"]
    assert row == {"check": "user", "status": "fail", "detail": (
        f"the release runs as user {name}, which does not exist on this host "
        f"(hint: create it first: useradd --system {name})")}


def test_invalid_user_names_fail_validate_with_file_and_line(tmp_path: Path) -> None:
    profile = tmp_path / "bundle.yaml"
    profile.write_text(textwrap.dedent("""\
        schema: 1
        name: app
        version: 1.0.0
        user: Bad User!
        services:
          - name: web
            command: [sleep, "1"]
            user: -root
          - name: other
            command: [sleep, "1"]
            usr: app
    """))
    result = bundle("validate", profile)
    assert result.rc == ProfileError.exit_code, result.err
    err = result.err
    assert f"{profile}:4: user: 'Bad User!' is not valid" in err
    assert f"{profile}:8: services[0].user: '-root' is not valid" in err
    assert "useradd --system NAME" in err
    assert f"{profile}:11: services[1]: unknown key 'usr'" in err and "did you mean 'user'" in err


def _manifest(runtime: Runtime) -> Manifest:
    return Manifest(name="app", version="1.0.0", sequence=1, created="2026-01-01T00:00:00Z",
                    target=Target(), files=(), runtime=runtime)


def test_manifest_carries_user_only_when_set() -> None:
    plain = _manifest(Runtime(services=(Service("web", ("sleep", "1")),)))
    assert b'"user"' not in plain.to_bytes()  # bundles without it stay byte-identical
    assert parse_manifest(plain.to_bytes()) == plain
    named = _manifest(Runtime(services=(Service("web", ("sleep", "1"), user="redis"),),
                              user="appuser"))
    back = parse_manifest(named.to_bytes())
    assert back.runtime.user == "appuser" and back.runtime.services[0].user == "redis"
    assert back.to_bytes() == named.to_bytes()
    for good, bad in ((b'"user":"appuser"', b'"user":"App User"'),
                      (b'"user":"redis"', b'"user":"../redis"'),
                      (b'"user":"redis"', b'"user":7')):
        forged = named.to_bytes().replace(good, bad)
        assert forged != named.to_bytes()
        with pytest.raises(SignatureError, match="is not a user name"):
            parse_manifest(forged)


def test_proc_run_as_user_sets_ids_groups_and_home(run_user: pwd.struct_passwd) -> None:
    user = proc.lookup_user(run_user.pw_name)
    assert user is not None
    out = proc.run(["sh", "-c", 'echo "$(id -u) $(id -g) $(id -G) $HOME $USER"'],
                   user=user).output.split()
    assert out[:2] == [str(run_user.pw_uid), str(run_user.pw_gid)]
    assert out[-2:] == [run_user.pw_dir, run_user.pw_name]
    assert "0" not in out[2:-2]  # root's supplementary groups are gone


def test_not_root_cannot_run_as_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(InstallError, match="cannot switch to it") as exc:
        runas.account("nobody")
    assert "run `bundle` as root" in exc.value.hint


def _owned_db(world: Path, user: pwd.struct_passwd) -> tuple[Path, proc.RunAs]:
    """A SQLite database as bundler lays it out for a run-as account: its directory
    root:<group> 1770, the file written by the account itself."""
    account = runas.account(user.pw_name)
    data = world / "data"
    data.mkdir()
    os.chown(data, 0, user.pw_gid)
    data.chmod(0o1770)
    path = data / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.execute("INSERT INTO t VALUES ('kept')")
        conn.commit()
    os.chown(path, user.pw_uid, user.pw_gid)
    assert path.stat().st_uid == user.pw_uid
    return path, account


def _rows(path: Path) -> list[tuple[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT x FROM t ORDER BY x").fetchall()


def test_sqlite_restore_never_writes_through_the_accounts_symlinks(
        run_user: pwd.struct_passwd, world: Path) -> None:
    """The account can write its database's directory: after the backup it swaps the database
    for a symlink to another product's database, which a root restore would overwrite with
    the backup's pages. bundler reads and writes that database with the account's own file
    access, so the restore fails instead, the other database untouched; with the account's
    own file back, the same restore works. (SQLite itself opens journals with O_NOFOLLOW.)"""
    from bundler.install import db as engines

    path, account = _owned_db(world, run_user)
    backups = world / "backups"
    db = engines.Database(f"sqlite:///{path}", owner=account)
    made = engines.backup(db, backups, {}, lambda _: None)
    assert made.path.stat().st_uid == 0 and stat.S_IMODE(made.path.stat().st_mode) == 0o600

    other = world / "other-product.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.execute("INSERT INTO t VALUES ('theirs')")
        conn.commit()
    other.chmod(0o644)
    path.rename(path.with_name("mine.db"))
    path.symlink_to(other)
    os.lchown(path, run_user.pw_uid, run_user.pw_gid)
    with pytest.raises(InstallError, match=r"SQLite restore of .* failed"):
        engines.restore(db, made, {}, lambda _: None)
    assert _rows(other) == [("theirs",)]

    path.unlink()
    path.with_name("mine.db").rename(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO t VALUES ('later')")
        conn.commit()
    engines.restore(db, made, {}, lambda _: None)
    assert _rows(path) == [("kept",)]
    assert not list(path.parent.glob(".app.db.bundler-*")), "side files are removed"


def test_sqlite_backup_of_a_symlink_to_roots_file_is_refused(
        run_user: pwd.struct_passwd, world: Path) -> None:
    """The account swaps its database for a symlink to a database only root can read: a root
    backup would copy those rows, and a later restore would hand them to the account."""
    from bundler.install import db as engines

    path, account = _owned_db(world, run_user)
    secret = world / "secret.db"
    with contextlib.closing(sqlite3.connect(secret)) as conn:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.execute("INSERT INTO t VALUES ('root only')")
        conn.commit()
    secret.chmod(0o600)
    path.unlink()
    path.symlink_to(secret)
    db = engines.Database(f"sqlite:///{path}", owner=account)
    with pytest.raises(InstallError, match=r"SQLite backup of .* failed"):
        engines.backup(db, world / "backups", {}, lambda _: None)
    assert not list((world / "backups").glob("*.sqlite")), "no backup holds root's rows"
    assert _rows(secret) == [("root only",)]
