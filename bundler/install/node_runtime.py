"""The Node.js runtime a bundle carries, unpacked into `<release>/runtime/node/`.

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
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

from bundler import proc
from bundler.errors import CommandError, InstallError
from bundler.fsutil import CHUNK
from bundler.manifest import Manifest
from bundler.models import NpmRef

RUNTIME_DIR = Path("runtime") / "node"
NPM_DIR = Path("lib") / "node_modules" / "npm"


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


def install(release: Path, m: Manifest, log: Callable[[str], None]) -> str:
    """Unpack the carried Node.js and npm into `<release>/runtime/node` and check that they
    run; returns "node vX, npm Y"."""
    assert m.runtimes is not None
    dest = home(release)
    if dest.exists():
        raise InstallError(f"{dest} exists already", hint="install the bundle again")
    dest.mkdir(parents=True, mode=0o755)
    os.chmod(dest, 0o755)
    node, npm = m.runtimes.node, m.runtimes.npm
    _extract(_verified(release, m, node), dest)
    npm_dir = dest / NPM_DIR
    npm_dir.mkdir(parents=True, mode=0o755)
    for d in (dest / "lib", dest / "lib" / "node_modules", npm_dir):
        os.chmod(d, 0o755)
    _extract(_verified(release, m, npm), npm_dir)
    bindir = dest / "bin"
    if not (bindir / "node").is_file():
        raise InstallError(f"the carried {node.name}@{node.version} has no bin/node",
                           hint="the bundle's runtime is not a Node.js build: rebuild it")
    for tool in ("npm", "npx"):
        cli = npm_dir / "bin" / f"{tool}-cli.js"
        if cli.is_file():  # relative, like the official builds' own links
            os.symlink(os.path.relpath(cli, bindir), bindir / tool)
    try:
        got = proc.run([bindir / "node", "--version"], what="node --version", timeout=60)
        npm_got = proc.run([*(npm_argv(release) or []), "--version"],
                           env=on_path(proc.clean_env(), release), cwd=dest,
                           what="npm --version", timeout=120)
    except CommandError as exc:
        raise InstallError(f"the carried Node.js does not run on this host: "
                           f"{exc.message.splitlines()[0]}",
                           hint="Node.js 18+ needs glibc 2.28 or newer (Debian 10+, RHEL 8+): "
                                "build for this host's CPU, or carry an older Node.js") from None
    have = got.output.strip().lstrip("v")
    if have != node.version:
        raise InstallError(f"the carried node reports {have}, the bundle says {node.version}",
                           hint="the runtime is damaged: rebuild the bundle")
    summary = f"node v{have}, npm {npm_got.output.strip().splitlines()[-1]}"
    log(f"Node.js runtime: {summary} in {dest}")
    return summary


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
