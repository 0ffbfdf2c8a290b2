"""A venv made partly from an installed release's (bundler.install.venv_delta, python_env's
`_partly`): the files of the changed distributions are left out of the clone and only the
changed wheels installed, with real uv; the result equals a fresh install of the new wheels at
the same path, and the earlier release's venv is left exactly as its record says."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundler.bundle.manifest import FileEntry, Manifest
from bundler.bundle.models import Target
from bundler.errors import InstallError
from bundler.install import python_env, reuse, venv_delta
from bundler.install.reuse import Doubt, Entry, Record
from tests.helpers import make_wheel, tree_digest
from tests.test_reuse import LOCK, _release

SITE = "lib/python3.11/site-packages"


def _greet(version: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"tinygreet/__init__.py": f"VERSION = {version!r}\n",
            "tinygreet/cli.py": "def main():\n    print('cli')\n",
            "tinygreet-" + version + ".dist-info/entry_points.txt":
                "[console_scripts]\ntinygreet = tinygreet.cli:main\n", **(extra or {})}


# name -> (version, files); the default set of release 1
BASE = {"tinygreet": ("1.0", _greet("1.0", {"tinygreet/old.py": "OLD = 1\n"})),
        "other": ("2.0", {"other/__init__.py": "X = 1\n", "other/sub/__init__.py": "Y = 2\n"}),
        "third": ("3.0", {"third.py": "Z = 3\n"})}


def _inputs(base: Path, dists: dict[str, tuple[str, dict[str, str]]]) -> tuple[Path, Manifest]:
    wheels = base / "wheels"
    lines, files = ["# lock"], []
    for name, (version, content) in sorted(dists.items()):
        whl = make_wheel(wheels, name, version, content)
        sha = hashlib.sha256(whl.read_bytes()).hexdigest()
        lines.append(f"{name}=={version} --hash=sha256:{sha}")
        files.append(FileEntry(f"python/wheels/{whl.name}", whl.stat().st_size, sha, "wheel"))
    lock = ("\n".join(lines) + "\n").encode()
    (base / "requirements.lock").write_bytes(lock)
    files.append(FileEntry(LOCK, len(lock), hashlib.sha256(lock).hexdigest(), "lock"))
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return base, Manifest("shop", "1", 1, "", Target(python=py), tuple(files), python_lock=LOCK)


def _provide(rel: Path, m: Manifest, earlier: list[Path], notes: list[str] | None = None
             ) -> python_env.Made:
    python = Path(getattr(sys, "_base_executable", sys.executable))
    return python_env.provide(python, m, rel, earlier, True,
                              (notes if notes is not None else []).append)


def _run(venv: Path, code: str) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-I", "-c", code], check=True,
                          capture_output=True, text=True).stdout.strip()


def _upgrade(tmp_path: Path, new: dict[str, tuple[str, dict[str, str]]],
             notes: list[str] | None = None) -> tuple[Path, Path, python_env.Made, object]:
    """Release 1.0 from BASE, then 1.1 from `new` with 1.0 to reuse; returns both, how 1.1's
    venv was made, and 1.0's tree digest before."""
    root = tmp_path / "root"
    first = _release(root, "1.0", _inputs(tmp_path / "in1", BASE)[0])
    _, m1 = _inputs(tmp_path / "in1", BASE)
    assert _provide(first, m1, []).reused_from is None
    before = tree_digest(first / "venv")
    inputs, m2 = _inputs(tmp_path / "in2", new)
    second = _release(root, "1.1", inputs)
    return first, second, _provide(second, m2, [first], notes), before


def _fresh_equals(tmp_path: Path, second: Path, new: dict[str, tuple[str, dict[str, str]]]
                  ) -> None:
    """1.1's venv equals a fresh install of its wheels at the same path."""
    got = tree_digest(second / "venv")
    shutil.move(second, tmp_path / "partial")
    inputs, m2 = _inputs(tmp_path / "in2", new)
    again = _release(second.parent.parent, "1.1", inputs)
    assert _provide(again, m2, []).reused_from is None
    assert tree_digest(again / "venv") == got


def _old_intact(first: Path, before: object) -> None:
    rec = reuse.Record.load(python_env.record_path(first))
    assert rec is not None
    assert reuse.shared_doubt(rec) is None
    assert tree_digest(first / "venv") == before


def test_one_changed_wheel_is_installed_into_a_clone_of_the_rest(tmp_path: Path) -> None:
    new = {**BASE, "tinygreet": ("1.1", _greet("1.1", {"tinygreet/new.py": "NEW = 1\n"}))}
    first, second, made, before = _upgrade(tmp_path, new)
    assert made.reused_from == "1.0", made
    assert made.summary.startswith("reused the venv of release 1.0 except 1 changed "
                                   "distribution (tinygreet 1.0 -> 1.1): "), made.summary
    assert "1 wheel(s) installed" in made.summary
    venv = second / "venv"
    assert _run(venv, "import tinygreet; print(tinygreet.VERSION)") == "1.1"
    assert _run(first / "venv", "import tinygreet; print(tinygreet.VERSION)") == "1.0"
    assert not list(venv.glob(f"{SITE}/tinygreet/old.py"))
    assert not list(venv.glob(f"{SITE}/tinygreet-1.0.dist-info"))
    assert subprocess.run([str(venv / "bin" / "tinygreet")], capture_output=True,
                          text=True).stdout == "cli\n"
    # the unchanged distributions' files are the earlier release's (hard links)
    other = next(venv.glob(f"{SITE}/other/sub/__init__.py"))
    assert os.stat(other).st_ino == os.stat(first / "venv" / other.relative_to(venv)).st_ino
    # the new bytecode is what the full install writes, and names no path
    pyc = next(venv.glob(f"{SITE}/tinygreet/__pycache__/new.*.pyc"))
    assert str(second).encode() not in pyc.read_bytes()
    _old_intact(first, before)
    # a later release can partly reuse this one in turn
    dists = venv_delta.Dists.load(python_env.dists_path(second))
    assert dists is not None and any(d.wheel.startswith("tinygreet-1.1") for d in dists.dists)
    _fresh_equals(tmp_path, second, new)


def test_removed_and_added_distributions(tmp_path: Path) -> None:
    new = {k: v for k, v in BASE.items() if k != "third"}
    new["fourth"] = ("4.0", {"fourth/__init__.py": "W = 4\n"})
    first, second, made, before = _upgrade(tmp_path, new)
    assert made.reused_from == "1.0", made
    assert "except 2 changed distributions (+fourth 4.0, -third 3.0)" in made.summary
    assert not list((second / "venv").glob(f"{SITE}/third*"))
    _old_intact(first, before)
    _fresh_equals(tmp_path, second, new)


def test_a_removed_distribution_only_installs_nothing(tmp_path: Path) -> None:
    new = {k: v for k, v in BASE.items() if k != "other"}
    first, second, made, before = _upgrade(tmp_path, new)
    assert "except 1 changed distribution (-other 2.0)" in made.summary, made
    assert "0 wheel(s) installed" in made.summary
    _old_intact(first, before)
    _fresh_equals(tmp_path, second, new)


def test_a_wheel_writing_a_file_the_clone_holds_falls_back_to_a_full_install(
        tmp_path: Path) -> None:
    # the new `fourth` ships other/extra.py: into a directory of the unchanged `other`, fine;
    # but also other/__init__.py, a file the clone shares with 1.0: never written, full install
    new = {**BASE, "fourth": ("4.0", {"fourth.py": "", "other/__init__.py": "X = 'mine'\n"})}
    notes: list[str] = []
    first, second, made, before = _upgrade(tmp_path, new, notes)
    assert made.reused_from is None and "installed from the wheels" in made.summary
    assert any(n.startswith("venv of 1.0 not partly reused (") and "other/__init__.py" in n
               for n in notes), notes
    assert not (second / ".venv.cloning").exists()
    assert _run(second / "venv", "import other; print(other.X)") in ("1", "mine")
    _old_intact(first, before)


@pytest.mark.parametrize("failing", ["uv", "check"])
def test_uv_or_the_check_failing_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            failing: str) -> None:
    # a fake at the adapter boundary: uv exiting non-zero, or the clone's check failing
    if failing == "uv":
        def uv_fails(*_: object) -> Path:
            raise InstallError("installing Python packages failed: uv pip install exited 2")
        monkeypatch.setattr(python_env, "_with_uv_into", uv_fails)
    else:
        monkeypatch.setattr(python_env, "_IMPORTS", "raise SystemExit('no such package')")
    new = {**BASE, "tinygreet": ("1.1", _greet("1.1"))}
    notes: list[str] = []
    first, second, made, before = _upgrade(tmp_path, new, notes)
    assert made.reused_from is None and "installed from the wheels" in made.summary, made
    why = "uv pip install exited 2" if failing == "uv" else "python (import check) failed"
    assert any(n.startswith("venv of 1.0 not partly reused (") and why in n
               for n in notes), notes
    assert _run(second / "venv", "import tinygreet; print(tinygreet.VERSION)") == "1.1"
    _old_intact(first, before)


def test_a_tampered_unchanged_file_falls_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inputs, m1 = _inputs(tmp_path / "in1", BASE)
    first = _release(root, "1.0", inputs)
    _provide(first, m1, [])
    next((first / "venv").glob(f"{SITE}/third.py")).write_text("Z = 'tampered'\n")
    new = {**BASE, "tinygreet": ("1.1", _greet("1.1"))}
    inputs2, m2 = _inputs(tmp_path / "in2", new)
    second = _release(root, "1.1", inputs2)
    notes: list[str] = []
    made = _provide(second, m2, [first], notes)
    assert made.reused_from is None
    assert any("third.py is not what the record says" in n for n in notes), notes
    assert _run(second / "venv", "import third; print(third.Z)") == "3"


# --- the plan alone (no venv): what is left out of the clone, and when it is a doubt

def _entry(path: str, kind: str = "f") -> Entry:
    return Entry(path, kind, 0o755 if kind == "d" else 0o644, "x" * 64 if kind == "f" else "")


def _record_of(dists: dict[str, list[str]], extra: list[str] = ()) -> tuple[Record, bytes]:
    """A record of a venv holding `dists` (dist-info name -> RECORD paths from site)."""
    files = {"bin/python", "pyvenv.cfg", *extra}
    for info, names in dists.items():
        files.add(f"{SITE}/{info}/RECORD")
        files.update(os.path.normpath(f"{SITE}/{n}") for n in names)
    dirs = {".", SITE}
    for p in files | {SITE}:
        while (p := os.path.dirname(p)):
            dirs.add(p)
    entries = tuple(_entry(p, "d" if p in dirs else "f") for p in sorted(dirs | files))
    return Record("fp", "/r/1/venv", "/r/1", entries), b""


def _dists(wheels: dict[str, str]) -> venv_delta.Dists:
    return venv_delta.Dists("fp", "base", SITE, tuple(
        venv_delta.Dist(w, "sha-" + w, f"{SITE}/{info}") for w, info in wheels.items()))


def _reader(records: dict[str, list[str]]) -> object:
    def read(e: Entry) -> bytes:
        info = e.path.split("/")[-2]
        return "".join(f"{n},sha256=abc,1\n" for n in records[info]).encode() + \
            f"{info}/RECORD,,\n".encode()
    return read


RECS = {"a-1.dist-info": ["a/__init__.py", "a/mod.py", "a/data/x.txt", "../../../bin/a-cli",
                          "a-1.dist-info/METADATA"],
        "b-1.dist-info": ["b/__init__.py", "b-1.dist-info/METADATA"]}
WHEELS = {"a-1-py3-none-any.whl": "a-1.dist-info", "b-1-py3-none-any.whl": "b-1.dist-info"}


def _plan(tmp_path: Path, records: dict[str, list[str]], new_files: dict[str, str],
          extra: list[str] = (), new_version: str = "2") -> venv_delta.Plan:
    rec, _ = _record_of(records, [*extra, f"{SITE}/a/__pycache__/mod.cpython-311.pyc",
                                  f"{SITE}/a/__pycache__/__init__.cpython-311.pyc",
                                  f"{SITE}/b/__pycache__/__init__.cpython-311.pyc"])
    whl = make_wheel(tmp_path / "w", "a", new_version, new_files)
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    new = {"b-1-py3-none-any.whl": "sha-b-1-py3-none-any.whl", whl.name: sha}
    return venv_delta.plan(rec, _dists(WHEELS), new, tmp_path / "w",
                           _reader(records))  # type: ignore[arg-type]


def test_the_plan_leaves_out_the_changed_distribution_its_script_and_bytecode(
        tmp_path: Path) -> None:
    p = _plan(tmp_path, RECS, {"a/__init__.py": "", "a/new.py": ""})
    kept = {e.path for e in p.keep}
    assert not {f"{SITE}/a", f"{SITE}/a/mod.py", f"{SITE}/a/data", f"{SITE}/a/data/x.txt",
                f"{SITE}/a/__pycache__/mod.cpython-311.pyc", f"{SITE}/a-1.dist-info",
                f"{SITE}/a-1.dist-info/RECORD", "bin/a-cli"} & kept
    assert {f"{SITE}/b/__init__.py", f"{SITE}/b/__pycache__/__init__.cpython-311.pyc",
            f"{SITE}/b-1.dist-info/RECORD", "bin", "bin/python", SITE, "pyvenv.cfg"} <= kept
    assert p.install == ("a-2-py3-none-any.whl",)
    assert p.installs == (f"{SITE}/a-2.dist-info",)
    assert f"{SITE}/a/new.py" in p.writes and p.changes == ("a 1 -> 2",)


def test_a_file_two_distributions_claim_is_a_doubt(tmp_path: Path) -> None:
    # a namespace package: `ns/__init__.py` written by both a and b
    recs = {"a-1.dist-info": [*RECS["a-1.dist-info"], "ns/__init__.py"],
            "b-1.dist-info": [*RECS["b-1.dist-info"], "ns/__init__.py"]}
    with pytest.raises(Doubt, match=r"ns/__init__\.py belongs to a changed distribution"):
        _plan(tmp_path, recs, {"a/__init__.py": ""})


def test_a_new_wheel_writing_into_a_namespace_file_the_clone_keeps_is_a_doubt(
        tmp_path: Path) -> None:
    recs = {**RECS, "b-1.dist-info": [*RECS["b-1.dist-info"], "ns/__init__.py"]}
    with pytest.raises(Doubt, match=r"ns/__init__.py would be written by a new wheel"):
        _plan(tmp_path, recs, {"a/__init__.py": "", "ns/__init__.py": ""})
    # a new file in the same namespace directory is fine: directories are never shared
    p = _plan(tmp_path, recs, {"a/__init__.py": "", "ns/a.py": ""})
    assert f"{SITE}/ns/__init__.py" in {e.path for e in p.keep}


def test_a_new_script_the_clone_holds_is_a_doubt(tmp_path: Path) -> None:
    with pytest.raises(Doubt, match="bin/b-cli would be written"):
        _plan(tmp_path, RECS, {"a/__init__.py": "", "a-2.dist-info/entry_points.txt":
                               "[console_scripts]\nb-cli = a:main\n"}, extra=["bin/b-cli"])
    with pytest.raises(Doubt, match="bin/python would be written"):
        _plan(tmp_path, RECS, {"a/__init__.py": "", "a-2.data/scripts/python": ""})


def test_a_record_row_the_venv_does_not_hold_is_a_doubt(tmp_path: Path) -> None:
    rec, _ = _record_of(RECS)
    bad = {**RECS, "a-1.dist-info": [*RECS["a-1.dist-info"], "a/missing.py"]}
    whl = make_wheel(tmp_path / "w", "a", "2", {"a/__init__.py": ""})
    new = {"b-1-py3-none-any.whl": "sha-b-1-py3-none-any.whl",
           whl.name: hashlib.sha256(whl.read_bytes()).hexdigest()}
    with pytest.raises(Doubt, match=r"lists a/missing\.py, which the venv does not hold"):
        venv_delta.plan(rec, _dists(WHEELS), new, tmp_path / "w",
                        _reader(bad))  # type: ignore[arg-type]
    escaping = {**RECS, "a-1.dist-info": ["../../../../etc/passwd"]}
    with pytest.raises(Doubt, match="leaves the venv"):
        venv_delta.plan(rec, _dists(WHEELS), new, tmp_path / "w",
                        _reader(escaping))  # type: ignore[arg-type]


def test_a_wheel_that_is_not_the_signed_one_is_a_doubt(tmp_path: Path) -> None:
    rec, _ = _record_of(RECS)
    whl = make_wheel(tmp_path / "w", "a", "2", {"a/__init__.py": ""})
    new = {"b-1-py3-none-any.whl": "sha-b-1-py3-none-any.whl", whl.name: "0" * 64}
    with pytest.raises(Doubt, match="not the wheel the manifest signs"):
        venv_delta.plan(rec, _dists(WHEELS), new, tmp_path / "w",
                        _reader(RECS))  # type: ignore[arg-type]


def test_nothing_in_common_is_a_doubt(tmp_path: Path) -> None:
    rec, _ = _record_of(RECS)
    with pytest.raises(Doubt, match="no distribution in common"):
        venv_delta.plan(rec, _dists(WHEELS), {}, tmp_path, _reader(RECS))  # type: ignore[arg-type]


def test_dists_round_trip(tmp_path: Path) -> None:
    d = _dists(WHEELS)
    d.write(tmp_path / "d.json")
    assert venv_delta.Dists.load(tmp_path / "d.json") == d
    (tmp_path / "d.json").write_text(json.dumps({"format": 99}))
    assert venv_delta.Dists.load(tmp_path / "d.json") is None
