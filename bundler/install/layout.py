"""Where things live under an install root: every path bundler uses under it is a property
here (of `Layout`, or of `ReleaseDir` inside one release), so a new one is added in one place.

    <root>/
      current -> releases/<version>   the release that serves (switched at the commit)
      releases/<version>/             one per kept release (`ReleaseDir`)
      state/state.db, state/trust/    the journal; the trusted keys
      shared/.env                     the operator's environment, kept across releases
      backups/                        database and data-directory backups
      data/<name>/                    the releases' own data directories
      runtimes/<key>/                 carried Node.js trees shared between releases
      bin/                            this root's own bundler (the boot unit runs it)
      policy.yaml, swarm.yaml         the host policy; the swarm's nodes (the swarm runtime)
      .staging-*/                     a bundle being verified (never a release yet)
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bundler.bundle.manifest import IMAGES_PATH, Manifest, parse_manifest
from bundler.errors import LockedError, StateError
from bundler.fsutil import atomic_symlink
from bundler.progname import cmd


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def trust_dir(self) -> Path:
        return self.state_dir / "trust"

    @property
    def shared(self) -> Path:
        """The operator's own files, kept across releases (0700)."""
        return self.root / "shared"

    @property
    def env_file(self) -> Path:
        """The shared `.env`: the environment every release runs with."""
        return self.shared / ".env"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    @property
    def data(self) -> Path:
        """Where the releases' data directories live (`{data}` in a profile)."""
        return self.root / "data"

    @property
    def bin(self) -> Path:
        """This root's own bundler (bundler.install.rootbin)."""
        return self.root / "bin"

    @property
    def runtimes(self) -> Path:
        """The carried Node.js trees, shared between releases (bundler.install.node_runtime)."""
        return self.root / "runtimes"

    @property
    def policy_file(self) -> Path:
        """The host policy (bundler.install.hostpolicy)."""
        return self.root / "policy.yaml"

    @property
    def swarm_file(self) -> Path:
        """The swarm's nodes; present: compose releases run as a swarm stack."""
        return self.root / "swarm.yaml"

    def staging_dirs(self) -> list[Path]:
        """Staging directories left under the root (an install's own, or a dead one's)."""
        return sorted(self.root.glob(".staging-*"))

    def new_staging(self) -> Path:
        """A fresh, private staging directory for a bundle being verified."""
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    def release(self, version: str) -> Path:
        return self.releases / version

    def removable_release(self, path: Path) -> Path:
        """`path`, checked to be a direct child of releases/ (what the installer may delete);
        StateError otherwise. Every rmtree of a release goes through this."""
        if path.parent != self.releases or path.name in ("", ".", ".."):
            raise StateError(f"refusing to remove {path}: not a release directory directly "
                             f"under {self.releases}")
        return path

    def removable_staging(self, path: Path) -> Path:
        """`path`, checked to be one of the root's own `.staging-*` directories."""
        if path.parent != self.root or not path.name.startswith(".staging-"):
            raise StateError(f"refusing to remove {path}: not a staging directory directly "
                             f"under {self.root}")
        return path

    def switch(self, version: str | None) -> None:
        """Point `current` at release `version` atomically (None: no current release)."""
        if version is None:
            self.current.unlink(missing_ok=True)
        else:
            atomic_symlink(os.path.join(self.releases.name, version), self.current)

    def current_version(self) -> str | None:
        try:
            return Path(os.readlink(self.current)).name
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.current} is not a symlink: {exc.strerror}") from None


@dataclass(frozen=True)
class ReleaseDir:
    """Paths inside one release directory."""

    path: Path

    @property
    def files(self) -> Path:
        return self.path / "files"

    @property
    def venv(self) -> Path:
        return self.path / "venv"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def run(self) -> Path:
        return self.path / "run"

    @property
    def meta(self) -> Path:
        return self.path / "bundle"

    @property
    def manifest_file(self) -> Path:
        return self.meta / "manifest.json"

    @property
    def environment_file(self) -> Path:
        return self.meta / "environment"

    @property
    def degraded_marker(self) -> Path:
        """Present when the release was installed with --allow-degraded and a node was down: its
        stack is accepted with fewer replicas than asked while tasks wait for that node."""
        return self.meta / "swarm-degraded"

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def report_md(self) -> Path:
        return self.path / "REPORT.md"

    @property
    def images_archive(self) -> Path:
        return self.path / IMAGES_PATH

    @property
    def wheels(self) -> Path:
        return self.path / "python" / "wheels"

    @property
    def npm_tarballs(self) -> Path:
        return self.path / "npm" / "tarballs"

    @property
    def npm_cache(self) -> Path:
        return self.path / "npm-cache"

    @property
    def payloads(self) -> tuple[Path, ...]:
        """What the release unpacked or built (payloads, venv, caches): what a full disk frees
        first. Its manifest and files/ (compose files) are not among them."""
        return tuple(self.path / part for part in ("venv", "python", "npm", "npm-cache",
                                                   "images", ".uv-unpack"))

    def environment(self) -> str:
        """The environment this release was installed for (production when not recorded)."""
        try:
            return self.environment_file.read_text().strip() or "production"
        except OSError:
            return "production"

    def manifest(self) -> Manifest | None:
        """The signed manifest this release was installed from (verified at install time)."""
        try:
            return parse_manifest(self.manifest_file.read_bytes())
        except OSError:
            return None

    def check_manifest(self, digest: str) -> None:
        """StateError unless the on-disk manifest is the one whose sha256 the state database
        recorded when it was verified: `start`, `rollback` and recovery act on that alone."""
        try:
            data = self.manifest_file.read_bytes()
        except OSError as exc:
            raise StateError(f"release {self.path.name}: its manifest is unreadable "
                             f"({exc.strerror})", hint="install the release's bundle again"
                             ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise StateError(f"release {self.path.name}: its manifest on disk differs from the "
                             "one verified at install time (sha256 mismatch); refusing to act "
                             "on it", hint="install the release's bundle again; check who can "
                                           "write under the install root")


def is_install_root(path: Path) -> bool:
    """A directory with the `state/` directory that `install` and `trust add` make."""
    return path.is_dir() and Layout(path).state_dir.is_dir()


def check_root(root: Path) -> None:
    """StateError (exit 14) unless `root` is an install root: a misspelt --root says so, and
    names the install roots it may have meant, instead of failing later on something else
    ("no trusted key", "no bundler state"). Only `install --trust KEY` and `trust add` may
    create a root (they do not call this); see docs/operating.md."""
    if is_install_root(root):
        return
    near = _near_roots(root)
    maybe = f" (did you mean {' or '.join(str(p) for p in near)}?)" if near else ""
    hint = "check --root (or BUNDLER_ROOT)"
    if not near:
        hint += ("; a first install makes it one: "
                 f"`{cmd('install', 'BUNDLE', '--trust', 'KEY.pub', '--root', root)}`")
    if not root.exists():
        raise StateError(f"no install root at {root}{maybe}", hint=hint)
    if not root.is_dir():
        raise StateError(f"{root} is not an install root (not a directory){maybe}",
                         hint="check --root (or BUNDLER_ROOT)")
    raise StateError(f"{root} is not an install root: it has no state/ (nothing was installed "
                     f"or trusted there){maybe}", hint=hint)


def _near_roots(root: Path) -> list[Path]:
    """Install roots `root` may have meant: the root it lies in, its own subdirectories that are
    roots (a parent given), else paths that differ from it in one misspelt component, the
    first one that does not exist (compared with its existing siblings)."""
    above = next((p for p in root.parents if is_install_root(p)), None)
    if above is not None:
        return [above]
    with contextlib.suppress(OSError):
        inside = sorted(Path(e.path) for e in os.scandir(root)
                        if e.is_dir() and is_install_root(Path(e.path)))
        if inside:
            return inside[:3]
    parts = root.parts  # absolute: parts[0] is "/"
    if len(parts) < 2:
        return []
    i = 1
    while i < len(parts) and Path(*parts[:i + 1]).exists():
        i += 1
    if i == len(parts):  # it all exists: compare the root's own name with its siblings
        i -= 1
    base, name, rest = Path(*parts[:i]), parts[i], parts[i + 1:]
    try:
        siblings = [e.name for e in os.scandir(base) if e.is_dir()]
    except OSError:
        return []
    out = []
    for close in difflib.get_close_matches(name, siblings, n=5, cutoff=0.6):
        candidate = base.joinpath(close, *rest)
        if candidate != root and is_install_root(candidate):
            out.append(candidate)
    return out[:3]


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Exclusive lock on the root directory itself (flock on its fd): no lock file to leave
    behind, and the kernel drops it if the holder dies."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"another bundler process is working on {root}") from None
        yield
    finally:
        os.close(fd)
