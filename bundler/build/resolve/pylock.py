"""Locking loose Python requirements into a hashed, pinned list for the TARGET.

uv resolves for the target (`--python-version`, `--python-platform`), whatever the build host
is, in seconds: it is the default. pip-compile (pip-tools) stays selectable with
`python.resolver: pip-tools`; it resolves for the interpreter it runs on (pip-tools #1326,
pip #11664), so it is refused for a target unlike this host. Both write the same hashed
requirements format.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

from bundler import proc, timeouts, ui
from bundler.build.profile import PythonSpec
from bundler.build.resolve import pyindex
from bundler.bundle.models import Target
from bundler.bundle.platforms import host_platform
from bundler.errors import BuildError, CommandError
from bundler.ui import Log

# How pip (pip-compile) and uv say that a project has nothing installable for the target.
_UNRESOLVABLE = (
    r"No matching distribution found for ([\w.\-]+)",
    r"Because (?:only )?([\w.\-]+)(?:[=<>!~]=?[^\s,]*)? has no (?:usable )?wheels",
    r"Because ([\w.\-]+) was not found in the package registry",
    r"Because there are no versions of ([\w.\-]+)",
)


def loose_requirements(spec: PythonSpec, work: Path) -> Path:
    """The `.in` file to compile: the profile's own, or one made from a pyproject."""
    if spec.requirements_in is not None:
        return spec.requirements_in
    assert spec.pyproject is not None
    try:
        doc = tomllib.loads(spec.pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"cannot read {spec.pyproject}: {exc}",
                         hint="python.pyproject must name a valid pyproject.toml") from None
    deps = doc.get("project", {}).get("dependencies")
    if not isinstance(deps, list):
        raise BuildError(f"{spec.pyproject} has no [project] dependencies list",
                         hint="list the runtime dependencies under [project] dependencies")
    out = work / "pyproject-dependencies.in"
    out.write_text("".join(f"{d}\n" for d in deps))
    return out


def host_matches(target: Target) -> bool:
    """The target is this host's Python (major.minor), CPU and libc family."""
    host, want = host_platform(), target.tag
    same_python = f"{sys.version_info[0]}.{sys.version_info[1]}" == target.python
    return same_python and host.libc == want.libc and host.arch == want.arch


def uv_platform(target: Target) -> str:
    """The target as uv's --python-platform names it."""
    return target.tag.uv_platform


def _uv() -> str:
    here = Path(sys.executable).parent / "uv"
    found = str(here) if here.exists() else shutil.which("uv")
    if found is None:
        raise BuildError("uv is needed to lock Python requirements, and is missing",
                         hint="install bundler's build side: pip install 'bundler[build]'")
    return found


def compile_requirements(spec: PythonSpec, target: Target, work: Path, cache_dir: Path,
                         log: Log, for_target: bool = False) -> str:
    """Return hashed, pinned requirements text for the target, with the profile's resolver.
    `for_target`: use uv even when pip-tools was chosen (pip-compile's markers saw this
    host's exact patch version)."""
    source = loose_requirements(spec, work)
    out = work / "locked.txt"
    if spec.resolver == "pip-tools" and not for_target:
        if not host_matches(target):
            raise BuildError(
                f"python.resolver pip-tools resolves for this host only (CPython "
                f"{sys.version_info[0]}.{sys.version_info[1]} on {host_platform().arch}), "
                f"not for the target (CPython {target.python} on {target.platform})",
                hint="drop `resolver: pip-tools` from the profile: uv (the default) resolves "
                     "for any target")
        log(f"locking {source.name} with pip-tools for CPython {target.python} "
            f"({target.platform}, this host)")
        args = [sys.executable, "-m", "piptools", "compile", "--no-header",
                "--generate-hashes", "--allow-unsafe", "--strip-extras", "--no-emit-index-url",
                "--no-emit-find-links",
                "--resolver", "backtracking", "--cache-dir", str(cache_dir / "pip-tools"),
                "--pip-args", "--isolated --only-binary=:all:",
                "--output-file", str(out), *spec.index_args(), str(source)]
        env = proc.clean_env()
    else:
        log(f"locking {source.name} with uv for CPython {target.python} on {target.platform}")
        args = [_uv(), "pip", "compile", "--quiet", "--no-header", "--generate-hashes",
                "--python-version", target.python, "--python-platform", uv_platform(target),
                "--only-binary", ":all:", "--no-annotate", "--no-emit-index-url",
                "--output-file", str(out),
                *spec.index_args(), str(source)]
        env = proc.clean_env({"UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never",
                              "UV_CACHE_DIR": str(cache_dir / "uv"),
                              "HOME": os.environ.get("HOME", "/root")})
    try:
        tool = "pip-compile" if spec.resolver == "pip-tools" and not for_target else "uv"
        with ui.activity(f"resolving {source.name} with {tool}"):
            proc.run(args, env=env, what="lock python requirements", timeout=timeouts.PACKAGES)
    except CommandError as exc:
        names = sorted({n for pattern in _UNRESOLVABLE for n in re.findall(pattern, exc.message)})
        if names:
            reasons = "; ".join(pyindex.why_unlockable(spec, target, n) for n in names)
            raise BuildError(f"cannot lock {source.name} for CPython {target.python} on "
                             f"{target.platform}: {reasons}",
                             hint="pin versions that publish wheels for the target, or change "
                                  "target.python / target.platform") from None
        raise BuildError(f"cannot lock {source.name} for CPython {target.python} on "
                         f"{target.platform}: {exc.message}",
                         hint="the resolver's output above names the package that has no "
                              "wheel for the target; pin a version that has one, or change "
                              "the target") from None
    return out.read_text(encoding="utf-8")
