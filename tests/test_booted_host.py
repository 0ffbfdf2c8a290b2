"""Issue 17 §3 on a host that boots: a Debian 12 with systemd as PID 1 (tests.booted_host),
`--network none`, python3 and the stick, nothing else.

Through the kit: install a process bundle; the unit is enabled and `<root>/bin/` holds the
kit's verified copy. The kit is then taken off the stick, and the power is cut: the service
answers again with nobody running `start`, `status` is healthy, `history` shows the boot's
health check, every command runs from `<root>/bin/`. A second power cut in the middle of an
upgrade (killed as its migrations begin): the boot settles it (the database restored, the
previous release serving). Then `uninstall`: the unit is gone, the services stopped and not
back after another power cut; the database, its backups and the journal are kept; `--purge`
removes the releases and bin/ but keeps them still.
"""

from __future__ import annotations

import json
import re
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import PolicyError
from tests.bare_target import SRV, STICK, Images, run_kit
from tests.booted_host import BootedHost, BootedTargets
from tests.helpers import Run, bundle, make_project
from tests.test_bare_host import fetch, kit, kits, ok, on_stick  # noqa: F401 - fixtures

# network: the bare images are debootstrapped from a Debian mirror on a cold cache
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]

PROFILE = """\
database:
  url: "sqlite:///{root}/app.db"
migrations:
  - {name: schema, sql: app/migrations}
"""


@pytest.fixture
def booted_target(bare_images: Images, tmp_path: Path) -> Iterator[BootedTargets]:
    targets = BootedTargets(bare_images, tmp_path / "booted-target")
    try:
        yield targets
    finally:
        targets.close()


def rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT name FROM items ORDER BY name").fetchall()


def cmd(host: BootedHost, root: str, *args: str, **kw: Any) -> Run:
    """A command through the root's own bundler, as the operator runs it after the install."""
    return host.run(f"{root}/bin/bundle", *args, "--root", root, **kw)


def boot_events(host: BootedHost, root: str) -> list[dict[str, str]]:
    events = json.loads(ok(cmd(host, root, "history", "--json")).out)["events"]
    return [e for e in events if e["step"] == "boot"]


def test_the_stack_comes_back_after_a_power_cut_and_uninstall_keeps_the_data(
        booted_target: BootedTargets, kit: Path, keys: tuple[Path, Path],  # noqa: F811
        tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    migrations = project.dir / "app" / "migrations"
    migrations.mkdir()
    stick = tmp_path / "stick"
    kit_file = on_stick(stick, kit)

    def build(version: str, seq: int, sql: dict[str, str]) -> str:
        for name, text in sql.items():
            (migrations / name).write_text(textwrap.dedent(text))
        built = ok(bundle("build", project.profile(version, sequence=seq, extra=PROFILE),
                          "--key", keys[0], "--out", stick, "--cache-dir", tmp_path / "cache",
                          "--json"))
        return f"{STICK}/{Path(json.loads(built.out)['bundle']).name}"

    v1 = build("1.0.0", 1, {"001.sql": """\
        CREATE TABLE items (name TEXT PRIMARY KEY);
        INSERT INTO items VALUES ('one');
        """})
    v2 = build("2.0.0", 2, {"002.sql": "INSERT INTO items VALUES ('two');\n"})
    (stick / "release.pub").write_bytes(keys[1].read_bytes())

    host = booted_target(stick)
    root = f"{SRV}/shop"
    local = host.srv / "shop"
    health = f"http://127.0.0.1:{project.port}/health"
    ok(run_kit(host, kit_file, "trust", "add", f"{STICK}/release.pub", "--root", root))
    # as INSTALL.txt says: in the stick's directory, the kit by its relative name
    install = ok(host.run("python3", "-I", "-S", kit_file.name, "install", v1, "--root", root,
                          workdir=STICK))
    said = install.out + install.err
    found = re.search(r"boot: enabled \((bundler-shop-[0-9a-f]{8}\.service): starts the stack "
                      r"at boot, health-checked\)", said)
    assert found, said
    unit = found.group(1)
    assert said.count("boot: ") == 1, said
    assert host.run("systemctl", "is-enabled", unit).out.strip() == "enabled"
    text = host.run("cat", f"/etc/systemd/system/{unit}").out
    assert f"ExecStart={root}/bin/bundle start --root {root} --boot" in text, text
    copy = local / "bin" / kit_file.name
    assert copy.read_bytes() == kit_file.read_bytes()
    assert (local / "bin" / "bundle").read_text().splitlines()[-1] == \
        f'exec /usr/bin/python3 -I -S {root}/bin/{kit_file.name} "$@"'

    # The stick is gone: only what the install left on the host is there.
    kit_file.unlink()
    assert host.run("test", "-e", f"{STICK}/{kit_file.name}").rc == 1
    assert host.power_cut() == "running"  # every unit started, ours included
    served = fetch(host, health)  # nobody ran `start`
    assert json.loads(served.out or "null") == {"greeting": "hello from a wheel",
                                                "version": "1.0.0"}, served.err
    status = json.loads(ok(cmd(host, root, "status", "--json")).out)
    assert status["healthy"] is True and status["current"]["version"] == "1.0.0", status
    assert status["boot"] == {"configured": True, "unit": unit,
                              "detail": f"enabled ({unit}, active)"}, status
    boots = boot_events(host, root)
    assert [e["status"] for e in boots][-2:] == ["started", "healthy"], boots
    assert f"web: ok GET {health}: 200" in boots[-1]["detail"], boots
    journal = host.run("journalctl", "-u", unit, "-b", "--no-pager").out
    assert "started 1.0.0" in journal, journal

    # A power cut while an upgrade migrates: the boot settles it (as `recover` would).
    killed = cmd(host, root, "install", v2, env={"BUNDLER_FAULT": "kill:migrate"})
    assert killed.rc == -9 or killed.rc == 137, killed.out + killed.err
    assert host.power_cut() == "running"
    served = fetch(host, health)
    assert json.loads(served.out or "null")["version"] == "1.0.0", served.err
    assert rows(local / "app.db") == [("one",)]
    boots = boot_events(host, root)
    assert [e["status"] for e in boots][-3:] == ["started", "recovered", "healthy"], boots
    assert "rolled back: the install of 2.0.0 was interrupted during migrate" in \
        boots[-2]["detail"], boots

    # uninstall: the unit is gone and the services stopped; database, backups, journal kept
    gone = json.loads(ok(cmd(host, root, "uninstall", "--json")).out)
    assert gone["unit_removed"] == unit and gone["stopped"] == "1.0.0", gone
    assert {"state", "shared", "backups"} <= set(gone["kept"]), gone
    assert host.run("test", "-e", f"/etc/systemd/system/{unit}").rc == 1
    assert host.run("systemctl", "is-enabled", unit).out.strip() != "enabled"
    assert fetch(host, health).rc != 0
    backups = sorted(p.name for p in (local / "backups").iterdir())
    assert backups, "the database backups are kept"
    assert host.power_cut() == "running"
    assert fetch(host, health).rc != 0  # nothing starts at boot any more
    after = json.loads(cmd(host, root, "status", "--json").out)
    assert after["healthy"] is False and after["boot"]["configured"] is False, after
    assert after["boot"]["detail"].startswith(f"not configured (no unit {unit}"), after

    refused = cmd(host, root, "uninstall", "--purge")  # destructive: not without --yes
    assert refused.rc == PolicyError.exit_code and "needs confirmation" in refused.err, refused.err
    assert (local / "releases" / "1.0.0").is_dir()
    purged = json.loads(ok(host.run("python3", "-I", "-S", f"{root}/bin/{kit_file.name}",
                                    "uninstall", "--root", root, "--purge", "--yes",
                                    "--json")).out)
    assert purged["purged"] == ["current", "releases", "bin", "store"], purged
    assert sorted(p.name for p in local.iterdir()) == ["app.db", "backups", "shared", "state"]
    assert rows(local / "app.db") == [("one",)]
    assert sorted(p.name for p in (local / "backups").iterdir()) == backups
    with sqlite3.connect(local / "state" / "state.db") as conn:
        steps = [r[0] for r in conn.execute("SELECT step FROM events WHERE step='uninstall'")]
    assert steps == ["uninstall", "uninstall"]
