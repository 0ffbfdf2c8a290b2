"""`bundle audit`: is what a release put on disk, and what its stack runs, still what bundler
installed? (docs/audit.md)

At install (`record`, after the packages, before anything runs), the release's
`bundle/audit.record.json` (0644, root's) records what no other record holds: every entry of
the release directory (path, type, mode, and the sha256 or link target; a payload the signed
manifest lists carries its mode only: the manifest holds its digest), except the trees that
already have a reuse record (the venv, pre-built and `npm ci` node_modules:
bundler.install.reuse) and the places an app is expected to write (`excluded`); and the Image
ID each of the release's tags named in the engine right after the load. A carried Node.js is a
shared sealed tree whose entries its own marker records (bundler.install.node_runtime).

The audit (`run`) walks the same places again, re-hashing every file, and compares them with
those records and with the signed manifest (itself checked against the digest the state
database kept at install): files changed, added or removed, by path relative to the release;
the release's tags in the engine (another image, or gone); and, for the current release of a
compose root, running containers of its project whose image is not one of the release's.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundler.bundle.manifest import Manifest, parse_manifest
from bundler.errors import BundlerError, StateError
from bundler.fsutil import CHUNK, atomic_write_bytes
from bundler.install import node_runtime, npm_env, python_env, reuse
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.state import State
from bundler.progname import cmd

FORMAT = 1
RECORD_NAME = "audit.record.json"  # in the release's bundle/ directory
RECORD_MODE = 0o644

# Written after the record, by bundler or by what the release runs: never drift.
#   top-level names of the release directory, and names anywhere below it.
EXCLUDED_TOP = {
    "logs": "service logs (bundler writes them while the release runs)",
    "run": "pid files of supervised services",
    "report.json": "the install report, written after the record",
    "REPORT.md": "the install report, written after the record",
    "npm-cache": "npm's download cache (used by the install only)",
    ".uv-unpack": "uv's scratch space (used by the install only)",
}
EXCLUDED_NAMES = {
    "__pycache__": "bytecode Python compiles at run time",
}
# A `.env` the bundle does not carry is the operator's (the one the release reads is
# shared/.env, outside the release); a node_modules/.cache is what build tools cache at run
# time.
DOTENV = ".env"
NODE_CACHE = ("node_modules", ".cache")


@dataclass(frozen=True)
class Finding:
    kind: str    # changed | added | removed | mode | type | image-replaced | image-gone |
    #              container-image | record
    path: str    # relative to the release (images: the tag; containers: the service)
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "detail": self.detail}

    def line(self) -> str:
        return f"{self.kind:<15} {self.path}: {self.detail}"


@dataclass(frozen=True)
class Report:
    product: str
    version: str
    root: str
    findings: tuple[Finding, ...]
    files: int         # entries compared
    hashed_bytes: int
    seconds: float
    images: int | None      # tags compared (None: not checked, see notes)
    containers: int | None  # containers compared
    notes: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.findings

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.kind] = out.get(f.kind, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> str:
        if self.clean:
            return (f"{self.product} {self.version}: no drift ({self.files} entries compared"
                    f"{'' if self.images is None else f', {self.images} image(s)'}"
                    f"{'' if self.containers is None else f', {self.containers} container(s)'}"
                    f", {self.seconds:.1f} s)")
        counts = ", ".join(f"{n} {k}" for k, n in self.counts().items())
        return (f"{self.product} {self.version}: drift found ({counts}); first: "
                f"{self.findings[0].kind} {self.findings[0].path}")

    def to_json(self) -> dict[str, Any]:
        return {"product": self.product, "version": self.version, "root": self.root,
                "clean": self.clean, "counts": self.counts(), "entries": self.files,
                "hashed_bytes": self.hashed_bytes, "seconds": round(self.seconds, 3),
                "images": self.images, "containers": self.containers,
                "notes": list(self.notes), "findings": [f.to_json() for f in self.findings]}


# --- what is excluded -------------------------------------------------------------------------

def excluded(rel: str, carried: frozenset[str] = frozenset()) -> bool:
    """Never recorded nor compared: what bundler writes after the record (logs, pid files, the
    report, its own record), the install's scratch and caches, and a `.env` the bundle does
    not carry. `carried`: the paths the signed manifest lists (a `.env` among them is
    compared)."""
    parts = rel.split("/")
    if parts[0] in EXCLUDED_TOP or rel == f"bundle/{RECORD_NAME}":
        return True
    return parts[-1] == DOTENV and rel not in carried


def run_time(rel: str) -> bool:
    """Under a place an app writes at run time (`__pycache__`, `node_modules/.cache`): what
    is there and not recorded is not drift; what was recorded is still compared (a changed
    `.pyc` bundler compiled runs as it is)."""
    parts = rel.split("/")
    if any(p in EXCLUDED_NAMES for p in parts):
        return True
    return any(parts[i:i + 2] == list(NODE_CACHE) for i in range(len(parts) - 1))


# --- the record, at install -------------------------------------------------------------------

def record_path(rel: ReleaseDir) -> Path:
    return rel.meta / RECORD_NAME


def reuse_records(rel: ReleaseDir, m: Manifest) -> dict[str, Path]:
    """The trees of the release that have their own (reuse) record: tree path -> record."""
    out = {}
    venv_rec = python_env.record_path(rel.path)
    if venv_rec.is_file():
        out["venv"] = venv_rec
    for project in m.npm:
        path = npm_env.tree_record(rel.path, project.dest)
        if path.is_file():
            out[f"files/{project.dest}/node_modules"] = path
    return out


def record(rel: ReleaseDir, m: Manifest, image_ids: Mapping[str, str] | None) -> Path:
    """Write the release's audit record (see the module's doc). `image_ids`: each of the
    release's tags -> the Image ID the engine gave it after the load (None: not known here,
    a swarm's nodes hold them)."""
    trees = reuse_records(rel, m)
    carried = frozenset(f.path for f in m.files)
    entries = [_entry(rel.path, path, st, path not in carried)[0].to_json()
               for path, st in _walk(rel.path, "", set(trees), carried)]
    doc = {"format": FORMAT, "version": m.version,
           "trees": {k: os.path.relpath(v, rel.path) for k, v in sorted(trees.items())},
           "images": dict(sorted(image_ids.items())) if image_ids is not None else None,
           "entries": entries}
    path = record_path(rel)
    atomic_write_bytes(path, (json.dumps(doc, separators=(",", ":")) + "\n").encode(),
                       RECORD_MODE)
    return path


def _walk(top: Path, prefix: str, skip: set[str], carried: frozenset[str]
          ) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under `top` (not itself), parents first, but the excluded ones (named
    `prefix` + path) and the `skip` subtrees."""
    stack = [""]
    while stack:
        base = stack.pop()
        try:
            names = sorted(os.listdir(top / base if base else top))
        except OSError:
            continue
        for name in names:
            rel = f"{base}/{name}" if base else name
            if rel in skip or excluded(prefix + rel, carried):
                continue
            try:
                st = os.lstat(top / rel)
            except FileNotFoundError:  # gone meanwhile
                continue
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)


def _entry(top: Path, rel: str, st: os.stat_result, hashed: bool
           ) -> tuple[reuse.Entry, int]:
    """The entry `rel` is now, and the bytes read to hash it."""
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return reuse.Entry(rel, "l", 0o777, os.readlink(top / rel)), 0
    if stat.S_ISDIR(st.st_mode):
        return reuse.Entry(rel, "d", mode), 0
    if stat.S_ISREG(st.st_mode):
        if not hashed:
            return reuse.Entry(rel, "f", mode), 0
        return reuse.Entry(rel, "f", mode, _sha256(top / rel)), st.st_size
    return reuse.Entry(rel, "?", mode), 0


def _sha256(path: Path) -> str:
    """A file's sha256, opened without following a link ("" if it cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb", buffering=0) as fh:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


# --- the audit --------------------------------------------------------------------------------

@dataclass
class _Tally:
    findings: list[Finding] = field(default_factory=list)
    entries: int = 0
    hashed: int = 0

    def add(self, kind: str, path: str, detail: str) -> None:
        self.findings.append(Finding(kind, path, detail))


def run(layout: Layout, version: str | None = None, engine: bool = True) -> Report:
    """Audit release `version` (default: the current one) under `layout`. `engine`: compare
    its images and containers too (when it has any, on a root that is not a swarm)."""
    start = time.monotonic()
    rel, row_digest, product = _release(layout, version)
    tally = _Tally()
    notes: list[str] = []
    m = _manifest(rel, row_digest, tally)
    doc = _load_record(rel)
    _compare_release(rel, m, doc, tally)
    _compare_runtime(layout, rel, m, tally, notes)
    images = containers = None
    if engine and m is not None and m.images:
        images, containers = _compare_engine(layout, rel, m, doc, tally, notes)
    return Report(product, rel.path.name, str(layout.root), tuple(tally.findings),
                  tally.entries, tally.hashed, time.monotonic() - start, images, containers,
                  tuple(notes))


def _release(layout: Layout, version: str | None) -> tuple[ReleaseDir, str, str]:
    state = State.open_readonly(layout.db)
    if state is None:
        raise StateError(f"nothing was installed under {layout.root}: nothing to audit",
                         hint="install a bundle first")
    try:
        product = state.product()
        version = version or layout.current_version()
        row = state.release(version) if version else None
    finally:
        state.close()
    if version is None:
        raise StateError(f"{layout.root} has no current release to audit",
                         hint="name one with --release VERSION (`bundle history` lists them)")
    rel = ReleaseDir(layout.release(version))
    if row is None or not rel.path.is_dir():
        raise StateError(f"release {version} is not installed under {layout.root}",
                         hint=f"`{cmd('history', '--root', layout.root)}` lists the releases")
    return rel, row.digest, product[0] if product else row.product


def _manifest(rel: ReleaseDir, digest: str, tally: _Tally) -> Manifest | None:
    """The signed manifest as verified at install (None, and a finding, if it changed)."""
    try:
        data = rel.manifest_file.read_bytes()
    except OSError as exc:
        tally.add("removed", "bundle/manifest.json", f"unreadable ({exc.strerror})")
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        tally.add("changed", "bundle/manifest.json",
                  "differs from the manifest verified at install: nothing is compared with it")
        return None
    return parse_manifest(data)


def _load_record(rel: ReleaseDir) -> dict[str, Any]:
    try:
        doc = json.loads(record_path(rel).read_bytes())
    except FileNotFoundError:
        raise StateError(f"release {rel.path.name} has no audit record (bundle/{RECORD_NAME}):"
                         " it was installed by a bundler that did not write one",
                         hint="install the release's bundle again (a later release gets "
                              "one by itself)") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"release {rel.path.name}: its audit record is unreadable ({exc})",
                         hint="install the release's bundle again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"release {rel.path.name}: its audit record is not one this bundler "
                         "reads", hint="install the release's bundle again")
    return doc


def _entries(raw: Any) -> dict[str, reuse.Entry]:
    return {str(p): reuse.Entry(str(p), str(k), int(md), str(v), bool(h))
            for p, k, md, v, h in raw}


def _compare_release(rel: ReleaseDir, m: Manifest | None, doc: Mapping[str, Any],
                     tally: _Tally) -> None:
    """The release directory against the audit record, the reuse records and the manifest."""
    trees: dict[str, str] = dict(doc.get("trees") or {})
    signed = {f.path: f for f in m.files} if m is not None else {}
    want = _entries(doc.get("entries") or [])
    _compare_tree(rel.path, "", want, set(trees), frozenset(signed), tally, signed)
    for tree, rec_rel in sorted(trees.items()):
        rec = reuse.Record.load(rel.path / rec_rel)
        if rec is None:
            tally.add("record", rec_rel, f"the record of {tree} is gone or unreadable: "
                                         f"{tree} cannot be compared")
            continue
        top = rel.path / tree
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            tally.add("removed", tree, "the whole tree is gone")
            continue
        entries = {e.path: e for e in rec.entries}
        _compare_one(top.parent, top.name, st, entries["."], tree, tally, None)
        if stat.S_ISDIR(st.st_mode):
            del entries["."]
            _compare_tree(top, tree + "/", entries, set(), frozenset(), tally, {})


def _compare_tree(top: Path, prefix: str, want: Mapping[str, reuse.Entry], skip: set[str],
                  carried: frozenset[str], tally: _Tally, signed: Mapping[str, Any]) -> None:
    """The entries under `top` against `want` (paths relative to `top`); findings named
    `prefix` + path. A file recorded without a digest is compared with `signed` (the
    manifest's entry for it)."""
    seen = set()
    for rel, st in _walk(top, prefix, skip, carried):
        seen.add(rel)
        tally.entries += 1
        e = want.get(rel)
        if e is None:
            if not run_time(prefix + rel):
                tally.add("added", prefix + rel, _what(st))
            continue
        _compare_one(top, rel, st, e, prefix + rel, tally, signed.get(rel))
    for rel in sorted(set(want) - seen):
        if not run_time(prefix + rel) and not _under_removed(rel, want, seen):
            tally.add("removed", prefix + rel, _kind_name(want[rel].kind))


def _compare_one(top: Path, rel: str, st: os.stat_result, want: reuse.Entry, name: str,
                 tally: _Tally, signed: Any) -> None:
    got, read = _entry(top, rel, st, want.kind == "f")
    tally.hashed += read
    problem = _differs(want, got, signed)
    if problem is not None:
        tally.add(problem[0], name, problem[1])


def _under_removed(rel: str, want: Mapping[str, reuse.Entry], seen: set[str]) -> bool:
    """A child of a directory reported removed already (one finding for the whole tree)."""
    parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
    return bool(parent) and parent in want and parent not in seen


def _differs(want: reuse.Entry, got: reuse.Entry, signed: Any) -> tuple[str, str] | None:
    if want.kind != got.kind:
        return "type", f"was {_kind_name(want.kind)}, now {_kind_name(got.kind)}"
    if want.kind == "l":
        if want.value != got.value:
            return "changed", f"link to {want.value!r}, now to {got.value!r}"
        return None
    expect = want.value or (signed.sha256 if signed is not None else "")
    if want.kind == "f" and expect and got.value != expect:
        return "changed", f"sha256 {got.value[:16] or '(unreadable)'}..., recorded {expect[:16]}..."
    if want.mode != got.mode:
        return "mode", f"mode {got.mode:04o}, recorded {want.mode:04o}"
    return None


def _kind_name(kind: str) -> str:
    return {"f": "file", "d": "directory", "l": "symlink"}.get(kind, "special file")


def _what(st: os.stat_result) -> str:
    kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) \
        else "f" if stat.S_ISREG(st.st_mode) else "?"
    size = f", {st.st_size} bytes" if kind == "f" else ""
    return f"{_kind_name(kind)} not installed by bundler (mode {stat.S_IMODE(st.st_mode):04o}" \
           f"{size})"


def _compare_runtime(layout: Layout, rel: ReleaseDir, m: Manifest | None, tally: _Tally,
                     notes: list[str]) -> None:
    """The shared Node.js tree the release links to, against its marker's entries."""
    if m is None or m.runtimes is None:
        return
    link = node_runtime.home(rel.path)
    prefix = f"{node_runtime.RUNTIME_DIR.as_posix()}/"
    shared = node_runtime.store(layout.root) / node_runtime.key(m)
    if not shared.is_dir():
        tally.add("removed", prefix.rstrip("/"), f"the shared runtime {shared} is gone")
        return
    if not link.is_symlink() or Path(os.path.normpath(link.parent / os.readlink(link))) != shared:
        return  # the link itself is an entry of the release: compared there
    want = node_runtime.recorded_entries(shared)
    if want is None:
        notes.append(f"{shared} was unpacked by a bundler that recorded no entries: "
                     "compared as a whole")
        if not node_runtime.intact(shared):
            tally.add("changed", prefix.rstrip("/"), "the shared runtime is not as it was "
                                                     "sealed (no per-file record to name what)")
        return
    _compare_tree(shared, prefix, {e.path: e for e in want if e.path != "."},
                  {node_runtime.MARKER}, frozenset(), tally, {})


# --- the engine -------------------------------------------------------------------------------

def _compare_engine(layout: Layout, rel: ReleaseDir, m: Manifest, doc: Mapping[str, Any],
                    tally: _Tally, notes: list[str]) -> tuple[int | None, int | None]:
    """The release's tags in the engine, and (current release) its project's containers."""
    if layout.swarm_file.exists():
        notes.append("a swarm root: images and tasks live on the nodes' engines and are not "
                     "compared (files are)")
        return None, None
    from bundler.engine import local_image_ids

    recorded: dict[str, str] = dict(doc.get("images") or {})
    want = {i.ref: recorded.get(i.ref, i.image_id) for i in m.images}
    found = local_image_ids(sorted(want))
    if found is None:
        found = _ids_through_sdk(sorted(want), notes)
        if found is None:
            return None, None
    for ref, image_id in sorted(want.items()):
        now = found.get(ref)
        if now is None:
            tally.add("image-gone", ref, f"the engine has no image {ref} (was {image_id[:19]})")
        elif now != image_id:
            tally.add("image-replaced", ref, f"names {now[:19]} in the engine, the release's "
                                             f"is {image_id[:19]}")
    containers = None
    if layout.current_version() == rel.path.name and m.runtime.compose is not None:
        containers = _compare_containers(layout, rel, m, set(want.values()), tally, notes)
    return len(want), containers


def _ids_through_sdk(refs: list[str], notes: list[str]) -> dict[str, str | None] | None:
    from bundler.engine import docker_sdk, engine_client

    try:
        client = engine_client(BundlerError).api
        out: dict[str, str | None] = {}
        for ref in refs:
            try:
                out[ref] = str(client.inspect_image(ref)["Id"])
            except docker_sdk().errors.NotFound:
                out[ref] = None
        return out
    except BundlerError as exc:
        notes.append(f"images not compared: {exc.message.splitlines()[0]}")
        return None


def _compare_containers(layout: Layout, rel: ReleaseDir, m: Manifest, ids: set[str],
                        tally: _Tally, notes: list[str]) -> int | None:
    from bundler.install import compose_runtime as cr
    from bundler.install.runtimes import ComposeRuntime

    runtime = ComposeRuntime(layout, rel, m, rel.environment())
    try:
        states = cr.ps(runtime.project())
    except BundlerError as exc:
        notes.append(f"containers not compared: {exc.message.splitlines()[0]}")
        return None
    running = [s for s in states if s.running or s.status == "restarting"]
    for s in running:
        if s.image not in ids:
            tally.add("container-image", f"service {s.name}",
                      f"container {s.container[:12]} runs image {s.image[:19]}, not one of "
                      "the release's")
    return len(running)


def image_ids(m: Manifest) -> dict[str, str] | None:
    """Each of the release's tags -> its Image ID in the engine now (right after the load);
    None when the engine cannot be asked here."""
    if not m.images:
        return {}
    from bundler.engine import local_image_ids

    refs = sorted(i.ref for i in m.images)
    found = local_image_ids(refs)
    if found is None:
        found = _ids_through_sdk(refs, [])
    if found is None:
        return None
    return {ref: i for ref, i in found.items() if i is not None}


# --- the signed report ------------------------------------------------------------------------

def write_report(layout: Layout, report: Report, out: Path) -> str:
    """`report` signed by the root's host key (the key that signs receipts) into `out`, 0644;
    returns the key id. Check it with `bundle audit --verify-report FILE --host-key PUB`."""
    from datetime import datetime

    from bundler.bundle import auditreport
    from bundler.bundle.signing import key_id, sign_payload
    from bundler.compat import UTC
    from bundler.install import receipts

    key = receipts.host_key(layout)
    keyid = key_id(key.public_key())
    doc = {**report.to_json(), "host_key": keyid,
           "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    atomic_write_bytes(out, sign_payload(auditreport.to_bytes(doc), auditreport.PAYLOAD_TYPE,
                                         key), 0o644)
    return keyid
