"""Wheel platform tags (`manylinux_2_28_x86_64`, `musllinux_1_2_aarch64`, `linux_x86_64`) and
this host's platform: parsed here and nowhere else, for the build side (what to fetch, which
resolver can lock for the target) and the install side (does this host fit the bundle).
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

# What a target may be: CPython on Linux, x86_64 or aarch64 (the profile, the manifest, the lock
# and `bundle kit --platform` check a tag with this; models.Target.tag is the parsed one).
PLATFORM_RE = re.compile(r"^(?:(manylinux|musllinux)_(\d+)_(\d+)|(linux))_(x86_64|aarch64)$")
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_NODE_CPU = {"x86_64": "x64", "aarch64": "arm64"}
_LEGACY = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}


@dataclass(frozen=True)
class PlatformTag:
    """One parsed platform tag. `version`: the glibc (manylinux) or musl (musllinux) minimum,
    None for plain `linux_<arch>`."""

    family: str                     # "manylinux" | "musllinux" | "linux"
    version: tuple[int, int] | None
    arch: str                       # "x86_64" | "aarch64" | ...

    @property
    def libc(self) -> str:
        return "musl" if self.family == "musllinux" else "glibc"

    @property
    def glibc(self) -> tuple[int, int] | None:
        """The oldest glibc the tag runs on (manylinux only)."""
        return self.version if self.family == "manylinux" else None

    @property
    def docker_platform(self) -> str:
        """The OCI platform of images for this target ("linux/amd64", "linux/arm64")."""
        return f"linux/{_GOARCH.get(self.arch, self.arch)}"

    @property
    def node_cpu(self) -> str:
        """node's process.arch on this target ("x64", "arm64")."""
        return _NODE_CPU.get(self.arch, self.arch)

    @property
    def uv_platform(self) -> str:
        """The target as uv's --python-platform names it."""
        if self.family == "manylinux" and self.version is not None:
            return f"{self.arch}-manylinux_{self.version[0]}_{self.version[1]}"
        if self.family == "musllinux":
            return f"{self.arch}-unknown-linux-musl"
        return f"{self.arch}-unknown-linux-gnu"

    def __str__(self) -> str:
        if self.version is None:
            return f"{self.family}_{self.arch}"
        return f"{self.family}_{self.version[0]}_{self.version[1]}_{self.arch}"


def parse_platform(tag: str) -> PlatformTag:
    """ValueError unless `tag` is a target's wheel platform tag (PLATFORM_RE)."""
    m = PLATFORM_RE.match(tag)
    if m is None:
        raise ValueError(f"{tag!r} is not a Linux wheel platform tag for x86_64 or aarch64 "
                         "(e.g. manylinux_2_28_x86_64, musllinux_1_2_aarch64)")
    if m[4]:
        return PlatformTag("linux", None, m[5])
    return PlatformTag(m[1], (int(m[2]), int(m[3])), m[5])


def wheel_platforms(tag: PlatformTag | str) -> list[str]:
    """Every platform tag a target accepts, most specific first (what pip's --platform needs:
    pip does not expand a manylinux tag to the older ones on its own)."""
    p = tag if isinstance(tag, PlatformTag) else parse_platform(tag)
    if p.family == "manylinux" and p.version is not None:
        major, minor = p.version
        out = []
        for mi in range(minor, 4, -1):
            out.append(f"manylinux_{major}_{mi}_{p.arch}")
            if (major, mi) in _LEGACY:
                out.append(f"{_LEGACY[(major, mi)]}_{p.arch}")
        return [*out, f"linux_{p.arch}"]
    if p.family == "musllinux" and p.version is not None:
        major, minor = p.version
        return [*(f"musllinux_{major}_{mi}_{p.arch}" for mi in range(minor, -1, -1)),
                f"linux_{p.arch}"]
    return [str(p)]


def pip_platforms(tag: PlatformTag) -> list[str]:
    """wheel_platforms in the order pip ranks them for `--platform` options: pip follows each
    legacy manylinux2014 / manylinux2010 tag with the older legacy tags it implies (PEP 599,
    PEP 571) before the next one given, so manylinux2010 ranks above manylinux_2_16."""
    out: list[str] = []
    for plat in wheel_platforms(tag):
        implied = [plat]
        if plat == f"manylinux2014_{tag.arch}" and tag.arch in ("i686", "x86_64"):
            implied += [f"manylinux2010_{tag.arch}", f"manylinux1_{tag.arch}"]
        elif plat == f"manylinux2010_{tag.arch}":
            implied.append(f"manylinux1_{tag.arch}")
        out += [p for p in implied if p not in out]
    return out


@dataclass(frozen=True)
class Host:
    arch: str                        # normalised: "x86_64" | "aarch64" | what uname says
    libc: str                        # "glibc" | "musl"
    glibc: tuple[int, int] | None    # its version, when glibc


def host_platform() -> Host:
    """This host's CPU, libc and glibc version."""
    arch = _ARCH.get(platform.machine(), platform.machine())
    libc, version = platform.libc_ver()
    if libc == "glibc" and version:
        major, minor = version.split(".")[:2]
        return Host(arch, "glibc", (int(major), int(minor)))
    return Host(arch, libc or "musl", None)
