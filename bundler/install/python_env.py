"""The release's virtualenv, filled from bundled wheels only (no index, hashes required)."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from bundler import proc, timeouts, tools
from bundler.bundle.models import Target
from bundler.errors import CommandError, InstallError
from bundler.faults import fault_point

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
# disk) fails the install.
COMPILE_STEP = "compile bytecode"
COMPILE = """
import multiprocessing, os, py_compile, re, sysconfig
from concurrent.futures import ProcessPoolExecutor
skip = re.compile(r"tests?|__pycache__")
def one(path):
    try:
        py_compile.compile(path, doraise=True)
    except py_compile.PyCompileError:
        return 1
    return 0
files = []
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
