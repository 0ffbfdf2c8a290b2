"""What a target host accepts: marker environment and wheel tags, computed with `packaging`
for the TARGET (never the build host: pip evaluates markers for the host, pip #11664)."""

from __future__ import annotations

from packaging import tags

from bundler.bundle.models import Target
from bundler.bundle.platforms import pip_platforms, wheel_platforms


def platforms(target: Target) -> list[str]:
    """Every platform tag the target accepts, most specific first."""
    return wheel_platforms(target.tag)


def arch(target: Target) -> str:
    return target.tag.arch


def python_tuple(target: Target) -> tuple[int, int]:
    major, minor = target.python.split(".")
    return int(major), int(minor)


def sorted_tags(target: Target) -> list[tags.Tag]:
    """The wheel tags the target accepts, most preferred first: exactly pip's order for
    `pip download --implementation cp --python-version X.Y --platform ...` (a wheel ranks
    by its best tag; bundler picks among a release's wheels the way pip would)."""
    py = python_tuple(target)
    interp = f"cp{py[0]}{py[1]}"
    plats = pip_platforms(target.tag)
    found = [*tags.cpython_tags(py, abis=[interp], platforms=plats),
             *tags.compatible_tags(py, interpreter=interp, platforms=plats)]
    return list(dict.fromkeys(found))


def supported_tags(target: Target) -> set[tags.Tag]:
    return set(sorted_tags(target))


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
