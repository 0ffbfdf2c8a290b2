"""Why is there no wheel? Asks the package index (PEP 503) or find-links directories what
files a release has, so a failed build names each package and the reason."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from bundler.models import Target
from bundler.profile import PythonSpec
from bundler.resolve import http
from bundler.resolve import target as tgt

_ANCHOR = re.compile(r"<a\s[^>]*>([^<]+)</a>", re.IGNORECASE)


def default_index() -> str:
    """pip's own default index (not spelled out here: it is pip's setting, not ours)."""
    from pip._internal.models.index import PyPI

    return str(PyPI.simple_url)


def _files_on_index(index: str, name: str) -> list[str]:
    url = f"{index.rstrip('/')}/{canonicalize_name(name)}/"
    try:
        text = http.get_bytes(url, accept="text/html", limit=16 * 1024 * 1024
                              ).decode("utf-8", "replace")
    except (http.NotFound, http.HttpFailed):
        return []
    return [html.unescape(m).strip() for m in _ANCHOR.findall(text)]


def release_files(spec: PythonSpec, name: str) -> list[str]:
    files: list[str] = []
    for link in spec.find_links:
        if "://" not in link and Path(link).is_dir():
            files += [p.name for p in Path(link).iterdir()]
    if not spec.no_index:
        for index in [spec.index_url or default_index(), *spec.extra_index_urls]:
            files += _files_on_index(index, name)
    return files


def why_no_wheel(spec: PythonSpec, target: Target, name: str, version: str,
                 files: Sequence[str] | None = None) -> str:
    """A short reason: not found, sdist only, or wheels only for other targets."""
    want = canonicalize_name(name)
    try:
        ver = Version(version)
    except InvalidVersion:
        return "invalid version"
    wheels: list[str] = []
    sdists = 0
    for f in (files if files is not None else release_files(spec, name)):
        try:
            if f.endswith(".whl"):
                n, v, _, _tags = parse_wheel_filename(f)
                if n == want and v == ver:
                    wheels.append(f)
            else:
                n, v = parse_sdist_filename(f)
                if n == want and v == ver:
                    sdists += 1
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
            continue
    if not wheels and not sdists:
        return f"{name} {version} is not on the index"
    if not wheels:
        return f"{name} {version} has only an sdist (no wheels; sdists cannot be installed " \
               "offline without a compiler)"
    supported = tgt.supported_tags(target)
    fitting = [w for w in wheels if parse_wheel_filename(w)[3] & supported]
    if fitting:
        return f"{name} {version} has a fitting wheel ({fitting[0]}); the download failed"
    shown = sorted({"-".join(w.removesuffix(".whl").split("-")[-3:]) for w in wheels})
    sample = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
    return f"{name} {version} has no wheel for CPython {target.python} on {target.platform} " \
           f"(wheels exist for: {sample})"


def why_unlockable(spec: PythonSpec, target: Target, name: str) -> str:
    """Like why_no_wheel, for a project with no version pinned yet (a failed lock)."""
    want = canonicalize_name(name)
    versions: dict[Version, list[str]] = {}
    sdists = 0
    for f in release_files(spec, name):
        try:
            if f.endswith(".whl"):
                n, v, _, _tags = parse_wheel_filename(f)
                if n == want:
                    versions.setdefault(v, []).append(f)
            elif parse_sdist_filename(f)[0] == want:
                sdists += 1
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
            continue
    if not versions:
        return (f"{name} publishes only sdists (no wheels)" if sdists
                else f"{name} is not on the index")
    newest = max(versions)
    return why_no_wheel(spec, target, name, str(newest), versions[newest])
