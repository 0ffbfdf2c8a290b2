"""The crash matrix: kill -9 at every journal step boundary of an upgrade that migrates, for
the process runtime (PostgreSQL on the host) and the compose runtime (PostgreSQL in a compose
service). After `bundle recover` (and the operator's `--restore-db` where recovery asks for a
choice), one release serves, healthy, and the database equals either its state before the
upgrade (when 1.0.0 serves) or the fully migrated state (when 2.0.0 serves): never half of it,
never an old release on a new schema.

Each point's outcome is also the row of the table in docs/fault-matrix.md; the last test
holds the two equal. A point the installer journals but this matrix lacks fails
`test_the_matrix_covers_every_step_an_upgrade_journals`.

The install side runs under `unshare -n`."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    build_release,
    bundle,
    bundle_argv,
    host_policy,
    offline,
    write_migration,
)
from tests.pg_fixtures import PgCluster, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.netns]

# point -> what `bundle recover` does after a kill there: "nothing" (nothing was pending),
# "rolled back" (to 1.0.0, the database restored if migrations began), "choice" (the new
# release's services ran: recovery asks, and --restore-db rolls back), "resumed" (switched
# already: the commit is finished, 2.0.0 serves).
PROCESS = {
    "extract": "nothing",
    "python": "rolled back",
    "stop-previous": "rolled back",
    "backup": "rolled back",
    "migrate": "rolled back",
    "migrate:applied": "rolled back",
    "start": "rolled back",
    "health": "choice",
    "commit": "resumed",
    "committed": "nothing",
}


# The same upgrade as a compose project whose PostgreSQL is a compose service.
COMPOSE = {
    "images": "rolled back",
    "stop-previous": "rolled back",
    "backup": "rolled back",
    "migrate": "rolled back",
    "migrate:applied": "rolled back",
    "start": "rolled back",
    "health": "choice",
    "commit": "resumed",
    "committed": "nothing",
}


@pytest.fixture(scope="module")
def process_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """v1 makes `items`; v2 migrates in two files (so a kill between them leaves half)."""
    from tests.helpers import make_project

    base = tmp_path_factory.mktemp("matrix")
    project = make_project(base)
    keys = (base / "k.key", base / "k.pub")
    assert bundle("keygen", base / "k").rc == 0
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int PRIMARY KEY);\n"
                    "INSERT INTO items VALUES (1), (2), (3);\n")
    v1 = build_release(project, keys, base / "cache", "1.0.0", 1)
    write_migration(project, "002_note.sql", "ALTER TABLE items ADD COLUMN note text;\n"
                    "UPDATE items SET note = 'v2';\n")
    write_migration(project, "003_more.sql", "CREATE TABLE tags (item int REFERENCES items);\n"
                    "INSERT INTO items VALUES (4, 'v2');\n")
    v2 = build_release(project, keys, base / "cache", "2.0.0", 2)
    return v1, v2, keys[1]


def _db_state(cluster: PgCluster, dbname: str) -> dict[str, Any]:
    with cluster.connect(dbname) as conn:
        return state_of(conn)


def state_of(conn: Any) -> dict[str, Any]:
    """`snapshot`, with the ledger compared as the list of files applied (not their times);
    as JSON would carry it."""
    snap = snapshot(conn)
    ledger = conn.execute("SELECT file FROM bundler_migrations ORDER BY file").fetchall() \
        if conn.execute("SELECT to_regclass('bundler_migrations')").fetchone()[0] else []
    snap["data"].pop("public.bundler_migrations", None)
    return dict(json.loads(json.dumps({**snap, "ledger": [r[0] for r in ledger]},
                                      default=str)))


# The database's state, printed as JSON from inside the namespace (between two commands).
SNAPSHOT = """
import json, sys, psycopg
from tests.test_fault_matrix import state_of
with psycopg.connect(host=sys.argv[1], port=int(sys.argv[2]), user="postgres",
                     dbname=sys.argv[3], autocommit=True) as conn:
    print(json.dumps(state_of(conn)))
"""


def _recover(root: Path) -> list[list[str]]:
    """`bundle recover`, then with --restore-db (only runs if the first asked for a choice:
    `sh -c` keeps both in one namespace call), then status."""
    rec = " ".join(map(str, bundle_argv("recover", "--root", root)))
    again = " ".join(map(str, bundle_argv("recover", "--root", root, "--restore-db")))
    return [["sh", "-c", f"{rec}; rc=$?; echo recover-rc=$rc >&2; "
                         f"if [ $rc = 20 ]; then {again}; fi"],
            bundle_argv("status", "--root", root, "--json")]


def _outcome(recovered: str, crashed_rc: int) -> str:
    if "recover-rc=20" in recovered:
        return "choice"
    if "resumed:" in recovered:
        return "resumed"
    if "rolled back:" in recovered:
        return "rolled back"
    assert crashed_rc == -signal.SIGKILL
    return "nothing"


@pytest.mark.parametrize("point", list(PROCESS))
def test_kill_9_at_each_step_of_a_migrating_upgrade_process_runtime(
        point: str, process_bundles: tuple[Path, Path, Path], cluster: PgCluster,
        tmp_path: Path, roots: list[Path]) -> None:
    v1, v2, pub = process_bundles
    dbname = cluster.create_database()
    url = cluster.url(dbname)
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL={url}\n")
    trust = ["--trust", pub, "--root", root]
    try:
        # One namespace for all: the services started in it are checked in it.
        snapshot_cmd = [sys.executable, "-c", SNAPSHOT, str(cluster.sockdir),
                        str(cluster.port), dbname]
        first, snap, crashed, recovered, status, snap2, again = offline(
            bundle_argv("install", v1, *trust), snapshot_cmd,
            ["env", f"BUNDLER_FAULT=kill:{point}", *bundle_argv("install", v2, *trust)],
            *_recover(root), snapshot_cmd, bundle_argv("install", v2, *trust))
        assert first.rc == 0, first.err
        before = json.loads(snap.out)
        assert crashed.rc == -signal.SIGKILL, crashed.err
        outcome = _outcome(recovered.err, crashed.rc)
        assert outcome == PROCESS[point], recovered.err
        doc = json.loads(status.out)
        assert doc["healthy"] is True and doc["pending_recovery"] is None, status.out
        serving = doc["current"]["version"]
        state = json.loads(snap2.out)
        if serving == "1.0.0":
            assert state == before
        else:
            assert serving == "2.0.0"
            assert state["ledger"] == ["001_items.sql", "002_note.sql", "003_more.sql"]
            with cluster.connect(dbname) as conn:
                assert conn.execute("SELECT count(*) FROM items WHERE note = 'v2'"
                                    ).fetchone()[0] == 4
        # and the next install goes through from there
        assert again.rc == 0, again.err
    finally:
        bundle("stop", "--root", root)
        cluster.drop_database(dbname)


def test_the_matrix_covers_every_step_an_upgrade_journals(
        process_bundles: tuple[Path, Path, Path], cluster: PgCluster, tmp_path: Path,
        roots: list[Path]) -> None:
    """Every step a migrating upgrade journals as started is a point of the matrix."""
    v1, v2, pub = process_bundles
    dbname = cluster.create_database()
    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL={cluster.url(dbname)}\n")
    trust = ["--trust", pub, "--root", root]
    try:
        r1, r2 = offline(bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust))
        assert r1.rc == 0 and r2.rc == 0, r1.err + r2.err
        events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
        started = {e["step"] for e in events if e["version"] == "2.0.0"
                   and e["status"] == "started"}
        assert started and started <= set(PROCESS), started - set(PROCESS)
    finally:
        bundle("stop", "--root", root)
        cluster.drop_database(dbname)


@pytest.fixture(scope="module")
def compose_bundles(tmp_path_factory: pytest.TempPathFactory, engine: Any
                    ) -> tuple[Path, Path, Path]:
    """tests/test_stack_compose_db.py's stack: 1.0.0, and 2.0.0 with another web image and
    two more SQL files."""
    from tests import docker_fixtures as dfx
    from tests import pg_image
    from tests.test_stack_compose_db import profile

    pg_image.ensure(engine)
    pair = dfx.make_pair(engine, "matrix")
    base = tmp_path_factory.mktemp("matrix-compose")
    assert bundle("keygen", base / "k").rc == 0
    m1 = {"001_items.sql": "CREATE TABLE items (id int PRIMARY KEY, name text);\n"
                           "INSERT INTO items VALUES (1, 'a'), (2, 'b');\n"}
    m2 = {**m1, "002_price.sql": "ALTER TABLE items ADD COLUMN price int DEFAULT 0;\n",
          "003_more.sql": "INSERT INTO items VALUES (3, 'c', 7);\n"}
    built = []
    for version, seq, web, migs in (("1.0.0", 1, pair.a, m1), ("2.0.0", 2, pair.b, m2)):
        result = bundle("build", profile(base, version, seq, web, migs), "--key",
                        base / "k.key", "--out", base / "out", "--cache-dir", base / "cache",
                        "--json")
        assert result.rc == 0, result.err
        built.append(Path(json.loads(result.out)["bundle"]))
    return built[0], built[1], base / "k.pub"


COMPOSE_SNAPSHOT = """
import json, sys, psycopg
from tests.test_fault_matrix import state_of
with psycopg.connect(host=sys.argv[1], dbname="appdb", user="app", autocommit=True) as conn:
    print(json.dumps(state_of(conn)))
"""


@pytest.mark.docker
@pytest.mark.parametrize("point", list(COMPOSE))
def test_kill_9_at_each_step_of_a_migrating_upgrade_compose_runtime(
        point: str, compose_bundles: tuple[Path, Path, Path], engine: Any,
        tmp_path: Path) -> None:
    from bundler.install import compose_runtime as cr
    from tests.test_stack_compose_db import PRODUCT, _clean

    v1, v2, pub = compose_bundles
    root = tmp_path / "target"
    project = cr.project_name(PRODUCT, root)
    sock = tmp_path / "pgsock"
    sock.mkdir()
    sock.chmod(0o1777)  # the server runs as uid 999 in its container
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(
        f"DATABASE_URL=postgresql://app@/appdb?host={sock}\nPGSOCK={sock}\n")
    host_policy(root, f"host-mount={sock}")  # the db service mounts the socket directory
    trust = ["--trust", pub, "--root", root]
    snap = [sys.executable, "-c", COMPOSE_SNAPSHOT, str(sock)]
    try:
        first, before, crashed, recovered, status, after, again = offline(
            bundle_argv("install", v1, *trust), snap,
            ["env", f"BUNDLER_FAULT=kill:{point}", *bundle_argv("install", v2, *trust)],
            *_recover(root), snap, bundle_argv("install", v2, *trust))
        assert first.rc == 0, first.err
        assert crashed.rc == -signal.SIGKILL, crashed.err
        outcome = _outcome(recovered.err, crashed.rc)
        assert outcome == COMPOSE[point], recovered.err
        doc = json.loads(status.out)
        assert doc["healthy"] is True and doc["pending_recovery"] is None, status.out
        state = json.loads(after.out)
        if doc["current"]["version"] == "1.0.0":
            assert state == json.loads(before.out)
        else:
            assert doc["current"]["version"] == "2.0.0"
            assert state["ledger"] == ["001_items.sql", "002_price.sql", "003_more.sql"]
            assert state["data"]["public.items"][0] == 4  # 3 + the seed migration's row
        assert again.rc == 0, again.err
    finally:
        _clean(engine, project)


def test_the_documented_matrix_is_the_tested_one() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "fault-matrix.md").read_text()
    for runtime, tested in (("process", PROCESS), ("compose", COMPOSE)):
        rows = dict(re.findall(rf"^\| `([^`]+)` \| {runtime} \| ([a-z ]+) \|", doc, re.M))
        assert rows == tested, runtime
