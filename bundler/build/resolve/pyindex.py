"""The files of a Python project, as the profile's package sources list them, and which wheel
pip would take for a pin; also why there is none, so a failed build names each package and
the reason.

Sources, in pip's order (it matters only for ties, see `choose_wheel`): `find_links` (local
directories, their HTML files, local files, URLs of pages or of files), then the index
(`index_url`, else pip's default) and each extra index, unless `no_index`. An index is asked
for PEP 691 JSON and answers with that or a PEP 503 HTML page; links are resolved against the
page's URL (or its <base href>), hashes come from the JSON `hashes` or a `#sha256=` fragment,
yanked files and Requires-Python are kept for the choice. Credentials written in an index URL
are sent with the files on the same host (as pip does), through bundler.build.resolve.http.
"""

from __future__ import annotations

import functools
import json
import mimetypes
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit, urlunsplit
from urllib.request import pathname2url, url2pathname

from packaging.specifiers import InvalidSpecifier, Specifier, SpecifierSet
from packaging.tags import Tag
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from bundler.build.profile import PythonSpec
from bundler.build.resolve import http
from bundler.build.resolve import target as tgt
from bundler.bundle.models import Target
from bundler.errors import BuildError

JSON_TYPE = "application/vnd.pypi.simple.v1+json"
# what pip asks an index for: PEP 691 JSON first, HTML as the fallback
ACCEPT = f"{JSON_TYPE}, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
_HTML_TYPES = ("text/html", "application/vnd.pypi.simple.v1+html")
_HASH_FRAGMENT = re.compile(r"[#&](sha512|sha384|sha256|sha224|sha1|md5)=([^&]*)")
PAGE_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class ProjectFile:
    """One file a source lists for a project."""

    filename: str
    url: str                                 # http(s) or file:, no fragment
    hashes: tuple[tuple[str, str], ...] = ()  # (algorithm, hex) as the source states them
    requires_python: str | None = None
    yanked: bool = False

    @property
    def sha256(self) -> str | None:
        return next((h for algo, h in self.hashes if algo == "sha256"), None)

    @property
    def is_local(self) -> bool:
        return self.url.startswith("file:")

    def local_path(self) -> Path:
        return Path(url2pathname(urlsplit(self.url).path))


def default_index() -> str:
    """pip's own default index (not spelled out here: it is pip's setting, not ours)."""
    from pip._internal.models.index import PyPI

    return str(PyPI.simple_url)


def indexes(spec: PythonSpec) -> list[str]:
    if spec.no_index:
        return []
    return list(dict.fromkeys([spec.index_url or default_index(), *spec.extra_index_urls]))


class _Links(HTMLParser):
    """<a href> elements with their attributes, and the first <base href>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.anchors: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.anchors.append(dict(attrs))
        elif tag == "base" and self.base is None:
            self.base = dict(attrs).get("href")


def _with_auth(url: str, page_url: str) -> str:
    """Credentials of the page's URL on a link to the same host that has none."""
    link, page = urlsplit(url), urlsplit(page_url)
    if "@" not in link.netloc and link.scheme == page.scheme \
            and link.netloc == page.netloc.rsplit("@", 1)[1]:
        return urlunsplit(link._replace(netloc=page.netloc))
    return url


def _file(url: str, base: str, hashes: dict[str, str], requires_python: str | None,
          yanked: bool, auth: bool) -> ProjectFile | None:
    """One link of a page (large pages list 15 000 files: keep the common case cheap)."""
    if not url:
        return None
    absolute = url if url.startswith(("https://", "http://")) else urljoin(base, url)
    if auth:
        absolute = _with_auth(absolute, base)
    clean, _, fragment = absolute.partition("#")
    found = _HASH_FRAGMENT.search("#" + fragment) if fragment else None
    if found:  # a fragment's hash wins over the JSON's (pip's rule)
        hashes = {**hashes, found[1]: found[2]}
    path = urlsplit(clean).path if "?" in clean else clean
    name = unquote(path.rstrip("/").rsplit("/", 1)[-1])
    return ProjectFile(name, clean, tuple(sorted((a.lower(), h.lower())
                                                 for a, h in hashes.items())),
                       requires_python or None, yanked)


def parse_page(page: http.Page) -> list[ProjectFile]:
    """The files a project page lists (PEP 691 JSON or PEP 503 HTML); another content type
    is no project page (pip skips it too)."""
    ctype = page.content_type.split(";")[0].strip().lower()
    text = page.body.decode("utf-8", "replace")
    out: list[ProjectFile] = []
    auth = "@" in urlsplit(page.url).netloc
    if ctype == JSON_TYPE:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise BuildError(f"{page.url} is not valid JSON",
                             hint="check the index URL in the profile") from None
        for entry in doc.get("files", []) if isinstance(doc, dict) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            hashes = entry.get("hashes")
            rp = entry.get("requires-python")
            found = _file(entry["url"], page.url,
                          {str(k): str(v) for k, v in hashes.items()}
                          if isinstance(hashes, dict) else {},
                          rp if isinstance(rp, str) else None,
                          bool(entry.get("yanked")), auth)  # pip: "" is not yanked here
            if found is not None:
                out.append(found)
    elif ctype in _HTML_TYPES:
        parser = _Links()
        parser.feed(text)
        base = urljoin(page.url, parser.base) if parser.base else page.url
        for attrs in parser.anchors:
            found = _file(attrs.get("href") or "", base, {}, attrs.get("data-requires-python"),
                          attrs.get("data-yanked") is not None, auth)  # pip: "" is yanked
            if found is not None:
                out.append(found)
    return list(dict.fromkeys(out))  # a link listed twice counts once


def _read(url: str) -> http.Page | None:
    """A page from an http(s) or file: URL; None when it is not there."""
    if url.startswith("file:"):
        path = Path(url2pathname(urlsplit(url).path))
        if path.is_dir():
            path = path / "index.html"
            url = urljoin(url.rstrip("/") + "/", "index.html")
        try:
            body = path.read_bytes()
        except OSError:
            return None
        return http.Page(body, mimetypes.guess_type(path.name)[0] or "", url)
    try:
        return http.get_page(url, accept=ACCEPT, limit=PAGE_LIMIT)
    except http.NotFound:
        return None
    except http.HttpFailed as exc:
        raise BuildError(f"asking the package index failed: {exc.message}",
                         hint="check the index URL (and its credentials) in the profile and "
                              "the network, then run again") from None


def _as_url(location: str) -> str:
    if "://" in location or location.startswith("file:"):
        return location
    return "file:" + pathname2url(os.path.abspath(location))


def _is_html(name: str) -> bool:
    return mimetypes.guess_type(name, strict=False)[0] == "text/html"


def _project_of(filename: str) -> NormalizedName | None:
    try:
        return parse_wheel_filename(filename)[0]
    except InvalidWheelFilename:
        try:
            return parse_sdist_filename(filename)[0]
        except (InvalidSdistFilename, InvalidVersion):
            return None


def project_files(spec: PythonSpec, name: str) -> list[ProjectFile]:
    """Every file the profile's sources list for project `name`, in pip's candidate order:
    files named directly (find-links directories' files, links to files), sorted by URL
    descending, then the files of pages (find-links pages, then each index's project page).

    Raises BuildError when a source cannot be read (other than "not found")."""
    want = canonicalize_name(name)
    direct: list[ProjectFile] = []
    pages: list[str] = []
    for location in spec.find_links:
        url = _as_url(location)
        if url.startswith("file:"):
            path = Path(url2pathname(urlsplit(url).path))
            if path.is_dir():
                for entry in sorted(os.scandir(path), key=lambda e: e.name):
                    if _is_html(entry.name):
                        pages.append(_as_url(entry.path))
                    elif _project_of(entry.name) == want:
                        direct.append(ProjectFile(entry.name, _as_url(entry.path)))
            elif _is_html(path.name):
                pages.append(url)
            elif path.is_file():
                direct.append(ProjectFile(path.name, url))
        else:
            # a URL: a page of links and, itself, maybe a file
            direct.append(ProjectFile(unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]),
                                      urldefrag(url)[0]))
            if not url.endswith((".whl", ".tar.gz", ".zip")):
                pages.append(url)
    for index in indexes(spec):
        pages.append(_as_url(index).rstrip("/") + f"/{want}/")
    out = sorted(direct, key=lambda f: f.url, reverse=True)
    for url in dict.fromkeys(pages):
        page = _read(url)
        if page is not None:
            out += parse_page(page)
    return out


@functools.lru_cache(maxsize=4096)
def _wheel_version(field: str) -> Version | None:
    try:
        return Version(field)
    except InvalidVersion:
        return None


def _wheel_of(f: ProjectFile, version: Version | None = None
              ) -> tuple[NormalizedName, Version, tuple[()] | tuple[int, str],
                         frozenset[Tag]] | None:
    """The parsed wheel filename; None for another file (or, given `version`, a wheel of
    another version: skipped cheaply, a big project lists thousands)."""
    if not f.filename.endswith(".whl"):
        return None
    if version is not None:
        parts = f.filename.split("-")
        if len(parts) < 5 or _wheel_version(parts[1]) != version:
            return None
    try:
        return parse_wheel_filename(f.filename)
    except (InvalidWheelFilename, InvalidVersion):
        return None


def python_fits(f: ProjectFile, target: Target) -> bool:
    """The file's Requires-Python admits the target's X.Y.0 (what pip download checks with
    --python-version X.Y); an invalid specifier is ignored, as pip ignores it.

    A clause that excludes one patch release of X.Y (`!=3.9.0,!=3.9.1`: cryptography's) does
    not exclude the target, which is any CPython X.Y.z (Debian 11 ships 3.9.2, RHEL 9 3.9.18):
    such clauses are left out, as uv's resolver leaves them out for `--python-version X.Y`."""
    if f.requires_python is None:
        return True
    try:
        spec = SpecifierSet(f.requires_python)
    except InvalidSpecifier:
        return True
    py = tgt.python_tuple(target)
    kept = SpecifierSet(",".join(str(s) for s in spec if not _one_patch_of(s, py)))
    return Version(f"{py[0]}.{py[1]}.0") in kept


def _one_patch_of(clause: Specifier, py: tuple[int, int]) -> bool:
    """`!=X.Y.Z` (no wildcard) of the target's X.Y."""
    if clause.operator != "!=" or clause.version.endswith(".*"):
        return False
    release = Version(clause.version).release
    return len(release) == 3 and release[:2] == py


def choose_wheel(files: Sequence[ProjectFile], name: str, version: str, target: Target,
                 hashes: Sequence[str] = (), filename: str | None = None
                 ) -> ProjectFile | None:
    """The wheel `pip download --only-binary=:all: name==version` takes for the target, or
    None. pip's rules (PackageFinder and the resolver's candidate order):

    - a candidate is a wheel of that project and version, with a tag the target supports and
      a Requires-Python that admits it;
    - with hashes given, if some candidate's stated hash is one of them, candidates whose
      stated hash is another are dropped;
    - best first: a matching hash, not yanked, the most preferred tag (its best one), the
      highest build number; among equals the one listed last;
    - a yanked file only when every candidate is yanked (the pin is exact).

    `filename`: only that file (a locked wheel fetched again)."""
    want, ver = canonicalize_name(name), Version(version)
    priority = {tag: i for i, tag in enumerate(tgt.sorted_tags(target))}
    allowed = set(hashes)
    candidates: list[tuple[ProjectFile, int, tuple[()] | tuple[int, str]]] = []
    for f in files:
        if filename is not None and f.filename != filename:
            continue
        parsed = _wheel_of(f, ver)
        if parsed is None or parsed[0] != want or parsed[1] != ver:
            continue
        ranks = [priority[t] for t in parsed[3] if t in priority]
        if ranks and python_fits(f, target):
            candidates.append((f, min(ranks), parsed[2]))
    if allowed and any(f.sha256 in allowed for f, _, _ in candidates):
        candidates = [c for c in candidates if not c[0].hashes or c[0].sha256 in allowed]
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda c: (c[0].sha256 in allowed, not c[0].yanked,
                                               -c[1], c[2]))
    all_yanked = all(f.yanked for f, _, _ in candidates)
    return next(f for f, _, _ in reversed(ranked) if all_yanked or not f.yanked)


def why_no_wheel(spec: PythonSpec, target: Target, name: str, version: str,
                 files: Sequence[ProjectFile] | None = None) -> str:
    """A short reason: not found, sdist only, wheels only for other targets or Pythons."""
    want = canonicalize_name(name)
    try:
        ver = Version(version)
    except InvalidVersion:
        return "invalid version"
    if files is None:
        try:
            files = project_files(spec, name)
        except BuildError as exc:
            return f"{name}: {exc.message}"
    wheels: list[ProjectFile] = []
    sdists = 0
    for f in files:
        parsed = _wheel_of(f)
        if parsed is not None:
            if parsed[0] == want and parsed[1] == ver:
                wheels.append(f)
            continue
        try:
            n, v = parse_sdist_filename(f.filename)
        except (InvalidSdistFilename, InvalidVersion):
            continue
        if n == want and v == ver:
            sdists += 1
    if not wheels and not sdists:
        return f"{name} {version} is not on the index"
    if not wheels:
        return f"{name} {version} has only an sdist (no wheels; sdists cannot be installed " \
               "offline without a compiler)"
    supported = tgt.supported_tags(target)
    fitting = [w for w in wheels if parse_wheel_filename(w.filename)[3] & supported]
    if fitting:
        if not any(python_fits(w, target) for w in fitting):
            return f"{name} {version} requires Python {fitting[0].requires_python} " \
                   f"(the target has CPython {target.python})"
        return f"{name} {version} has a fitting wheel ({fitting[0].filename}); " \
               "the download failed"
    shown = sorted({"-".join(w.filename.removesuffix(".whl").split("-")[-3:]) for w in wheels})
    sample = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
    return f"{name} {version} has no wheel for CPython {target.python} on {target.platform} " \
           f"(wheels exist for: {sample})"


def why_unlockable(spec: PythonSpec, target: Target, name: str) -> str:
    """Like why_no_wheel, for a project with no version pinned yet (a failed lock)."""
    want = canonicalize_name(name)
    try:
        files = project_files(spec, name)
    except BuildError as exc:
        return f"{name}: {exc.message}"
    versions: dict[Version, list[ProjectFile]] = {}
    sdists = 0
    for f in files:
        parsed = _wheel_of(f)
        if parsed is not None:
            if parsed[0] == want:
                versions.setdefault(parsed[1], []).append(f)
        elif _project_of(f.filename) == want:
            sdists += 1
    if not versions:
        return (f"{name} publishes only sdists (no wheels)" if sdists
                else f"{name} is not on the index")
    newest = max(versions)
    return why_no_wheel(spec, target, name, str(newest), versions[newest])
