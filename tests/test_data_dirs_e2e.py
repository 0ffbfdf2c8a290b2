"""Data directories end to end (issue 17 §4): a supervised service running as the release's
`user` writes its own files into `{data:uploads}`; they survive an upgrade and a rollback; a
migrating upgrade that fails (its migration, exit 17; its health, exit 12) or is killed
(`kill -9`, then `bundle recover`) puts the directory back exactly as it was, with the SQLite
database. The install side runs under `unshare -n`; the service is a real HTTP server."""

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
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.errors import InstallError, MigrationError, RolledBackError
from tests.helpers import Run, bundle, bundle_argv, free_port, offline, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PYTHON = "/usr/bin/python3"  # the host's, as a bare target has it

APP = textwrap.dedent("""\
    # Keeps each POSTed item as a file in its data directory (UPLOADS); 201 only once the
    # file is on disk. GET lists them.
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    port, data = int(sys.argv[1]), os.environ["UPLOADS"]
    items = os.path.join(data, "items")
    if os.environ.get("MARK_START"):  # a release that writes as it starts
        os.makedirs(items, exist_ok=True)
        open(os.path.join(items, "started-" + os.environ["APP_VERSION"]), "w").close()

    class H(BaseHTTPRequestHandler):
        def reply(self, code, doc):
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            names = sorted(os.listdir(items)) if os.path.isdir(items) else []
            ok = os.environ.get("APP_HEALTHY", "1") == "1"
            self.reply(200 if ok else 503, {"items": names, "uid": os.getuid(),
                                            "version": os.environ["APP_VERSION"]})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            name = self.path.strip("/")
            try:
                os.makedirs(items, exist_ok=True)
                with open(os.path.join(items, name), "wb") as fh:
                    fh.write(body)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                self.reply(500, {"error": str(exc)})
                return
            self.reply(201, {"stored": name})

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", port), H).serve_forever()
""")

CLIENT = textwrap.dedent("""\
    import sys, urllib.request
    url, data = sys.argv[1], (sys.argv[2].encode() if len(sys.argv) > 2 else None)
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            print(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode())
""")

# Everything a restore must reproduce, per entry: type, mode, owner, mtime (ns), content hash
# or link target; read independently of bundler's own digest. Prints JSON.
TREE = textwrap.dedent("""\
    import hashlib, json, os, stat, sys
    top = sys.argv[1]
    out = {}
    for dirpath, dirs, files in os.walk(top):  # never into a symlinked directory
        for p in [dirpath] + [os.path.join(dirpath, n) for n in dirs + files]:
            rel = os.path.relpath(p, top)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = "link " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(open(p, "rb").read()).hexdigest()
            else:
                what = "dir"
            out[rel] = [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, what]
    print(json.dumps(out, sort_keys=True))
""")


@pytest.fixture
def run_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        unavailable("creating a system user needs root")
    if not Path(PYTHON).exists():
        unavailable(f"{PYTHON} is missing")
    name = f"bundler-data-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every account can reach (the service runs as the release's user)."""
    base = Path(tempfile.mkdtemp(prefix="bundler-data-", dir="/tmp"))
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


class App:
    """The product's sources, its bundles, and commands to run inside the namespace."""

    def __init__(self, base: Path, user: str, keys: tuple[Path, Path]) -> None:
        self.base, self.user, self.keys = base, user, keys
        self.port = free_port()
        self.root = base / "root"
        self.src = base / "src"
        (self.src / "app" / "sql").mkdir(parents=True)
        (self.src / "app" / "server.py").write_text(APP)
        (base / "client.py").write_text(CLIENT)
        (base / "tree.py").write_text(TREE)
        self.sql("001_items.sql", "CREATE TABLE items (id int PRIMARY KEY);\n"
                                  "INSERT INTO items VALUES (1);\n")

    def sql(self, name: str, text: str) -> Path:
        path = self.src / "app" / "sql" / name
        path.write_text(text)
        return path

    def build(self, version: str, seq: int, healthy: bool = True, step: str = "",
              uploads: str = "uploads", database: bool = True, mark: bool = False) -> Path:
        """A bundle; `step`: a command migration (run as the user) after the SQL ones;
        `uploads`: its `data:` entry; `database`: with the SQLite database and migrations;
        `mark`: the service writes a file into its data directory as it starts."""
        migration = f"  - name: reshape\n    command: [sh, -c, '{step}']\n" if step else ""
        db = textwrap.dedent("""\
            database:
              url: sqlite:///{data:db}/app.db
            migrations:
              - {name: schema, sql: app/sql}
            """) + migration if database else ""
        profile = self.src / f"notes-{version}.yaml"
        profile.write_text(textwrap.dedent(f"""\
            schema: 1
            name: notes
            version: {version}
            sequence: {seq}
            user: {self.user}
            files:
              - src: app
                dest: app
            data:
              - {uploads}
              - {{name: db, backup: never}}
            """) + db + textwrap.dedent(f"""\
            services:
              - name: web
                cwd: app
                command: ["{PYTHON}", server.py, "{self.port}"]
                env:
                  UPLOADS: "{{data:uploads}}"
                  APP_VERSION: "{version}"
                  APP_HEALTHY: "{1 if healthy else 0}"
                  MARK_START: "{1 if mark else ''}"
            health:
              - name: web
                http: http://127.0.0.1:{self.port}/health
                timeout: 1s
                retries: {40 if healthy else 4}
                interval: 250ms
            """))
        result = bundle("build", profile, "--key", self.keys[0], "--out", self.base / "dist",
                        "--cache-dir", self.base / "cache", "--json")
        assert result.rc == 0, result.err
        return Path(json.loads(result.out)["bundle"])

    def install(self, path: Path) -> list[str]:
        return bundle_argv("install", path, "--trust", self.keys[1], "--root", self.root)

    def post(self, name: str, body: str) -> list[str]:
        return [sys.executable, str(self.base / "client.py"),
                f"http://127.0.0.1:{self.port}/{name}", body]

    def get(self) -> list[str]:
        return [sys.executable, str(self.base / "client.py"), f"http://127.0.0.1:{self.port}/"]

    def tree(self) -> list[str]:
        return [sys.executable, str(self.base / "tree.py"), str(self.uploads)]

    def digest(self) -> list[str]:
        return [sys.executable, "-c", "import sys; from pathlib import Path; "
                "from bundler.install import datadirs; from bundler.install.layout import "
                "Layout; print(datadirs.fingerprint(Layout(Path(sys.argv[1])), 'uploads'))",
                str(self.root)]

    @property
    def uploads(self) -> Path:
        return self.root / "data" / "uploads"

    def rows(self) -> list[int]:
        with sqlite3.connect(self.root / "data" / "db" / "app.db") as conn:
            return sorted(r[0] for r in conn.execute("SELECT id FROM items"))


def reply(run: Run) -> tuple[int, dict[str, object]]:
    assert run.rc == 0, run.err
    code, _, body = run.out.partition(" ")
    return int(code), json.loads(body)


# A migration that reshapes the data as the user would: removes, adds, changes a mode, plants
# a symlink to a root-only file (the restore must not follow it).
RESHAPE = ("rm {data:uploads}/items/a && echo changed > {data:uploads}/items/b && "
           "echo new > {data:uploads}/items/c && chmod 0700 {data:uploads}/items && "
           "ln -s /etc/shadow {data:uploads}/shadow && mkdir {data:uploads}/v2")


def test_the_service_writes_its_data_as_the_user_and_upgrades_keep_it(
        run_user: pwd.struct_passwd, world: Path, keys: tuple[Path, Path]) -> None:
    app = App(world, run_user.pw_name, keys)
    v1 = app.build("1.0.0", 1)
    app.sql("002_more.sql", "INSERT INTO items VALUES (2);\n")
    v2 = app.build("2.0.0", 2, step="echo migrated > {data:uploads}/migrated")
    shown = bundle("inspect", v2, "--trust", keys[1], "--json")
    assert shown.rc == 0, shown.err
    assert json.loads(shown.out)["data"] == [
        {"name": "uploads", "mode": "0750", "backup": "migrate"},
        {"name": "db", "mode": "0750", "backup": "never"}]
    r1, a, b, got1, r2, got2, back, got3 = offline(
        app.install(v1), app.post("a", "first"), app.post("b", "second"), app.get(),
        app.install(v2), app.get(),
        bundle_argv("rollback", "--root", app.root), app.get())
    assert r1.rc == 0, r1.err
    # the first write is kept (the Node app's EACCES under the read-only release is gone)
    assert reply(a) == (201, {"stored": "a"}) and reply(b) == (201, {"stored": "b"})
    assert reply(got1) == (200, {"items": ["a", "b"], "uid": run_user.pw_uid,
                                 "version": "1.0.0"})
    assert r2.rc == 0, r2.err
    assert "Backing up the data directory uploads" in r2.err
    assert reply(got2) == (200, {"items": ["a", "b"], "uid": run_user.pw_uid,
                                 "version": "2.0.0"})
    assert back.rc == 0, back.err
    assert reply(got3)[1]["items"] == ["a", "b"] and reply(got3)[1]["version"] == "1.0.0"
    # where it lives, and who owns it
    uploads = app.uploads
    assert (uploads / "items" / "a").read_text() == "first"
    assert (uploads / "migrated").read_text() == "migrated\n"  # written by v2's migration
    for p in (uploads, uploads / "items", uploads / "items" / "a", uploads / "migrated"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (run_user.pw_uid, run_user.pw_gid), p
    st = uploads.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750
    base = (app.root / "data").stat()
    assert (base.st_uid, stat.S_IMODE(base.st_mode)) == (0, 0o755)
    # the release itself stays root's and read-only to the user
    files = app.root / "releases" / "2.0.0" / "files" / "app"
    assert files.stat().st_uid == 0 and not files.stat().st_mode & 0o022
    # v2 migrated: its data directory was backed up first, and the report says where
    report = json.loads((app.root / "releases" / "2.0.0" / "report.json").read_text())
    (made,) = report["data_backups"]
    assert made["name"] == "uploads" and Path(made["path"]).is_file()
    assert Path(made["path"]).parent == app.root / "backups"
    assert stat.S_IMODE(Path(made["path"]).stat().st_mode) == 0o600
    # the `db` data directory (backup: never) holds the database, backed up as a database
    assert not list((app.root / "backups").glob("data-db-*"))
    assert app.rows() == [1, 2]  # a rollback does not restore a database either


@pytest.mark.parametrize("failure", ["migration", "health"])
def test_a_failed_migrating_upgrade_restores_the_data_directory(
        run_user: pwd.struct_passwd, world: Path, keys: tuple[Path, Path],
        failure: str) -> None:
    app = App(world, run_user.pw_name, keys)
    v1 = app.build("1.0.0", 1)
    app.sql("002_more.sql", "INSERT INTO items VALUES (2);\n")
    if failure == "migration":
        v2 = app.build("2.0.0", 2, step=RESHAPE + " && exit 1")
    else:
        v2 = app.build("2.0.0", 2, healthy=False, step=RESHAPE)
    r1, a, b, before, digest, r2, after, digest2, got, c, st = offline(
        app.install(v1), app.post("a", "first"), app.post("b", "second"), app.tree(),
        app.digest(), app.install(v2), app.tree(), app.digest(), app.get(),
        app.post("d", "after"), bundle_argv("status", "--root", app.root, "--json"))
    assert r1.rc == 0, r1.err
    assert reply(a)[0] == 201 and reply(b)[0] == 201
    assert r2.rc == (MigrationError.exit_code if failure == "migration"
                     else RolledBackError.exit_code), r2.err
    assert "Restoring the data directory uploads from data-uploads-" in r2.err
    assert "Restoring the database" in r2.err
    assert json.loads(after.out) == json.loads(before.out)  # exactly, owners and mtimes too
    assert digest2.out == digest.out and digest.out.startswith("tree:")
    assert app.rows() == [1]
    assert reply(got) == (200, {"items": ["a", "b"], "uid": run_user.pw_uid,
                                "version": "1.0.0"})
    assert reply(c) == (201, {"stored": "d"})  # v1 writes there again
    status = json.loads(st.out)
    assert status["current"]["version"] == "1.0.0" and status["pending_recovery"] is None
    assert not [p for p in (app.root / "data").iterdir() if p.name.startswith(".")]
    assert Path("/etc/shadow").stat().st_uid == 0


def test_kill_during_migrate_then_recover_restores_the_data_directory(
        run_user: pwd.struct_passwd, world: Path, keys: tuple[Path, Path]) -> None:
    """Two kills: at the migrate step's start (BUNDLER_FAULT), and a real `kill -9` while a
    migration is half-way through reshaping the data (it has changed files, then waits).
    `bundle recover` restores the directory and the database in both cases, keeping the
    half-migrated tree in backups/."""
    app = App(world, run_user.pw_name, keys)
    v1 = app.build("1.0.0", 1)
    app.sql("002_more.sql", "INSERT INTO items VALUES (2);\n")
    mark = "{data:uploads}/.migrating"
    v2 = app.build("2.0.0", 2, step=RESHAPE + f" && echo $$ > {mark} && exec sleep 120")
    marker = app.uploads / ".migrating"
    kill_mid_migration = ["sh", "-c", f"""
        {' '.join(app.install(v2))} >/dev/null 2>&1 & pid=$!
        for i in $(seq 1200); do [ -s {marker} ] && break; sleep 0.1; done
        [ -s {marker} ] || exit 99
        kill -9 $pid; wait $pid; rc=$?
        kill -9 "$(cat {marker})"
        exit $rc"""]
    (r1, a, b, before, faulted, rec1, after1, killed, st, rec2, after2, got,
     status) = offline(
        app.install(v1), app.post("a", "first"), app.post("b", "second"), app.tree(),
        ["env", "BUNDLER_FAULT=kill:migrate", *app.install(v2)],
        bundle_argv("recover", "--root", app.root), app.tree(),
        kill_mid_migration,
        bundle_argv("status", "--root", app.root, "--json"),
        bundle_argv("recover", "--root", app.root), app.tree(), app.get(),
        bundle_argv("status", "--root", app.root, "--json"))
    assert r1.rc == 0, r1.err
    assert reply(a)[0] == 201 and reply(b)[0] == 201
    assert faulted.rc == -signal.SIGKILL, faulted.err
    assert rec1.rc == 0, rec1.err
    assert "rolled back" in rec1.err
    assert json.loads(after1.out) == json.loads(before.out)

    assert killed.rc == 128 + signal.SIGKILL, killed.err
    pending = json.loads(st.out)["pending_recovery"]
    assert pending["version"] == "2.0.0" and pending["data_restores"][0]["name"] == "uploads"
    assert rec2.rc == 0, rec2.err
    assert "Restoring the data directory uploads" in rec2.err
    assert json.loads(after2.out) == json.loads(before.out)
    assert app.rows() == [1]
    (kept,) = (app.root / "backups").glob("data-uploads-replaced-*")
    assert (kept / "items" / "c").read_text() == "new\n" and (kept / ".migrating").exists()
    assert reply(got)[1]["items"] == ["a", "b"]
    final = json.loads(status.out)
    assert final["pending_recovery"] is None and final["current"]["version"] == "1.0.0"


def test_a_data_directory_swapped_for_a_symlink_is_refused_before_anything_changes(
        run_user: pwd.struct_passwd, world: Path, keys: tuple[Path, Path]) -> None:
    """Someone replaced data/uploads with a symlink to a root directory: the next install
    refuses it (exit 11) before it creates anything; the symlink is never followed."""
    app = App(world, run_user.pw_name, keys)
    v1 = app.build("1.0.0", 1)
    v2 = app.build("2.0.0", 2)
    victim = world / "victim"
    victim.mkdir()
    swap = ["sh", "-c", f"mv {app.uploads} {world / 'moved'} && ln -s {victim} {app.uploads}"]
    r1, swapped, r2, st = offline(
        app.install(v1), swap, app.install(v2),
        bundle_argv("status", "--root", app.root, "--json"))
    assert r1.rc == 0, r1.err
    assert swapped.rc == 0, swapped.err
    assert r2.rc == InstallError.exit_code, r2.err
    assert "error: data directory uploads is not a directory" in r2.err
    assert "never a symlink" in r2.err
    assert not (app.root / "releases" / "2.0.0").exists()
    assert not list(app.root.glob(".staging-*"))
    assert app.uploads.is_symlink() and list(victim.iterdir()) == []
    vst = victim.stat()
    assert (vst.st_uid, stat.S_IMODE(vst.st_mode)) == (0, 0o755)
    status = json.loads(st.out)
    assert status["current"]["version"] == "1.0.0" and status["pending_recovery"] is None
    assert [r["version"] for r in status["releases"]] == ["1.0.0"]


@pytest.mark.parametrize("policy", ["always", "migrate"])
def test_backup_always_restores_a_failed_upgrade_without_migrations(
        run_user: pwd.struct_passwd, world: Path, keys: tuple[Path, Path], policy: str) -> None:
    """No database, no migrations: `backup: always` still backs the directory up, and the
    failed release's startup write is undone; with the default (`migrate`) nothing is backed
    up, and what it wrote stays (as documented)."""
    app = App(world, run_user.pw_name, keys)
    entry = f"{{name: uploads, backup: {policy}}}"
    v1 = app.build("1.0.0", 1, uploads=entry, database=False)
    v2 = app.build("2.0.0", 2, uploads=entry, database=False, healthy=False, mark=True)
    r1, a, before, r2, after, got = offline(
        app.install(v1), app.post("a", "first"), app.tree(), app.install(v2), app.tree(),
        app.get())
    assert r1.rc == 0, r1.err
    assert reply(a)[0] == 201
    assert r2.rc == RolledBackError.exit_code, r2.err
    backups = list((app.root / "backups").glob("data-uploads-*.tar"))
    if policy == "always":
        assert "Restoring the data directory uploads" in r2.err
        assert json.loads(after.out) == json.loads(before.out)
        assert len(backups) == 2  # v1's install and v2's
        assert reply(got)[1]["items"] == ["a"]
    else:
        assert "Backing up the data directory" not in r2.err
        assert "Restoring the data directory" not in r2.err
        assert backups == []
        assert reply(got)[1]["items"] == ["a", "started-2.0.0"]
