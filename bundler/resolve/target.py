"""What a target host accepts: marker environment and wheel tags, computed with `packaging`
for the TARGET (never the build host: pip evaluates markers for the host, pip #11664)."""

from __future__ import annotations

import re

from packaging import tags

from bundler.models import Target

_MANY = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
_MUSL = re.compile(r"^musllinux_(\d+)_(\d+)_(\w+)$")
_LEGACY = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}


def platforms(target: Target) -> list[str]:
    """Every platform tag a target accepts, most specific first (what pip's --platform needs:
    pip does not expand a manylinux tag to the older ones on its own)."""
    plat = target.platform
    if m := _MANY.match(plat):
        major, minor, arch = int(m[1]), int(m[2]), m[3]
        out = []
        for mi in range(minor, 4, -1):
            out.append(f"manylinux_{major}_{mi}_{arch}")
            if (major, mi) in _LEGACY:
                out.append(f"{_LEGACY[(major, mi)]}_{arch}")
        return [*out, f"linux_{arch}"]
    if m := _MUSL.match(plat):
        major, minor, arch = int(m[1]), int(m[2]), m[3]
        return [*(f"musllinux_{major}_{mi}_{arch}" for mi in range(minor, -1, -1)),
                f"linux_{arch}"]
    return [plat]


def arch(target: Target) -> str:
    return target.platform.rsplit("_", 1)[-1] if not target.platform.endswith("x86_64") \
        else "x86_64"


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
