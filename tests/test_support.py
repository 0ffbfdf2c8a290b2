"""`bundle support` (unit): an install root laid out by hand (a process release that is not
running, its journal, reports and logs), secrets planted everywhere the archive reads; not one
byte of any of them may be in the archive, read back member by member."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import sys
import tarfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bundler.bundle import supportfile
from bundler.bundle.models import EnvSpec, Runtime, Service
from bundler.errors import IntegrityError
from bundler.install import support
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.state import ReleaseRow, State
from bundler.redact import KNOWN
from tests.bundles import manifest_for
from tests.helpers import bundle

ENV_SECRET = "Sh4red-env-S3cret-value!"       # shared/.env, under a harmless name
PROFILE_SECRET = "pr0file-Secret-named-Value"  # a service env value the profile calls secret
URL_PASSWORD = "urlP4ss-w0rd-planted"           # scheme://user:pass@host, in a log only
LOG_ONLY = "Tok-only-in-the-run-spec-9f3a"     # what the supervisor was told to mask
QUOTED = 'quo"te\\back-slash-S3cret'             # escapes differently in JSON
BUNDLED_ENV = "Bundled-env-file-Value-42"       # a .env among the release's files
PLAIN_LOOKING = "opensesame"                    # shared/.env: a lowercase word, harmless name
PLANTED = (ENV_SECRET, PROFILE_SECRET, URL_PASSWORD, LOG_ONLY, QUOTED, BUNDLED_ENV,
           PLAIN_LOOKING)


@pytest.fixture(autouse=True)
def _forget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    KNOWN.clear()  # each test proves its own masking, not what an earlier one remembered
    # no engine here (this machine's is not asked): its section must fail alone
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    yield
    KNOWN.clear()


def _root(tmp_path: Path, pub: Path, log_bytes: int = 0) -> Layout:
    """An install root with release 1.0.0 current (process runtime, nothing running)."""
    root = tmp_path / "root"
    assert bundle("trust", "add", pub, "--root", root).rc == 0
    layout = Layout(root)
    layout.shared.mkdir(mode=0o700)
    layout.env_file.write_text(f"GREETING={ENV_SECRET}\nPORT=8080\nMODE=production\n"
                               f"WORD={PLAIN_LOOKING}\n")
    m = manifest_for({}, runtime=Runtime(
        services=(Service("web", ("sleep", "1000"), env=(("UPSTREAM_KEYRING",
                                                           PROFILE_SECRET),)),),
        env=EnvSpec(secret=("UPSTREAM_KEYRING",))))
    rel = ReleaseDir(layout.release(m.version))
    rel.meta.mkdir(parents=True)
    rel.manifest_file.write_bytes(m.to_bytes())
    rel.logs.mkdir()
    (rel.files / "stack").mkdir(parents=True)
    (rel.files / "stack" / ".env").write_text(f"UPSTREAM_HOST={BUNDLED_ENV}\n")
    rel.run.mkdir()
    (rel.run / "web.json").write_text(json.dumps({"secrets": [LOG_ONLY, QUOTED]}))
    lines = [f"connecting to postgresql://app:{URL_PASSWORD}@db:5432/shop",
             f"greeting is {ENV_SECRET} and key {PROFILE_SECRET}",
             f"token {LOG_ONLY} quoted {QUOTED}", f"the word is {PLAIN_LOOKING}"]
    text = "\n".join(lines) + "\n"
    filler = "".join(f"filler line {i} {ENV_SECRET}\n" for i in range(log_bytes // 40))
    (rel.logs / "web.log").write_text(filler + text)
    rel.report_json.write_text(json.dumps({"reason": f"failed with {ENV_SECRET}",
                                           "steps": [{"detail": QUOTED}]}))
    rel.report_md.write_text(f"# shop 1.0.0: failed\n- reason: {PROFILE_SECRET}\n"
                             f"- upstream: {BUNDLED_ENV}\n")
    layout.switch(m.version)
    state = State.open(layout.db)
    state.upsert_release(ReleaseRow(m.version, m.name, m.sequence, "0" * 64, "k", "current",
                                    "2026-01-01T00:00:00Z"))
    state.bind_product(m.name)
    state.event("t1", m.version, "migrate", "failed", f"psql said {ENV_SECRET}")
    state.close()
    (layout.backups).mkdir()
    (layout.backups / "db.dump").write_text("BACKUP-BYTES-NEVER")
    layout.data.mkdir()
    (layout.data / "blob").write_text("DATA-BYTES-NEVER")
    return layout


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:*") as tar:
        return {i.name: tar.extractfile(i).read() for i in tar if i.isreg()}  # type: ignore[union-attr]


def _assert_clean(path: Path) -> dict[str, bytes]:
    members = _members(path)
    everything = [path.read_bytes(), gzip.decompress(path.read_bytes()), *members.values()]
    for secret in PLANTED:
        for form in {secret, json.dumps(secret)[1:-1], secret.replace("\\", "\\\\")}:
            for blob in everything:
                assert form.encode() not in blob, f"{secret!r} leaked"
    for never in (b"BACKUP-BYTES-NEVER", b"DATA-BYTES-NEVER", b"SQLite format 3",
                  b"PRIVATE KEY"):
        assert all(never not in blob for blob in everything)
    return members


def test_no_planted_secret_anywhere_and_the_sections_are_there(tmp_path: Path,
                                                              pub: Path) -> None:
    layout = _root(tmp_path, pub)
    out = tmp_path / "out" / "support.tar.gz"
    result = support.collect(layout, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not list(out.parent.glob(".*.tmp"))  # written to a temp name, renamed
    members = _assert_clean(out)
    names = set(members)
    for name in ("MANIFEST.json", "versions.json", "host.json", "status.json", "doctor.json",
                 "history.json", "trust.json", "policy.json",
                 "releases/1.0.0/report.json", "releases/1.0.0/REPORT.md",
                 "logs/1.0.0/web.log"):
        assert name in names, name
    assert not any(n.startswith(("backups", "data", "state", "shared")) for n in names)
    log = members["logs/1.0.0/web.log"].decode()
    assert "postgresql://app:****@db:5432/shop" in log and "greeting is **** and key ****" in log
    manifest = json.loads(members["MANIFEST.json"])
    assert manifest["format"] == supportfile.FORMAT and manifest["cut"] == []
    assert {m["name"] for m in manifest["members"]} == names - {"MANIFEST.json"}
    trust = json.loads(members["trust.json"])
    assert len(trust["trusted"]) == 1 and len(trust["trusted"][0]["keyid"]) > 8
    facts = json.loads(members["host.json"])
    assert facts["memory"]["MemTotal"].endswith("kB") and facts["disks"][0]["free"] > 0
    history = json.loads(members["history.json"])
    assert history["events"][0]["detail"] == "psql said ****"
    assert result.size == out.stat().st_size
    outcome = {s["section"]: s for s in manifest["sections"]}
    assert set(outcome) == {n for n, _ in support.SECTIONS}
    assert outcome["engine"]["status"] == "error" and "engine.json" not in names
    # and nothing else fails, but the drift audit where this bundler has one: this hand-made
    # release has no audit record for it to compare with
    assert {n for n, s in outcome.items() if s["status"] == "error"} <= {"engine", "audit"}


def test_a_huge_log_is_cut_to_its_tail_and_the_archive_bounded(tmp_path: Path,
                                                               pub: Path) -> None:
    layout = _root(tmp_path, pub, log_bytes=30 * 1024 * 1024)
    for n in range(4):  # 4 x 256 KiB of log tails: more than 1 MiB's archive holds
        lines = [os.urandom(50).hex() for _ in range(20000)]
        (layout.release("1.0.0") / "logs" / f"x{n}.log").write_text("\n".join(lines))
    out = tmp_path / "s.tar.gz"
    result = support.collect(layout, out, max_size=1024 * 1024)
    assert out.stat().st_size <= 1024 * 1024
    members = _assert_clean(out)
    log = members["logs/1.0.0/web.log"].decode()
    assert support.LOG_TAIL // 2 < len(log) <= support.LOG_TAIL  # masked: shorter
    assert log.startswith("filler line ") and log.endswith("quoted ****\nthe word is ****\n")
    manifest = json.loads(members["MANIFEST.json"])
    cut: dict[str, list[dict[str, Any]]] = {}
    for c in manifest["cut"]:
        cut.setdefault(c["member"], []).append(c)
    assert cut["logs/1.0.0/web.log"][0]["size"] > 30 * 1024 * 1024
    assert [c["why"] for c in cut["logs/1.0.0/web.log"]] == [
        f"a log tail: its last {cut['logs/1.0.0/web.log'][0]['kept']} bytes, whole lines"]
    # the archive's bound: the last log does not fit whole, its last lines are kept
    assert str(cut["logs/1.0.0/x2.log"][-1]["why"]).endswith("its last lines kept")
    assert members["logs/1.0.0/x2.log"].endswith(b"\n") is False  # its very end is kept
    assert str(cut["logs/1.0.0/x3.log"][-1]["why"]).endswith("left out")
    assert "logs/1.0.0/x3.log" not in members
    assert list(result.cut) == manifest["cut"]


def test_a_broken_section_does_not_stop_the_rest(tmp_path: Path, pub: Path) -> None:
    layout = _root(tmp_path, pub)
    layout.db.write_bytes(b"not a database at all " * 100)  # an unreadable state
    # a shared .env compose's rules refuse (a backslash in quotes): its values still masked
    (layout.release("1.0.0") / "run" / "web.json").unlink()
    layout.env_file.write_text(f"GREETING={ENV_SECRET}\nOTHER='{QUOTED}'\n"
                               f"TOKEN_X={LOG_ONLY}\nWORD={PLAIN_LOOKING}\n")

    def broken(ctx: support.Context) -> Iterator[tuple[str, support.Content]]:
        raise RuntimeError(f"boom with {ENV_SECRET}")
        yield "never", ""  # type: ignore[unreachable]  # a generator that raises

    def said(ctx: support.Context) -> Iterator[tuple[str, support.Content]]:
        # a command's output, as a section quotes it: in JSON (keys too) and as text
        yield "said.json", {f"key {ENV_SECRET}": [f"value {QUOTED}", 1, None],
                            "url": f"mysql://root:{URL_PASSWORD}@db/x", "n": 3}
        yield "said.txt", f"$ check\nconnected with {PROFILE_SECRET}\n"

    out = tmp_path / "s.tar.zst"
    sections = (("broken", broken), ("said", said), *support.SECTIONS)
    result = support.collect(layout, out, sections=sections)
    assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd, by the name
    archive = supportfile.read(out)
    for secret in PLANTED:
        assert all(secret.encode() not in data for data in archive.members.values())
    outcome = {s["section"]: s for s in archive.manifest["sections"]}
    assert outcome["broken"] == {"section": "broken", "status": "error",
                                 "detail": "RuntimeError: boom with ****"}
    assert outcome["history"]["status"] == "error" and outcome["status"]["status"] == "error"
    assert outcome["versions"]["status"] == "ok" and "logs/1.0.0/web.log" in archive.members
    assert archive.json("said.json") == {"key ****": ["value ****", 1, None],
                                         "url": "mysql://root:****@db/x", "n": 3}
    assert archive.members["said.txt"] == b"$ check\nconnected with ****\n"
    assert {e["section"] for e in result.errors} >= {"broken", "history", "status"}


def test_no_current_release_and_no_env(tmp_path: Path, pub: Path) -> None:
    root = tmp_path / "root"
    assert bundle("trust", "add", pub, "--root", root).rc == 0
    out = tmp_path / "s.tar.gz"
    support.collect(Layout(root), out)
    archive = supportfile.read(out)
    assert archive.manifest["current"] is None
    outcome = {s["section"]: s for s in archive.manifest["sections"]}
    assert outcome["status"]["detail"].startswith("no bundler state")  # nothing installed yet
    assert outcome["doctor"]["status"] == "ok" and outcome["trust"]["status"] == "ok"


def test_cli_writes_and_show_reads_it_back(tmp_path: Path, pub: Path) -> None:
    layout = _root(tmp_path, pub)
    out = tmp_path / "s.tar.gz"
    done = bundle("support", "--root", layout.root, "--out", out, "--json")
    assert done.rc == 0, done.err
    assert json.loads(done.out)["path"] == str(out)
    _assert_clean(out)
    shown = bundle("support", "--show", out, "--json")
    assert shown.rc == 0, shown.err
    doc = json.loads(shown.out)
    assert doc["current"] == "1.0.0" and doc["releases"][0]["version"] == "1.0.0"
    assert doc["failures"][0]["step"] == "migrate" and doc["failures"][0]["detail"] == \
        "psql said ****"
    text = bundle("support", "--show", out)
    assert text.rc == 0 and "last failures:" in text.out and "1.0.0" in text.out


def test_show_refuses_what_is_not_a_support_archive(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../etc/passwd")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    evil.write_bytes(buf.getvalue())
    done = bundle("support", "--show", evil)
    assert done.rc == IntegrityError.exit_code and "not a plain file name" in done.err
    with pytest.raises(IntegrityError, match="neither gzip nor zstd"):
        supportfile.read(Path(__file__))
    assert not (tmp_path.parent.parent / "etc" / "passwd").exists()


def test_bad_max_size_and_missing_options(tmp_path: Path, pub: Path) -> None:
    layout = _root(tmp_path, pub)
    out = tmp_path / "s.tar.gz"
    assert bundle("support", "--root", layout.root, "--out", out, "--max-size", "10K").rc == 2
    assert bundle("support", "--root", layout.root).rc == 2
    assert bundle("support", "--show", out, "--out", out).rc == 2
    assert not out.exists()
    for bad, why in ((tmp_path, "is a directory"), (tmp_path / "s.zip", "name it")):
        done = bundle("support", "--root", layout.root, "--out", bad)
        assert done.rc == 2 and why in done.err, done.err
    assert support.parse_size("50M") == 50 * 1024**2 and support.parse_size("1G") == 1024**3


def test_the_drift_audit_goes_in_through_its_one_hook(tmp_path: Path, pub: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _root(tmp_path, pub)
    monkeypatch.setitem(sys.modules, "bundler.install.audit", None)  # a bundler without it
    support.collect(layout, tmp_path / "a.tar.gz")
    note = supportfile.read(tmp_path / "a.tar.gz").json("audit.json")
    assert note == {"note": "this bundler has no drift audit (bundler.install.audit): not "
                            "collected"}

    class Report:
        def to_json(self) -> dict[str, object]:
            return {"clean": False, "findings": [{"path": "app/x.py",
                                                  "detail": f"changed, saw {ENV_SECRET}"}]}

    seen: list[Layout] = []
    fake = types.ModuleType("bundler.install.audit")
    def run(at: Layout) -> Report:
        seen.append(at)
        return Report()

    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bundler.install.audit", fake)
    support.collect(layout, tmp_path / "b.tar.gz")
    assert seen == [layout]
    assert supportfile.read(tmp_path / "b.tar.gz").json("audit.json") == {
        "clean": False, "findings": [{"path": "app/x.py", "detail": "changed, saw ****"}]}


def test_an_sbom_is_summarised_and_its_absence_is_quiet(tmp_path: Path, pub: Path) -> None:
    layout = _root(tmp_path, pub)
    support.collect(layout, tmp_path / "none.tar.gz")
    quiet = supportfile.read(tmp_path / "none.tar.gz")
    assert not [n for n in quiet.members if n.startswith("sbom/")]
    assert {s["section"]: s for s in quiet.manifest["sections"]}["sbom"]["status"] == "ok"
    bom = {"bomFormat": "CycloneDX", "specVersion": "1.7", "metadata": {"component": {
        "name": "shop", "version": "1.0.0"}}, "components": [
        {"type": "library", "purl": "pkg:pypi/tinygreet@1.0"},
        {"type": "container", "name": "img", "components": [
            {"type": "library", "purl": "pkg:deb/debian/libc6@2.36"},
            {"type": "library", "purl": "pkg:npm/left-pad@1.3.0"}]}]}
    sbom = layout.release("1.0.0") / "sbom" / "bom.cdx.json"
    sbom.parent.mkdir()
    sbom.write_text(json.dumps(bom))
    support.collect(layout, tmp_path / "with.tar.gz")
    summary = supportfile.read(tmp_path / "with.tar.gz").json("sbom/1.0.0.json")
    assert summary["components"] == 4 and summary["spec_version"] == "1.7"
    assert summary["by_purl_type"] == {"pypi": 1, "deb": 1, "npm": 1, "(no purl)": 1}
    assert summary["by_type"] == {"library": 3, "container": 1}
