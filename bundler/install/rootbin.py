"""The install root's own `bundle` command: `<root>/bin/`, so that every later command and the
boot unit work without the stick the kit came on (issue 17 §3).

At each install's commit bundler puts there:

- from the kit (`python3 -I -S KIT ...`): a copy of the running kit,
  `bin/bundler-kit-....pyz` under the kit's own file name, and a `bin/bundle` shell wrapper
  that runs it (`exec PYTHON -I -S <root>/bin/KIT "$@"`). The copy is verified before it
  takes its name: its site/ tree must hash to the digest its kit.json records, and that
  digest must be the one of the kit now running (a stick file swapped mid-run is refused); a
  `<kit>.sha256` beside the source kit (as `bundle export` writes it) must match too.
- from a normal installation (a venv, pip): only the wrapper, running that interpreter's
  bundler (`exec PYTHON -I -m bundler "$@"`): that installation must stay where it is.

Root-owned, 0755, written atomically. Every change returns its undo; kits the wrapper no
longer names are pruned after a successful commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bundler
from bundler.bundle import kitboot
from bundler.errors import IntegrityError, StateError
from bundler.fsutil import CHUNK, atomic_write_bytes, make_dir
from bundler.install import strict
from bundler.install.layout import Layout

WRAPPER = "bundle"
KIT_GLOB = "bundler-kit-*.pyz"
MARK = "# Written by bundler"

Undo = Callable[[], None]


@dataclass(frozen=True)
class Running:
    """How this bundler runs: from a kit file (`kit`, with the digest of its site/ tree), or
    from a normal installation (kit None)."""

    python: str
    kit: Path | None = None
    digest: str | None = None


def running() -> Running:
    """The kit's bootstrap (bundler/bundle/kitboot.py) runs as `__main__` from inside the kit file
    (`<kit>/__main__.py`) and unpacks site/ into a directory named by its digest, where the
    bootstrap's READY file records it: both are read back here."""
    python = sys.executable or "/usr/bin/python3"
    main = sys.modules.get("__main__")
    where = getattr(main, "__file__", None)
    if not where or getattr(main, "META", None) != kitboot.META:
        return Running(python)
    kit = Path(where).parent.absolute()  # INSTALL.txt runs it by a relative name
    tree = Path(bundler.__file__).resolve().parent.parent
    try:
        digest = (tree / kitboot.READY).read_text(encoding="ascii").strip()
    except OSError:
        return Running(python)
    return Running(python, kit, digest) if zipfile.is_zipfile(kit) else Running(python)


def wrapper_text(python: str, kit: Path | None) -> str:
    target = (f"{shlex.quote(python)} -I -S {shlex.quote(str(kit))}" if kit is not None
              else f"{shlex.quote(python)} -I -m bundler")
    return (f"#!/bin/sh\n{MARK} at each install: this root's own bundler "
            f"({'the kit' if kit else 'the installation'} that installed its current release)."
            f"\nexec {target} \"$@\"\n")


def command(layout: Layout) -> Path:
    return layout.bin / WRAPPER


def wrapped_kit(layout: Layout) -> Path | None:
    """The kit `bin/bundle` runs, if it runs one under bin/."""
    try:
        text = command(layout).read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("exec "):
            words = shlex.split(line)
            found = [Path(w) for w in words if w.endswith(".pyz")]
            return found[0] if found else None
    return None



def kit_digest(path: Path) -> str:
    """The digest of a kit's site/ tree, computed from its members (not taken from kit.json):
    IntegrityError unless it is also the digest kit.json records."""
    try:
        with zipfile.ZipFile(path) as kit:
            meta = json.loads(kit.read(kitboot.META))
            seen = []
            for info in kit.infolist():
                if not info.filename.startswith(kitboot.SITE) or info.is_dir():
                    continue
                h = hashlib.sha256()
                with kit.open(info) as src:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                seen.append((info.filename[len(kitboot.SITE):], h.hexdigest(),
                             bool((info.external_attr >> 16) & 0o111)))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"{path} is not a readable bundler kit ({exc})",
                             hint="copy the kit again from its source") from None
    digest = kitboot.tree_digest(seen)
    if digest != meta.get("digest"):
        raise IntegrityError(f"{path}: its contents do not match the digest its kit.json "
                             "records", hint="the kit is damaged: copy it again and compare "
                                             "its sha256 with the published one")
    return digest


def _published_sha256(kit: Path) -> str | None:
    """The sha256 `bundle export` wrote beside the kit (`<kit>.sha256`), if there is one."""
    try:
        return kit.with_name(kit.name + ".sha256").read_text(encoding="ascii").split()[0]
    except (OSError, IndexError):
        return None


def _copy_kit(src: Path, bindir: Path, digest: str) -> tuple[Path, Undo]:
    """Copy the running kit into bin/ under its own name, verified; return it and its undo."""
    dest = bindir / src.name
    if dest.is_file() and not dest.is_symlink():
        with contextlib.suppress(IntegrityError):
            if kit_digest(dest) == digest:
                return dest, lambda: None  # this very kit is there already
    fd, tmp_name = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".tmp", dir=bindir)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, src.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        published = _published_sha256(src)
        if published is not None and published != h.hexdigest():
            raise IntegrityError(f"the kit {src} differs from its published sha256 "
                                 f"({src.name}.sha256)", hint="copy the kit again from its "
                                                              "source")
        copied = kit_digest(tmp)
        if copied != digest:
            raise IntegrityError(f"the kit {src} is not the kit that is running (its digest "
                                 "changed since it started)",
                                 hint="the file was replaced while bundler ran: check the "
                                      "stick and run the command again")
        os.chmod(tmp, 0o755)
        old = dest.with_name(f".{dest.name}.old")
        had = dest.exists()
        if had:
            os.replace(dest, old)
        os.replace(tmp, dest)
        atomic_write_bytes(dest.with_name(dest.name + ".sha256"),
                           f"{h.hexdigest()}  {dest.name}\n".encode())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    def undo() -> None:
        if had:
            os.replace(old, dest)
        else:
            dest.unlink(missing_ok=True)
            dest.with_name(dest.name + ".sha256").unlink(missing_ok=True)

    return dest, undo


def place(layout: Layout, how: Running | None = None) -> tuple[Path, Undo]:
    """Put this bundler into `<root>/bin/` (see the module doc); return the wrapper's path
    and the undo of everything this call changed. Call under the root lock."""
    how = how or running()
    bindir = layout.bin
    why = strict.problem(bindir)
    if why is not None:
        raise StateError(f"{bindir} {why}: the boot unit runs what it holds as root",
                         hint=f"chown root: {bindir} && chmod 755 {bindir}, or remove it")
    created = not bindir.exists()
    make_dir(bindir, 0o755)
    undos: list[Undo] = []
    if created:
        undos.append(lambda: _rmdir_quietly(bindir))
    try:
        kit = None
        if how.kit is not None and how.digest is not None:
            if how.kit.resolve().parent == bindir.resolve():
                kit = how.kit.resolve()  # run from bin/ already: nothing to copy
            else:
                kit, undo_kit = _copy_kit(how.kit, bindir, how.digest)
                undos.append(undo_kit)
        wrapper = command(layout)
        text = wrapper_text(how.python, kit).encode()
        try:
            before: bytes | None = wrapper.read_bytes()
        except FileNotFoundError:
            before = None
        if before != text:
            atomic_write_bytes(wrapper, text, mode=0o755)
            undos.append(lambda: _put_back(wrapper, before))
    except BaseException:
        _run_all(undos)
        raise
    return wrapper, lambda: _run_all(undos)


def prune(layout: Layout, keep_running: Running | None = None) -> list[str]:
    """Remove the kits in bin/ that the wrapper no longer runs (never the one running now);
    also the `.old` copies an earlier place() kept for its undo. Best effort."""
    bindir = layout.bin
    keep = {p.resolve() for p in (wrapped_kit(layout), (keep_running or running()).kit) if p}
    removed = []
    for path in sorted(bindir.glob(KIT_GLOB)) + sorted(bindir.glob(".bundler-kit-*.old")):
        if path.resolve() in keep:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _put_back(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_bytes(path, data, mode=0o755)


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _run_all(undos: list[Undo]) -> None:
    """Undo in reverse order; each one runs even if an earlier one failed."""
    for undo in reversed(undos):
        with contextlib.suppress(Exception):
            undo()
