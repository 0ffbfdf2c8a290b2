"""Data directories (profile `data:`): validation with file:line, the signed manifest field,
`{data:NAME}`, and the target-side safety of creating, re-owning, backing up and restoring a
tree an unprivileged account owns (its planted symlinks are never followed, its hard links to
root's files never handed over)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.build.profile import load_profile
from bundler.bundle.manifest import Manifest, parse_manifest
from bundler.bundle.models import DataDir, MigrationSpec, Runtime, Target
from bundler.errors import InstallError, ProfileError, RecoveryPendingError, SignatureError
from bundler.install import datadirs, environ
from bundler.install.layout import Layout
from tests.helpers import bundle, unavailable


def _profile(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bundle.yaml"
    path.write_text("schema: 1\nname: app\nversion: 1.0.0\n" + textwrap.dedent(body))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ProfileError) as exc:
        load_profile(path, check_files=False)
    return [str(p) for p in exc.value.problems]


# --------------------------------------------------------------------------- profile

def test_profile_data_short_and_long_forms(tmp_path: Path) -> None:
    path = _profile(tmp_path, """\
        data:
          - uploads
          - {name: cache, mode: 0700, backup: never}
          - name: index
            mode: "0755"
            backup: always
          - {name: plain, mode: 750}
        services:
          - name: web
            command: [app, --uploads, "{data:uploads}", --all, "{data}"]
            env: {CACHE: "{data:cache}", SHELLISH: "${X:-y}"}
    """)
    p = load_profile(path, check_files=False)
    assert p.runtime.data == (DataDir("uploads", 0o750, "migrate"),
                              DataDir("cache", 0o700, "never"),
                              DataDir("index", 0o755, "always"),
                              DataDir("plain", 0o750, "migrate"))


def test_profile_data_problems_name_file_and_line(tmp_path: Path) -> None:
    path = _profile(tmp_path, """\
        data:
          - Uploads
          - {name: cache, mode: 0777}
          - {name: keys, mode: 0600}
          - {name: logs, mode: 0770}
          - {name: odd, mode: rwx}
          - {name: cache, backup: sometimes}
          - {name: there, path: /var/lib/there}
          - {mode: 0700}
        services:
          - name: web
            command: [app, "{data:nope}", "{dta:cache}"]
    """)
    problems = _problems(path)
    f = str(path)
    expected = [
        f"{f}:5: data[0]: 'Uploads' is not valid",
        f"{f}:6: data[1].mode: '0777' is not valid",
        f"{f}:7: data[2].mode: '0600' is not valid",
        f"{f}:8: data[3].mode: '0770' is not valid",
        f"{f}:9: data[4].mode: 'rwx' is not valid",
        f"{f}:10: data[5].backup: 'sometimes' is not valid",
        f"{f}:11: data[6]: unknown key 'path'",
        f"{f}:12: data[7]: missing required key 'name'",
        f"{f}:15: placeholder {{data:nope}} names no data directory",
        f"{f}:15: unknown placeholder {{dta:cache}}",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    text = "\n".join(problems)
    assert "no group or world write" in text  # the mode hint
    assert "did you mean {data:cache}" in text
    assert "allowed: name, mode, backup" in text


def test_profile_data_names_are_unique(tmp_path: Path) -> None:
    path = _profile(tmp_path, "data: [uploads, {name: uploads, mode: 0700}]\n")
    assert any(p.startswith(f"{path}:4: data directory 'uploads' appears twice")
               for p in _problems(path))


def test_data_placeholder_needs_a_declared_directory(tmp_path: Path) -> None:
    path = _profile(tmp_path, """\
        services:
          - name: web
            command: [app, "{data}"]
    """)
    assert any("placeholder {data} but the profile declares no `data:`" in p
               for p in _problems(path))


def test_validate_cli_reports_data_problems_with_exit_3(tmp_path: Path) -> None:
    path = _profile(tmp_path, "data: [../etc]\n")
    result = bundle("validate", path)
    assert result.rc == ProfileError.exit_code, result.err
    assert f"{path}:4: data[0]: '../etc' is not valid" in result.err


# --------------------------------------------------------------------------- manifest

def _manifest(data: tuple[DataDir, ...] = (), user: str | None = None) -> Manifest:
    return Manifest(name="app", version="1.0.0", sequence=1, created="2026-01-01T00:00:00Z",
                    target=Target(), files=(), runtime=Runtime(data=data, user=user))


def test_manifest_carries_data_only_when_declared() -> None:
    plain = _manifest()
    assert b'"data"' not in plain.to_bytes()  # older bundles stay byte-identical
    assert parse_manifest(plain.to_bytes()).runtime.data == ()
    dirs = (DataDir("uploads"), DataDir("cache", 0o700, "never"))
    signed = _manifest(dirs)
    assert b'"data":[{"backup":"migrate","mode":"0750","name":"uploads"}' in signed.to_bytes()
    back = parse_manifest(signed.to_bytes())
    assert back.runtime.data == dirs and back.to_bytes() == signed.to_bytes()


@pytest.mark.parametrize(("good", "bad", "why"), [
    (b'"name":"uploads"', b'"name":"../etc"', "is not a name"),
    (b'"name":"uploads"', b'"name":"/var/lib"', "is not a name"),
    (b'"name":"uploads"', b'"name":"cache"', "same name"),
    (b'"mode":"0750"', b'"mode":"0777"', "no group or world write"),
    (b'"mode":"0750"', b'"mode":488', "no group or world write"),
    (b'"backup":"migrate"', b'"backup":"sometimes"', "not one of"),
    (b'"backup":"migrate",', b'"backup":"migrate","path":"/etc",', "exactly name, mode"),
    (b'"data":[{', b'"data":[],"x":[{', "non-empty list"),
])
def test_forged_data_fields_are_refused(good: bytes, bad: bytes, why: str) -> None:
    data = _manifest((DataDir("uploads"), DataDir("cache", 0o700, "never"))).to_bytes()
    forged = data.replace(good, bad, 1)
    assert forged != data
    with pytest.raises(SignatureError, match=why):
        parse_manifest(forged)


def test_data_placeholders_expand_under_the_root(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    env = environ.release_env(layout, Runtime().env, "production", version="1.0.0")
    assert env.expand("{data:uploads}/x") == f"{tmp_path}/data/uploads/x"
    assert env.expand("{data}") == f"{tmp_path}/data"
    assert env.expand("{data:../x}") == "{data:../x}"  # not a placeholder: left as text


# --------------------------------------------------------------------------- target side

@pytest.fixture
def run_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway system account, removed afterwards."""
    if os.geteuid() != 0:
        unavailable("creating a system user needs root")
    name = f"bundler-dd-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        unavailable("creating a system user needs root")
    name = f"bundler-dd-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def world() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="bundler-dd-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _tree(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything a restore must reproduce, read independently of datadirs: per entry its
    type, mode, owner, mtime (ns) and content hash or link target."""
    out: dict[str, tuple[object, ...]] = {}
    for p in [top, *sorted(top.rglob("*"))]:
        st = p.lstat()
        rel = "." if p == top else p.relative_to(top).as_posix()
        if stat.S_ISLNK(st.st_mode):
            what: object = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISDIR(st.st_mode):
            what = "dir"
        else:
            continue
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_mtime_ns, what)
    return out


def _as(user: pwd.struct_passwd, *paths: Path) -> None:
    for p in paths:
        os.lchown(p, user.pw_uid, user.pw_gid)


def test_prepare_creates_owned_directories_and_refuses_symlinks(
        run_user: pwd.struct_passwd, world: Path) -> None:
    layout = Layout(world / "root")
    layout.root.mkdir()
    m = _manifest((DataDir("uploads"), DataDir("keys", 0o700, "never")), user=run_user.pw_name)
    datadirs.check(layout, m)  # nothing there yet: fine
    assert not (layout.root / "data").exists()
    datadirs.prepare(layout, m)
    base = layout.root / "data"
    st = base.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    for name, mode in (("uploads", 0o750), ("keys", 0o700)):
        st = (base / name).lstat()
        assert stat.S_ISDIR(st.st_mode)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
            run_user.pw_uid, run_user.pw_gid, mode)
    # a mode the account changed is put back; what is in it is never touched
    (base / "uploads" / "kept.txt").write_text("x")
    os.chmod(base / "uploads", 0o777)
    datadirs.prepare(layout, m)
    assert stat.S_IMODE((base / "uploads").stat().st_mode) == 0o750
    assert (base / "uploads" / "kept.txt").read_text() == "x"
    # a data directory that is a symlink is refused, before and during an install
    victim = world / "victim"
    victim.mkdir()
    shutil.rmtree(base / "keys")
    (base / "keys").symlink_to(victim)
    for call in (datadirs.check, datadirs.prepare):
        with pytest.raises(InstallError, match="data directory keys is not a directory"):
            call(layout, m)
    assert victim.stat().st_uid == 0 and stat.S_IMODE(victim.stat().st_mode) == 0o755


def test_data_base_not_roots_is_refused(run_user: pwd.struct_passwd, world: Path) -> None:
    layout = Layout(world / "root")
    (layout.root / "data").mkdir(parents=True)
    os.chown(layout.root / "data", run_user.pw_uid, run_user.pw_gid)
    m = _manifest((DataDir("uploads"),), user=run_user.pw_name)
    with pytest.raises(InstallError, match="only root may create or rename") as exc:
        datadirs.check(layout, m)
    assert "chown root:root" in exc.value.hint
    assert not (layout.root / "data" / "uploads").exists()


def test_reown_never_follows_the_accounts_symlinks_or_hard_links(
        run_user: pwd.struct_passwd, other_user: pwd.struct_passwd, world: Path) -> None:
    """The release's `user` changes from run_user to other_user: root re-owns run_user's tree.
    run_user planted a symlink to a root-only file (as /etc/shadow is), a symlink to a root
    directory, and (as protected_hardlinks=0 would allow) a hard link to root's file: none of
    them may end up other_user's; its own files do."""
    layout = Layout(world / "root")
    layout.root.mkdir()
    datadirs.prepare(layout, _manifest((DataDir("uploads"),), user=run_user.pw_name))
    top = layout.root / "data" / "uploads"
    shadow = world / "shadow"
    shadow.write_text("root:$6$secret\n")
    shadow.chmod(0o640)
    root_dir = world / "etc"
    root_dir.mkdir()
    (root_dir / "passwd").write_text("x")
    mine = top / "notes"
    mine.mkdir()
    (mine / "a.txt").write_text("mine")
    (top / "shadow-link").symlink_to(shadow)
    (mine / "etc-link").symlink_to(root_dir)
    os.link(shadow, top / "hardlink")  # root makes it: the kernel would stop the account
    _as(run_user, mine, mine / "a.txt", top / "shadow-link", mine / "etc-link")

    datadirs.prepare(layout, _manifest((DataDir("uploads"),), user=other_user.pw_name))
    new = (other_user.pw_uid, other_user.pw_gid)
    for p in (top, mine, mine / "a.txt", top / "shadow-link", mine / "etc-link"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == new, p
    for p in (shadow, root_dir, root_dir / "passwd"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), p
    assert stat.S_IMODE(shadow.stat().st_mode) == 0o640


def _filled(layout: Layout, user: pwd.struct_passwd) -> tuple[Path, Path]:
    """A data directory the account filled: files of every size, modes, a non-UTF-8 name, a
    nested read-only directory, symlinks (one to a root-only file), a FIFO; and that file."""
    m = _manifest((DataDir("uploads"),), user=user.pw_name)
    datadirs.prepare(layout, m)
    top = layout.root / "data" / "uploads"
    secret = layout.root.parent / "secret"
    secret.write_text("ROOT-ONLY-SECRET")
    secret.chmod(0o600)
    (top / "sub" / "deep").mkdir(parents=True)
    (top / "empty").write_bytes(b"")
    (top / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    (top / "run.sh").write_text("#!/bin/sh\n")
    (top / "run.sh").chmod(0o755)
    (top / "sub" / "private").write_text("p")
    (top / "sub" / "private").chmod(0o600)
    (top / os.fsdecode(b"caf\xe9")).write_text("latin-1 name")
    (top / "sub" / "deep" / "x.json").write_text("{}")
    (top / "secret-link").symlink_to(secret)
    (top / "sub" / "up").symlink_to("../empty")
    os.mkfifo(top / "pipe")
    for p in [*top.rglob("*")]:
        os.lchown(p, user.pw_uid, user.pw_gid)
    (top / "sub" / "deep").chmod(0o500)
    os.utime(top / "big.bin", ns=(1, 1_700_000_000_123_456_789))
    os.utime(top / "sub" / "up", ns=(1, 1_600_000_000_987_654_321), follow_symlinks=False)
    return top, secret


def test_backup_and_restore_reproduce_the_tree_exactly(
        run_user: pwd.struct_passwd, world: Path) -> None:
    layout = Layout(world / "root")
    layout.root.mkdir()
    top, secret = _filled(layout, run_user)
    before = _tree(top)
    digest = datadirs.fingerprint(layout, "uploads")
    made = datadirs.backup(layout, DataDir("uploads"))
    st = made.path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert stat.S_IMODE((layout.root / "backups").stat().st_mode) == 0o700
    assert made.digest == digest
    assert (made.size, made.sha256) == (st.st_size, hashlib.sha256(
        made.path.read_bytes()).hexdigest())
    # the symlink is in the backup as a symlink: root's file never is
    assert b"ROOT-ONLY-SECRET" not in made.path.read_bytes()
    with tarfile.open(made.path) as tar:
        link = tar.getmember("secret-link")
        assert link.issym() and link.linkname == str(secret)
        assert "pipe" not in tar.getnames()

    # the account changes everything it can, and swaps a directory for a symlink to root's
    (top / "big.bin").write_bytes(b"changed")
    (top / "new.txt").write_text("new")
    (top / "run.sh").chmod(0o700)
    (top / "sub" / "deep").chmod(0o700)
    shutil.rmtree(top / "sub" / "deep")
    victim = world / "victim"
    victim.mkdir()
    (top / "sub" / "deep").symlink_to(victim)
    assert datadirs.fingerprint(layout, "uploads") != digest

    datadirs.restore(layout, made)
    after = _tree(top)
    assert after == before  # (a FIFO is not kept: _tree leaves it out)
    assert datadirs.fingerprint(layout, "uploads") == digest
    assert list(victim.iterdir()) == [] and secret.read_text() == "ROOT-ONLY-SECRET"
    assert sorted(os.listdir(layout.root / "data")) == ["uploads"]  # nothing left aside


def test_recovery_restore_keeps_what_it_replaces(run_user: pwd.struct_passwd,
                                                 world: Path) -> None:
    layout = Layout(world / "root")
    layout.root.mkdir()
    top, _ = _filled(layout, run_user)
    made = datadirs.backup(layout, DataDir("uploads"))
    (top / "written-later.txt").write_text("later")
    kept = datadirs.restore(layout, made, keep_in=layout.root / "backups")
    assert kept is not None and (kept / "written-later.txt").read_text() == "later"
    assert kept.parent == layout.root / "backups"
    assert not (top / "written-later.txt").exists()


def test_a_damaged_backup_is_not_restored(run_user: pwd.struct_passwd, world: Path) -> None:
    layout = Layout(world / "root")
    layout.root.mkdir()
    top, _ = _filled(layout, run_user)
    made = datadirs.backup(layout, DataDir("uploads"))
    (top / "written-later.txt").write_text("later")
    now = _tree(top)
    with open(made.path, "r+b") as fh:
        fh.seek(made.size // 2)
        byte = fh.read(1)
        fh.seek(made.size // 2)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(InstallError, match="missing or changed since it was taken"):
        datadirs.restore(layout, made)
    assert _tree(top) == now  # untouched, and nothing left aside
    assert sorted(os.listdir(layout.root / "data")) == ["uploads"]
    made.path.unlink()
    with pytest.raises(InstallError, match="is missing"):
        datadirs.restore(layout, made)
    assert _tree(top) == now


def _crafted(layout: Layout, members: list[tuple[str, bytes, str]]) -> datadirs.DataBackup:
    """A tar that bundler did not write (a name, a type, a link target), with a journal
    record that matches its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, 0o755
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    path = layout.root / "crafted.tar"
    path.write_bytes(buf.getvalue())
    return datadirs.DataBackup("uploads", path, len(buf.getvalue()),
                               hashlib.sha256(buf.getvalue()).hexdigest(), "now", "tree:x")


@pytest.mark.parametrize("members", [
    [(".", tarfile.DIRTYPE, ""), ("../escape", tarfile.REGTYPE, "")],
    [(".", tarfile.DIRTYPE, ""), ("/tmp/escape", tarfile.REGTYPE, "")],
    [(".", tarfile.DIRTYPE, ""), ("ln", tarfile.SYMTYPE, "/tmp"),
     ("ln/escape", tarfile.REGTYPE, "")],
    [(".", tarfile.DIRTYPE, ""), ("hard", tarfile.LNKTYPE, "/etc/passwd")],
    [(".", tarfile.DIRTYPE, ""), ("dev", tarfile.CHRTYPE, "")],
    [("escape", tarfile.REGTYPE, "")],
])
def test_restore_refuses_an_archive_bundler_did_not_write(
        world: Path, members: list[tuple[str, bytes, str]]) -> None:
    layout = Layout(world / "root")
    layout.root.mkdir()
    datadirs.prepare(layout, _manifest((DataDir("uploads"),)))
    (layout.root / "data" / "uploads" / "keep").write_text("k")
    made = _crafted(layout, members)
    with pytest.raises(InstallError, match="data backup"):
        datadirs.restore(layout, made)
    assert (layout.root / "data" / "uploads" / "keep").read_text() == "k"
    assert sorted(os.listdir(layout.root / "data")) == ["uploads"]
    assert not Path("/tmp/escape").exists()


def test_space_needed_counts_what_is_backed_up(world: Path) -> None:
    layout = Layout(world / "root")
    layout.root.mkdir()
    dirs = (DataDir("uploads"), DataDir("cache", backup="never"), DataDir("idx", backup="always"))
    datadirs.prepare(layout, _manifest(dirs))
    (layout.root / "data" / "uploads" / "f").write_bytes(b"x" * 100_000)
    (layout.root / "data" / "cache" / "f").write_bytes(b"x" * 900_000)
    (layout.root / "data" / "idx" / "f").write_bytes(b"x" * 10_000)
    plain = datadirs.space_needed(layout, _manifest(dirs))
    assert 10_000 < plain < 100_000  # no migrations: only `always`
    migrating = dataclasses.replace(_manifest(dirs), runtime=Runtime(
        data=dirs, migrations=(MigrationSpec("m", "command", command=("true",)),)))
    assert 110_000 < datadirs.space_needed(layout, migrating) < 200_000  # `migrate` too
    assert [d.name for d in datadirs.due(_manifest(dirs), True)] == ["uploads", "idx"]
    assert [d.name for d in datadirs.due(_manifest(dirs), False)] == ["idx"]


def _events(*rows: tuple[str, str, str]) -> list[tuple[str, str, str, str]]:
    return [("t", step, status, detail) for step, status, detail in rows]


def test_pending_restores_follow_the_journal(world: Path) -> None:
    made = datadirs.DataBackup("uploads", world / "b.tar", 1, "0" * 64, "now", "tree:a")
    other = datadirs.DataBackup("idx", world / "c.tar", 1, "0" * 64, "now", "tree:b")
    file = ("data-backup", "file", json.dumps(made.to_json()))
    file2 = ("data-backup", "file", json.dumps(other.to_json()))
    assert datadirs.pending_restores(_events(file, file2)) == (
        datadirs.PendingData(made, None), datadirs.PendingData(other, None))
    assert datadirs.pending_restores(_events(
        file, file2, ("restore-data", "done:uploads", ""),
        ("data-state", "after-failed-rollback:idx", "tree:c"))) == (
        datadirs.PendingData(other, "tree:c"),)
    assert datadirs.pending_restores(_events(file, ("restore", "skipped", ""))) == ()
    assert datadirs.pending_restores(_events(file, ("restore-data", "skipped:uploads", ""))) \
        == ()


def test_plan_restores_refuses_to_discard_later_writes(world: Path) -> None:
    layout = Layout(world / "root")
    layout.root.mkdir()
    datadirs.prepare(layout, _manifest((DataDir("uploads"),)))
    made = datadirs.backup(layout, DataDir("uploads"))
    unchanged = [datadirs.PendingData(made, None)]
    plans = datadirs.plan_restores(layout, unchanged, None, "what", lambda: ["web (1.0.0)"])
    assert plans == [datadirs.Plan(made, False)]  # nothing to restore: nothing refused
    (layout.root / "data" / "uploads" / "new").write_text("n")
    with pytest.raises(RecoveryPendingError, match=r"what; the data directory uploads: "
                       r"web \(1\.0\.0\) ran since the interruption"):
        datadirs.plan_restores(layout, unchanged, None, "what", lambda: ["web (1.0.0)"])
    assert datadirs.plan_restores(layout, unchanged, None, "w", lambda: []) == [
        datadirs.Plan(made, True)]
    assert datadirs.plan_restores(layout, unchanged, "restore", "w", lambda: ["x"]) == [
        datadirs.Plan(made, True)]
    assert datadirs.plan_restores(layout, unchanged, "keep", "w", lambda: ["x"]) == []
    now = datadirs.fingerprint(layout, "uploads")
    same = [datadirs.PendingData(made, now)]
    assert datadirs.plan_restores(layout, same, None, "w", lambda: ["x"]) == [
        datadirs.Plan(made, True)]
    (layout.root / "data" / "uploads" / "newer").write_text("n")
    with pytest.raises(RecoveryPendingError, match="written to since the failed rollback"):
        datadirs.plan_restores(layout, same, None, "w", lambda: [])
