"""Issue 17 §3, the fast part: the boot unit's text and its install/undo against a fake
systemd (the adapter boundary), the root's own command (`<root>/bin/`: the kit copy verified
against its digest, the wrapper), and restart-policy detection for compose files.

The real thing (a booted Debian 12, a power cut, `uninstall`) is tests/test_booted_host.py;
an install and `uninstall` on this host (no systemd) is at the end of this file (slow)."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import select
import sqlite3
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bundler.bundle import kitboot
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import ComposeSpec, Runtime, Service, Target
from bundler.errors import IntegrityError, PolicyError, RolledBackError, StateError, UnhealthyError
from bundler.install import boot, rootbin
from bundler.install import compose_runtime as cr
from bundler.install.layout import Layout
from tests.helpers import Project, bundle, bundle_argv, offline

# --- a fake systemd: unit files in a directory, enablement as a set ---------------------------


class FakeSystemd(boot.Systemd):
    def __init__(self, unit_dir: Path, fail: str | None = None) -> None:
        unit_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(unit_dir, booted=unit_dir)
        self.on: set[str] = set()
        self.calls: list[str] = []
        self.fail = fail

    def unavailable(self) -> str | None:
        return None

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.fail == what.split()[0]:
            raise OSError(f"{what} failed")

    def reload(self) -> None:
        self._call("daemon-reload")

    def enable(self, unit: str) -> None:
        self._call(f"enable {unit}")
        self.on.add(unit)

    def disable(self, unit: str) -> None:
        self._call(f"disable {unit}")
        self.on.discard(unit)

    def stop(self, unit: str) -> None:
        self._call(f"stop {unit}")

    def enabled(self, unit: str) -> bool:
        return unit in self.on

    def active(self, unit: str) -> str:
        return "active"


class NoSystemd(boot.Systemd):
    def unavailable(self) -> str | None:
        return "no systemd"


def manifest(name: str = "shop", compose: bool = False, version: str = "1.0.0") -> Manifest:
    runtime = Runtime(services=(Service("web", ("sleep", "1")),),
                      compose=ComposeSpec(("stack/compose.yml",)) if compose else None)
    return Manifest(name=name, version=version, sequence=1, created="2026-01-01T00:00:00Z",
                    target=Target(), files=(), runtime=runtime)


def parse_unit(text: str) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=True, delimiters=("=",), comment_prefixes=("#",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    return unit


# --- the unit file ------------------------------------------------------------------------------

def test_unit_name_is_per_product_and_root(tmp_path: Path) -> None:
    a = boot.unit_name("shop", tmp_path / "a")
    assert a == boot.unit_name("shop", tmp_path / "a" / ".." / "a")  # the resolved root
    assert a != boot.unit_name("shop", tmp_path / "b")
    assert a.startswith("bundler-shop-") and a.endswith(".service")
    assert len(a) == len("bundler-shop-") + 8 + len(".service")
    assert boot.unit_name("My Shop!", tmp_path).startswith("bundler-my-shop-")


def test_unit_text_runs_the_roots_own_command_at_boot() -> None:
    root = Path("/srv/shop")
    unit = parse_unit(boot.unit_text(root, "shop", root / "bin/bundle", compose=False))
    svc = unit["Service"]
    assert svc["Type"] == "oneshot" and svc["RemainAfterExit"] == "yes"
    assert svc["ExecStart"] == "/srv/shop/bin/bundle start --root /srv/shop --boot"
    assert svc["ExecStop"] == "/srv/shop/bin/bundle stop --root /srv/shop"
    assert svc["SuccessExitStatus"] == "19"  # unhealthy: the supervisors stay
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert unit["Unit"]["Wants"] == "network-online.target"
    after = unit["Unit"]["After"].split()
    assert after[0] == "network-online.target" and "docker.service" in after
    assert "postgresql.service" in after  # a database on the same host starts first
    assert unit["Unit"]["RequiresMountsFor"] == "/srv/shop"
    assert "ExecStartPre" not in svc and "User" not in svc


def test_unit_of_a_compose_release_wants_the_engine() -> None:
    root = Path("/srv/shop")
    unit = parse_unit(boot.unit_text(root, "shop", root / "bin/bundle", compose=True))
    assert unit["Unit"]["Wants"].split() == ["network-online.target", "docker.service"]
    assert "docker.service" in unit["Unit"]["After"].split()


# --- setting the unit up, and its undo ----------------------------------------------------------

def test_configure_writes_and_enables_the_unit_and_is_idempotent(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(Path("/srv/shop"))
    setup, _ = boot.configure(layout, manifest(), layout.root / "bin/bundle", sd)
    unit = boot.unit_name("shop", layout.root)
    assert setup.configured and setup.unit == unit
    path = sd.unit_dir / unit
    assert path.read_text() == boot.unit_text(layout.root, "shop", layout.root / "bin/bundle",
                                              False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sd.on == {unit} and sd.calls == ["daemon-reload", f"enable {unit}"]
    sd.calls.clear()
    again, undo = boot.configure(layout, manifest(version="2.0.0"), layout.root / "bin/bundle",
                                 sd)
    assert again == setup and sd.calls == []  # the same unit: nothing to do
    undo()
    assert path.is_file() and sd.on == {unit}


def test_undo_of_a_first_install_leaves_no_unit(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(Path("/srv/shop"))
    _, undo = boot.configure(layout, manifest(), layout.root / "bin/bundle", sd)
    undo()
    assert list(sd.unit_dir.iterdir()) == [] and sd.on == set()


def test_undo_puts_back_the_previous_unit_and_its_enablement(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(Path("/srv/shop"))
    unit = boot.unit_name("shop", layout.root)
    old = "[Unit]\nDescription=an older bundler's unit\n"
    (sd.unit_dir / unit).write_text(old)  # present but disabled by the operator
    _, undo = boot.configure(layout, manifest(compose=True), layout.root / "bin/bundle", sd)
    assert "docker.service" in (sd.unit_dir / unit).read_text() and sd.on == {unit}
    undo()
    assert (sd.unit_dir / unit).read_text() == old and sd.on == set()


def test_a_failing_systemctl_leaves_the_previous_state(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units", fail="enable")
    layout = Layout(Path("/srv/shop"))
    with pytest.raises(OSError, match="enable"):
        boot.configure(layout, manifest(), layout.root / "bin/bundle", sd)
    assert list(sd.unit_dir.iterdir()) == [] and sd.on == set()


def test_no_systemd_says_so_and_writes_nothing(tmp_path: Path) -> None:
    sd = NoSystemd(tmp_path / "units", booted=tmp_path / "absent")
    layout = Layout(Path("/srv/shop"))
    setup, _ = boot.configure(layout, manifest(), layout.root / "bin/bundle", sd)
    assert not setup.configured and setup.unit is None
    assert setup.detail.startswith("not configured (no systemd): after a reboot, run "
                                   "`/srv/shop/bin/bundle start --root /srv/shop`")
    assert boot.describe(layout, "shop", sd).detail == "not configured (no systemd)"
    assert not (tmp_path / "units").exists()


def test_the_real_adapter_sees_no_systemd_on_this_host(tmp_path: Path) -> None:
    assert boot.Systemd(tmp_path, booted=tmp_path / "run-systemd-system").unavailable() == \
        "no systemd"


def test_a_root_a_unit_cannot_name_plainly_gets_no_unit(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(Path("/srv/my shop"))
    setup, _ = boot.configure(layout, manifest(), layout.root / "bin/bundle", sd)
    assert not setup.configured and "characters a unit file would interpret" in setup.detail
    assert list(sd.unit_dir.iterdir()) == []


def test_describe_and_remove(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(tmp_path / "root")
    unit = boot.unit_name("shop", layout.root)
    assert boot.describe(layout, "shop", sd).detail.startswith(f"not configured (no unit {unit}")
    assert boot.remove(layout, "shop", sd) is None  # nothing to remove
    boot.configure(layout, manifest(), layout.root / "bin/bundle", sd)
    assert boot.describe(layout, "shop", sd).to_json() == {
        "configured": True, "unit": unit, "detail": f"enabled ({unit}, active)"}
    sd.calls.clear()
    assert boot.remove(layout, "shop", sd) == unit
    assert sd.calls == [f"stop {unit}", f"disable {unit}", "daemon-reload"]
    assert list(sd.unit_dir.iterdir()) == [] and sd.on == set()


# --- around the commit: bin/ and the unit go in together, and back out ---------------------------

def test_a_failed_commit_leaves_no_unit_and_no_bin(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(tmp_path / "root")
    layout.root.mkdir()
    with pytest.raises(RuntimeError, match="commit"), \
            boot.at_commit(layout, manifest(), systemd=sd):
        assert (layout.root / "bin/bundle").is_file() and sd.on
        raise RuntimeError("commit failed")
    assert list(sd.unit_dir.iterdir()) == [] and sd.on == set()
    assert list(layout.root.iterdir()) == []


def test_a_failed_upgrade_commit_puts_the_previous_wrapper_and_unit_back(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(tmp_path / "root")
    layout.root.mkdir()
    with boot.at_commit(layout, manifest(), systemd=sd):
        pass
    wrapper = layout.root / "bin/bundle"
    wrapper.write_text("#!/bin/sh\nexec an older bundler\n")
    unit = sd.unit_dir / boot.unit_name("shop", layout.root)
    before = unit.read_text()
    with pytest.raises(KeyboardInterrupt), \
            boot.at_commit(layout, manifest(compose=True, version="2.0.0"), systemd=sd):
        assert "docker.service" in unit.read_text().split("Wants=")[1].splitlines()[0]
        raise KeyboardInterrupt
    assert wrapper.read_text() == "#!/bin/sh\nexec an older bundler\n"
    assert unit.read_text() == before and sd.on == {unit.name}


def test_at_commit_journals_and_prints_the_outcome(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    sd = NoSystemd(tmp_path / "units", booted=tmp_path / "absent")
    layout = Layout(tmp_path / "root")
    layout.root.mkdir()
    records: list[tuple[str, str, str]] = []
    with boot.at_commit(layout, manifest(), lambda *r: records.append(r), systemd=sd):
        pass
    assert [r[:2] for r in records] == [("boot", "none")]
    err = capsys.readouterr().err
    assert err.count("boot: not configured (no systemd)") == 1, err
    assert f"this root's own command: {layout.root / 'bin/bundle'}" in err


def test_nothing_after_the_commit_can_fail_the_install(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path / "units")
    layout = Layout(tmp_path / "root")
    layout.root.mkdir()

    def broken_journal(*_: str) -> None:
        raise OSError("disk full")

    with boot.at_commit(layout, manifest(), broken_journal, systemd=sd):
        pass  # committed: the journal's failure is reported, not raised (no undo of it)
    assert (sd.unit_dir / boot.unit_name("shop", layout.root)).is_file()
    assert (layout.root / "bin" / "bundle").is_file()


# --- the root's own command ---------------------------------------------------------------------

def make_kit(path: Path, files: dict[str, bytes], digest: str | None = None) -> str:
    """A kit-shaped zip: site/ files and a kit.json recording their digest (or `digest`)."""
    seen = [(name, hashlib.sha256(data).hexdigest(), False) for name, data in files.items()]
    real = kitboot.tree_digest(seen)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__main__.py", "print('a kit')\n")
        for name, data in sorted(files.items()):
            zf.writestr(kitboot.SITE + name, data)
        zf.writestr(kitboot.META, json.dumps({"digest": digest or real, "bundler": "0.1.0"}))
    return real


def test_wrapper_runs_the_kit_or_this_installation() -> None:
    kit = rootbin.wrapper_text("/usr/bin/python3", Path("/srv/a b/bin/bundler-kit-1.pyz"))
    assert kit.startswith("#!/bin/sh\n")
    assert kit.splitlines()[-1] == \
        "exec /usr/bin/python3 -I -S '/srv/a b/bin/bundler-kit-1.pyz' \"$@\""
    plain = rootbin.wrapper_text("/opt/venv/bin/python", None)
    assert plain.splitlines()[-1] == 'exec /opt/venv/bin/python -I -m bundler "$@"'


def test_not_running_from_a_kit_here() -> None:
    assert rootbin.running().kit is None


def test_the_running_kit_is_copied_verified_and_wrapped(tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    kit = stick / "bundler-kit-0.1.0-manylinux_2_36_x86_64.pyz"
    digest = make_kit(kit, {"bundler/__init__.py": b"x = 1\n"})
    sha = hashlib.sha256(kit.read_bytes()).hexdigest()
    (stick / (kit.name + ".sha256")).write_text(f"{sha}  {kit.name}\n")
    layout = Layout(tmp_path / "root")
    layout.root.mkdir()
    how = rootbin.Running("/usr/bin/python3", kit, digest)
    wrapper, undo = rootbin.place(layout, how)
    copy = layout.root / "bin" / kit.name
    assert copy.read_bytes() == kit.read_bytes()
    assert (layout.root / "bin" / (kit.name + ".sha256")).read_text() == f"{sha}  {kit.name}\n"
    for path in (layout.root / "bin", copy, wrapper):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755 and path.stat().st_uid == os.geteuid()
    assert wrapper.read_text().splitlines()[-1] == f'exec /usr/bin/python3 -I -S {copy} "$@"'
    assert rootbin.wrapped_kit(layout) == copy
    undo()
    assert not (layout.root / "bin").exists()


def test_running_from_bin_copies_nothing_and_old_kits_are_pruned(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    bindir = layout.root / "bin"
    bindir.mkdir(parents=True)
    old = bindir / "bundler-kit-0.0.9-x.pyz"
    make_kit(old, {"bundler/__init__.py": b"old\n"})
    kit = bindir / "bundler-kit-0.1.0-x.pyz"
    digest = make_kit(kit, {"bundler/__init__.py": b"new\n"})
    how = rootbin.Running("/usr/bin/python3", kit, digest)
    rootbin.place(layout, how)
    assert sorted(p.name for p in bindir.iterdir()) == ["bundle", old.name, kit.name]
    assert rootbin.prune(layout, how) == [old.name]
    assert sorted(p.name for p in bindir.iterdir()) == ["bundle", kit.name]


@pytest.mark.parametrize("damage", ["recorded digest", "published sha256", "swapped"])
def test_a_kit_that_does_not_verify_is_not_installed(tmp_path: Path, damage: str) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    kit = stick / "bundler-kit-0.1.0-x.pyz"
    files = {"bundler/__init__.py": b"x = 1\n"}
    digest = make_kit(kit, files, digest="0" * 64 if damage == "recorded digest" else None)
    if damage == "published sha256":
        (stick / (kit.name + ".sha256")).write_text(f"{'1' * 64}  {kit.name}\n")
    if damage == "swapped":  # the file on the stick is not the kit that is running
        digest = "2" * 64
    layout = Layout(tmp_path / "root")
    layout.root.mkdir()
    with pytest.raises(IntegrityError):
        rootbin.place(layout, rootbin.Running("/usr/bin/python3", kit, digest))
    assert list(layout.root.iterdir()) == []  # no bin/, no temp file


def test_a_bin_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    (layout.root / "bin").mkdir(parents=True)
    os.chmod(layout.root / "bin", 0o777)
    with pytest.raises(StateError, match="writable by its group and others"):
        rootbin.place(layout, rootbin.Running("/usr/bin/python3"))
    assert list((layout.root / "bin").iterdir()) == []


# --- compose restart policies -------------------------------------------------------------------

def test_compose_services_without_a_restart_policy(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("""\
services:
  web: {image: x, restart: unless-stopped}
  worker: {image: x}
  never: {image: x, restart: no}
  swarmish: {image: x, deploy: {restart_policy: {condition: any}}}
  migrate: {image: x}
  api:
    image: x
    depends_on: {migrate: {condition: service_completed_successfully}}
""")
    (tmp_path / "b.yml").write_text("services:\n  api: {restart: always}\n")
    assert cr.no_restart_policy(tmp_path, ("a.yml",)) == ["api", "never", "worker"]
    assert cr.no_restart_policy(tmp_path, ("a.yml", "b.yml")) == ["never", "worker"]
    assert cr.no_restart_policy(tmp_path, ("missing.yml",)) == []


# --- on this host (no systemd): install, the root's own command, start --boot, uninstall ------

SQLITE = """\
database:
  url: "sqlite:///{root}/app.db"
migrations:
  - {name: schema, sql: app/migrations}
"""


@pytest.mark.slow
def test_install_then_uninstall_on_a_host_without_systemd(project: Project,
                                                          keys: tuple[Path, Path],
                                                          tmp_path: Path,
                                                          roots: list[Path]) -> None:
    migrations = project.dir / "app" / "migrations"
    migrations.mkdir()
    (migrations / "001.sql").write_text("CREATE TABLE items (name TEXT);\n"
                                        "INSERT INTO items VALUES ('kept');\n")
    built = []
    for version, healthy in (("1.0.0", True), ("1.0.1", False)):
        done = bundle("build", project.profile(version, healthy=healthy, extra=SQLITE),
                      "--key", keys[0], "--out", project.dir / "dist",
                      "--cache-dir", tmp_path / "cache", "--json")
        assert done.rc == 0, done.err
        built.append(json.loads(done.out)["bundle"])
    root, failed_root = tmp_path / "target", tmp_path / "failed"
    roots += [root, failed_root]
    own = [str(root / "bin" / "bundle")]
    runs = offline(
        bundle_argv("install", built[1], "--trust", keys[1], "--root", failed_root),
        bundle_argv("install", built[0], "--trust", keys[1], "--root", root),
        [*own, "status", "--root", root, "--json"],
        [*own, "stop", "--root", root],
        [*own, "start", "--root", root, "--boot"],
        [*own, "history", "--root", root, "--json"],
        [*own, "uninstall", "--root", root, "--purge"],
        [*own, "uninstall", "--root", root, "--json"],
        [*own, "status", "--root", root, "--json"],
    )
    failed, install, status, stop, boot_start, history, refused, gone, stopped = runs
    assert failed.rc == RolledBackError.exit_code, failed.err
    assert not (failed_root / "bin").exists()  # a failed first install leaves no bin/

    assert install.rc == 0, install.err
    assert install.err.count("boot: not configured (no systemd): after a reboot, run "
                             f"`{root}/bin/bundle start --root {root}`") == 1, install.err
    assert f"this root's own command: {root}/bin/bundle (runs this installation's bundler" \
        in install.err
    wrapper = root / "bin" / "bundle"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert wrapper.read_text().splitlines()[-1] == f'exec {sys.executable} -I -m bundler "$@"'
    doc = json.loads(status.out)
    assert doc["healthy"] is True and doc["boot"] == {
        "configured": False, "unit": None, "detail": "not configured (no systemd)"}, doc
    assert stop.rc == 0 and boot_start.rc == 0, stop.err + boot_start.err
    boots = [(e["step"], e["status"]) for e in json.loads(history.out)["events"]
             if e["step"] == "boot"]
    assert boots == [("boot", "none"), ("boot", "started"), ("boot", "healthy")], boots

    assert refused.rc == PolicyError.exit_code and "needs confirmation" in refused.err, refused.err
    doc = json.loads(gone.out)
    assert doc == {"ok": True, "root": str(root), "product": "shop", "stopped": "1.0.0",
                   "unit_removed": None, "purged": [], "kept": ["state", "shared", "backups"]}
    doc = json.loads(stopped.out)
    assert stopped.rc == UnhealthyError.exit_code \
        and [s["running"] for s in doc["services"]] == [False], doc
    # --purge on a terminal asks; "no" changes nothing
    said, rc = on_a_terminal([*own, "uninstall", "--root", str(root), "--purge"], b"n\n")
    assert rc == PolicyError.exit_code and "not confirmed; nothing was changed" in said, said
    assert f"Remove {root}/current, {root}/releases, {root}/bin" in said and "[y/N]" in said
    assert (root / "releases" / "1.0.0").is_dir() and (root / "bin" / "bundle").is_file()
    # the same bundle again: already current, started again
    again, back, purged, replay, reinstall, purged2 = offline(
        bundle_argv("install", built[0], "--trust", keys[1], "--root", root, "--json"),
        [*own, "status", "--root", root, "--json"],
        [*own, "uninstall", "--root", root, "--purge", "--yes", "--json"],
        bundle_argv("install", built[0], "--trust", keys[1], "--root", root),
        bundle_argv("install", built[0], "--trust", keys[1], "--root", root,
                    "--allow-downgrade"),
        [*own, "uninstall", "--root", root, "--purge", "--yes"])
    assert again.rc == 0 and json.loads(again.out)["status"] == "unchanged", again.err
    assert json.loads(back.out)["healthy"] is True, back.out
    doc = json.loads(purged.out)
    assert doc["purged"] == ["current", "releases", "bin", "store"] \
        and doc["stopped"] == "1.0.0", doc
    assert sorted(p.name for p in root.iterdir()) == ["app.db", "backups", "shared", "state"]
    with sqlite3.connect(root / "app.db") as conn:
        assert conn.execute("SELECT name FROM items").fetchall() == [("kept",)]
    # the accepted sequence is kept: the same bundle again is a replay unless allowed
    assert replay.rc == PolicyError.exit_code \
        and "not newer than the last accepted" in replay.err, replay.err
    assert reinstall.rc == 0 and purged2.rc == 0, reinstall.err + purged2.err


def on_a_terminal(argv: list[str], reply: bytes) -> tuple[str, int]:
    """Run argv with a pseudo-terminal as stdin and stderr, typing `reply`; what it printed
    there and its exit status."""
    master, slave = os.openpty()
    try:
        child = subprocess.Popen(argv, stdin=slave, stdout=subprocess.DEVNULL, stderr=slave)
        os.write(master, reply)
        rc = child.wait(timeout=120)
        said = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            said += chunk
        return said.decode(errors="replace"), rc
    finally:
        os.close(master)
        os.close(slave)
