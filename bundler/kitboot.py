"""The target kit's bootstrap: the kit's `__main__.py` (bundler.kit copies this file verbatim).

Standard library only: it runs on `python3 -I -S` before anything else is importable.
Compiled extensions (cryptography, zstandard, psycopg's binary) cannot be imported from inside
a zip, so the kit's `site/` tree is extracted ONCE into a private, versioned directory and put
on sys.path (the way shiv does it):

- where: $BUNDLER_KIT_CACHE, else /var/cache/bundler-kit, else ~/.cache/bundler-kit; the first
  one that can be created with mode 0700 and is owned by this user and writable by no one else;
- as:    <that dir>/<digest>/, where digest is the sha256 of the tree recorded in the kit;
- how:   into a temporary directory beside it, every file hashed while written, the tree's
  digest compared with the recorded one, then renamed into place (atomic: a crash or a
  concurrent run never leaves a half-extracted tree that looks ready).

The kit file itself is checked by the operator against its published sha256 (`<kit>.sha256`).
BUNDLER_KIT_DUMP_MODULES=FILE writes the names of every module loaded, at exit (for tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from typing import NoReturn

META = "kit.json"
SITE = "site/"
READY = ".kit-digest"


def tree_digest(files: Iterable[tuple[str, str, bool]]) -> str:
    """The digest of a tree: (relative path, sha256 hex, executable) of every file, sorted by
    path. bundler.kit records it at build time; the bootstrap checks it after extracting."""
    h = hashlib.sha256()
    for path, sha, executable in sorted(files):
        h.update(f"{path}\0{sha}\0{'x' if executable else '-'}\n".encode())
    return h.hexdigest()


def _die(message: str, hint: str, code: int = 2) -> NoReturn:
    sys.stderr.write(f"error: {message}\nhint: {hint}\n")
    raise SystemExit(code)


def _private_dir(path: str) -> bool:
    """`path` exists (created 0700 if missing), is a real directory owned by this user and
    writable by nobody else."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def cache_base() -> str:
    chosen = os.environ.get("BUNDLER_KIT_CACHE")
    if chosen:
        if not _private_dir(chosen):
            _die(f"BUNDLER_KIT_CACHE={chosen} is not a directory owned by this user and "
                 "writable by no one else", "point it at a private directory (mode 0700)")
        return chosen
    candidates = ["/var/cache/bundler-kit"]
    home = os.path.expanduser("~")
    if home and home != "~":
        candidates.append(os.path.join(home, ".cache", "bundler-kit"))
    for path in candidates:
        if _private_dir(path):
            return path
    _die("no private directory to unpack the kit into (tried " + ", ".join(candidates) + ")",
         "set BUNDLER_KIT_CACHE to a directory owned by this user, mode 0700")


def _is_ready(dest: str, digest: str) -> bool:
    try:
        with open(os.path.join(dest, READY), encoding="ascii") as fh:
            return fh.read().strip() == digest and _private_dir(dest)
    except OSError:
        return False


def _extract(kit: zipfile.ZipFile, base: str, dest: str, digest: str) -> None:
    tmp = tempfile.mkdtemp(prefix=".unpacking-", dir=base)  # mode 0700
    try:
        seen: list[tuple[str, str, bool]] = []
        for info in kit.infolist():
            if not info.filename.startswith(SITE) or info.is_dir():
                continue
            rel = info.filename[len(SITE):]
            parts = rel.split("/")
            if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
                _die(f"the kit holds an unsafe path {info.filename!r}",
                     "the kit is damaged or forged: compare its sha256 with the published one")
            target = os.path.join(tmp, *parts)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            executable = bool((info.external_attr >> 16) & 0o111)
            h = hashlib.sha256()
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o700 if executable else 0o600)
            with kit.open(info) as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(1024 * 1024):
                    h.update(chunk)
                    out.write(chunk)
            seen.append((rel, h.hexdigest(), executable))
        if tree_digest(seen) != digest:
            _die("the kit's contents do not match the digest it records",
                 "the kit is damaged: copy it again and compare its sha256 with the published "
                 "one")
        with open(os.path.join(tmp, READY), "w", encoding="ascii") as fh:
            fh.write(digest + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_ready(dest, digest):  # not another run that won the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def invocation(kit: str) -> str:
    """The command line that runs this kit, for hints that tell the operator what to run next:
    the interpreter as typed when it was found on PATH (else its absolute path), the isolated
    flags, the kit by its absolute path (so the line works from any directory)."""
    import shlex

    typed = (getattr(sys, "orig_argv", None) or [""])[0]
    python = typed if typed and "/" not in typed else (sys.executable or "python3")
    return " ".join(shlex.quote(w) for w in (python, "-I", "-S", kit))


def _dump_modules(path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(sorted(sys.modules)) + "\n")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))  # the kit file (zipimport: kit/__main__.py)
    with zipfile.ZipFile(here) as kit:
        meta = json.loads(kit.read(META))
        want = tuple(int(x) for x in str(meta["python"]).split("."))
        if sys.version_info[:2] != want:
            _die(f"this kit is for CPython {meta['python']} (its compiled wheels are); this is "
                 f"{sys.version_info[0]}.{sys.version_info[1]}",
                 f"run it with python{meta['python']}, or make a kit for this host: "
                 f"`bundle kit --python {sys.version_info[0]}.{sys.version_info[1]}`")
        digest = str(meta["digest"])
        base = cache_base()
        dest = os.path.join(base, digest)
        if not _is_ready(dest, digest):
            _extract(kit, base, dest, digest)
    sys.path[:] = [dest] + [p for p in sys.path if os.path.abspath(p or ".") != here]
    dump = os.environ.get("BUNDLER_KIT_DUMP_MODULES")
    if dump:
        import atexit

        atexit.register(_dump_modules, dump)
    from bundler.cli.kitmain import main as bundle

    sys.argv[0] = "bundle"
    bundle(invocation(here))


if __name__ == "__main__":
    main()
