"""The target kit's bootstrap: the kit's `__main__.py` (bundler.build.kit copies this file
verbatim).

Standard library only (it runs on `python3 -I -S`): extracts the kit's `site/` ONCE into a
private directory that is safe as sshd's StrictModes has it, checks it against the digest the
kit records, puts the checked canonical path on sys.path and runs kit.json's entry point.
Where, how, and why it is safe for root: docs/kit.md.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import pwd
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
REFUSED = 2  # the kit's own refusals (before bundler, and its error codes, can be imported)
NO_SPACE = 9  # bundler.errors.SpaceError's code
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def kit_file_name(version: str, python: str, platform: str) -> str:
    """The kit's file name: bundler's version, the CPython its compiled wheels are for, and
    the target platform (`bundler-kit-0.1.0-cp311-manylinux_2_28_x86_64.pyz`)."""
    return f"bundler-kit-{version}-cp{python.replace('.', '')}-{platform}.pyz"


def tree_digest(files: Iterable[tuple[str, str, bool]]) -> str:
    """The digest of a tree: (relative path, sha256 hex, executable) of every file, sorted by
    path. bundler.build.kit records it at build time; the bootstrap checks it after extracting."""
    h = hashlib.sha256()
    for path, sha, executable in sorted(files):
        h.update(f"{path}\0{sha}\0{'x' if executable else '-'}\n".encode())
    return h.hexdigest()


def _die(message: str, hint: str, code: int = REFUSED) -> NoReturn:
    sys.stderr.write(f"error: {message}\nhint: {hint}\n")
    raise SystemExit(code)


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def unsafe(path: str, leaf: bool = True) -> str | None:
    """Why `path` (absolute, canonical) is no safe place for this user's code, or None.

    Every component from / down (lstat: a link found here was swapped in after the path was
    resolved) must be a directory owned by root or this user, not writable by group or others
    unless sticky; `leaf`: the last one must be this user's and never writable by others."""
    uid = os.geteuid()
    parts = [p for p in path.split("/") if p]
    current = "/"
    for depth in range(len(parts) + 1):
        current = os.path.join(current, parts[depth - 1]) if depth else "/"
        last = leaf and depth == len(parts)
        try:
            st = os.lstat(current)
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return f"{current} is a symbolic link"
        if not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        if st.st_uid != uid and (last or st.st_uid != 0):
            return f"{current} is owned by {_owner(st.st_uid)}"
        if st.st_mode & 0o022 and (last or not st.st_mode & stat.S_ISVTX):
            return (f"{current} is writable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def safe_dir(path: str) -> tuple[str | None, str]:
    """(canonical path, "") of `path` made a safe private directory, or (None, why not).

    The existing part of the path is checked before any missing component is created (mode
    0700, each under a checked parent); the whole is checked again after."""
    path = os.path.abspath(path)
    head, missing = path, []
    while not os.path.lexists(head):
        head, tail = os.path.split(head)
        missing.append(tail)
    real = os.path.realpath(head)
    why = unsafe(real, leaf=not missing)
    if why:
        return None, why
    for name in reversed(missing):
        real = os.path.join(real, name)
        try:
            os.mkdir(real, 0o700)
        except FileExistsError:
            pass  # made at the same moment by another run: checked below like any
        except OSError as exc:
            return None, f"cannot create {real}: {exc.strerror}"
    real = os.path.realpath(path)
    why = unsafe(real)
    return (None, why) if why else (real, "")


def _home_candidates() -> list[str]:
    """The user's own cache dir. Root's comes from the password database: $HOME may be
    another user's (sudo keeps it), whose owner could swap the tree root then imports."""
    if os.geteuid() == 0:
        try:
            home = pwd.getpwuid(0).pw_dir
        except KeyError:
            return []
    else:
        home = os.path.expanduser("~")
        if not home or home == "~":
            return []
    return [os.path.join(home, ".cache", "bundler-kit")]


def cache_base() -> str:
    """The canonical path of the directory to unpack into (see the module's docstring)."""
    chosen = os.environ.get("BUNDLER_KIT_CACHE")
    if chosen:
        real, why = safe_dir(chosen)
        if real is None:
            _die(f"BUNDLER_KIT_CACHE={chosen} is not safe to unpack code into: {why}",
                 "use a directory of this user (mode 0700) whose every parent is owned by "
                 "root or this user and writable by no one else, or unset it")
        return real
    tried = []
    for path in ["/var/cache/bundler-kit", *_home_candidates()]:
        real, why = safe_dir(path)
        if real is not None:
            return real
        tried.append(f"{path}: {why}")
    _die("no safe private directory to unpack the kit into (" + "; ".join(tried) + ")",
         "set BUNDLER_KIT_CACHE to a directory of this user (mode 0700) whose every parent "
         "is owned by root or this user and writable by no one else")


def _is_ready(dest: str, digest: str) -> bool:
    """`dest` holds the tree of `digest`, safely (every component checked now)."""
    if unsafe(dest) is not None:
        return False
    try:
        fd = os.open(os.path.join(dest, READY), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, encoding="ascii") as fh:
            return fh.read().strip() == digest
    except (OSError, UnicodeDecodeError):
        return False


def _site_members(kit: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    out = []
    for info in kit.infolist():
        if not info.filename.startswith(SITE) or info.is_dir():
            continue
        rel = info.filename[len(SITE):]
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            _die(f"the kit holds an unsafe path {info.filename!r}",
                 "the kit is damaged or forged: compare its sha256 with the published one")
        out.append((info, rel))
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e6:.1f} MB"


def _no_space(base: str, need: int, free: int | None) -> NoReturn:
    have = f", {_mb(free)} free" if free is not None else ""
    _die(f"no space to unpack the kit into {base}: it needs {_mb(need)}{have}",
         f"free space in {base} or set BUNDLER_KIT_CACHE to a directory of this user (mode "
         f"0700) on a filesystem with {_mb(need)} free", NO_SPACE)


def _check_space(base: str, members: list[tuple[zipfile.ZipInfo, str]]) -> int:
    """The bytes the tree takes (whole blocks); refuses up front when they are not free."""
    try:
        st = os.statvfs(base)
    except OSError:
        return sum(info.file_size for info, _ in members)
    block = st.f_frsize or st.f_bsize or 4096
    need = sum(-(-info.file_size // block) * block for info, _ in members)
    if st.f_blocks and need > st.f_bavail * block:
        _no_space(base, need, st.f_bavail * block)
    return need


def _extract(kit: zipfile.ZipFile, base: str, dest: str, digest: str) -> None:
    members = _site_members(kit)
    need = _check_space(base, members)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=".unpacking-", dir=base)  # mode 0700
        seen: list[tuple[str, str, bool]] = []
        for info, rel in members:
            target = os.path.join(tmp, *rel.split("/"))
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
    except OSError as exc:
        if exc.errno in _SPACE_ERRNOS:
            _no_space(base, need, None)
        _die(f"cannot unpack the kit into {base}: {exc.strerror}"
             + (f" ({exc.filename})" if exc.filename else ""),
             "set BUNDLER_KIT_CACHE to a writable directory of this user (mode 0700)")
    finally:
        if tmp is not None:
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


def _check_python(meta: dict[str, object]) -> None:
    want = tuple(int(x) for x in str(meta["python"]).split("."))
    if sys.version_info[:2] == want:
        return
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    other = kit_file_name(str(meta["bundler"]), here, str(meta["platform"]))
    _die(f"this kit is for CPython {meta['python']} (its compiled wheels are); this is {here}",
         f"run it with python{meta['python']}, or use {other}: `bundle kit --python {here} "
         f"--platform {meta['platform']}` makes it")


def unpack(kit_file: str) -> str:
    """The canonical path of the kit's checked, unpacked `site/` tree (unpacked now if need
    be); exits with one line on any refusal."""
    with zipfile.ZipFile(kit_file) as kit:
        meta = json.loads(kit.read(META))
        _check_python(meta)
        digest = str(meta["digest"])
        base = cache_base()
        dest = os.path.join(base, digest)
        if not _is_ready(dest, digest):
            _extract(kit, base, dest, digest)
            if not _is_ready(dest, digest):  # checked again after the rename, as it is used
                _die(f"the kit's unpacked tree {dest} changed while it was being put in place: "
                     f"{unsafe(dest) or 'its digest file does not match'}",
                     "find out who else can write there; set BUNDLER_KIT_CACHE to a "
                     "directory of this user (mode 0700)")
    return dest


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))  # the kit file (zipimport: kit/__main__.py)
    dest = unpack(here)
    sys.path[:] = [dest] + [p for p in sys.path if os.path.abspath(p or ".") != here]
    dump = os.environ.get("BUNDLER_KIT_DUMP_MODULES")
    if dump:
        import atexit

        atexit.register(_dump_modules, dump)
    # The command line's entry point, as kit.json names it (`module:function`, written by
    # `bundle kit`): the bootstrap is the kit's format, and imports no command of its own.
    with zipfile.ZipFile(here) as kit:
        module, _, function = str(json.loads(kit.read(META))["entry"]).partition(":")
    bundle = getattr(importlib.import_module(module), function)
    sys.argv[0] = "bundle"
    bundle(invocation(here))


if __name__ == "__main__":
    main()
