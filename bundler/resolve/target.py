"""What a target host accepts: marker environment and wheel tags, computed with `packaging`
for the TARGET (never the build host: pip evaluates markers for the host, pip #11664)."""

from __future__ import annotations

from packaging import tags

from bundler.models import Target
from bundler.platforms import parse_platform, wheel_platforms


def platforms(target: Target) -> list[str]:
    """Every platform tag the target accepts, most specific first."""
    return wheel_platforms(target.platform)


def arch(target: Target) -> str:
    return parse_platform(target.platform).arch


def python_tuple(target: Target) -> tuple[int, int]:
    major, minor = target.python.split(".")
    return int(major), int(minor)


def supported_tags(target: Target) -> set[tags.Tag]:
    py = python_tuple(target)
    interp = f"cp{py[0]}{py[1]}"
    plats = platforms(target)
    found = set(tags.cpython_tags(py, abis=[interp], platforms=plats))
    found.update(tags.compatible_tags(py, interpreter=interp, platforms=plats))
    return found


def marker_env(target: Target) -> dict[str, str]:
    """PEP 508 marker environment of the target host (CPython on Linux)."""
    py = python_tuple(target)
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{py[0]}.{py[1]}.0",
        "os_name": "posix",
        "platform_machine": arch(target),
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": f"{py[0]}.{py[1]}.0",
        "python_version": f"{py[0]}.{py[1]}",
        "sys_platform": "linux",
        "extra": "",
    }
