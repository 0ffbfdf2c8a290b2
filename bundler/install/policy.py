"""Should this host take this (authentic) bundle at all? Checked before anything is created.

Authentic is not enough: an old bundle replayed from last year's USB stick is authentic too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from bundler import __version__, proc, timeouts, tools
from bundler.bundle.manifest import Manifest, required_version
from bundler.bundle.models import Target
from bundler.bundle.platforms import Host, host_platform
from bundler.compat import UTC, zip_strict
from bundler.errors import CommandError, PolicyError
from bundler.install import python_env
from bundler.install.layout import Layout
from bundler.install.state import State


@dataclass(frozen=True)
class Decision:
    already_current: bool       # this exact bundle is the current release
    downgrade: bool             # accepted only because --allow-downgrade was given
    python: Path | None         # host interpreter for the release venv


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# Builder and host clocks may differ a little; a host clock further behind than this is wrong.
CLOCK_SLACK = timedelta(minutes=15)
_CLOCK_HINT = ("set this host's clock to the right UTC time (`timedatectl set-time`, or "
               "`date -u -s`), then run the command again")


def check_expiry(manifest: Manifest, now: datetime | None = None,
                 last_recorded: str | None = None) -> None:
    """Refuse an expired bundle, and a host clock that cannot be right: before the bundle was
    created, or before the last time recorded in this root's state (an expiry check against
    a clock set back, e.g. to 1970 after a dead RTC battery, would check nothing)."""
    moment = now or datetime.now(UTC)
    here = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if parse_time(manifest.created) - CLOCK_SLACK > moment:
        raise PolicyError(f"this host's clock says {here}, before bundle {manifest.name} "
                          f"{manifest.version} was created ({manifest.created}): the clock is "
                          "wrong, so expiry cannot be checked", hint=_CLOCK_HINT)
    if last_recorded is not None and parse_time(last_recorded) - CLOCK_SLACK > moment:
        raise PolicyError(f"this host's clock says {here}, before the last install recorded "
                          f"under this root ({last_recorded}): the clock was set back",
                          hint=_CLOCK_HINT)
    if manifest.expires is None:
        return
    if parse_time(manifest.expires) <= moment:
        raise PolicyError(f"bundle {manifest.name} {manifest.version} expired at "
                          f"{manifest.expires}", hint="build a fresh bundle; expiry is signed "
                          "and cannot be overridden")


def last_recorded_time(state: State) -> str | None:
    """The latest time this root's journal recorded (UTC, as written), or None."""
    row = state.conn.execute("SELECT max(ts) FROM events").fetchone()
    text = row[0] if row else None
    try:
        return str(parse_time(text).strftime("%Y-%m-%dT%H:%M:%SZ")) if text else None
    except ValueError:  # a hand-edited journal: nothing to compare against
        return None


def check_bundler_version(manifest: Manifest, own: str = __version__) -> None:
    """Refuse a bundle built by a newer bundler than this one: this kit may not know what the
    bundle relies on. The stick `bundle export` writes carries the kit that matches it."""
    need = required_version(manifest)
    if need is None:
        return
    try:
        newer = Version(need) > Version(own)
    except InvalidVersion:
        raise PolicyError(f"bundle {manifest.name} {manifest.version} was built by "
                          f"{manifest.builder!r}, whose version this bundler ({own}) cannot "
                          "compare", hint="use the kit that came with the bundle") from None
    if newer:
        raise PolicyError(f"bundle {manifest.name} {manifest.version} needs bundler {need} or "
                          f"newer; this is bundler {own}",
                          hint="use the kit that came with the bundle (`bundle export` writes "
                               "it next to the bundle), or upgrade bundler on this host")


def check_target(target: Target, host: Host | None = None) -> None:
    """PolicyError unless this host (CPU, libc, glibc version) runs the target's wheels."""
    have = host or host_platform()
    want = target.tag
    if want.arch != have.arch:
        raise PolicyError(f"bundle is for {target.platform}; this host is {have.arch}",
                          hint="build the bundle with target.platform for this host")
    if want.glibc is not None and (have.libc != "glibc" or have.glibc is None
                                   or have.glibc < want.glibc):
        need = want.glibc
        found = f"glibc {have.glibc[0]}.{have.glibc[1]}" if have.glibc else have.libc
        raise PolicyError(f"bundle needs glibc {need[0]}.{need[1]}+ ({target.platform}); "
                          f"this host has {found}",
                          hint="build for an older manylinux target, e.g. "
                               "manylinux_2_17_x86_64")
    if want.libc == "musl" and have.libc == "glibc":
        raise PolicyError(f"bundle is for {target.platform} (musl); this host uses glibc",
                          hint="build with a manylinux target.platform")


def tool_version(tool: str) -> str | None:
    """`node --version` / `npm --version` as a bare version ("20.19.2"); None: not found.
    Asked once per binary as it is now (its path, inode, size, time): an install asks twice,
    and each start of npm costs a quarter of a second."""
    found = tools.host_tool(tool)
    return None if found is None else _version_of(*found)


@functools.lru_cache(maxsize=16)
def _version_of(path: str, _ino: int, _size: int, _mtime_ns: int) -> str | None:
    try:
        result = proc.run([path, "--version"], timeout=timeouts.PROBE, check=False,
                          what=f"{os.path.basename(path)} --version")
    except CommandError:
        return None
    m = re.search(r"(\d+\.\d+\.\d+)", result.output)
    return m.group(1) if result.returncode == 0 and m else None


def check_node(manifest: Manifest) -> str:
    """Node.js and npm are on PATH and satisfy target.node / target.npm; PolicyError if not.
    Returns "node X, npm Y"."""
    found = []
    tools = (("node", manifest.target.node), ("npm", manifest.target.npm))
    with ThreadPoolExecutor(2) as pool:  # npm alone takes a quarter of a second to start
        versions = list(pool.map(tool_version, [tool for tool, _ in tools]))
    for (tool, spec), have in zip_strict(tools, versions):
        if have is None:
            raise PolicyError(f"this bundle installs {len(manifest.npm)} npm project(s) but "
                              f"{tool} is not on this host's PATH",
                              hint="install Node.js and npm on the host (npm ci runs offline)")
        if spec and not SpecifierSet(spec).contains(have, prereleases=True):
            raise PolicyError(f"this bundle needs {tool} {spec}; this host has {tool} {have}",
                              hint=f"install a {tool} matching {spec} on the host, or build "
                                   f"for this host's version (target.{tool} in the profile)")
        found.append(f"{tool} {have}" + (f" ({spec})" if spec else ""))
    return ", ".join(found)


def decide(manifest: Manifest, digest: str, layout: Layout, allow_downgrade: bool) -> Decision:
    """Every refusal a host makes before it creates anything."""
    seen = recheck(manifest, digest, layout, allow_downgrade)
    if seen.already_current:
        return seen
    python = check_host(manifest)
    return dataclasses.replace(seen, python=python)


def recheck(manifest: Manifest, digest: str, layout: Layout, allow_downgrade: bool,
            first: Decision | None = None) -> Decision:
    """What the root's state says of this bundle (product, sequence, expiry against the
    journal's clock, already current): asked again under the root's lock, where a concurrent
    install may have changed it; what the host is (`check_host`) does not change, so `first`'s
    interpreter is kept."""
    check_bundler_version(manifest)
    state = State.open_readonly(layout.db)
    known = current_row = None
    last_recorded = None
    if state is not None:
        try:
            last_recorded = last_recorded_time(state)
            known = state.product()
            current = layout.current_version()
            current_row = state.release(current) if current else None
        finally:
            state.close()
    check_expiry(manifest, last_recorded=last_recorded)
    if known and known[0] != manifest.name:
        raise PolicyError(f"this root holds product {known[0]!r}; the bundle is "
                          f"{manifest.name!r}", hint="use a separate --root per product")
    if current_row is not None and current_row.digest == digest:
        return Decision(already_current=True, downgrade=False, python=None)
    downgrade = bool(known and manifest.sequence <= known[1])
    if downgrade and not allow_downgrade:
        assert known is not None
        raise PolicyError(
            f"bundle sequence {manifest.sequence} is not newer than the last accepted "
            f"({known[1]}): refusing a replay or downgrade",
            hint="pass --allow-downgrade to install an older bundle on purpose",
        )
    return Decision(already_current=False, downgrade=downgrade,
                    python=first.python if first is not None else None)


def check_host(manifest: Manifest) -> Path | None:
    """What this host must have to run the bundle (CPU and libc, Node.js and npm, the engine,
    the compose tool, Python): PolicyError otherwise. Returns the venv's interpreter."""
    check_target(manifest.target)
    if manifest.npm and manifest.runtimes is None:  # a carried Node.js is the one that runs
        check_node(manifest)
    if manifest.images or manifest.runtime.compose:
        from bundler.engine import engine_client
        from bundler.errors import InstallError

        engine_client(InstallError)  # refuse before anything is created, not half-way
    if manifest.runtime.compose is not None:
        from bundler.errors import InstallError
        from bundler.install.compose_runtime import detect

        try:  # not at the start step, after the migrations: now
            detect(manifest.runtime.compose.tool)
        except InstallError as exc:
            raise PolicyError(f"this bundle runs a compose project: {exc.message}",
                              hint=exc.hint) from None
    python = None
    if manifest.python_lock:
        found = python_env.find_python(manifest.target)
        if found is None:
            raise PolicyError(f"this bundle needs Python {manifest.target.python} on the host, "
                              "and none was found",
                              hint=f"install it ({python_env.install_hint(manifest.target.python)}"
                                   "), or build for this host's Python (target.python in the "
                                   "profile)")
        lacking = python_env.missing_distutils(found)
        if lacking is not None:
            raise PolicyError(f"{found} (CPython {manifest.target.python}) has no distutils, "
                              "which uv needs to make the release's venv before Python 3.10",
                              hint=f"install it ({lacking})")
        python = found
    return python
