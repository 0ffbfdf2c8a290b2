"""`bundle support`: a diagnostic archive of an install root to carry back out of the air gap,
with no secret in it (docs/support.md).

Each section is collected on its own: one that fails (no engine, no current release, an
unreadable state) records its error in MANIFEST.json and the rest is still collected. Every
byte that goes in is masked by `bundler.redact` first, knowing every secret this root has
(the shared .env, the releases' env files and `secret:` names, what the supervisor was told
to mask). Never read: the host key's private half, state.db itself (only through the State
API), backups/ and data/.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from bundler import __version__, ui
from bundler.bundle import supportfile
from bundler.bundle.manifest import Manifest
from bundler.errors import BundlerError
from bundler.install import tails
from bundler.install.environ import ENVIRONMENTS, read_env_file
from bundler.install.layout import Layout, ReleaseDir
from bundler.redact import Secrets, redact, redact_tree, release_secrets

LOG_TAIL = 256 * 1024         # bytes kept of each service log
COMPOSE_LINES = 2000          # lines asked of each container's log
REPORT_MAX = 1024 * 1024      # bytes kept of each install report
HISTORY_EVENTS = 5000         # journal rows kept at most (`bundle history` gives 200)
SMALL_FILE = 1024 * 1024      # env files, policy.yaml, the supervisor's specs: read up to this
SBOM_MAX = 64 * 1024 * 1024   # an SBOM larger than this is not summarised
RELEASES_LOGGED = 3           # releases whose logs/ are collected (current first, then newest)
DEFAULT_MAX = 50 * 1024 * 1024
MIN_MAX = 1024 * 1024

Content = Union[bytes, str, dict[str, Any], list[Any]]  # a runtime alias: python 3.9's Union
Collector = Callable[["Context"], Iterator[tuple[str, Content]]]


@dataclass(frozen=True)
class Context:
    layout: Layout
    secrets: tuple[str, ...]
    cut: list[dict[str, Any]]  # what a section cut itself (a log's older lines), for MANIFEST

    def current(self) -> str | None:
        return self.layout.current_version()


@dataclass(frozen=True)
class Result:
    path: Path
    size: int
    members: int
    cut: tuple[dict[str, Any], ...]
    errors: tuple[dict[str, str], ...]

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "members": self.members,
                "cut": list(self.cut), "section_errors": list(self.errors)}


_SIZE = re.compile(r"^(\d+)([KMG]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """`50M`, `1G`, `800K` or bytes (K/M/G powers of 1024); None if not a size of 1 MiB+."""
    m = _SIZE.match(text.strip())
    if not m:
        return None
    size = int(m[1]) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m[2].upper()]
    return size if size >= MIN_MAX else None


# --- what is secret -----------------------------------------------------------------------------

def _small_text(path: Path, follow: bool = False) -> str | None:
    """A small regular file's text, not following a symlink under the root (None: absent or
    not such a file); the system's own files (`follow`) are often links."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, SMALL_FILE).decode("utf-8", "replace")
    finally:
        os.close(fd)


def loose_env(text: str) -> dict[str, str]:
    """Every NAME=value of an env file, read leniently (a file compose's rules refuse still
    holds values to mask): quotes stripped, `export` allowed, anything else skipped."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", line)
        if m:
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[m.group(1)] = value
    return out


def _env_file(path: Path) -> dict[str, str]:
    try:
        return read_env_file(path)
    except (BundlerError, OSError):
        text = _small_text(path)
        return loose_env(text) if text else {}


def _release_dirs(layout: Layout) -> list[ReleaseDir]:
    try:
        return [ReleaseDir(p) for p in sorted(layout.releases.iterdir()) if p.is_dir()]
    except OSError:
        return []


def _release_secrets(found: Secrets, rel: ReleaseDir, shared: dict[str, str]) -> None:
    m = rel.manifest()
    if m is not None:
        spec = m.runtime.env
        for environment in ENVIRONMENTS:
            base = spec.defaults_for(environment)
            found.add(*release_secrets(base, spec.secret, shared))
            for svc in m.runtime.services:
                found.add(*release_secrets({**base, **dict(svc.env)}, spec.secret, shared))
    with contextlib.suppress(OSError):  # compose's own .env files in the release's files/
        for path in [*rel.files.rglob(".env"), *rel.files.rglob("*.env")][:100]:
            found.add(*_env_file(path).values())
    with contextlib.suppress(OSError):  # what the supervisor was told to mask
        for spec_file in sorted(rel.run.glob("*.json"))[:100]:
            with contextlib.suppress(ValueError, TypeError):
                doc = json.loads(_small_text(spec_file) or "{}")
                found.add(*[s for s in doc.get("secrets", []) if isinstance(s, str)])


def known_secrets(layout: Layout) -> list[str]:
    """Every secret value of this root, longest first: every value of the shared .env and of
    the releases' own .env files (of at least redact.MIN_SECRET characters), and what
    bundler.redact's rule takes as secret elsewhere (a file that cannot be parsed is read
    leniently rather than skipped)."""
    found = Secrets()
    shared = _env_file(layout.env_file)
    # Every value of the shared .env leaves masked, even one that looks plain (a port, a
    # word): the archive leaves the site. (Install output keeps the plain ones readable.)
    found.add(*shared.values())
    for rel in _release_dirs(layout):
        with contextlib.suppress(Exception):  # a damaged release: the rest still counts
            _release_secrets(found, rel, shared)
    return found.values()


# --- the sections -------------------------------------------------------------------------------

def _os_release() -> dict[str, str]:
    return loose_env(_small_text(Path("/etc/os-release"), follow=True) or "")


def versions(ctx: Context) -> Iterator[tuple[str, Content]]:
    u = os.uname()
    yield "versions.json", {
        "bundler": __version__,
        "python": {"version": sys.version, "executable": sys.executable,
                   "implementation": platform.python_implementation()},
        "os_release": _os_release(),
        "uname": {"sysname": u.sysname, "nodename": u.nodename, "release": u.release,
                  "version": u.version, "machine": u.machine},
        "platform": platform.platform(),
    }


_ENGINE_INFO = ("ServerVersion", "Driver", "DockerRootDir", "Containers", "ContainersRunning",
                "ContainersStopped", "Images", "NCPU", "MemTotal", "OperatingSystem",
                "KernelVersion", "CgroupVersion", "CgroupDriver", "Architecture")


def engine(ctx: Context) -> Iterator[tuple[str, Content]]:
    from bundler.engine import docker_sdk

    client = docker_sdk().from_env(timeout=15)  # a hung engine must not hang the collection
    try:
        info = client.info()
        doc = {"version": client.version(),
               "info": {k: info.get(k) for k in _ENGINE_INFO},
               "swarm": (info.get("Swarm") or {}).get("LocalNodeState")}
    finally:
        client.close()
    yield "engine.json", doc


def _current_manifest(ctx: Context) -> Manifest | None:
    version = ctx.current()
    return ReleaseDir(ctx.layout.release(version)).manifest() if version else None


def compose(ctx: Context) -> Iterator[tuple[str, Content]]:
    from bundler.install import compose_runtime as cr

    m = _current_manifest(ctx)
    spec = m.runtime.compose if m is not None else None
    try:
        tool = cr.detect(spec.tool if spec else None)
    except BundlerError as exc:
        if spec is not None:
            raise
        yield "compose.json", {"found": False, "detail": exc.message,
                               "needed": "no (the current release uses no compose)"}
        return
    yield "compose.json", {"found": True, "argv": list(tool.argv), "version": tool.version}


def host(ctx: Context) -> Iterator[tuple[str, Content]]:
    disks, seen = [], set()
    for path in (ctx.layout.root, Path("/"), Path("/var/lib/docker"), Path("/tmp")):
        with contextlib.suppress(OSError):
            dev = path.stat().st_dev
            if dev in seen:
                continue
            seen.add(dev)
            use = shutil.disk_usage(path)
            disks.append({"path": str(path), "total": use.total, "used": use.used,
                          "free": use.free})
    memory = {}
    for line in (_small_text(Path("/proc/meminfo"), follow=True) or "").splitlines():
        name, _, value = line.partition(":")
        if name in ("MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree"):
            memory[name] = value.strip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    uptime = (_small_text(Path("/proc/uptime"), follow=True) or "?").split()[0]
    yield "host.json", {"hostname": socket.gethostname(), "cpus": os.cpu_count(),
                        "load": list(load) if load else None, "disks": disks,
                        "memory": memory, "uptime_s": uptime}


def status(ctx: Context) -> Iterator[tuple[str, Content]]:
    from bundler.install.control import status as get_status

    yield "status.json", get_status(ctx.layout).to_json()


def doctor(ctx: Context) -> Iterator[tuple[str, Content]]:
    from bundler.install import doctor as doc

    version = ctx.current()
    environment = ReleaseDir(ctx.layout.release(version)).environment() if version \
        else "production"
    rows = doc.run(ctx.layout, None, environment)
    yield "doctor.json", {"environment": environment, "checks": [r.to_json() for r in rows]}


def history(ctx: Context) -> Iterator[tuple[str, Content]]:
    from bundler.install.control import history as get_history

    events = get_history(ctx.layout)[-HISTORY_EVENTS:]  # `bundle history`'s rows (its last)
    yield "history.json", {"events": [e.__dict__ for e in events]}


def policy(ctx: Context) -> Iterator[tuple[str, Content]]:
    from bundler.install import hostpolicy

    text = _small_text(ctx.layout.policy_file)
    doc: dict[str, Any] = {"file": str(ctx.layout.policy_file), "present": text is not None}
    try:
        loaded = hostpolicy.load(ctx.layout.root)
        doc.update(allow=[g.text for g in loaded.grants],
                   users=list(loaded.users) if loaded.users is not None else None)
    except BundlerError as exc:
        doc["error"] = exc.message
    yield "policy.json", doc
    if text is not None:
        yield "policy.yaml", text


def trust(ctx: Context) -> Iterator[tuple[str, Content]]:
    """Key ids and file names only: public keys, and never the host key's private half."""
    from bundler.bundle.signing import load_public_key
    from bundler.install import trust as trust_store

    keys = [{"keyid": k.keyid, "file": Path(k.source).name}
            for k in trust_store.listed(ctx.layout)]
    host_key = None
    if ctx.layout.host_pub.is_file():
        try:
            host_key = load_public_key(ctx.layout.host_pub).keyid
        except BundlerError as exc:
            host_key = f"unreadable: {exc.message}"
    yield "trust.json", {"trusted": keys, "host_key": host_key}


def reports(ctx: Context) -> Iterator[tuple[str, Content]]:
    for rel in _release_dirs(ctx.layout):
        for path in (rel.report_json, rel.report_md):
            text = _small_text(path)
            if text is not None:
                yield f"releases/{rel.path.name}/{path.name}", text


def _sbom_file(rel: ReleaseDir, m: Manifest) -> Path | None:
    places = [rel.path / f.path for f in m.files if f.kind == "sbom"]
    for path in [*places, rel.path / "sbom" / "bom.cdx.json"]:
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size <= SBOM_MAX:
                return path
    return None


def _sbom_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Counts of every component, nested ones included (an image's packages sit inside the
    image's component)."""
    by_type: dict[str, int] = {}
    by_purl: dict[str, int] = {}
    todo = list(doc.get("components") or [])
    count = 0
    while todo and count < 1_000_000:
        c = todo.pop()
        if not isinstance(c, dict):
            continue
        count += 1
        by_type[str(c.get("type"))] = by_type.get(str(c.get("type")), 0) + 1
        purl = str(c.get("purl") or "")
        kind = purl[4:].split("/", 1)[0] if purl.startswith("pkg:") else "(no purl)"
        by_purl[kind] = by_purl.get(kind, 0) + 1
        todo += c.get("components") or []
    meta = doc.get("metadata") or {}
    return {"format": doc.get("bomFormat"), "spec_version": doc.get("specVersion"),
            "serial": doc.get("serialNumber"), "timestamp": meta.get("timestamp"),
            "component": meta.get("component"), "components": count,
            "by_type": by_type, "by_purl_type": by_purl}


def sbom(ctx: Context) -> Iterator[tuple[str, Content]]:
    """Quietly nothing for a release whose bundle has no SBOM."""
    for rel in _release_dirs(ctx.layout):
        m = rel.manifest()
        path = _sbom_file(rel, m) if m is not None else None
        if path is not None:
            yield f"sbom/{rel.path.name}.json", _sbom_summary(json.loads(path.read_bytes()))


def audit_report(layout: Layout) -> dict[str, Any] | None:
    """The drift audit's report (bundler.install.audit), or None where this bundler has
    none: the one place the support archive asks for it."""
    try:
        audit = importlib.import_module("bundler.install.audit")
    except ModuleNotFoundError:
        return None
    doc: dict[str, Any] = audit.run(layout).to_json()
    return doc


def audit(ctx: Context) -> Iterator[tuple[str, Content]]:
    report = audit_report(ctx.layout)
    yield "audit.json", report if report is not None else {
        "note": "this bundler has no drift audit (bundler.install.audit): not collected"}


def _process_logs(ctx: Context) -> Iterator[tuple[str, Content]]:
    current = ctx.current()
    rels = sorted(_release_dirs(ctx.layout), key=lambda r: (r.path.name != current,
                                                             -_mtime(r.logs)))
    for rel in rels[:RELEASES_LOGGED]:
        with contextlib.suppress(OSError):
            for path in sorted(rel.logs.iterdir()):
                name = f"logs/{rel.path.name}/{path.name}"
                text, cut = tails.read_tail(path, LOG_TAIL)
                if cut:
                    ctx.cut.append({"member": name, "size": _size(path), "kept": len(text),
                                    "why": f"a log tail: its last {len(text)} bytes, whole "
                                           "lines"})
                if text:
                    yield name, text


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def logs(ctx: Context) -> Iterator[tuple[str, Content]]:
    """The releases' logs/ (supervised processes), then the current compose project's
    containers, or swarm stack's services (engine logs, the last lines)."""
    yield from _process_logs(ctx)
    version = ctx.current()
    if version is None:
        return
    from bundler.install.release import Release
    from bundler.install.runtimes.compose import ComposeRuntime
    from bundler.install.runtimes.swarm import SwarmRuntime

    found = Release.load(ctx.layout, version)
    runtime = found.runtime if found is not None else None
    if isinstance(runtime, SwarmRuntime):
        from bundler.install import swarm_runtime

        for name, text in swarm_runtime.logs_tail(runtime.stack(), COMPOSE_LINES):
            yield f"logs/swarm/{name}.log", text
    elif isinstance(runtime, ComposeRuntime):
        from bundler.install import compose_runtime as cr

        project = runtime.project()
        for name in sorted({s.name for s in cr.ps(project)}):
            yield f"logs/compose/{name}.log", cr.logs_tail(project, None, name, COMPOSE_LINES)


# In the order of their importance: when the size bound is reached, the last ones are cut.
SECTIONS: tuple[tuple[str, Collector], ...] = (
    ("versions", versions), ("host", host), ("engine", engine), ("compose", compose),
    ("status", status), ("doctor", doctor), ("policy", policy), ("trust", trust),
    ("history", history), ("reports", reports), ("sbom", sbom), ("audit", audit),
    ("logs", logs),
)
_TAIL_KEPT = ("logs/",)  # members whose end matters most: cut from the front


# --- the archive --------------------------------------------------------------------------------

def _bytes(content: Content, secrets: tuple[str, ...]) -> bytes:
    """Masked before serialized (JSON), and the whole text masked again."""
    if isinstance(content, (dict, list)):
        text = json.dumps(redact_tree(content, secrets), indent=2, sort_keys=True,
                          ensure_ascii=False, default=str)
    elif isinstance(content, bytes):
        text = content.decode("utf-8", "replace")
    else:
        text = content
    return redact(text, secrets).encode()


def _limit(name: str, data: bytes) -> tuple[bytes, bool]:
    cap = LOG_TAIL if name.startswith(_TAIL_KEPT) else REPORT_MAX
    kept = supportfile.cut_lines(data, cap, name.startswith(_TAIL_KEPT))
    return kept, len(kept) != len(data)


def _one_line(exc: BaseException, secrets: tuple[str, ...]) -> str:
    text = exc.message if isinstance(exc, BundlerError) else f"{type(exc).__name__}: {exc}"
    lines = str(text).strip().splitlines()
    return redact(lines[0][:500] if lines else type(exc).__name__, secrets)


def collect(layout: Layout, out: Path, max_size: int = DEFAULT_MAX,
            sections: tuple[tuple[str, Collector], ...] = SECTIONS) -> Result:
    """Write the support archive of `layout` at `out`, at most `max_size` bytes."""
    from bundler.redact import remember

    started = time.time()
    secrets = tuple(known_secrets(layout))
    remember(*secrets)  # also masked in whatever the sections' own code says
    budget = supportfile.Budget.for_archive(max_size)
    ctx = Context(layout, secrets, budget.cut)
    members: list[tuple[str, bytes]] = []
    listed: list[dict[str, Any]] = []
    outcome: list[dict[str, str]] = []
    for section, fn in sections:
        ui.step(f"collecting {section}")
        count = 0
        try:
            for name, content in fn(ctx):
                data, capped = _limit(name, _bytes(content, secrets))
                if capped:
                    budget.cut.append({"member": name, "kept": len(data),
                                       "why": f"bounded to {len(data)} bytes per member"})
                kept = budget.fit(name, data, name.startswith(_TAIL_KEPT))
                if kept is not None:
                    members.append((name, kept))
                    listed.append({"name": name, "section": section, "size": len(kept),
                                   "sha256": hashlib.sha256(kept).hexdigest()})
                    count += 1
        except Exception as exc:  # each section on its own: the rest is still collected
            outcome.append({"section": section, "status": "error",
                            "detail": _one_line(exc, secrets)})
            continue
        outcome.append({"section": section, "status": "ok", "detail": f"{count} member(s)"})
    manifest = redact_tree({
        "format": supportfile.FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime(started)),
        "bundler": __version__, "root": str(layout.root), "hostname": socket.gethostname(),
        "os": _os_release().get("PRETTY_NAME", platform.platform()),
        "current": _safe(layout.current_version), "max_size": max_size,
        "seconds": round(time.time() - started, 2), "sections": outcome,
        "members": listed, "cut": budget.cut, "masked_values": len(secrets),
        "never_collected": ["state/host.key", "state/state.db (read through bundler only)",
                            "backups/", "data/", "shared/.env (its values are masked)"]},
        secrets)
    assert isinstance(manifest, dict)
    size = supportfile.write(out, members, manifest)
    return Result(out, size, len(members) + 1, tuple(budget.cut),
                  tuple(o for o in outcome if o["status"] == "error"))


def _safe(fn: Callable[[], str | None]) -> str | None:
    try:
        return fn()
    except BundlerError:
        return None


# --- reading one back (the connected side) ------------------------------------------------------

def summary(archive: supportfile.Archive) -> dict[str, Any]:
    """What `bundle support --show` prints: the host, its releases, the last failures, what
    was cut and which sections failed."""
    m = archive.manifest
    st = archive.json("status.json") or {}
    hist = archive.json("history.json") or {}
    doc = archive.json("doctor.json") or {}
    failures = [e for e in hist.get("events", []) if isinstance(e, dict)
                and (e.get("status") == "failed" or e.get("step") == "rollback")][-10:]
    return {
        "host": {k: m.get(k) for k in ("hostname", "os", "bundler", "root", "created")},
        "current": m.get("current"),
        "healthy": st.get("healthy"),
        "releases": [{k: r.get(k) for k in ("version", "status", "installed_at")}
                     for r in st.get("releases", []) if isinstance(r, dict)],
        "failures": [{k: e.get(k) for k in ("ts", "version", "step", "status", "detail")}
                     for e in failures],
        "doctor_failures": [r for r in doc.get("checks", [])
                            if isinstance(r, dict) and r.get("status") == "fail"],
        "cut": m.get("cut", []),
        "section_errors": [s for s in m.get("sections", []) if s.get("status") == "error"],
        "members": len(archive.members),
    }
