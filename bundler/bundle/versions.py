"""Each ecosystem's own version order, for matching OSV ranges (bundler.bundle.osv): PyPI by
PEP 440 (`packaging`), npm by SemVer 2.0 (prerelease identifiers, build metadata ignored),
Debian by dpkg's order (a port of its verrevcmp: epoch, upstream, revision; `~` sorts before
everything, even the end), Alpine by apk's order (digits, letter, suffixes, -rN).

`key(ecosystem, text)` gives a sortable key, or None when the text is no version of that
ecosystem (such a version is then matched only by an exact `versions` entry)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from packaging.version import InvalidVersion, Version

Key = Any


def _pypi(text: str) -> Key | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


# SemVer 2.0 (a leading "v" or "=" tolerated, as npm's semver.clean does).
_SEMVER = re.compile(r"^[v=]?\s*(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                     r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?$")


def _npm(text: str) -> Key | None:
    m = _SEMVER.match(text.strip())
    if m is None:
        return None
    release = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    pre = m.group(4)
    if pre is None:  # a release sorts after all its prereleases
        return (release, 1, ())
    # numeric identifiers sort numerically and before alphanumeric ones
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (release, 0, ids)


def _order(c: str) -> int:
    """dpkg's character weight: letters first, then other symbols; `~` below the end."""
    if "0" <= c <= "9":
        return 0
    if ("a" <= c <= "z") or ("A" <= c <= "Z"):
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256 if c else 0


def _isdigit(s: str, i: int) -> bool:
    return i < len(s) and "0" <= s[i] <= "9"


def verrevcmp(a: str, b: str) -> int:
    """dpkg's lib/dpkg/version.c verrevcmp, ported: <0, 0 or >0."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not _isdigit(a, i)) or (j < len(b) and not _isdigit(b, j)):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while _isdigit(a, i) and _isdigit(b, j):
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if _isdigit(a, i):
            return 1
        if _isdigit(b, j):
            return -1
        if first_diff:
            return first_diff
    return 0


_DEB = re.compile(r"^(?:(\d+):)?([0-9][A-Za-z0-9.+~:-]*?)(?:-([A-Za-z0-9.+~]+))?$")


@functools.total_ordering
class DebVersion:
    """A Debian version ([epoch:]upstream[-revision]) in dpkg's order."""

    __slots__ = ("epoch", "revision", "upstream")

    def __init__(self, epoch: int, upstream: str, revision: str) -> None:
        self.epoch, self.upstream, self.revision = epoch, upstream, revision

    def _cmp(self, other: DebVersion) -> int:
        if self.epoch != other.epoch:
            return self.epoch - other.epoch
        return verrevcmp(self.upstream, other.upstream) or \
            verrevcmp(self.revision, other.revision)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DebVersion) and self._cmp(other) == 0

    def __lt__(self, other: DebVersion) -> bool:
        return self._cmp(other) < 0

    def __hash__(self) -> int:
        return hash(self.epoch)


def _deb(text: str) -> Key | None:
    m = _DEB.match(text.strip())
    if m is None:
        return None
    return DebVersion(int(m.group(1) or 0), m.group(2), m.group(3) or "")


# apk: 1.2.3a_rc1_p2-r4. Suffix weights as apk-tools orders them: alpha < beta < pre < rc <
# (none) < cvs < svn < git < hg < p.
_APK = re.compile(r"^(\d+(?:\.\d+)*)([a-z]?)((?:_(?:alpha|beta|pre|rc|cvs|svn|git|hg|p)\d*)*)"
                  r"(?:-r(\d+))?$")
_SUFFIX = {"alpha": -4, "beta": -3, "pre": -2, "rc": -1, "cvs": 1, "svn": 2, "git": 3,
           "hg": 4, "p": 5}


def _apk(text: str) -> Key | None:
    m = _APK.match(text.strip())
    if m is None:
        return None
    digits = m.group(1).split(".")
    # the first number compares as a number, later ones too unless they have a leading zero
    # (then as a decimal fraction, as apk-tools does)
    nums = tuple((0, int(d), "") if i == 0 or not d.startswith("0") else (0, 0, d.rstrip("0"))
                 for i, d in enumerate(digits))
    suffixes = tuple((_SUFFIX[s.rstrip("0123456789")], int(s.lstrip("abcdeghilnprstv") or 0))
                     for s in m.group(3).split("_") if s)
    return (nums, m.group(2), (*suffixes, (0, 0)), int(m.group(4) or 0))


_ORDERS: dict[str, Callable[[str], Key | None]] = {
    "PyPI": _pypi, "npm": _npm, "Debian": _deb, "Alpine": _apk}


def key(ecosystem: str, text: str) -> Key | None:
    """A sortable key for `text` in `ecosystem` ("Debian:12" orders as Debian), or None."""
    order = _ORDERS.get(ecosystem.split(":", 1)[0])
    return None if order is None else order(text)


def known(ecosystem: str) -> bool:
    return ecosystem.split(":", 1)[0] in _ORDERS
