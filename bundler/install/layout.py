"""Where things live under an install root."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bundler.errors import LockedError, StateError
from bundler.manifest import Manifest, parse_manifest


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

    def environment(self) -> str:
        """The environment this release was installed for (production when not recorded)."""
        try:
            return (self.meta / "environment").read_text().strip() or "production"
        except OSError:
            return "production"

    def manifest(self) -> Manifest | None:
        """The signed manifest this release was installed from (verified at install time)."""
        try:
            return parse_manifest((self.meta / "manifest.json").read_bytes())
        except OSError:
            return None

    def check_manifest(self, digest: str) -> None:
        """StateError unless the on-disk manifest is the one whose sha256 the state database
        recorded when it was verified: `start`, `rollback` and recovery act on that alone."""
        try:
            data = (self.meta / "manifest.json").read_bytes()
        except OSError as exc:
            raise StateError(f"release {self.path.name}: its manifest is unreadable "
                             f"({exc.strerror})", hint="install the release's bundle again"
                             ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise StateError(f"release {self.path.name}: its manifest on disk differs from the "
                             "one verified at install time (sha256 mismatch); refusing to act "
                             "on it", hint="install the release's bundle again; check who can "
                                           "write under the install root")


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
