"""mypy on the target kit's modules as Python 3.9 (issue 22; `make lint` runs it).

The kit runs on the host's own python3, 3.9 and newer. ruff checks its modules as 3.9 through
pyproject.toml's `[tool.ruff.per-file-target-version]`, the one list of them (tests keep it equal
to what `bundle kit` carries); this runs mypy on the same list with `--python-version 3.9`, so
that a 3.10+ name of the standard library (datetime.UTC, enum.StrEnum, zip(strict=)) or an
`X | Y` evaluated at run time is an error.

It needs two things the project's own environment cannot give:
- a mypy that still checks for 3.9 (mypy 2 checks for 3.10 and newer): mypy 1.x, in a venv of
  its own;
- the kit's dependencies as the 3.9 kit carries them (click 8.1, not 8.2 whose sources use
  `match`): resolved for 3.9 by uv into `site39/`, which that venv sees through a `.pth` file.
Both are made once under `.venv/kit39/` (remade when the requirements change).

    python scripts/lint_kit.py [--env DIR] [--files]   # --files: print the list and exit
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
OLDEST = "3.9"
MYPY = "mypy>=1.19,<2"
STUBS = ("types-PyYAML", "types-requests")


def kit_files(pyproject: Path = PYPROJECT) -> list[str]:
    """The kit's module files, as pyproject.toml lists them for ruff (target py39)."""
    with pyproject.open("rb") as fh:
        doc = tomllib.load(fh)
    versions: dict[str, str] = doc["tool"]["ruff"].get("per-file-target-version", {})
    wanted = "py" + OLDEST.replace(".", "")
    return sorted(path for path, version in versions.items() if version == wanted)


def _requirements() -> list[str]:
    from bundler.build.kit import target_requirements

    return sorted({str(r) for r in target_requirements()} | set(STUBS))


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}")


def ensure_env(env: Path) -> Path:
    """The venv's python: mypy 1.x, and the kit's dependencies for 3.9 on its path."""
    reqs = _requirements()
    stamp = hashlib.sha256(repr((MYPY, OLDEST, reqs)).encode()).hexdigest()
    python = env / "bin" / "python"
    ready = env / ".ready"
    if ready.is_file() and ready.read_text().strip() == stamp:
        return python
    print(f"making {env}: {MYPY}, the kit's dependencies for Python {OLDEST}", flush=True)
    from uv import find_uv_bin

    _run([sys.executable, "-m", "venv", "--clear", str(env)])
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", MYPY])
    site = env / f"site{OLDEST.replace('.', '')}"
    _run([find_uv_bin(), "pip", "install", "--quiet", "--no-config", "--target", str(site),
          "--python", str(python), "--python-version", OLDEST, "--only-binary", ":all:", *reqs])
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "kit-deps.pth").write_text(f"{site}\n")
    ready.write_text(stamp + "\n")
    return python


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--env", type=Path, default=ROOT / ".venv" / "kit39")
    parser.add_argument("--files", action="store_true", help="print the kit's files and exit")
    args = parser.parse_args(argv)
    files = kit_files()
    if args.files:
        print("\n".join(files))
        return 0
    python = ensure_env(args.env.resolve())
    mypy = python.parent / "mypy"
    # pyproject's [tool.mypy] (strict, overrides) with the oldest Python the kit runs on
    done = subprocess.run([str(mypy), "--config-file", str(PYPROJECT), "--python-version",
                           OLDEST, "--python-executable", str(python), *files], cwd=ROOT,
                          check=False)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
