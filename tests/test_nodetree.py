"""The pre-built node_modules payload: deterministic packing, what may not be pre-built, and
strict extraction of hostile payloads (nothing written outside the project)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from bundler.build.resolve.npm_tree import portable_reason
from bundler.bundle import nodetree
from bundler.errors import IntegrityError


def make_tree(project: Path) -> None:
    nm = project / "node_modules"
    (nm / "a" / "lib").mkdir(parents=True)
    (nm / "a" / "lib" / "index.js").write_text("module.exports = 1;\n")
    (nm / "a" / "cli.js").write_text("#!/usr/bin/env node\n")
    os.chmod(nm / "a" / "cli.js", 0o755)
    (nm / "@s" / "b").mkdir(parents=True)
    (nm / "@s" / "b" / "package.json").write_text("{}")
    (nm / "empty").mkdir()
    (nm / ".bin").mkdir()
    os.symlink("../a/cli.js", nm / ".bin" / "a")
    (nm / ".package-lock.json").write_text('{"resolved": "file:/build/host/path"}')


def packed(project: Path) -> bytes:
    out = io.BytesIO()
    nodetree.pack(project, out)
    return out.getvalue()


def extract(data: bytes, tmp: Path) -> Path:
    (tmp / "payload").write_bytes(data)
    dest = tmp / "target" / "app"
    dest.mkdir(parents=True)
    nodetree.extract(tmp / "payload", hashlib.sha256(data).hexdigest(), len(data), dest)
    return dest


def test_round_trip_keeps_files_modes_and_links_and_drops_the_hidden_lock(
        tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    data = packed(tmp_path / "src")
    assert data == packed(tmp_path / "src")  # same tree, same bytes
    nm = extract(data, tmp_path) / "node_modules"
    assert (nm / "a" / "lib" / "index.js").read_text() == "module.exports = 1;\n"
    assert os.stat(nm / "a" / "cli.js").st_mode & 0o111
    assert not os.stat(nm / "a" / "lib" / "index.js").st_mode & 0o111
    assert os.readlink(nm / ".bin" / "a") == "../a/cli.js"
    assert (nm / "empty").is_dir() and (nm / "@s" / "b" / "package.json").is_file()
    assert not (nm / ".package-lock.json").exists()


@pytest.mark.parametrize("what", ["addon", "elf", "abs-link", "escaping-link"])
def test_native_code_and_odd_links_are_not_pre_built(tmp_path: Path, what: str) -> None:
    make_tree(tmp_path)
    nm = tmp_path / "node_modules"
    if what == "addon":
        (nm / "a" / "binding.node").write_bytes(b"whatever")
    elif what == "elf":
        (nm / "a" / "tool").write_bytes(b"\x7fELF\x02\x01")
    elif what == "abs-link":
        os.symlink("/usr/bin/env", nm / ".bin" / "env")
    else:
        os.symlink("../../../etc/passwd", nm / ".bin" / "pw")
    with pytest.raises(nodetree.NotPortable):
        packed(tmp_path)


def craft(members: list[tuple[str, bytes, str]]) -> bytes:
    """A zstd tar with these (name, type, data-or-linkname) members, no checks."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(extra)
                tar.addfile(info, io.BytesIO(extra.encode()))
            else:
                info.linkname = extra
                tar.addfile(info)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


ROOT = ("node_modules", tarfile.DIRTYPE, "")
HOSTILE = {
    "dotdot": [ROOT, ("node_modules/../../../evil", tarfile.REGTYPE, "x")],
    "absolute": [ROOT, ("/tmp/evil-nodetree", tarfile.REGTYPE, "x")],
    "outside-root": [ROOT, ("elsewhere/evil", tarfile.REGTYPE, "x")],
    "root-not-first": [("node_modules/a", tarfile.REGTYPE, "x"), ROOT],
    "escaping-link": [ROOT, ("node_modules/l", tarfile.SYMTYPE, "../../../evil")],
    "absolute-link": [ROOT, ("node_modules/l", tarfile.SYMTYPE, "/etc")],
    "under-a-link": [ROOT, ("node_modules/l", tarfile.SYMTYPE, "d"),
                     ("node_modules/l/evil", tarfile.REGTYPE, "x")],
    "hard-link": [ROOT, ("node_modules/h", tarfile.LNKTYPE, "node_modules")],
    "fifo": [ROOT, ("node_modules/f", tarfile.FIFOTYPE, "")],
    "duplicate": [ROOT, ("node_modules/a", tarfile.REGTYPE, "x"),
                  ("node_modules/a", tarfile.REGTYPE, "y")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payloads_are_refused_and_nothing_lands_outside(tmp_path: Path,
                                                                case: str) -> None:
    with pytest.raises(IntegrityError):
        extract(craft(HOSTILE[case]), tmp_path)
    outside = [p for p in tmp_path.rglob("*") if "node_modules" not in p.parts
               and p.name not in ("payload", "target", "app")]
    assert outside == []
    assert not Path("/tmp/evil-nodetree").exists()


def test_payload_that_does_not_match_the_manifest_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    data = packed(tmp_path / "src")
    (tmp_path / "payload").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (tmp_path / "app").mkdir()
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        nodetree.extract(tmp_path / "payload", hashlib.sha256(data).hexdigest(), len(data),
                         tmp_path / "app")
    assert not (tmp_path / "app" / "node_modules").exists()


@pytest.mark.parametrize(("pj", "entry", "why"), [
    ({}, {}, None),
    ({"scripts": {"start": "node s.js", "build": "x"}}, {}, None),
    ({"scripts": {"postinstall": "x"}}, {}, "the project runs postinstall scripts"),
    ({"scripts": {"prepare": "x"}}, {}, "the project runs prepare scripts"),
    ({}, {"hasInstallScript": True}, "dep has an install script"),
    ({}, {"cpu": ["x64"]}, "dep is built for a particular platform"),
    ({}, {"libc": ["glibc"]}, "dep is built for a particular platform"),
])
def test_what_may_be_pre_built(pj: dict[str, object], entry: dict[str, object],
                               why: str | None) -> None:
    lock = {"packages": {"": {}, "node_modules/dep": {"version": "1.0.0", **entry}}}
    assert portable_reason(pj, lock) == why
