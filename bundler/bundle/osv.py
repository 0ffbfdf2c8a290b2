"""OSV vulnerability records matched against an SBOM's components (docs/vulns.md).

A snapshot is what osv.dev publishes per ecosystem: a zip (`all.zip`) of `<ID>.json` records,
or a tar of them, or a directory. It is read streaming, one record at a time with bounded
sizes, and only the `affected` entries naming a package of interest are kept: memory grows
with the findings, not the snapshot. Ranges of type ECOSYSTEM and SEMVER are evaluated as the
OSV schema says (events sorted by version: `introduced` opens, `fixed` closes at, and
`last_affected` after, the version; a `limit` caps the whole range), `versions` lists match
exactly, withdrawn records are ignored. Both sides read it (the kit: Python 3.9)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bundler.bundle import versions
from bundler.bundle.manifest import SHA256_RE, canonical_json, strict_loads

# A record over this is no advisory; a snapshot of more records than this is no snapshot.
MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_RECORDS = 2_000_000
MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024 * 1024  # uncompressed, all records together

SEVERITIES = ("UNKNOWN", "LOW", "MODERATE", "HIGH", "CRITICAL")
_WORDS = {"LOW": "LOW", "MODERATE": "MODERATE", "MEDIUM": "MODERATE", "HIGH": "HIGH",
          "CRITICAL": "CRITICAL", "IMPORTANT": "HIGH"}


class SnapshotError(ValueError):
    """The snapshot cannot be read as OSV records (one line, said by the caller)."""


@dataclass(frozen=True)
class Component:
    """A package to match: its OSV ecosystem ("PyPI", "npm", "Debian:12", "Alpine:v3.19"),
    name and version as that ecosystem spells them, and where it sits (for the report)."""

    ecosystem: str
    name: str
    version: str
    kind: str = ""
    where: str = ""
    shown: str = ""  # the name shown when it differs (a Debian binary package of `name`)


@dataclass(frozen=True)
class Finding:
    id: str
    component: Component
    severity: str
    fixed: tuple[str, ...]  # the versions that fix it (nearest above the component's first)
    summary: str = ""
    aliases: tuple[str, ...] = ()
    score: str = ""  # the CVSS base score, when one was given ("9.8")

    def to_json(self) -> dict[str, Any]:
        c = self.component
        return {"id": self.id, "aliases": list(self.aliases), "severity": self.severity,
                "score": self.score, "ecosystem": c.ecosystem,
                "component": c.shown or c.name, "package": c.name, "version": c.version,
                "kind": c.kind, "where": c.where, "fixed": list(self.fixed),
                "summary": self.summary}

    def line(self) -> str:
        c = self.component
        fix = f"fixed in {', '.join(self.fixed)}" if self.fixed else "no fix"
        name = f"{c.shown} (source {c.name})" if c.shown else c.name
        return f"{self.id} {name} {c.version} ({c.ecosystem}, {fix}, {self.severity})"


def rank(severity: str) -> int:
    return SEVERITIES.index(severity.upper())


@dataclass(frozen=True)
class Scan:
    findings: tuple[Finding, ...]
    records: int  # records read (withdrawn ones included)
    modified: str  # the newest `modified` of any record: the snapshot's date
    components: int

    def at_least(self, severity: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if rank(f.severity) >= rank(severity))


# --fail-on: the lowest severity that refuses; `any` refuses every finding, `none` none.
FAIL_ON = ("any", "low", "moderate", "high", "critical", "none")
DEFAULT_FAIL_ON = "high"
SHOWN = 5  # findings named in a one-line error; --json lists them all


def refusing(scan: Scan, fail_on: str) -> tuple[Finding, ...]:
    """The findings at or above `fail_on`."""
    if fail_on == "none":
        return ()
    return scan.at_least("UNKNOWN" if fail_on == "any" else fail_on.upper())


def describe(found: tuple[Finding, ...], fail_on: str, where: str) -> str:
    named = "; ".join(f.line() for f in found[:SHOWN])
    more = f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    return (f"{len(found)} vulnerabilit{'y' if len(found) == 1 else 'ies'} at or above "
            f"{fail_on} in {where}: {named}{more}")


# --- the version ranges -------------------------------------------------------------------

_EVENT_ORDER = {"introduced": 0, "last_affected": 1, "fixed": 2, "limit": 3}


def _affected_by_range(ecosystem: str, version: str, rng: dict[str, Any]) -> bool:
    if rng.get("type") not in ("ECOSYSTEM", "SEMVER"):
        return False  # GIT ranges name commits, not versions
    eco = "npm" if rng.get("type") == "SEMVER" else ecosystem  # SemVer 2.0 either way
    have = versions.key(eco, version)
    if have is None:
        return False
    events: list[tuple[Any, int, str]] = []
    for ev in rng.get("events") or ():
        if not isinstance(ev, dict) or len(ev) != 1:
            continue
        (kind, value), = ev.items()
        if kind not in _EVENT_ORDER or not isinstance(value, str):
            continue
        if kind == "introduced" and value == "0":
            events.append((None, 0, kind))
            continue
        if kind == "limit" and value == "*":
            continue
        k = versions.key(eco, value)
        if k is not None:
            events.append((k, _EVENT_ORDER[kind], kind))
    # "0" first, then by version (at one version: introduced before the ends)
    events.sort(key=lambda e: (e[0] is not None, _Sortable(e[0]), e[1]))
    affected = False
    for k, _, kind in events:
        if kind == "limit":
            if have >= k:
                return False
        elif kind == "introduced":
            if k is None or have >= k:
                affected = True
        elif (kind == "fixed" and have >= k) or (kind == "last_affected" and have > k):
            affected = False
    return affected


class _Sortable:
    """A version key that sorts with None (the "0" events) below everything."""

    __slots__ = ("k",)

    def __init__(self, k: Any) -> None:
        self.k = k

    def __eq__(self, other: object) -> bool:  # tuples compare equal items by ==, then <
        if not isinstance(other, _Sortable):
            return NotImplemented
        if self.k is None or other.k is None:
            return self.k is None and other.k is None
        return bool(self.k == other.k)

    def __hash__(self) -> int:
        return 0

    def __lt__(self, other: _Sortable) -> bool:
        if self.k is None or other.k is None:
            return self.k is None and other.k is not None
        return bool(self.k < other.k)


def affected(entry: dict[str, Any], component: Component) -> bool:
    """One `affected[]` entry of a record (its package already matched) covers the version."""
    listed = entry.get("versions") or ()
    if isinstance(listed, list) and component.version in listed:
        return True
    return any(isinstance(r, dict) and _affected_by_range(component.ecosystem,
                                                          component.version, r)
               for r in entry.get("ranges") or ())


def fixes(entry: dict[str, Any], component: Component) -> tuple[str, ...]:
    """The `fixed` versions above the component's, lowest first."""
    have = versions.key(component.ecosystem, component.version)
    out = []
    for rng in entry.get("ranges") or ():
        for ev in (rng.get("events") or ()) if isinstance(rng, dict) else ():
            value = ev.get("fixed") if isinstance(ev, dict) else None
            if isinstance(value, str):
                k = versions.key(component.ecosystem, value)
                if k is not None and (have is None or k > have):
                    out.append((k, value))
    out.sort(key=lambda kv: _Sortable(kv[0]))
    seen: list[str] = []
    for _, v in out:
        if v not in seen:
            seen.append(v)
    return tuple(seen)


# --- severity -----------------------------------------------------------------------------

# OSV severity types and the `cvss` package's class for each (its base score, per version).
_CVSS_KINDS = {"CVSS_V2": "CVSS2", "CVSS_V3": "CVSS3", "CVSS_V4": "CVSS4"}


def cvss_score(kind: str, vector: str) -> float | None:
    """The CVSS base score of an OSV `severity[]` entry (CVSS_V2, _V3 or _V4, computed by the
    `cvss` package), or None: another type, or a vector it cannot read."""
    name = _CVSS_KINDS.get(kind)
    if name is None or len(vector) > 400:
        return None
    import cvss  # loaded only when a record is scored

    if kind == "CVSS_V2" and vector.startswith("CVSS:2.0/"):
        vector = vector[len("CVSS:2.0/"):]  # cvss reads v2 vectors without the prefix
    try:
        return float(getattr(cvss, name)(vector).base_score)
    except Exception:  # signed data, but a vector the package refuses is just not a score
        return None


def score_severity(score: float) -> str:
    """CVSS qualitative bands: 0.1-3.9 LOW, 4.0-6.9 MODERATE (CVSS: Medium), 7.0-8.9 HIGH,
    9.0-10.0 CRITICAL; 0.0 (None) counts as LOW."""
    if score >= 9.0:
        return "CRITICAL"
    if score >= 7.0:
        return "HIGH"
    if score >= 4.0:
        return "MODERATE"
    return "LOW"


def severity(record: dict[str, Any], entry: dict[str, Any]) -> tuple[str, str]:
    """(severity, CVSS score text): the record's or the entry's `database_specific.severity`
    word when there is one, else the highest CVSS (v2, v3 or v4) base score of `severity[]`
    (the entry's or the record's), else UNKNOWN."""
    for where in (entry, record):
        spec = where.get("database_specific")
        word = spec.get("severity") if isinstance(spec, dict) else None
        if isinstance(word, str) and word.upper() in _WORDS:
            best = _best_score(entry, record)
            return _WORDS[word.upper()], "" if best is None else f"{best:.1f}"
    best = _best_score(entry, record)
    if best is None:
        return "UNKNOWN", ""
    return score_severity(best), f"{best:.1f}"


def _best_score(entry: dict[str, Any], record: dict[str, Any]) -> float | None:
    scores = []
    for where in (entry, record):
        for s in where.get("severity") or ():
            if isinstance(s, dict) and isinstance(s.get("score"), str):
                value = cvss_score(str(s.get("type")), s["score"])
                if value is not None:
                    scores.append(value)
    return max(scores) if scores else None


# --- matching -----------------------------------------------------------------------------

def _normal(ecosystem: str, name: str) -> str:
    if ecosystem == "PyPI":
        return re.sub(r"[-_.]+", "-", name).lower()
    return name


class Matcher:
    """The components indexed by (ecosystem, name): records are matched as they stream by."""

    def __init__(self, components: Iterable[Component]) -> None:
        self.by_name: dict[tuple[str, str], list[Component]] = {}
        self.count = 0
        for c in components:
            self.count += 1
            self.by_name.setdefault((c.ecosystem, _normal(c.ecosystem, c.name)), []).append(c)
        self.findings: list[Finding] = []
        self.records = 0
        self.modified = ""

    def add(self, record: Any) -> None:
        if not isinstance(record, dict):
            raise SnapshotError("an OSV record is not a JSON object")
        self.records += 1
        modified = record.get("modified")
        if isinstance(modified, str) and modified > self.modified:
            self.modified = modified
        if record.get("withdrawn") or not isinstance(record.get("id"), str):
            return
        for entry in record.get("affected") or ():
            pkg = entry.get("package") if isinstance(entry, dict) else None
            if not isinstance(pkg, dict):
                continue
            eco, name = pkg.get("ecosystem"), pkg.get("name")
            if not isinstance(eco, str) or not isinstance(name, str):
                continue
            for c in self.by_name.get((eco, _normal(eco, name)), ()):
                if affected(entry, c):
                    self._found(record, entry, c)

    def _found(self, record: dict[str, Any], entry: dict[str, Any], c: Component) -> None:
        sev, score = severity(record, entry)
        aliases = tuple(a for a in record.get("aliases") or () if isinstance(a, str))
        summary = record.get("summary")
        self.findings.append(Finding(
            record["id"], c, sev, fixes(entry, c),
            summary[:200] if isinstance(summary, str) else "", aliases, score))

    def result(self) -> Scan:
        unique = {(f.id, f.component): f for f in self.findings}  # one per record and package
        ordered = sorted(unique.values(), key=lambda f: (
            -rank(f.severity), f.component.where, f.component.name, f.component.shown, f.id))
        return Scan(tuple(ordered), self.records, self.modified, self.count)


def scan(snapshot: Path, components: Iterable[Component]) -> Scan:
    """Match every record of the snapshot against the components (SnapshotError if the
    snapshot cannot be read)."""
    matcher = Matcher(components)
    for data in records(snapshot):
        try:
            doc = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"a record is not JSON: {str(exc)[:80]}") from None
        matcher.add(doc)
    if matcher.records == 0:  # an empty scan would say "no findings": a false clean
        raise SnapshotError(f"{snapshot} holds no OSV records (<ID>.json)")
    return matcher.result()


# --- the components of an SBOM -----------------------------------------------------------

_ECOSYSTEM = {"wheel": "PyPI", "image-pypi": "PyPI", "npm": "npm", "image-npm": "npm",
              "runtime": "npm"}


def _qualifiers(purl: str) -> dict[str, str]:
    from urllib.parse import parse_qsl

    _, _, query = purl.partition("?")
    return dict(parse_qsl(query.partition("#")[0]))


def _props(c: dict[str, Any]) -> dict[str, str]:
    return {str(p.get("name")): str(p.get("value")) for p in c.get("properties") or ()
            if isinstance(p, dict)}


def sbom_components(doc: dict[str, Any]) -> tuple[list[Component], list[str]]:
    """What can be matched in a bundler SBOM (docs/sbom.md): wheels and Python packages as
    PyPI, npm packages and runtimes as npm, an image's Debian packages as `Debian:<major>` by
    their source package, its Alpine packages as `Alpine:v<major.minor>`. Also the notes: the
    kinds of components that could not be matched (another distribution)."""
    from bundler.bundle.sbom import KIND, WHERE

    comps = [c for c in doc.get("components") or () if isinstance(c, dict)]
    image_os = {}
    for c in comps:
        p = _props(c)
        if p.get(KIND) == "image":
            image_os[p.get(WHERE) or str(c.get("name"))] = p.get("bundler:os", "")
    out, skipped = [], set()
    for c in comps:
        p = _props(c)
        kind, where = p.get(KIND, ""), p.get(WHERE, "")
        name, version = str(c.get("name", "")), str(c.get("version", ""))
        eco = _ECOSYSTEM.get(kind)
        if eco is not None:
            out.append(Component(eco, name, version, kind, where))
        elif kind in ("image-deb", "image-apk"):
            found = _os_component(kind, name, version, where, p, image_os.get(where, ""),
                                  _qualifiers(str(c.get("purl", ""))))
            if found is None:
                skipped.add(f"{kind} of {image_os.get(where) or 'an unknown OS'} in {where}")
            else:
                out.append(found)
    return out, sorted(skipped)


def _os_component(kind: str, name: str, version: str, where: str, props: dict[str, str],
                  os_text: str, quals: dict[str, str]) -> Component | None:
    os_id, _, os_version = os_text.partition(" ")
    if kind == "image-deb":
        distro = quals.get("distro", "")
        major = distro[len("debian-"):].split(".")[0] if distro.startswith("debian-") else (
            os_version.split(".")[0] if os_id == "debian" else "")
        if not major.isdigit():
            return None
        source = quals.get("upstream") or name
        return Component(f"Debian:{major}", source, props.get("bundler:source-version")
                         or version, kind, where, shown=name if source != name else "")
    parts = os_version.split(".")
    if os_id != "alpine" or len(parts) < 2:
        return None
    return Component(f"Alpine:v{parts[0]}.{parts[1]}", name, version, kind, where)


# --- reading a snapshot -------------------------------------------------------------------

@dataclass
class _Budget:
    records: int = 0
    total: int = 0
    seen: set[str] = field(default_factory=set)

    def take(self, size: int, name: str) -> None:
        if size > MAX_RECORD_BYTES:
            raise SnapshotError(f"record {name[:80]!r} is {size} bytes, over the "
                                f"{MAX_RECORD_BYTES} byte limit of one record")
        self.records += 1
        self.total += size
        if self.records > MAX_RECORDS or self.total > MAX_SNAPSHOT_BYTES:
            raise SnapshotError(f"the snapshot holds more than {MAX_RECORDS} records or "
                                f"{MAX_SNAPSHOT_BYTES} bytes")


def _read_bounded(fh: BinaryIO, name: str) -> bytes:
    data = fh.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise SnapshotError(f"record {name[:80]!r} is over the {MAX_RECORD_BYTES} byte limit")
    return data


def records(snapshot: Path) -> Iterator[bytes]:
    """The bytes of each `*.json` record of a directory, zip or tar (plain or compressed),
    never extracted to disk and never read by a member's own path."""
    try:
        st = os.stat(snapshot)
    except OSError as exc:
        raise SnapshotError(f"cannot read {snapshot}: {exc.strerror}") from None
    budget = _Budget()
    if stat.S_ISDIR(st.st_mode):
        yield from _dir_records(snapshot, budget)
    elif zipfile.is_zipfile(snapshot):
        yield from _zip_records(snapshot, budget)
    else:
        yield from _tar_records(snapshot, budget)


def _dir_records(top: Path, budget: _Budget) -> Iterator[bytes]:
    for _, data in _dir_named(top, budget):
        yield data


def _dir_named(top: Path, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    for dirpath, dirnames, filenames in os.walk(top):  # symlinks to directories not followed
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".json"):
                continue
            path = os.path.join(dirpath, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as exc:
                raise SnapshotError(f"cannot read {path}: {exc.strerror}") from None
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    continue
                data = _read_bounded(fh, name)
            budget.take(len(data), name)
            yield os.path.relpath(path, top), data


def _zip_records(path: Path, budget: _Budget) -> Iterator[bytes]:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.endswith(".json"):
                    continue
                budget.take(info.file_size, info.filename)  # the header's word, then checked
                with zf.open(info) as fh:
                    yield _read_bounded(fh, info.filename)  # type: ignore[arg-type]
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise SnapshotError(f"{path} is not a readable zip: {str(exc)[:120]}") from None


def _tar_records(path: Path, budget: _Budget) -> Iterator[bytes]:
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if not member.isreg() or not member.name.endswith(".json"):
                    continue
                budget.take(member.size, member.name)
                fh = tf.extractfile(member)
                if fh is not None:
                    yield _read_bounded(fh, member.name)  # type: ignore[arg-type]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SnapshotError(f"{path} is not an OSV snapshot (a directory, zip or tar of "
                            f"<ID>.json records): {str(exc)[:120]}") from None


def file_digest(path: Path) -> str:
    """The sha256 of a snapshot file, or of a directory's records (their sorted names and
    digests), as the manifest and the signature name it."""
    if path.is_dir():
        h = hashlib.sha256()
        for name, data in _dir_named(path, _Budget()):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



# --- a signed snapshot (carried to the host after the release) ----------------------------

SIG_PAYLOAD_TYPE = "application/vnd.bundler.osv-snapshot+json"
SIG_SCHEMA = 1
_SIG_KEYS = {"schema", "name", "sha256", "size", "signed"}


@dataclass(frozen=True)
class Statement:
    """What a snapshot signature says: this file's name, sha256 and size, when it was
    signed. The snapshot itself is never re-encoded."""

    name: str
    sha256: str
    size: int
    signed: str

    def to_bytes(self) -> bytes:
        return canonical_json({"schema": SIG_SCHEMA, "name": self.name,
                               "sha256": self.sha256, "size": self.size,
                               "signed": self.signed})


def signature_path(snapshot: Path) -> Path:
    """Where `bundle vulns sign` writes the signature: next to the snapshot, `.sig` added."""
    return snapshot.with_name(snapshot.name + ".sig")


def parse_statement(body: bytes) -> Statement:
    doc = strict_loads(body)
    if not isinstance(doc, dict) or set(doc) != _SIG_KEYS or doc["schema"] != SIG_SCHEMA:
        raise ValueError("not a snapshot statement of schema 1")
    if not isinstance(doc["sha256"], str) or not SHA256_RE.match(doc["sha256"]) or \
            type(doc["size"]) is not int or doc["size"] < 0 or \
            not isinstance(doc["name"], str) or not isinstance(doc["signed"], str):
        raise ValueError("a snapshot statement field is not valid")
    return Statement(doc["name"], doc["sha256"], doc["size"], doc["signed"])


def copy_hashed(src: Path, dst: Path, limit: int) -> tuple[str, int]:
    """Copy `src` (a regular file, not followed through a symlink) to a new private `dst`,
    hashing what is written: what is then read is exactly what was hashed."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise SnapshotError(f"{src} is not a regular file")
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        h, size = hashlib.sha256(), 0
        with os.fdopen(out, "wb") as wh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                size += len(block)
                if size > limit:
                    raise SnapshotError(f"{src} is larger than its signature says ({limit} "
                                        "bytes)")
                h.update(block)
                wh.write(block)
    return h.hexdigest(), size
