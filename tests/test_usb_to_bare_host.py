"""The operator's whole path (issue 9, "The USB step" and "Acceptance"): `bundle build`, `bundle
export` onto a stick, then on a bare Debian 12 host with no network and ONLY the stick mounted,
the commands the stick's INSTALL.txt lists (the demo) and the commands of the README's "On the
air-gapped host" section (seed 001 on PostgreSQL 15): install, an upgrade from a second stick,
a rollback, then the smaller upgrade (issue 19): the host's receipt onto the stick, a delta
built against it on the connected side, installed by the kit.

Nothing is run on the target that the operator would not type: INSTALL.txt's commands are
parsed from the file and run as written (in the stick's directory, as it says), and the
README's five fenced blocks are read from README.md and run as they are, so the README and
this test cannot drift apart; so are the README's connected-side `bundle build --against` and
`bundle export` of the delta (with the stick's path, the shared cache and --json added).

Builds use a persistent bundler cache (tests.bare_image.cache_dir()/bundler-cache, beside the
bare images: BUNDLER_TEST_CACHE, /var/cache/bundler-tests as root), and so does the kit that
`bundle export` builds for the bundle's target: repeated runs fetch nothing. The wheels and
Node.js come from PyPI and npm on the first run (network).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import bare_image
from tests.bare_target import BareHost, BareTargets
from tests.helpers import REPO, bundle, bundle_argv, tree_snapshot

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]

PROFILES = REPO / "profiles"
README = REPO / "README.md"
SECTION = "## On the air-gapped host"
USB = "/media/usb"  # where the README's operator mounts the stick
KIT_CMD = re.compile(r"^(python3 -I -S \S+\.pyz|sha256sum|grep) ")


def bundler_cache() -> Path:
    """The bundler cache these tests share across runs (content-addressed: safe to share)."""
    path = bare_image.cache_dir() / "bundler-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(profile: Path, key: Path, out: Path, sequence: int) -> Path:
    done = bundle("build", profile, "--frozen", "--key", key, "--out", out, "--cache-dir",
                  bundler_cache(), "--sequence", str(sequence), "--json")
    assert done.rc == 0, done.err
    return Path(json.loads(done.out)["bundle"])


def export(bundle_path: Path, stick: Path, pub: Path) -> dict[str, object]:
    """`bundle export` onto the stick; no kit is next to the bundle, so export makes it (or
    takes the one it made for this target before, from the cache)."""
    done = bundle("export", bundle_path, stick, "--pub", pub, "--cache-dir", bundler_cache(),
                  "--json")
    assert done.rc == 0, done.err
    doc: dict[str, object] = json.loads(done.out)
    assert doc["kit_source"] in ("built", "cached"), doc
    return doc


def new_stick(stick: Path) -> None:
    """Unplug the stick and plug in a fresh one, at the same mount point."""
    for entry in stick.iterdir():
        entry.unlink()


def install_commands(text: str) -> tuple[list[str], str]:
    """INSTALL.txt's commands, as written (indented lines that run the kit, sha256sum or the
    checksum pipeline), and its rollback command."""
    commands = [line.strip() for line in text.splitlines()
                if line.startswith("  ") and KIT_CMD.match(line.strip())]
    (rollback,) = [line.split(": ", 1)[1] for line in text.splitlines()
                   if line.startswith("Back to the previous release")]
    return commands, rollback


def readme_blocks() -> list[str]:
    """The fenced ```sh blocks of the README's "On the air-gapped host" section, in order."""
    text = README.read_text()
    section = text[text.index(SECTION + "\n"):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.M | re.S)


def run_on_target(host: BareHost, command: str, timeout: float = 900) -> str:
    """One operator command in the stick's directory (as INSTALL.txt says to run them)."""
    done = host.sh(command, timeout=timeout, workdir=host.stick_at)
    assert done.rc == 0, f"$ {command}\n{done.out}\n{done.err}"
    return done.out + done.err


def get(host: BareHost, url: str) -> str:
    done = host.run("python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                    f"{url!r}, timeout=10).read().decode())")
    assert done.rc == 0, done.err
    return done.out


def status(host: BareHost, kit: str, root: str) -> dict[str, object]:
    done = host.run("python3", "-I", "-S", f"{host.stick_at}/{kit}", "status", "--root", root,
                    "--json")
    assert done.rc == 0, done.out + done.err
    doc: dict[str, object] = json.loads(done.out)
    return doc


def current_version(doc: dict[str, object]) -> str:
    current = doc["current"]
    assert isinstance(current, dict)
    return str(current["version"])


def kit_on(stick: Path) -> str:
    (kit,) = stick.glob("bundler-kit-*.pyz")
    return kit.name


# ---- the demo: INSTALL.txt, as written -------------------------------------------------------

def _demo_v2(base: Path) -> Path:
    src = base / "demo-v2"
    shutil.copytree(PROFILES / "demo", src / "demo")
    shutil.copy(PROFILES / "demo.lock", src / "demo.lock")
    text = (PROFILES / "demo.yaml").read_text()
    text = text.replace("version: 1.0.0", "version: 1.1.0").replace("DEMO_VERSION: 1.0.0",
                                                                    "DEMO_VERSION: 1.1.0")
    (src / "demo.yaml").write_text(text)
    return src / "demo.yaml"


def test_demo_from_stick_by_install_txt_then_upgrade_and_rollback(
        bare_target: BareTargets, keys: tuple[Path, Path], tmp_path: Path) -> None:
    times: dict[str, float] = {}
    t0 = time.monotonic()
    v1 = build(PROFILES / "demo.yaml", keys[0], tmp_path / "dist1", sequence=1)
    v2 = build(_demo_v2(tmp_path), keys[0], tmp_path / "dist2", sequence=2)
    times["build v1+v2"] = time.monotonic() - t0
    stick = tmp_path / "stick"
    stick.mkdir()
    t0 = time.monotonic()
    export(v1, stick, keys[1])
    times["export v1"] = time.monotonic() - t0
    host = bare_target(stick=stick)  # python3 only; the stick is all it has

    t0 = time.monotonic()
    commands, rollback = install_commands((stick / "INSTALL.txt").read_text())
    kit = kit_on(stick)
    verbs = [c.split()[4] if c.startswith("python3") else c.split()[0] for c in commands]
    assert verbs == ["grep", "sha256sum", "trust", "verify", "install", "status"], commands
    assert all("--root /srv/demo" in c for c in commands if c.startswith("python3")), commands
    assert commands[1] == f"sha256sum {kit}"
    outputs = [run_on_target(host, c) for c in commands]
    times["install v1 (INSTALL.txt)"] = time.monotonic() - t0
    assert f"{kit}: OK" in outputs[0] and "demo-1.0.0.bundle: OK" in outputs[0]
    assert "installed and healthy" in outputs[4]
    assert json.loads(get(host, "http://127.0.0.1:8765/health")) == {"status": "ok",
                                                                     "version": "1.0.0"}

    # The next release on a new stick: its INSTALL.txt's commands are the upgrade.
    new_stick(stick)
    t0 = time.monotonic()
    export(v2, stick, keys[1])
    times["export v2"] = time.monotonic() - t0
    t0 = time.monotonic()
    commands2, rollback2 = install_commands((stick / "INSTALL.txt").read_text())
    assert [c.replace("1.1.0", "1.0.0") for c in commands2] == commands
    for command in commands2:
        run_on_target(host, command)
    times["upgrade to v2 (INSTALL.txt)"] = time.monotonic() - t0
    assert json.loads(get(host, "http://127.0.0.1:8765/health"))["version"] == "1.1.0"
    assert current_version(status(host, kit, "/srv/demo")) == "1.1.0"

    t0 = time.monotonic()
    assert rollback2 == rollback == f"python3 -I -S {kit} rollback --root /srv/demo"
    assert "rolled back from 1.1.0 to 1.0.0" in run_on_target(host, rollback2)
    times["rollback"] = time.monotonic() - t0
    assert json.loads(get(host, "http://127.0.0.1:8765/health"))["version"] == "1.0.0"
    doc = status(host, kit, "/srv/demo")
    assert doc["healthy"] is True and current_version(doc) == "1.0.0"
    print("\ntimings (demo): " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


# ---- acceptance: seed 001 by the README's commands ----------------------------------------

MIGRATION_V2 = '''\
"""add metric_snapshots.unit (seed 001, 1.2.0)

Revision ID: 20251110_add_metric_unit
Revises: 20251102_add_metrics_tables
"""
import sqlalchemy as sa
from alembic import op

revision = "20251110_add_metric_unit"
down_revision = "20251102_add_metrics_tables"


def upgrade() -> None:
    op.add_column("metric_snapshots", sa.Column("unit", sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column("metric_snapshots", "unit")
'''


MAIN_V3 = '''

@app.get("/api/v1/metrics/release")
def release() -> dict[str, Any]:  # seed 001, 1.3.0: the one change a delta carries
    return {"release": "1.3.0"}
'''


def _seed_001_copy(dest: Path, version: str) -> Path:
    """Seed 001's profile (a copy, with its sources and lock, in DEST) as VERSION, with one
    more alembic revision (1.2.0's)."""
    shutil.copytree(PROFILES / "llm-webapp", dest / "llm-webapp",
                    ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    shutil.copy(PROFILES / "llm-webapp.lock", dest / "llm-webapp.lock")
    text = (PROFILES / "llm-webapp.yaml").read_text()
    assert "\nversion: 1.1.0\n" in text
    (dest / "llm-webapp.yaml").write_text(text.replace("\nversion: 1.1.0\n",
                                                       f"\nversion: {version}\n"))
    versions = dest / "llm-webapp" / "backend" / "migrations" / "versions"
    (versions / "20251110_add_metric_unit.py").write_text(MIGRATION_V2)
    return dest / "llm-webapp.yaml"


def _seed_001_v3(profiles: Path) -> Path:
    """1.3.0: 1.2.0 with one change of application code (a new endpoint), as
    `profiles/llm-webapp.yaml` on the connected side."""
    profile = _seed_001_copy(profiles, "1.3.0")
    main = profiles / "llm-webapp" / "backend" / "app" / "main.py"
    main.write_text(main.read_text() + MAIN_V3)
    return profile


def _alembic_version(host: BareHost) -> str:
    done = host.run("runuser", "-u", "postgres", "--", "psql", "-d", "llm_webapp", "-Atc",
                    "SELECT version_num FROM alembic_version")
    assert done.rc == 0, done.err
    return done.out.strip()


def connected_commands() -> list[list[str]]:
    """The README section's `bundle` commands for the connected side of the delta upgrade (the
    indented lines after the receipt block), as argv without `bundle`."""
    text = README.read_text()
    section = text[text.index(SECTION + "\n"):]
    section = section[section.index(" receipt --root "):section.index("\n## ", len(SECTION))]
    return [shlex.split(line.strip())[1:] for line in section.splitlines()
            if line.startswith("    bundle ")]


def on_connected_side(workdir: Path, stick: Path, argv: list[str],
                      *extra: str | os.PathLike[str]) -> dict[str, object]:
    """One README command on the connected machine, in WORKDIR (profiles/, release.key,
    host.pub as the README names them), with the stick at STICK instead of /media/usb and the
    test's EXTRA options (the shared cache, --json)."""
    args = [str(stick) + a[len(USB):] if a.startswith(USB) else a for a in argv]
    done = subprocess.run(bundle_argv(*args, *extra), cwd=workdir, capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, f"$ bundle {' '.join(argv)}\n{done.stdout}\n{done.stderr}"
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def stick_state(stick: Path) -> dict[str, tuple[int, int]]:
    """What is on the stick: each file's size and modification time."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in stick.iterdir()}


def run_block(host: BareHost, stick: Path, block: str, timeout: float = 900,
              writes: bool = False) -> str:
    """One README block, as written, with `set -e`; a block that does not write on the stick
    is checked to have left it as it was."""
    before = stick_state(stick)
    out = run_on_target(host, "set -e\n" + block, timeout=timeout)
    assert writes or stick_state(stick) == before, "the block wrote on the stick"
    return out


def _payload_trees(release: Path) -> dict[str, str]:
    """A release's payload trees (tests.helpers.tree_snapshot), but for bytecode."""
    return {f"{top}/{path}": what for top in ("files", "npm", "python", "runtimes", "runtime")
            for path, what in tree_snapshot(release / top).items() if "__pycache__" not in path}


def test_seed_001_acceptance(bare_target: BareTargets, tmp_path: Path) -> None:
    """README "On the air-gapped host", run as written: a stick from `bundle export` to a healthy
    seed 001 (FastAPI + alembic on the host's PostgreSQL 15, the npm dashboard on a carried
    Node.js 20) on a bare Debian 12 + postgresql-15 with no network; an upgrade from a second
    stick; a rollback; then the host's receipt onto the stick, a delta 1.3.0 built against it
    on the connected side (the README's commands) and installed by the kit from a third stick."""
    blocks = readme_blocks()
    assert len(blocks) == 5, blocks
    first, upgrade, rollback, receipt, delta = blocks
    assert "install llm-webapp-1.1.0.bundle" in first and "cd /media/usb" in first
    assert "install llm-webapp-1.2.0.bundle" in upgrade and "rollback" in rollback
    assert f" receipt --root /srv/llm-webapp --out {USB}/" in receipt
    assert "install llm-webapp-1.3.0.bundle" in delta and "cd /media/usb" in delta
    build_v3, export_v3 = connected_commands()
    assert build_v3[:2] == ["build", "profiles/llm-webapp.yaml"], build_v3
    assert build_v3[build_v3.index("--against") + 1] == f"{USB}/llm-webapp.receipt", build_v3
    assert build_v3[build_v3.index("--host-key") + 1] == "host.pub", build_v3
    assert export_v3 == ["export", "dist/llm-webapp-1.3.0.bundle", USB], export_v3

    times: dict[str, float] = {}
    connected = tmp_path / "connected"  # the README's working directory there
    connected.mkdir()
    keys = connected
    assert bundle("keygen", keys / "release").rc == 0  # the README's names: release.pub
    t0 = time.monotonic()
    v1 = build(PROFILES / "llm-webapp.yaml", keys / "release.key", tmp_path / "dist1", 1)
    v2 = build(_seed_001_copy(tmp_path / "llm-webapp-v2", "1.2.0"), keys / "release.key",
               tmp_path / "dist2", 2)
    times["build 1.1.0+1.2.0"] = time.monotonic() - t0
    assert (v1.name, v2.name) == ("llm-webapp-1.1.0.bundle", "llm-webapp-1.2.0.bundle")

    stick = tmp_path / "stick"
    stick.mkdir()
    t0 = time.monotonic()
    export(v1, stick, keys / "release.pub")
    times["export 1.1.0"] = time.monotonic() - t0
    kit = kit_on(stick)
    assert kit in first, f"the README names another kit than export writes ({kit})"
    assert {p.name for p in stick.iterdir()} == {
        v1.name, kit, kit + ".sha256", "release.pub", "INSTALL.txt"}
    assert "DATABASE_URL" in (stick / "INSTALL.txt").read_text()

    # The stick is writable (the receipt block writes on it); run_block checks that the
    # other blocks leave it as it was.
    host = bare_target(variant="pg15", stick=stick, stick_at=USB, stick_writable=True)
    assert host.sh("command -v node npm pip uv; true").out == ""  # nothing the bundle brings

    t0 = time.monotonic()
    out = run_block(host, stick, first, timeout=1500)
    times["README block 1: database + install 1.1.0"] = time.monotonic() - t0
    assert "alembic applied 20251102_add_metrics_tables" in out, out
    assert "1.1.0 installed and healthy under /srv/llm-webapp" in out, out
    assert "change-me" not in out  # the secret in shared/.env is never printed
    doc = status(host, kit, "/srv/llm-webapp")
    assert doc["healthy"] is True and current_version(doc) == "1.1.0", doc
    assert json.loads(get(host, "http://127.0.0.1:8000/api/v1/metrics/status"))["status"] \
        == "healthy"
    libs = json.loads(get(host, "http://127.0.0.1:3000/libs"))  # from node_modules on the host
    assert libs["chart.js"].startswith("4."), libs
    node = host.run("/srv/llm-webapp/current/runtime/node/bin/node", "--version")
    assert node.rc == 0 and node.out.startswith("v20."), node.err  # carried, not the host's
    assert _alembic_version(host) == "20251102_add_metrics_tables"

    # A new stick with 1.2.0 (one more alembic revision), a full bundle.
    new_stick(stick)
    t0 = time.monotonic()
    export(v2, stick, keys / "release.pub")
    times["export 1.2.0"] = time.monotonic() - t0
    assert kit_on(stick) == kit
    t0 = time.monotonic()
    out = run_block(host, stick, upgrade, timeout=1500)
    times["README block 2: upgrade to 1.2.0"] = time.monotonic() - t0
    assert "Backing up the database" in out and \
        "alembic applied 20251110_add_metric_unit" in out, out
    assert "1.2.0 installed and healthy" in out, out
    doc = status(host, kit, "/srv/llm-webapp")
    assert doc["healthy"] is True and current_version(doc) == "1.2.0", doc
    assert _alembic_version(host) == "20251110_add_metric_unit"

    t0 = time.monotonic()
    out = run_block(host, stick, rollback)
    times["README block 3: rollback"] = time.monotonic() - t0
    assert "rolled back from 1.2.0 to 1.1.0" in out, out
    doc = status(host, kit, "/srv/llm-webapp")
    assert doc["healthy"] is True and current_version(doc) == "1.1.0", doc
    assert json.loads(get(host, "http://127.0.0.1:8000/api/v1/metrics/status"))["status"] \
        == "healthy"
    # A manual rollback keeps the database as it is (1.2.0's additive column stays).
    assert _alembic_version(host) == "20251110_add_metric_unit"

    _delta_upgrade(host, stick, connected, (receipt, delta), v2, times)
    print("\ntimings (seed 001): " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


def _delta_upgrade(host: BareHost, stick: Path, connected: Path, blocks: tuple[str, str],
                   full_v2: Path, times: dict[str, float]) -> None:
    """The README's smaller upgrade: the host writes its receipt onto the stick; the test
    carries it (and the host key's public half the block prints) to the connected side, runs
    the README's `bundle build --against` and `bundle export` there, and brings the stick back
    with the delta 1.3.0, which the kit installs offline."""
    receipt, delta = blocks
    kit = kit_on(stick)
    t0 = time.monotonic()
    out = run_block(host, stick, receipt, writes=True)
    times["README block 4: receipt"] = time.monotonic() - t0
    assert (stick / "llm-webapp.receipt").is_file(), out
    assert "1.1.0 (sequence 1), 2 kept release(s)" in out, out
    pem = re.search(r"-----BEGIN PUBLIC KEY-----\n.*?-----END PUBLIC KEY-----\n", out, re.S)
    assert pem is not None, out
    host_pub = (host.srv / "llm-webapp" / "state" / "host.pub").read_text()
    assert pem.group(0) == host_pub  # what the operator sends out of band is the host's key
    assert "change-me" not in (stick / "llm-webapp.receipt").read_text()  # no secret in it

    # The connected side: the README's two commands, against the receipt on the stick.
    (connected / "host.pub").write_text(pem.group(0))
    _seed_001_v3(connected / "profiles")
    build_v3, export_v3 = connected_commands()
    t0 = time.monotonic()
    built = on_connected_side(connected, stick, build_v3, "--frozen", "--cache-dir",
                              bundler_cache(), "--json")
    times["build 1.3.0 --against the receipt"] = time.monotonic() - t0
    assert built["bundle"] == "dist/llm-webapp-1.3.0.bundle", built  # as the README says
    v3 = connected / "dist" / "llm-webapp-1.3.0.bundle"
    split = built["delta"]
    assert isinstance(split, dict) and split["authenticated"] is True, split
    # Only the changed application file (and the SBOM, which always travels) travels; wheels,
    # the lock, Node.js, the pre-built node_modules and 1.2.0's migration are in the host's
    # store.
    assert split["travel_files"] == 2 and split["host_files"] >= 5, split
    shown = bundle("inspect", v3, "--trust", connected / "release.pub", "--json")
    assert shown.rc == 0, shown.err
    travelling = [f["path"] for f in json.loads(shown.out)["files"] if f.get("travels", True)]
    assert travelling == ["files/backend/app/main.py", "sbom/bom.cdx.json"], travelling
    size, full = v3.stat().st_size, full_v2.stat().st_size
    print(f"\ndelta 1.3.0: {size} bytes (full 1.2.0: {full}); travels {split['travel_bytes']} "
          f"B, the host supplies {split['host_files']} file(s), {split['host_bytes']} B")
    assert size * 50 <= full, (size, full)  # under 2% of the full bundle (issue 19's bound)

    new_stick(stick)  # the receipt was read: the stick is emptied (export never overwrites)
    t0 = time.monotonic()
    exported = on_connected_side(connected, stick, export_v3, "--cache-dir", bundler_cache(),
                                 "--json")
    times["export 1.3.0"] = time.monotonic() - t0
    assert exported["kit_source"] in ("built", "cached") and kit_on(stick) == kit, exported

    t0 = time.monotonic()
    out = run_block(host, stick, delta, timeout=1500)
    times["README block 5: delta install 1.3.0"] = time.monotonic() - t0
    assert "1.3.0 installed and healthy" in out, out
    doc = status(host, kit, "/srv/llm-webapp")
    assert doc["healthy"] is True and current_version(doc) == "1.3.0", doc
    assert json.loads(get(host, "http://127.0.0.1:8000/api/v1/metrics/release")) \
        == {"release": "1.3.0"}  # the code the delta carried runs
    assert _alembic_version(host) == "20251110_add_metric_unit"
    # 1.3.0 is 1.2.0 with main.py changed: so are its payload trees as the delta made them
    # (file for file against a full install of 1.3.0: tests/test_delta.py; the venv holds its
    # release's path, so it is left out here).
    releases = host.srv / "llm-webapp" / "releases"
    changed = {"files/backend/app/main.py"}
    old, new = (_payload_trees(releases / v) for v in ("1.2.0", "1.3.0"))
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} == changed
    assert (releases / "1.3.0" / "files/backend/app/main.py").read_bytes() == \
        (connected / "profiles/llm-webapp/backend/app/main.py").read_bytes()
    # What did not travel is the host's own copy: 1.3.0's wheels are 1.2.0's, one store object.
    wheels = sorted((releases / "1.3.0" / "python" / "wheels").iterdir())
    assert wheels and all(w.stat().st_ino == (releases / "1.2.0" / "python" / "wheels" /
                                              w.name).stat().st_ino for w in wheels)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
