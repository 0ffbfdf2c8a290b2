"""The disk fills during an upgrade: wherever the write fails (staging, the venv, its bytecode,
the database backup, the migration, the journal, the start, the commit), the install ends
promptly with exit 9 (SpaceError) in one line, the previous release serves, its database is as
it was, no partial release or pending recovery is left, and once space is freed the same
install succeeds.

The install root lives on a small tmpfs; `BUNDLER_FAULT=fill:POINT` fills that filesystem at
POINT (bundler.faults), as a log or another program filling the disk would. The install side
runs under `unshare -n`."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.errors import SpaceError
from tests.helpers import (
    Project,
    build_release,
    bundle,
    bundle_argv,
    make_wheel,
    offline,
    unavailable,
    write_migration,
)

pytestmark = [pytest.mark.slow, pytest.mark.netns]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 160 MiB tmpfs: room for two releases, not for a full disk's worth of filler."""
    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m,mode=0755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _heavy(project: Project) -> None:
    """A wheel of 400 modules beside tinygreet: a venv and bytecode step that take a while."""
    files = {f"heavy/m{i}.py": f"X = {i}\n" + "def f():\n    return 1\n" * 50
             for i in range(400)}
    files["heavy/__init__.py"] = ""
    whl = make_wheel(project.wheelhouse, "heavy", "1.0", files)
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    with open(project.dir / "requirements.txt", "a") as f:
        f.write(f"heavy==1.0 --hash=sha256:{sha}\n")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """v1 (table items, 3 rows) and v2 (a second migration), and the public key."""
    from tests.helpers import make_project

    base = tmp_path_factory.mktemp("diskfull")
    project = make_project(base)
    _heavy(project)
    keys = (base / "k.key", base / "k.pub")
    assert bundle("keygen", base / "k").rc == 0
    write_migration(project, "001_items.sql", "CREATE TABLE items (id int PRIMARY KEY);\n"
                    "INSERT INTO items VALUES (1), (2), (3);\n")
    v1 = build_release(project, keys, base / "cache", "1.0.0", 1)
    write_migration(project, "002_more.sql", "ALTER TABLE items ADD COLUMN note text;\n"
                    "INSERT INTO items VALUES (4, 'v2');\n")
    v2 = build_release(project, keys, base / "cache", "2.0.0", 2)
    return v1, v2, keys[1]


def _stop(root: Path) -> None:
    bundle("stop", "--root", root)


# Every write phase of an upgrade that migrates: the journaled steps as they start, the
# staging of the payloads, and the two commands of the Python step.
POINTS = ["extract", "python", "python:uv pip install", "python:compile bytecode", "backup",
          "migrate", "start", "commit"]


DUMP = "import sqlite3, sys; print(chr(10).join(sqlite3.connect(sys.argv[1]).iterdump()))"


@pytest.mark.parametrize("point", POINTS)
def test_a_full_disk_at_each_write_phase_leaves_the_previous_release_serving(
        point: str, bundles: tuple[Path, Path, Path], small_fs: Path) -> None:
    v1, v2, pub = bundles
    root = small_fs / "root"
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL=sqlite:///{root}/app.db\n")
    filler = small_fs / "filler"
    argv = ["install", v2, "--trust", pub, "--root", root]
    status = bundle_argv("status", "--root", root, "--json")
    try:
        # One network namespace for all: the services started in it are checked in it.
        first, before, full, size, after, st, left, again, final = offline(
            bundle_argv("install", v1, "--trust", pub, "--root", root),
            [sys.executable, "-c", DUMP, str(root / "app.db")],
            ["env", f"BUNDLER_FAULT=fill:{point}", f"BUNDLER_FAULT_FILL={filler}",
             *bundle_argv(*argv)],
            ["sh", "-c", f"stat -c %s {filler} && rm {filler}"],  # the operator frees space
            [sys.executable, "-c", DUMP, str(root / "app.db")],
            status, ["ls", "-A", root, root / "releases"], bundle_argv(*argv), status,
            timeout=300)
        assert first.rc == 0, first.err
        assert full.rc == SpaceError.exit_code, full.err  # SpaceError, whatever the phase
        error = [ln for ln in full.err.splitlines() if ln.startswith("error:")]
        assert len(error) == 1 and "ran out of space" in error[0], full.err
        assert "hint: free space there" in full.err and "1.0.0 is serving" in full.err
        assert "Traceback" not in full.err
        assert int(size.out) > 0
        # what the failed install left: 1.0.0 serving, its database as it was, nothing pending
        doc = json.loads(st.out)
        assert doc["current"]["version"] == "1.0.0" and doc["healthy"] is True, st.out
        assert doc["pending_recovery"] is None
        # (a failure while staging comes before the journal knows the release)
        assert {r["version"]: r["status"] for r in doc["releases"]}.get("2.0.0") in (
            None if point == "extract" else "failed", "rolled_back")
        assert after.out == before.out and "INSERT INTO \"items\" VALUES(3)" in before.out
        assert "2.0.0" not in left.out.split() and ".staging-" not in left.out, left.out
        # and with space again, the same install goes through
        assert again.rc == 0, again.err
        done = json.loads(final.out)
        assert done["current"]["version"] == "2.0.0" and done["healthy"] is True
        with sqlite3.connect(root / "app.db") as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 4
    finally:
        _stop(root)


def test_a_disk_filled_by_another_program_mid_install_does_not_hang_it(
        bundles: tuple[Path, Path, Path], small_fs: Path) -> None:
    """The way operators hit it: a log or a copy fills the disk while the upgrade runs (here
    a filler starts a second after the install does). Whatever phase it strikes, the install
    ends promptly with exit 9 and 1.0.0 serving (or, had it finished first, 0), with nothing
    left pending."""
    v1, v2, pub = bundles
    root = small_fs / "root"
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL=sqlite:///{root}/app.db\n")
    filler = small_fs / "filler"
    fill = f"(sleep 1; cat /dev/zero > {filler}) 2>/dev/null &"
    install = " ".join(map(str, bundle_argv("install", v2, "--trust", pub, "--root", root)))
    try:
        first, timed, freed, st = offline(
            bundle_argv("install", v1, "--trust", pub, "--root", root),
            ["sh", "-c", f"{fill} start=$(date +%s); {install}; rc=$?; "
                         f"echo elapsed $(( $(date +%s) - start )) >&2; exit $rc"],
            ["sh", "-c", f"sleep 1; rm -f {filler}"],
            bundle_argv("status", "--root", root, "--json"), timeout=300)
        assert first.rc == 0, first.err
        assert timed.rc in (0, SpaceError.exit_code), timed.err
        elapsed = int(timed.err.rsplit("elapsed ", 1)[1].split()[0])
        assert elapsed < 90, f"the install took {elapsed}s: {timed.err}"
        assert "Traceback" not in timed.err and "internal error" not in timed.err
        doc = json.loads(st.out)
        assert doc["pending_recovery"] is None and doc["healthy"] is True, st.out
        if timed.rc == SpaceError.exit_code:
            assert doc["current"]["version"] == "1.0.0"
            assert not (root / "releases" / "2.0.0").exists()
        assert freed.rc == 0
    finally:
        _stop(root)


def test_the_journal_records_a_rollback_on_a_full_disk(tmp_path: Path,
                                                       small_fs: Path) -> None:
    """state.db on a full filesystem: the reserve set aside in state/ makes room for the
    rollback's records (before: 'cannot rollback - no transaction is active', exit 13)."""
    from bundler.install.state import RESERVE, State

    db = small_fs / "state" / "state.db"
    state = State.open(db)
    assert (db.parent / RESERVE).stat().st_size > 0
    with open(small_fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass
    # a big record would not fit anywhere now: the reserve is given back for it
    state.event("t1", "2.0.0", "rollback", "done", "x" * 100_000)
    assert not (db.parent / RESERVE).exists()
    assert [e.step for e in state.events()] == ["rollback"]
    state.close()


def test_ctrl_c_during_the_bytecode_compile_stops_its_workers_and_rolls_back(
        bundles: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Ctrl+C while the bytecode workers run: exit 130 within seconds, no worker left, 1.0.0
    serving. (Workers that outlive a killed parent used to hang the install on a full disk:
    tests/test_install_concurrency.py holds that case.)"""
    v1, v2, pub = bundles
    root = tmp_path / "root"
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text(f"DATABASE_URL=sqlite:///{root}/app.db\n")
    install = bundle_argv("install", v2, "--trust", pub, "--root", root)
    try:
        first, interrupted, st = offline(
            bundle_argv("install", v1, "--trust", pub, "--root", root),
            [sys.executable, "-c", CTRL_C, json.dumps(list(map(str, install)))],
            bundle_argv("status", "--root", root, "--json"), timeout=300)
        assert first.rc == 0, first.err
        assert interrupted.rc == 0, interrupted.out + interrupted.err
        out = json.loads(interrupted.out)
        assert out["found"], out["err"]  # Ctrl+C came while the pool ran
        assert out["rc"] == 130, out["err"]
        assert out["seconds"] < 20 and out["left"] == [], out
        doc = json.loads(st.out)
        assert doc["current"]["version"] == "1.0.0" and doc["healthy"] is True
        assert doc["pending_recovery"] is None
    finally:
        _stop(root)


# Start the install, wait until the bytecode pool runs (its source names ProcessPoolExecutor),
# press Ctrl+C (SIGINT to bundler), and report its exit, how long it took, and what is left.
CTRL_C = """
import json, signal, subprocess, sys, time
def pool():
    found = subprocess.run(["pgrep", "-f", "ProcessPool[E]xecutor"], capture_output=True,
                           text=True)
    return found.stdout.split()
child = subprocess.Popen(json.loads(sys.argv[1]), stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 60
while not (found := pool()) and time.monotonic() < deadline and child.poll() is None:
    time.sleep(0.02)
start = time.monotonic()
child.send_signal(signal.SIGINT)
err = child.stderr.read()
rc = child.wait()
seconds = time.monotonic() - start
time.sleep(0.5)
print(json.dumps({"rc": rc, "seconds": seconds, "left": pool(), "found": found, "err": err}))
"""
