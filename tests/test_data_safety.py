"""No committed row is ever lost to a stale restore. Recovery acts on ONE install transaction:
it restores a database only for the attempt that itself began migrating and whose own restore
has not completed; arguments are checked before anything is touched; and a pending restore
that would discard writes made after the failed attempt waits for the operator's choice.

Each scenario runs against SQLite and a real PostgreSQL; the install side runs under
`unshare -n`."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.errors import MigrationError, RecoveryPendingError, RollbackFailedError, StateError
from tests.helpers import (
    DB_PROFILE,
    Project,
    build_release,
    bundle,
    bundle_argv,
    offline,
    write_migration,
)

pytestmark = pytest.mark.slow

WRITER = textwrap.dedent("""\
    import sys
    url, row = sys.argv[1], int(sys.argv[2])
    if url.startswith("sqlite:///"):
        import sqlite3
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            conn.execute("INSERT INTO items VALUES (?)", (row,))
    else:
        import psycopg
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO items VALUES (%s)", (row,))
""")


class Db:
    """The release's database as the application sees it: `url` for writers, rows read back."""

    def __init__(self, kind: str, root: Path, url: str) -> None:
        self.kind, self.root, self.url = kind, root, url

    def write(self, row: int) -> list[str]:
        """A command (run inside the namespace, as the application would) adding one row."""
        return [sys.executable, "-c", WRITER, self.url, str(row)]

    def rows(self) -> list[int]:
        if self.kind == "sqlite":
            with sqlite3.connect(self.root / "app.db") as conn:
                return sorted(r[0] for r in conn.execute("SELECT id FROM items"))
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return sorted(r[0] for r in conn.execute("SELECT id FROM items"))


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    root = tmp_path / "target"
    (root / "shared").mkdir(parents=True)
    if request.param == "sqlite":
        # `{root}` in the database URL means the install root, as it does everywhere else.
        (root / "shared" / ".env").write_text("DATABASE_URL=sqlite:///{root}/app.db\n")
        yield Db("sqlite", root, f"sqlite:///{root}/app.db")
        return
    cluster = request.getfixturevalue("cluster")
    name = cluster.create_database()
    url = cluster.url(name)
    (root / "shared" / ".env").write_text(f"DATABASE_URL={url}\n")
    yield Db("postgres", root, url)
    cluster.drop_database(name)


def status_of(root: Path) -> dict[str, object]:
    done = bundle("status", "--root", root, "--json")
    return dict(json.loads(done.out))


def test_a_retry_never_restores_an_earlier_attempts_backup(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, db: Db,
        roots: list[Path]) -> None:
    """v2 fails its migration (restored, exit 17); rows are written; a retry of v2 dies before
    migrating; rows are written; `bundle rollback` settles the retry and loses nothing."""
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int PRIMARY KEY);\n"
                    "INSERT INTO items VALUES (1), (2), (3);\n")
    v1 = build_release(project, keys, cache_dir, "1.0.0", 1)
    bad = write_migration(project, "002_bad.sql", "CREATE TABLE half (x int);\n"
                          "INSERT INTO nowhere VALUES (1);\n")
    v2 = build_release(project, keys, cache_dir, "2.0.0", 2)
    bad.unlink()
    root = db.root
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    r1, r2, w4, retry, w5, back, st = offline(
        bundle_argv("install", v1, *trust),
        bundle_argv("install", v2, *trust),
        db.write(4),
        ["env", "BUNDLER_FAULT=kill:python", *bundle_argv("install", v2, *trust)],
        db.write(5),
        bundle_argv("rollback", "--root", root, "--json"),
        bundle_argv("status", "--root", root, "--json"))
    assert r1.rc == 0, r1.err
    assert r2.rc == MigrationError.exit_code, r2.err
    assert (w4.rc, w5.rc) == (0, 0), w4.err + w5.err
    assert retry.rc == -signal.SIGKILL
    assert back.rc == 0, back.err
    assert "Restoring the database" not in back.err
    assert json.loads(back.out)["from"] == "2.0.0"
    assert db.rows() == [1, 2, 3, 4, 5]  # nothing written after the first attempt was lost
    status = json.loads(st.out)
    # the healthy current release is not rolled back as well
    assert status["current"]["version"] == "1.0.0" and status["healthy"] is True
    assert status["pending_recovery"] is None


SQUATTER = textwrap.dedent("""\
    # Takes PORT as soon as it is free and answers 404 until STOPFILE exists: another
    # program that grabs the port while a release is being swapped.
    import os, socket, sys, threading, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    port, stop = int(sys.argv[1]), sys.argv[2]
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            server = HTTPServer(("127.0.0.1", port), H)
            break
        except OSError:
            time.sleep(0.01)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.shutdown(); server.server_close()
""")


def test_a_rollback_that_failed_after_restoring_is_not_restored_again(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, db: Db, tmp_path: Path,
        roots: list[Path]) -> None:
    """v2 fails its health check; its rollback restores the database, then cannot bring v1
    back (another program took the port): exit 13. The port is freed, v1 recovers, rows are
    written: the next install must not restore v2's backup a second time."""
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int PRIMARY KEY);\n"
                    "INSERT INTO items VALUES (1);\n")
    v1 = build_release(project, keys, cache_dir, "1.0.0", 1)
    write_migration(project, "002_more.sql", "INSERT INTO items VALUES (2);\n")
    v2 = build_release(project, keys, cache_dir, "2.0.0", 2, healthy=False)
    v3 = build_release(project, keys, cache_dir, "3.0.0", 3)
    root = db.root
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    stop = tmp_path / "squatter.stop"
    (tmp_path / "squatter.py").write_text(SQUATTER)
    wait_healthy = ["sh", "-c", f"for i in $(seq 120); do {' '.join(bundle_argv('status'))} "
                                f"--root {root} >/dev/null 2>&1 && exit 0; sleep 0.5; done; "
                                "exit 1"]
    r1, _, r2, _, healthy, w3, r3, st = offline(
        bundle_argv("install", v1, *trust),
        ["sh", "-c", f"{sys.executable} {tmp_path / 'squatter.py'} {project.port} {stop} "
                     ">/dev/null 2>&1 &"],
        bundle_argv("install", v2, *trust),
        ["touch", str(stop)],
        wait_healthy,
        db.write(3),
        bundle_argv("install", v3, *trust),
        bundle_argv("status", "--root", root, "--json"))
    assert r1.rc == 0, r1.err
    assert r2.rc == RollbackFailedError.exit_code, r2.err
    assert "Restoring the database" in r2.err
    assert healthy.rc == 0, healthy.err
    assert w3.rc == 0, w3.err
    assert r3.rc == 0, r3.err
    assert "Restoring the database" not in r3.err
    assert db.rows() == [1, 2, 3]  # 002 (from v3's migrations) and the row written since
    status = json.loads(st.out)
    assert status["current"]["version"] == "3.0.0" and status["healthy"] is True
    versions = {r["version"]: r["status"] for r in status["releases"]}
    assert versions["2.0.0"] == "rolled_back"


def test_rollback_to_a_missing_release_touches_nothing(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, db: Db,
        roots: list[Path]) -> None:
    """With a restore pending (kill -9 as migrations start), `rollback --to 9.9.9` is refused
    before the pending restore runs; status and doctor show what is pending."""
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int PRIMARY KEY);\n"
                    "INSERT INTO items VALUES (1);\n")
    v1 = build_release(project, keys, cache_dir, "1.0.0", 1)
    write_migration(project, "002_more.sql", "INSERT INTO items VALUES (2);\n")
    v2 = build_release(project, keys, cache_dir, "2.0.0", 2)
    root = db.root
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    r1, crashed, w7, bad_to, st, doc = offline(
        bundle_argv("install", v1, *trust),
        ["env", "BUNDLER_FAULT=kill:migrate", *bundle_argv("install", v2, *trust)],
        db.write(7),
        bundle_argv("rollback", "--root", root, "--to", "9.9.9"),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("doctor", "--root", root, "--json"))
    assert r1.rc == 0, r1.err
    assert crashed.rc == -signal.SIGKILL
    assert w7.rc == 0, w7.err
    assert bad_to.rc == StateError.exit_code, bad_to.err
    assert f"error: release 9.9.9 is not on disk under {root}" in bad_to.err
    assert "Restoring" not in bad_to.err
    assert db.rows() == [1, 7]
    pending = json.loads(st.out)["pending_recovery"]
    assert pending["version"] == "2.0.0" and pending["restore"] is not None
    rows = {r["check"]: r for r in json.loads(doc.out)["checks"]}
    assert rows["pending recovery"]["status"] == "fail"
    assert "interrupted during migrate" in rows["pending recovery"]["detail"]


def test_a_pending_restore_that_would_discard_later_writes_needs_a_choice(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, db: Db,
        roots: list[Path]) -> None:
    """v2's migration fails and its rollback cannot restore (the backup was damaged): exit 13,
    the restore left pending. Rows are written afterwards. The next install refuses (exit 20,
    nothing changed) until the operator chooses; --keep-db keeps every row."""
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int PRIMARY KEY);\n"
                    "INSERT INTO items VALUES (1);\n")
    v1 = build_release(project, keys, cache_dir, "1.0.0", 1)
    # `{root}` in a command migration is the install root, as in service commands.
    spoil = ("  - name: spoil\n    command: [sh, -c, 'for f in {root}/backups/*; do "
             "echo x >> $f; done; exit 1']\n")
    v2 = build_release(project, keys, cache_dir, "2.0.0", 2, extra=DB_PROFILE + spoil)
    root = db.root
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    r1, r2, w8, refused, st, kept, again = offline(
        bundle_argv("install", v1, *trust),
        bundle_argv("install", v2, *trust),
        db.write(8),
        bundle_argv("install", v1, *trust),
        bundle_argv("status", "--root", root, "--json"),
        bundle_argv("recover", "--root", root, "--keep-db"),
        bundle_argv("status", "--root", root, "--json"))
    assert r1.rc == 0, r1.err
    assert r2.rc == RollbackFailedError.exit_code, r2.err
    assert "missing or changed since it was taken" in r2.err
    assert w8.rc == 0, w8.err
    assert refused.rc == RecoveryPendingError.exit_code, refused.err
    assert "written to since the failed rollback" in refused.err
    assert "--restore-db" in refused.err and "--keep-db" in refused.err
    assert db.rows() == [1, 8]
    assert json.loads(st.out)["pending_recovery"]["version"] == "2.0.0"
    assert kept.rc == 0, kept.err
    assert db.rows() == [1, 8]
    after = json.loads(again.out)
    assert after["pending_recovery"] is None
    assert after["current"]["version"] == "1.0.0" and after["healthy"] is True
