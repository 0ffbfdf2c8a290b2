"""The Node.js runtime a bundle carries, reached from a release as `<release>/runtime/node/`.

Shared between releases: a carried runtime (node and npm tarballs, as the signed manifest
names them by sha256) is unpacked ONCE into `<root>/runtimes/<key>/`, `key` being the sha256
of the two tarballs' digests, and `<release>/runtime/node` is a relative symlink to it. The
tree is sealed read-only when unpacked (files 0444/0555, directories 0555) with a digest of
every entry (path, type, mode, owner, content or link target) in its `.bundler-runtime`
marker; a later release with the same Node checks that digest, ownership and modes
(StrictModes) instead of unpacking again. Unpacking goes to a temporary directory renamed
into place, so a crash never leaves a tree that looks ready. `prune` (run by the installer's
own pruning, under the root lock) removes the trees no release left on disk links to, so
rollback and recovery always find the runtime of every kept release.

Layout, as the official Node.js builds have it: `bin/node`, and npm (the registry's `npm`
package, whose tarball holds its own dependencies) in `lib/node_modules/npm` with `bin/npm`
and `bin/npx` pointing at its CLI scripts. Services, `npm ci`, command migrations and command
health checks of that release get `runtime/node/bin` first on PATH (see `on_path`), so they run
this node, never the host's (which may be missing or another version).

The tarballs were verified with the rest of the bundle; they are checked again (size and
sha256 against the signed manifest) and unpacked member by member by the code below, never by
`extractall`: regular files and directories only (symlinks only when they stay inside, and
never traversed while unpacking), no absolute paths, no `..`, each file created anew
(`O_EXCL|O_NOFOLLOW`) with an explicit mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from bundler import proc, timeouts
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import NpmRef
from bundler.errors import CommandError, InstallError
from bundler.fsutil import CHUNK, make_dir, sha256_file
from bundler.install import reuse, strict
from bundler.install.layout import Layout

RUNTIME_DIR = Path("runtime") / "node"
NPM_DIR = Path("lib") / "node_modules" / "npm"
# In each tree: {"key", "digest", "entries"} (not part of the digest); "entries": every entry
# as a reuse record lists them (path, type, mode, sha256 or link target), for `bundle audit`.
MARKER = ".bundler-runtime"
_NPM_PROBE = 120.0  # `npm --version` loads npm's whole CLI first: slower than a probe
_LAYOUT = 1  # how a tree is laid out: part of the key, so a change never reuses an old tree


def home(release: Path) -> Path:
    return release / RUNTIME_DIR


def bin_dir(release: Path) -> Path | None:
    """`<release>/runtime/node/bin` if that release carries Node.js, else None."""
    path = home(release) / "bin"
    return path if (path / "node").is_file() else None


def on_path(env: Mapping[str, str], release: Path) -> dict[str, str]:
    """`env` with the release's carried node first on PATH (unchanged without one)."""
    out = dict(env)
    bindir = bin_dir(release)
    if bindir is not None:
        base = out.get("PATH") or os.environ.get("PATH") or os.defpath
        out["PATH"] = f"{bindir}{os.pathsep}{base}"
    return out


def npm_argv(release: Path) -> list[str] | None:
    """How to run the carried npm: `node <npm>/bin/npm-cli.js` (None: nothing carried)."""
    bindir = bin_dir(release)
    if bindir is None:
        return None
    return [str(bindir / "node"), str(home(release) / NPM_DIR / "bin" / "npm-cli.js")]


def store(root: Path) -> Path:
    """<root>/runtimes/: the shared, read-only trees (one per key)."""
    return Layout(root).runtimes


def key(m: Manifest) -> str:
    """The shared tree's name: the same node and npm tarballs (by their signed sha256) give
    the same tree."""
    assert m.runtimes is not None
    h = hashlib.sha256(f"bundler node runtime, layout {_LAYOUT}\n".encode())
    for role, ref in (("node", m.runtimes.node), ("npm", m.runtimes.npm)):
        h.update(f"{role} {m.file(ref.tarball).sha256}\n".encode())
    return h.hexdigest()


def shared_ready(root: Path, m: Manifest) -> bool:
    """A tree for this bundle's runtime is in place (by its marker; not verified: for space
    estimates only)."""
    try:
        marker = json.loads((store(root) / key(m) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("key") == key(m)


def install(release: Path, m: Manifest, log: Callable[[str], None], root: Path) -> str:
    """Link `<release>/runtime/node` to the shared tree of the carried Node.js and npm
    (unpacked first if no verified one is there) and check that they run; returns
    "node vX, npm Y"."""
    assert m.runtimes is not None
    dest = home(release)
    if os.path.lexists(dest):
        raise InstallError(f"{dest} exists already", hint="install the bundle again")
    k = key(m)
    shared = store(root) / k
    reused = _usable(shared, k, log)
    if not reused:
        _unpack(release, m, store(root), k)
    make_dir(dest.parent, 0o755)
    os.symlink(os.path.relpath(shared, dest.parent), dest)
    summary = _runs(release, m)
    how = "shared with an earlier release" if reused else "unpacked"
    log(f"Node.js runtime: {summary} ({how}) in {shared}")
    return summary


def _unpack(release: Path, m: Manifest, top: Path, k: str) -> None:
    """Unpack the carried Node.js and npm into a temporary directory beside the tree's place,
    seal it read-only with its digest, and rename it into place."""
    assert m.runtimes is not None
    make_dir(top, 0o755)
    tmp = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=top))
    try:
        node, npm = m.runtimes.node, m.runtimes.npm
        _extract(_verified(release, m, node), tmp)
        npm_dir = tmp / NPM_DIR
        npm_dir.mkdir(parents=True, mode=0o755)
        for d in (tmp / "lib", tmp / "lib" / "node_modules", npm_dir):
            os.chmod(d, 0o755)
        _extract(_verified(release, m, npm), npm_dir)
        bindir = tmp / "bin"
        if not (bindir / "node").is_file():
            raise InstallError(f"the carried {node.name}@{node.version} has no bin/node",
                               hint="the bundle's runtime is not a Node.js build: rebuild it")
        for tool in ("npm", "npx"):
            cli = npm_dir / "bin" / f"{tool}-cli.js"
            if cli.is_file():  # relative, like the official builds' own links
                os.symlink(os.path.relpath(cli, bindir), bindir / tool)
        _seal(tmp)
        marker = tmp / MARKER
        entries = [e.to_json() for e in reuse.scan(tmp, k).entries]  # for `bundle audit`
        marker.write_text(json.dumps({"key": k, "digest": _digest(tmp), "entries": entries},
                                     separators=(",", ":")) + "\n")
        os.chmod(marker, 0o444)
        os.chmod(tmp, 0o555)
        shared = top / k
        if os.path.lexists(shared):  # a damaged tree (see _usable): replaced whole
            _remove(shared)
        os.rename(tmp, shared)
    finally:
        if tmp.exists():
            _remove(tmp)


def _runs(release: Path, m: Manifest) -> str:
    """Run the release's node and npm (through its link): "node vX, npm Y"."""
    assert m.runtimes is not None
    bindir = bin_dir(release)
    node = m.runtimes.node
    if bindir is None:
        raise InstallError(f"the carried {node.name}@{node.version} has no bin/node",
                           hint="the bundle's runtime is not a Node.js build: rebuild it")
    try:
        got = proc.run([bindir / "node", "--version"], what="node --version",
                       timeout=timeouts.PROBE)
        npm_got = proc.run([*(npm_argv(release) or []), "--version"],
                           env=on_path(proc.clean_env(), release), cwd=home(release),
                           what="npm --version", timeout=_NPM_PROBE)
    except CommandError as exc:
        raise InstallError(f"the carried Node.js does not run on this host: "
                           f"{exc.message.splitlines()[0]}",
                           hint="Node.js 18+ needs glibc 2.28 or newer (Debian 10+, RHEL 8+): "
                                "build for this host's CPU, or carry an older Node.js") from None
    have = got.output.strip().lstrip("v")
    if have != node.version:
        raise InstallError(f"the carried node reports {have}, the bundle says {node.version}",
                           hint="the runtime is damaged: rebuild the bundle")
    return f"node v{have}, npm {npm_got.output.strip().splitlines()[-1]}"


def _usable(shared: Path, k: str, log: Callable[[str], None]) -> bool:
    """A tree unpacked earlier is there, safe from other users (StrictModes: else StateError,
    it may have run their code), and exactly as it was sealed. A tree that differs is
    reported and unpacked again."""
    try:
        st = os.lstat(shared)
    except FileNotFoundError:
        return False
    strict.check((shared.parent, "the shared runtimes directory"),
                 (shared, "a shared Node.js runtime"))
    if stat.S_ISDIR(st.st_mode):
        try:
            marker = json.loads((shared / MARKER).read_text())
        except (OSError, ValueError):
            marker = None
        if isinstance(marker, dict) and marker.get("key") == k \
                and marker.get("digest") == _digest(shared):
            return True
    log(f"the shared runtime {shared} is not as it was unpacked: unpacking it again")
    return False


def recorded_entries(shared: Path) -> list[reuse.Entry] | None:
    """The entries the tree's marker recorded when it was sealed (None: an older marker, or
    none)."""
    try:
        marker = json.loads((shared / MARKER).read_text())
        return [reuse.Entry(str(p), str(k), int(m), str(v), bool(h))
                for p, k, m, v, h in marker["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def intact(shared: Path) -> bool:
    """The tree is exactly as it was sealed (its marker's digest)."""
    try:
        marker = json.loads((shared / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("digest") == _digest(shared)


def _seal(top: Path) -> None:
    """Read-only for everyone: files 0444 (0555 if executable), directories 0555."""
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o555 if st.st_mode & 0o111 else 0o444)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o555)


def _digest(top: Path) -> str:
    """Every entry of the tree but the marker: path, type, mode, owner, and the content's
    sha256 or the link's target. Any change, added or missing file gives another digest."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            if rel == MARKER:
                continue
            st = os.lstat(path)
            head = f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0"
            if stat.S_ISLNK(st.st_mode):
                h.update(f"{head}{os.readlink(path)}\n".encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(f"{head}{sha256_file(Path(path))[0]}\n".encode())
            else:
                h.update(f"{head}\n".encode())
    return h.hexdigest()


def prune(root: Path, log: Callable[[str], None]) -> list[str]:
    """Remove the shared trees no release directory under `root` links to, and what an
    interrupted unpack left. Call under the root lock, after releases were pruned."""
    top = store(root)
    if not top.is_dir():
        return []
    used = set()
    releases = Layout(root).releases
    for rel in releases.iterdir() if releases.is_dir() else ():
        link = rel / RUNTIME_DIR
        if link.is_symlink():
            target = Path(os.path.normpath(link.parent / os.readlink(link)))
            if target.parent == top:
                used.add(target.name)
    removed = []
    for entry in sorted(top.iterdir()):
        if entry.name not in used:
            _remove(entry)
            removed.append(entry.name)
    if removed:
        log(f"removed {len(removed)} shared runtime(s) no kept release uses")
    return removed


def _remove(path: Path) -> None:
    """Remove a (sealed) tree: its directories made writable first, for a non-root owner."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(path)


def _verified(release: Path, m: Manifest, ref: NpmRef) -> Path:
    """The staged tarball, once more checked against the signed size and sha256."""
    entry = m.file(ref.tarball)
    path = release / ref.tarball
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise InstallError(f"the runtime tarball {ref.tarball} is missing",
                           hint="the bundle was not fully unpacked: install it again") from None
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise InstallError(f"the runtime tarball {ref.tarball} does not match the manifest",
                           hint="the staged files were changed after verification: install "
                                "the bundle again")
    return path


def _unsafe(tgz: Path, name: str, why: str) -> InstallError:
    return InstallError(f"refusing {tgz.name}: member {name[:200]!r} {why}",
                        hint="the runtime tarball is not a plain npm package: rebuild the "
                             "bundle from the registry's package")


def _inner(tgz: Path, name: str) -> str | None:
    """The member's path below the package's top directory (npm strips the first
    component, whatever it is), checked; None for the top directory itself."""
    if "\0" in name or "\\" in name or name.startswith("/"):
        raise _unsafe(tgz, name, "has an absolute or unusual path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(tgz, name, "climbs out with '..'")
    return "/".join(parts[1:]) or None


def _real_dirs(dest: Path, rel: str, tgz: Path, name: str) -> Path:
    """Create the parents of `rel` as real directories (0755); refuse to go through a
    symlink or a file."""
    here = dest
    for part in rel.split("/")[:-1]:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            os.mkdir(here, 0o755)
            os.chmod(here, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _unsafe(tgz, name, "would be written through a link or a file")
    return here


def _extract(tgz: Path, dest: Path) -> None:
    try:
        with tarfile.open(tgz, mode="r|gz") as tar:
            for member in tar:
                rel = _inner(tgz, member.name)
                if rel is None:
                    continue
                parent = _real_dirs(dest, rel, tgz, member.name)
                target = parent / rel.rsplit("/", 1)[-1]
                if member.isdir():
                    if not target.is_dir() or target.is_symlink():
                        if os.path.lexists(target):
                            raise _unsafe(tgz, member.name, "is a directory and a file")
                        os.mkdir(target, 0o755)
                    os.chmod(target, 0o755)
                elif member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    mode = 0o755 if member.mode & 0o111 else 0o644
                    try:
                        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW, mode)
                    except FileExistsError:
                        raise _unsafe(tgz, member.name, "appears twice") from None
                    with os.fdopen(fd, "wb") as out:
                        os.fchmod(out.fileno(), mode)
                        left = member.size
                        while left > 0:
                            chunk = src.read(min(CHUNK, left))
                            if not chunk:
                                raise _unsafe(tgz, member.name, "is truncated")
                            out.write(chunk)
                            left -= len(chunk)
                elif member.issym():
                    link = member.linkname
                    inside = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link))
                    if link.startswith("/") or inside == ".." or inside.startswith("../"):
                        raise _unsafe(tgz, member.name, f"links outside ({link!r})")
                    try:
                        os.symlink(link, target)
                    except FileExistsError:
                        raise _unsafe(tgz, member.name, "appears twice") from None
                else:
                    raise _unsafe(tgz, member.name, "is not a regular file or directory")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InstallError(f"cannot unpack {tgz.name}: {exc}",
                           hint="the runtime tarball is damaged: install the bundle again"
                           ) from None
