"""The release's virtualenv, filled from bundled wheels only (no index, hashes required)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bundler import proc
from bundler.errors import CommandError, InstallError
from bundler.models import Target


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
                          check=False, timeout=30)
        if result.returncode == 0 and result.output.strip() == want:
            return Path(exe)
    return None


def create_venv(python: Path, venv: Path, wheels: Path, lock: Path, log: Path) -> None:
    try:
        proc.run([python, "-m", "venv", venv], what="create venv", timeout=300)
        result = proc.run(
            [venv / "bin" / "python", "-m", "pip", "install", "--isolated", "--no-index",
             "--require-hashes", "--only-binary=:all:", "--find-links", wheels,
             "--no-cache-dir", "--progress-bar", "off", "-r", lock],
            what="pip install (offline)", timeout=1800,
        )
    except CommandError as exc:
        raise InstallError(f"installing Python packages failed: {exc.message}",
                           hint="the bundle's wheels do not fit this host; check target.python "
                                "and target.platform in the profile") from None
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(result.output)
