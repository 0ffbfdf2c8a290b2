"""The release's virtualenv, filled from bundled wheels only (no index, hashes required)."""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import functools
import hashlib
import os
import posixpath
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bundler import proc, timeouts, tools
from bundler.bundle import hostneeds
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import Target
from bundler.errors import Cancelled, CommandError, InstallError, disk_full
from bundler.faults import fault_point
from bundler.fsutil import sha256_file
from bundler.install import reuse, venv_delta

_PYTHON_PROBE = 30.0  # seconds for each candidate interpreter to print its version
_VENV_TIMEOUT = 300.0  # `python -m venv`: copies pip in

def find_python(target: Target) -> Path | None:
    """A host interpreter whose major.minor is the target's, if there is one."""
    want = target.python
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == want:
        return Path(getattr(sys, "_base_executable", sys.executable))
    for name in (f"python{want}", "python3"):
        exe = shutil.which(name)
        if exe is None:
            continue
        result = proc.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          check=False, timeout=_PYTHON_PROBE)
        if result.returncode == 0 and result.output.strip() == want:
            return Path(exe)
    return None


OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))  # os-release(5)'s order


def install_hint(python: str, files: tuple[Path, ...] = OS_RELEASE) -> str:
    """How this host installs CPython `python`: its family's package, from its os-release."""
    return hostneeds.python_install(python, _os_release(files))


def _os_release(files: tuple[Path, ...] = OS_RELEASE) -> dict[str, str] | None:
    for path in files:
        try:
            return hostneeds.os_release(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return None


def missing_distutils(python: Path) -> str | None:
    """How to install what uv needs of `python` and it lacks (distutils, before 3.10), or None.
    Checked when bundler carries uv: without it, the pip fallback needs the venv module."""
    if tools.find_uv() is None:
        return None
    probe = (f"import sys\nif sys.version_info < {hostneeds.UV_DISTUTILS_BEFORE!r}:\n"
             "    import distutils.sysconfig")
    result = proc.run([str(python), "-I", "-c", probe], check=False, timeout=_PYTHON_PROBE)
    return None if result.returncode == 0 else hostneeds.distutils_install(_os_release())


# Logged when uv is missing: the slow path, and one that needs python3-venv on the host.
PIP_FALLBACK_NOTE = ("uv not found (bundler's `uv` package, BUNDLER_UV or PATH): creating the "
                     "venv with this host's `python -m venv` and pip (slower; needs the "
                     "python3-venv package on Debian)")


def create_venv(python: Path, venv: Path, wheels: Path, lock: Path, logs: Path,
                note: Callable[[str], None] = lambda _: None) -> Path:
    """Create `venv` for the host interpreter `python` and install the lock's wheels into it,
    from `wheels` only: no index, hashes required, binary wheels only, no host configuration.

    With uv (see bundler.tools.find_uv): `uv venv` then `uv pip install --offline`; neither
    needs the host's `venv` module or pip (Debian's python3 has neither). Without uv: the
    host's `python -m venv` and the venv's pip. Returns the log written in `logs`
    (`uv-pip-install.log` or `pip-install.log`, for what ran)."""
    uv = tools.find_uv()
    if uv is None:
        note(PIP_FALLBACK_NOTE)
        return _with_pip(python, venv, wheels, lock, logs)
    return _with_uv(uv, python, venv, wheels, lock, logs)


# Bytecode for the venv's site-packages, as `uv pip install --compile-bytecode` and pip write
# it, but not for directories named test/tests: packages' own test suites, which no service
# imports (one that does still works, compiled on import), and 1,324 of seed 001's 3,030
# files: 8.6 -> 4.3 s here. Run by the venv's interpreter: the bytecode must be its own.
# A file that is not valid Python 3 is left out, as pip and uv do; any other error (a full
# disk) fails the install. Each file's code names its source relative to the venv (`dfile`),
# not by the venv's path: the import system names the real source when it loads the code
# (importlib's _fix_co_filename), so tracebacks are unchanged, and the bytecode does not
# depend on where the venv is, so a reused venv links or copies it instead of rewriting it.
COMPILE_STEP = "compile bytecode"
_COMPILE_ONE = """
import multiprocessing, os, py_compile, re, sys, sysconfig
from concurrent.futures import ProcessPoolExecutor
skip = re.compile(r"tests?|__pycache__")
def one(path):
    try:
        py_compile.compile(path, dfile=os.path.relpath(path, sys.prefix), doraise=True)
    except py_compile.PyCompileError:
        return 1
    return 0
"""
COMPILE = _COMPILE_ONE + """files = []
for top in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
    for here, dirs, names in os.walk(top):
        dirs[:] = [d for d in dirs if not skip.fullmatch(d)]
        files += [os.path.join(here, n) for n in names if n.endswith(".py")]
files.sort(key=os.path.getsize, reverse=True)
fork = multiprocessing.get_context("fork")
with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=fork) as pool:
    bad = sum(pool.map(one, files, chunksize=16))
print(f"compiled {len(files) - bad} file(s); {bad} not valid Python 3, left out")
"""


def _with_uv(uv: Path, python: Path, venv: Path, wheels: Path, lock: Path, logs: Path
             ) -> Path:
    # No uv.toml / pyproject / UV_* from the host (clean_env drops UV_*), no cache shared with
    # anything else, never an index or a Python download.
    env = proc.clean_env({"UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never"})
    # uv unpacks each wheel into its cache, then links the files into the venv. A cache of its
    # own beside the venv (same filesystem, removed afterwards) lets it hard-link instead of
    # copying every file a second time (--no-cache unpacks into the system's temporary
    # directory, often another filesystem): 15.3 -> 10.3 s for seed 001's 30 wheels here.
    unpack = venv.parent / ".uv-unpack"
    shutil.rmtree(unpack, ignore_errors=True)  # a previous attempt's, killed mid-way
    unpack.mkdir(mode=0o700)
    common = ["--no-config", "--cache-dir", str(unpack), "--offline", "--color", "never"]
    log = logs / "uv-pip-install.log"
    steps: tuple[tuple[str, list[str | Path]], ...] = (
        ("uv venv", [uv, "venv", *common, "--no-project", "--no-python-downloads",
                     "--python", python, venv]),
        ("uv pip install", [uv, "pip", "install", *common, "--no-index", "--find-links", wheels,
                            "--require-hashes", "--only-binary", ":all:",
                            "--link-mode", "hardlink",
                            "--python", venv / "bin" / "python", "-r", lock]),
        (COMPILE_STEP, [venv / "bin" / "python", "-I", "-c", COMPILE]),
    )
    try:
        return _run_uv(steps, env, venv, log)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)


def _run_uv(steps: tuple[tuple[str, list[str | Path]], ...], env: dict[str, str], venv: Path,
            log: Path) -> Path:
    output = ""
    for what, argv in steps:
        fault_point(f"python:{what}")
        try:
            result = proc.run(argv, what=what, env=env, cwd=venv.parent, timeout=timeouts.PACKAGES,
                              check=False)
        except CommandError as exc:  # not executable, timed out
            _log(log, output + exc.message)
            raise _failed(exc.message.splitlines()[0], log) from None
        output += f"$ {what}\n{result.output}"
        if result.returncode != 0:
            _log(log, output)
            raise _failed(f"{what} exited {result.returncode}: {_summary(result.output)}", log,
                          wheels_fit=what != COMPILE_STEP)
    return _log(log, output)


def _with_pip(python: Path, venv: Path, wheels: Path, lock: Path, logs: Path) -> Path:
    log = logs / "pip-install.log"
    try:
        proc.run([python, "-m", "venv", venv], what="python -m venv", timeout=_VENV_TIMEOUT)
        result = proc.run(
            [venv / "bin" / "python", "-m", "pip", "install", "--isolated", "--no-index",
             "--require-hashes", "--only-binary=:all:", "--find-links", wheels,
             "--no-cache-dir", "--progress-bar", "off", "-r", lock],
            what="pip install (offline)", timeout=timeouts.PACKAGES,
        )
    except CommandError as exc:
        _log(log, exc.message)
        lines = exc.message.splitlines()
        raise _failed(f"{lines[0].rstrip(':')}: {_summary(chr(10).join(lines[1:]))}"
                      if len(lines) > 1 else lines[0], log) from None
    return _log(log, result.output)


def _summary(output: str) -> str:
    """The line of a uv or pip failure that says what went wrong (with its cause, if uv
    gave one on the next line)."""
    lines = [ln.strip(" ×│╰─▶") for ln in output.splitlines() if ln.strip(" ×│╰─▶")]
    for i, line in enumerate(lines):
        if line.lower().startswith(("error", "caused by", "because", "no solution")):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if nxt.lower().startswith(("caused by", "cause:", "because")):
                return f"{line}; {nxt}"
            return line
    return lines[-1] if lines else "no output"


def _failed(reason: str, log: Path, wheels_fit: bool = True) -> InstallError:
    """`wheels_fit` False: the wheels are in; writing their bytecode failed (a full disk)."""
    return InstallError(f"installing Python packages failed: {reason}",
                        hint=f"see {log}; " + (
                            "the bundle's wheels do not fit this host: check target.python "
                            "and target.platform in the profile" if wheels_fit else
                            "the venv could not be written: free space in the install root "
                            "or fix the file named above, then install again"))


def _log(path: Path, text: str) -> Path:
    """Best effort: on a full disk the step's own error is what must reach the operator."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


# --- reuse: the venv of an installed release with the same inputs, cloned (bundler.install.reuse)

# Bump when how a venv is made changes (the commands above, their options): a record made
# before then never matches again. COMPILE's text is part of the fingerprint by itself.
VENV_RECIPE = 1
RECORD_NAME = "venv.record.json"  # in the release's bundle/ directory
_SHEBANG_MAX = 127
_RECORD_ROW = re.compile(rb"^(.*),sha256=([A-Za-z0-9_-]+),(\d+)(\r?)$")
# Run by the clone's own interpreter: it must start from the clone (sys.prefix), and every
# rewritten .pyc must load and name its source in the clone.
_CHECK = """
import marshal, os, sys
venv = sys.argv[1]
assert sys.prefix == venv, f"sys.prefix is {sys.prefix}, not {venv}"
def names(code):
    yield code.co_filename
    for c in code.co_consts:
        if hasattr(c, "co_filename"):
            yield from names(c)
for rel in sys.argv[2:]:
    with open(os.path.join(venv, rel), "rb") as fh:
        code = marshal.loads(fh.read()[16:])
    bad = [n for n in names(code) if not n.startswith(venv + "/")]
    assert not bad, f"{rel} names {bad[0]}"
print("ok")
"""


def record_path(release: Path) -> Path:
    return release / "bundle" / RECORD_NAME


def fingerprint(m: Manifest, python: Path) -> str:
    """What a venv made for release `m` by `python` depends on, its path aside: the wheels
    and the lock (their signed sha256), the interpreter (its path, version and build), the
    installer (uv's binary, or the pip fallback) and how bundler runs them."""
    return fingerprints(m, python)[0]


def fingerprints(m: Manifest, python: Path) -> tuple[str, str | None]:
    """(`fingerprint`, the same without the wheels and the lock: what a venv another release
    made must share for its unchanged distributions to be reused, None with the pip fallback,
    whose venvs are never partly reused)."""
    probe = proc.run([python, "-I", "-c", "import sys; print(sys.version); "
                      "print(sys.implementation.cache_tag, sys.platform)"],
                     what="python (fingerprint)", timeout=_PYTHON_PROBE)
    uv = tools.find_uv()
    h = hashlib.sha256(f"bundler venv, recipe {VENV_RECIPE}\n".encode())
    h.update(hashlib.sha256(COMPILE.encode()).hexdigest().encode())
    h.update(f"\npython {python}\n{probe.output}\n".encode())
    h.update(f"installer {'uv ' + sha256_file(uv)[0] if uv else 'pip'}\n".encode())
    base = h.copy()
    base.update(f"partial {hashlib.sha256((COMPILE_FILES + _IMPORTS).encode()).hexdigest()}"
                .encode())
    assert m.python_lock is not None
    for f in sorted(m.files, key=lambda f: f.path):
        if f.kind == "wheel" or f.path == m.python_lock:
            h.update(f"{f.kind} {f.path} {f.sha256}\n".encode())
    return h.hexdigest(), base.hexdigest() if uv else None


def dists_path(release: Path) -> Path:
    return release / "bundle" / venv_delta.NAME


def _wheels_of(m: Manifest) -> dict[str, str]:
    """The release's wheels: file name -> signed sha256."""
    return {posixpath.basename(f.path): f.sha256 for f in m.files if f.kind == "wheel"}


@dataclass(frozen=True)
class Made:
    """How the venv came to be: `reused_from` the release it was cloned from (None: installed
    with `log` the installer's log)."""

    summary: str
    reused_from: str | None = None
    log: Path | None = None


def provide(python: Path, m: Manifest, release: Path, releases: list[Path],
            link: bool, note: Callable[[str], None] = lambda _: None
            ) -> Made:
    """`<release>/venv` for release `m`: cloned from the first of `releases` (installed ones,
    the current first) whose venv record has the same fingerprint and whose venv is exactly
    as recorded; else cloned from the first with the same interpreter and installer without
    the distributions whose wheel changed, and the new wheels installed into it (`_partly`);
    else installed from the wheels (`create_venv`). Either way its record is written, for
    the next release. `link`: files are hard-linked (packages.LINK), else copied."""
    assert m.python_lock is not None
    venv, (fp, base) = release / "venv", fingerprints(m, python)
    with contextlib.suppress(FileNotFoundError):
        dists_path(release).unlink()  # a repaired release's, from its first install
    recorded = [(old, rec) for old in releases
                if (rec := reuse.Record.load(record_path(old))) is not None
                and rec.top == os.path.abspath(old / "venv")]
    for old, rec in recorded:
        if rec.fingerprint != fp:
            continue
        start = time.monotonic()
        try:
            done = _clone(rec, venv, fp, link)
        except reuse.Doubt as exc:
            note(f"venv of {old.name} not reused ({exc}): installing from the wheels")
            continue
        done.record.write(record_path(release))
        _write_dists(release, m, done.record, base)
        how = (f"{done.linked} file(s) hard-linked, {done.copied} copied" if done.linked
               else f"{done.copied} file(s) copied")
        return Made(f"reused the venv of release {old.name} (same wheels, interpreter and "
                    f"installer): {how}, {done.written} rewritten for the new path, in "
                    f"{time.monotonic() - start:.1f} s", old.name)
    if base is not None:
        made = _partly(m, release, recorded, fp, base, link, note)
        if made is not None:
            return made
    start = time.monotonic()
    log = create_venv(python, venv, release / "python" / "wheels", release / m.python_lock,
                      release / "logs", note)
    took = time.monotonic() - start
    try:
        rec = reuse.scan(venv, fp, os.path.abspath(release))
        rec.write(record_path(release))
        _write_dists(release, m, rec, base)
    except reuse.Doubt as exc:
        note(f"the venv cannot be reused by a later release: {exc}")
    return Made(f"installed from the wheels in {took:.1f} s", None, log)


def _write_dists(release: Path, m: Manifest, rec: reuse.Record, base: str | None) -> None:
    """Which wheel made which dist-info, for a later release that changes some of them."""
    if base is None:
        return
    dists = venv_delta.describe(rec, release / "python" / "wheels", _wheels_of(m), base)
    if dists is not None:
        dists.write(dists_path(release))


def _partly(m: Manifest, release: Path, recorded: list[tuple[Path, reuse.Record]], fp: str,
            base: str, link: bool, note: Callable[[str], None]) -> Made | None:
    """The venv of the first recorded release made by the same interpreter and installer,
    cloned without the distributions whose wheel changed or went, and the changed and added
    wheels installed into it (venv_delta). None, the partial clone removed and a note, on
    any doubt: the caller installs every wheel."""
    for old, rec in recorded:
        dists = venv_delta.Dists.load(dists_path(old))
        if dists is None or dists.base != base or dists.fingerprint != rec.fingerprint:
            continue
        start, venv = time.monotonic(), release / "venv"
        try:
            plan = venv_delta.plan(rec, dists, _wheels_of(m), release / "python" / "wheels",
                                   functools.partial(reuse.read_verified, Path(rec.top)))
            done = _clone(dataclasses.replace(rec, entries=plan.keep), venv, fp, link)
            try:
                log = _install_changed(venv, release, m, plan, done.record)
                new = reuse.scan(venv, fp, os.path.abspath(release))
            except BaseException:
                reuse.remove(venv)
                raise
        except reuse.Doubt as exc:
            note(f"venv of {old.name} not partly reused ({exc}): installing every wheel")
            return None
        new.write(record_path(release))
        _write_dists(release, m, new, base)
        n = len(plan.changes)
        return Made(f"reused the venv of release {old.name} except {n} changed "
                    f"distribution{'s' if n != 1 else ''} ({', '.join(plan.changes)}): "
                    f"{done.linked} file(s) hard-linked, {done.copied} copied, "
                    f"{len(plan.install)} wheel(s) installed, in "
                    f"{time.monotonic() - start:.1f} s", old.name, log)
    return None


# The bytecode of the files the given distributions installed (each a dist-info directory
# argument), written as COMPILE writes it (same walk, same skips, same `dfile`).
COMPILE_FILES = _COMPILE_ONE + """import csv
want = set()
for info in sys.argv[1:]:
    with open(os.path.join(info, "RECORD"), newline="") as fh:
        want.update(os.path.normpath(os.path.join(os.path.dirname(info), row[0]))
                    for row in csv.reader(fh) if row and row[0].endswith(".py"))
files = []
for top in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
    for here, dirs, names in os.walk(top):
        dirs[:] = [d for d in dirs if not skip.fullmatch(d)]
        files += [p for p in (os.path.join(here, n) for n in names if n.endswith(".py"))
                  if p in want]
files.sort(key=os.path.getsize, reverse=True)
fork = multiprocessing.get_context("fork")
with ProcessPoolExecutor(min(os.cpu_count() or 1, max(len(files), 1)), mp_context=fork) as pool:
    bad = sum(pool.map(one, files, chunksize=16))
print(f"compiled {len(files) - bad} file(s); {bad} not valid Python 3, left out")
"""
# The changed distributions' top-level names must resolve to the venv's site-packages. Found
# (importlib.util.find_spec), not imported: importing runs the package's code, which a full
# install never does, and code that wrote a file at import could write one the clone shares.
_IMPORTS = """
import importlib.util, os, sys, sysconfig
sites = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    where = spec and (spec.origin or next(iter(spec.submodule_search_locations or ()), None))
    assert where and any(where.startswith(s + os.sep) for s in sites), f"{name}: {where}"
"""


def _install_changed(venv: Path, release: Path, m: Manifest, plan: venv_delta.Plan,
                     cloned: reuse.Record) -> Path:
    """Install the plan's wheels into the partial clone `venv` (offline, --no-deps, only
    their lock lines), their bytecode, then check it. Doubt if anything fails, or if a file
    the clone holds (hard-linked with the earlier release) changed meanwhile."""
    uv = tools.find_uv()
    if uv is None:
        raise reuse.Doubt("uv not found")
    before = _stats(venv, cloned)
    wheels = release / "python" / "wheels"
    assert m.python_lock is not None
    lines = _lock_lines(release / m.python_lock, [_wheels_of(m)[w] for w in plan.install])
    log = release / "logs" / "uv-pip-install.log"
    try:
        if plan.install:  # (none: distributions were only removed)
            _with_uv_into(uv, venv, wheels, lines, [str(venv / i) for i in plan.installs],
                          log)
    except (InstallError, CommandError) as exc:
        if isinstance(exc, Cancelled) or disk_full(exc):
            raise  # not a doubt about the clone: a full install would fail the same way
        raise reuse.Doubt(f"installing the changed wheels failed: {exc.message}") from None
    py = venv / "bin" / "python"
    checks: tuple[tuple[str, list[str | Path]], ...] = (
        ("python (venv check)", [py, "-I", "-c", _CHECK, str(venv)]),
        ("python (import check)", [py, "-I", "-c", _IMPORTS, *_top_level(plan)]))
    for what, argv in checks:
        try:
            result = proc.run(argv, what=what, timeout=_VENV_TIMEOUT, check=False)
        except CommandError as exc:
            raise reuse.Doubt(f"{what} failed: {exc.message}") from None
        if result.returncode != 0:
            raise reuse.Doubt(f"{what} failed: {_summary(result.output)}")
    if _stats(venv, cloned) != before:
        raise reuse.Doubt("a file the clone shares with the earlier release changed while "
                          "the new wheels were installed")
    return log


def _stats(venv: Path, rec: reuse.Record) -> dict[str, tuple[int, int, int, int]]:
    """Each cloned file's inode, size, mtime and ctime: a write in place changes the last."""
    out = {}
    top = str(venv)
    for e in rec.entries:
        if e.kind == "f":
            try:
                st = os.lstat(os.path.join(top, e.path))
            except OSError:
                raise reuse.Doubt(f"{e.path} went while the new wheels were installed") from None
            out[e.path] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def _lock_lines(lock: Path, shas: list[str]) -> list[str]:
    """The lock's line of each wheel (by its signed sha256), exactly one each."""
    lines = lock.read_text().splitlines()
    out = []
    for sha in shas:
        found = [ln for ln in lines if re.search(rf"--hash=sha256:{sha}\b", ln)]
        if len(found) != 1:
            raise reuse.Doubt(f"the lock has {len(found)} line(s) for wheel sha256 {sha[:12]}")
        out.append(found[0])
    return out


def _top_level(plan: venv_delta.Plan) -> list[str]:
    """The importable top-level names the plan's wheels install (packages with an
    __init__.py and modules directly in site-packages)."""
    names = set()
    for info in plan.installs:
        site = posixpath.dirname(info)
        for path in plan.writes:
            if not path.startswith(site + "/"):
                continue
            rel = path[len(site) + 1:].split("/")
            if len(rel) == 1 and rel[0].endswith(".py"):
                names.add(rel[0][:-3])
            elif len(rel) == 2 and rel[1] == "__init__.py":
                names.add(rel[0])
    return sorted(n for n in names if n.isidentifier())


def _with_uv_into(uv: Path, venv: Path, wheels: Path, lines: list[str], infos: list[str],
                  log: Path) -> Path:
    """`_with_uv` for some wheels into an existing venv: their lock lines only, --no-deps,
    then their bytecode."""
    env = proc.clean_env({"UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never"})
    unpack, sub = venv.parent / ".uv-unpack", venv.parent / ".uv-changed.lock"
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir(mode=0o700)
    fd = os.open(sub, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    common = ["--no-config", "--cache-dir", str(unpack), "--offline", "--color", "never"]
    steps: tuple[tuple[str, list[str | Path]], ...] = (
        ("uv pip install", [uv, "pip", "install", *common, "--no-index", "--find-links", wheels,
                            "--require-hashes", "--only-binary", ":all:", "--no-deps",
                            "--link-mode", "hardlink",
                            "--python", venv / "bin" / "python", "-r", sub]),
        (COMPILE_STEP, [venv / "bin" / "python", "-I", "-c", COMPILE_FILES, *infos]),
    )
    try:
        return _run_uv(steps, env, venv, log)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            sub.unlink()


def _clone(rec: reuse.Record, venv: Path, fp: str, link: bool) -> reuse.Cloned:
    """The venv `rec` describes, cloned to `venv`: files that hold the old release's path
    rewritten (scripts' #! lines, activate scripts, bytecode; then the RECORD rows of those
    files), everything else linked or copied; then checked by its own interpreter."""
    old, new = rec.anchor, os.path.abspath(venv.parent)
    src = Path(rec.top)
    written: dict[str, bytes] = {}
    was: dict[str, str] = {}  # the sha256 of each rewritten file before
    for e in rec.entries:
        if e.kind == "f" and e.holds_path:
            written[e.path] = _moved_bytes(e.path, reuse.read_verified(src, e), old, new)
            was[e.path] = e.value
    for e in rec.entries:
        if e.kind == "f" and e.path.endswith(".dist-info/RECORD"):
            data = written.get(e.path) or reuse.read_verified(src, e)
            fixed = _fix_record(data, e.path, written, was)
            if fixed != data:
                written[e.path] = fixed
    done = reuse.clone(rec, venv, fp, written, link, relink=(old, new))
    pycs = sorted(p for p in written if p.endswith(".pyc"))
    result = proc.run([venv / "bin" / "python", "-I", "-c", _CHECK, str(venv), *pycs],
                      what="python (venv check)", timeout=_VENV_TIMEOUT, check=False)
    if result.returncode != 0:
        reuse.remove(venv)
        raise reuse.Doubt(f"the clone does not check: {_summary(result.output)}")
    return done


def _moved_bytes(rel: str, data: bytes, old: str, new: str) -> bytes:
    """A file's bytes with the old release's path replaced by the new one's."""
    if rel.endswith(".pyc"):
        moved = patch_pyc(data, old, new)
        if moved is None:
            raise reuse.Doubt(f"{rel} names the old path where bundler does not rewrite it")
        return moved
    if rel.endswith(".py") or b"\0" in data:  # a source (its .pyc would go stale), a binary
        raise reuse.Doubt(f"{rel} holds the old path and is not a script bundler rewrites")
    moved = data.replace(old.encode(), new.encode())
    if data.startswith(b"#!"):
        line = moved.split(b"\n", 1)[0]
        # uv and pip write `#!<python>` only up to 127 bytes and without spaces, else a
        # /bin/sh line that execs it: a form that a path's length decides is not rewritten
        if old.encode() not in data.split(b"\n", 1)[0] or len(line) > _SHEBANG_MAX \
                or b" " in line:
            raise reuse.Doubt(f"{rel}: its #! line takes another form at the new path")
    return moved


# marshal's string types (CPython 3.4+): short ASCII (1-byte length), ASCII, UTF-8, each also
# interned; FLAG_REF (0x80) marks an object later ones refer back to.
_SHORT = {ord("z"): False, ord("Z"): True}              # -> interned
_LONG = {ord("a"): False, ord("A"): True, ord("u"): False, ord("t"): True}
_FLAG_REF = 0x80


def patch_pyc(data: bytes, old: str, new: str) -> bytes | None:
    """Bytecode whose strings that begin with `old` (the source's path, compiled in) begin
    with `new` instead, written as marshal writes a string of that length and kind, so that
    the result is byte for byte what compiling at the new path writes (the header, which
    names the source's mtime and size, is kept: the source is the same file). None when an
    occurrence is not the start of a marshal string (no guess is made)."""
    needle, out, end = old.encode(), [], len(data)
    spots = _spots(data, needle)
    if spots is None:
        return None
    for start, size, kind in reversed(spots):
        body = data[start:start + size]
        text = new.encode() + body[len(needle):]
        out.append(data[start + size:end])
        out.append(_string_head(kind, text) + text)
        end = start - (2 if kind & 0x7F in _SHORT else 5)
    out.append(data[:end])
    return b"".join(reversed(out))


def _spots(data: bytes, needle: bytes) -> list[tuple[int, int, int]] | None:
    """(where the string's bytes start, their length, its type byte) of each string that
    begins with `needle`; None if `needle` occurs anywhere else."""
    spots = []
    at = data.find(needle, 16)
    while at != -1:
        framings = []
        if at >= 2 and data[at - 2] & 0x7F in _SHORT:
            framings.append((data[at - 1], data[at - 2]))
        if at >= 5 and data[at - 5] & 0x7F in _LONG:
            framings.append((int.from_bytes(data[at - 4:at], "little"), data[at - 5]))
        fits = [(size, kind) for size, kind in framings
                if len(needle) <= size and at + size <= len(data)]
        if len(fits) != 1:
            return None  # neither framing, or both: no guess
        size, kind = fits[0]
        spots.append((at, size, kind))
        at = data.find(needle, at + size)
    return spots


def _string_head(kind: int, text: bytes) -> bytes:
    """The type byte and length marshal writes for `text`, keeping the interned and
    FLAG_REF bits of the string it replaces."""
    interned = (_SHORT | _LONG)[kind & 0x7F]
    ascii_ = text.isascii()
    if ascii_ and len(text) < 256:
        code = "Z" if interned else "z"
        return bytes([ord(code) | kind & _FLAG_REF, len(text)])
    code = ("A" if interned else "a") if ascii_ else ("t" if interned else "u")
    return bytes([ord(code) | kind & _FLAG_REF]) + len(text).to_bytes(4, "little")


def _fix_record(data: bytes, rel: str, written: dict[str, bytes], was: dict[str, str]
                ) -> bytes:
    """A wheel's RECORD with the sha256 and size of each file it lists that was rewritten,
    where the row had the file's sha256 before (the installer wrote it: a script); a row that
    did not (a wheel's own .pyc, compiled again after) stays as a fresh install leaves it."""
    base = posixpath.dirname(posixpath.dirname(rel))  # RECORD paths are from site-packages
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        row = _RECORD_ROW.match(line)
        if row is None:
            continue
        name = next(csv.reader([row[1].decode()]))[0]
        path = posixpath.normpath(posixpath.join(base, name))
        moved = written.get(path)
        before = base64.urlsafe_b64decode(row[2] + b"=" * (-len(row[2]) % 4)).hex()
        if moved is None or was.get(path) != before:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(moved).digest()).rstrip(b"=")
        lines[i] = b"%s,sha256=%s,%d%s" % (row[1], digest, len(moved), row[4])
    return b"\n".join(lines)
