"""`bundle export BUNDLE DEST`: the USB step.

Writes onto DEST (a mounted stick, or any directory) everything an air-gapped host needs: the
bundle (split into a volume set when DEST's filesystem cannot hold a file that large), the kit
that runs bundler there, the public key (or the root document a bundle under a root of trust
carries), and INSTALL.txt (`install_txt`: the sha256 of each file and the exact commands).
Before writing anything it verifies the bundle, works out every file's bytes and sha256,
refuses a different file already under one of those names, and checks free space. Each file
is written under a temp name, fsynced, its page cache dropped, read back in full and compared
with the source's sha256, and only then renamed to its final name (and the directory
fsynced): DEST never holds a half-written or unverified file under a final name. A failure
removes what this run had written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from bundler import __version__, ui
from bundler.build import install_txt
from bundler.build.cache import Cache
from bundler.bundle import archive, volumes
from bundler.bundle.kitboot import META as KIT_META
from bundler.bundle.kitboot import kit_file_name
from bundler.bundle.manifest import Manifest, required_version
from bundler.bundle.models import Target
from bundler.bundle.signing import TrustedKey, key_id, load_private_key, load_public_key
from bundler.errors import (
    ExportError,
    IntegrityError,
    PolicyError,
    SignatureError,
    SigningKeyError,
    SpaceError,
)
from bundler.faults import corrupt_point
from bundler.fsutil import CHUNK, human_bytes, sha256_file

KIT_PREFIX = "bundler-kit-"
KIT_SUFFIX = ".pyz"
# bundler-kit-VERSION-cpXY-PLATFORM.pyz (kits made before the Python was in the name: no cpXY)
_KIT_RE = re.compile(r"^bundler-kit-(?P<version>[^-]+)-(?:cp(?P<python>[0-9]{2,3})-)?"
                     r"(?P<platform>[A-Za-z0-9_.]+)\.pyz$")
INSTRUCTIONS = install_txt.NAME
# Filesystems that cap a file at 4 GiB - 1 (kernel FAT drivers, and fusefat's FUSE one).
FAT_TYPES = frozenset({"vfat", "msdos", "fat", "umsdos", "fuse.fusefat"})
FAT_MAX_FILE = 4 * 1024**3 - 1
# Test hook: the per-file limit of a FAT filesystem, in bytes, so that a test can exercise the
# automatic split on a small FAT32 image instead of writing 4 GiB. Never set it otherwise.
TEST_MAX_FILE_ENV = "BUNDLER_TEST_MAX_FILE"
TMP_SUFFIX = ".export-tmp"


@dataclass
class Item:
    """One file `bundle export` puts on DEST."""

    name: str
    role: str                  # bundle, head, part, index, kit, kit-sha256, key or root,
                               # instructions
    size: int
    sha256: str
    source: Path | None = None  # copied whole from this file
    data: bytes | None = None   # or written from memory
    in_stream: bool = False     # or a slice of the bundle stream (a part of a new split)
    status: str = "pending"     # then: written, replaced, or unchanged (identical, there)
    replaces: bool = False      # an earlier export's INSTALL.txt is there: written over it

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "size": self.size,
                "sha256": self.sha256, "status": self.status}


@dataclass(frozen=True)
class ExportResult:
    dest: Path
    manifest: Manifest
    keyid: str
    items: tuple[Item, ...]
    fs_type: str
    max_file: int | None
    split: bool
    kit: Path
    kit_source: str  # given (--kit), found (next to the bundle), cached or built
    pub: Path        # the public key found (--pub, or the one that verifies the bundle)
    # A bundle under a root of trust: the latest root document it carries, put on DEST for
    # `trust init` instead of the public key (which such a host does not use).
    root_doc: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"dest": str(self.dest), "name": self.manifest.name,
                "version": self.manifest.version, "keyid": self.keyid,
                "fs_type": self.fs_type, "max_file_size": self.max_file, "split": self.split,
                "kit": str(self.kit), "kit_source": self.kit_source, "pub": str(self.pub),
                "root_metadata": self.root_doc,
                "files": [i.to_json() for i in self.items]}


# ---- the kit ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class KitName:
    """What a kit's file name says: `bundler-kit-<version>-cp<XY>-<platform>.pyz`."""

    version: str
    python: str | None  # "3.11"; None for a name from before the Python was in it
    platform: str


def kit_name_fields(name: str) -> KitName | None:
    match = _KIT_RE.match(name)
    if match is None:
        return None
    cp = match["python"]
    return KitName(match["version"], f"{cp[0]}.{cp[1:]}" if cp else None, match["platform"])


def find_kit(bundle_dir: Path, target: Target) -> Path:
    """The kit for a bundle's target: the newest `bundler-kit-<version>-cp<XY>-<platform>.pyz`
    of its CPython and platform in the bundle's directory (as `bundle build --with-kit` and
    `bundle kit --out DIR` write it). Raises ExportError if there is none (`kit_for` then
    builds one)."""
    pattern = f"{KIT_PREFIX}*-{_cp(target.python)}-{target.platform}{KIT_SUFFIX}"
    found: list[tuple[Version, float, Path]] = []
    for path in bundle_dir.glob(pattern):
        fields = kit_name_fields(path.name)
        wanted = fields is not None and fields.python == target.python \
            and fields.platform == target.platform
        if fields is None or not wanted or not path.is_file():
            continue
        try:
            found.append((Version(fields.version), path.stat().st_mtime, path))
        except InvalidVersion:
            continue
    if not found:
        raise ExportError(f"no kit for CPython {target.python} on {target.platform} next to "
                          f"the bundle (no {pattern} in {bundle_dir})",
                          hint="build with --with-kit or run `bundle kit --out DIR` (or pass "
                               "--kit FILE)")
    return max(found)[2]


def _cp(python: str) -> str:
    return "cp" + python.replace(".", "")


KIT_CACHE_DIR = "kits"


def _kit_key(manifest: Manifest, with_compose: bool, from_installed: bool) -> str:
    """What a built kit depends on: bundler's version and the bytes of every module the kit
    carries (and its bootstrap), the target, compose or not, and where its wheels came from."""
    from bundler.build.kit import target_modules
    from bundler.bundle import kitboot

    h = hashlib.sha256()
    h.update(repr((__version__, manifest.target.platform, manifest.target.python,
                   with_compose, from_installed)).encode())
    for name, path in [("__main__", Path(kitboot.__file__)), *target_modules().items()]:
        h.update(f"{name}\0{sha256_file(path)[0]}\n".encode())
    return h.hexdigest()[:24]


def kit_for(bundle_dir: Path, manifest: Manifest, cache: Cache, *,
            from_installed: bool = False) -> tuple[Path, str]:
    """The kit to export with a bundle, and where it came from ("found", "cached", "built"):
    the newest one next to the bundle (`find_kit`), else one built here for the bundle's
    target (its platform and CPython; with the compose binary when the bundle has a compose
    project) into `<cache>/kits/<key>/`, where a kit built earlier from the same bundler
    code for the same target is reused (no network needed then)."""
    try:
        return find_kit(bundle_dir, manifest.target), "found"
    except ExportError:
        pass
    from bundler.build.kit import build_kit, checksum_path, kit_name

    with_compose = manifest.runtime.compose is not None
    out = cache.root / KIT_CACHE_DIR / _kit_key(manifest, with_compose, from_installed)
    path = out / kit_name(manifest.target)
    side = checksum_path(path)
    if path.is_file() and side.is_file():
        listed = side.read_text(errors="replace").split()
        if listed and listed[0].lower() == sha256_file(path)[0]:
            ui.note(f"no kit next to the bundle: using {path.name} built earlier ({out})")
            return path, "cached"
    ui.step(f"No kit next to the bundle: making one for CPython {manifest.target.python} on "
            f"{manifest.target.platform}" + (" (with compose)" if with_compose else ""))
    made = build_kit(out, manifest.target, cache, ui.note, from_installed=from_installed,
                     with_compose=with_compose)
    ui.note(f"wrote {made.path} (sha256 {made.sha256})")
    return made.path, "built"


def _kit_meta(kit: Path) -> dict[str, Any] | None:
    """The kit.json a kit records (its Python and platform), or None if it is not a kit."""
    try:
        with zipfile.ZipFile(kit) as zf:
            meta = json.loads(zf.read(KIT_META))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return meta if isinstance(meta, dict) else None


def _check_kit(kit: Path, manifest: Manifest) -> str:
    """The kit's sha256, after checking it against its .sha256 file (if any), its Python,
    platform and version against what the bundle needs."""
    if not kit.is_file():
        raise ExportError(f"kit {kit} is not a file", hint="pass --kit FILE (a bundler-kit-"
                          "VERSION-cpXY-PLATFORM.pyz)")
    sha, _size = sha256_file(kit)
    side = kit.with_name(kit.name + ".sha256")
    if side.is_file():
        listed = side.read_text(errors="replace").split()
        if not listed or listed[0].lower() != sha:
            raise IntegrityError(f"kit {kit.name} does not match {side.name} (its sha256 is "
                                 f"{sha})", hint="the kit was damaged or replaced: build it "
                                                 "again with `bundle kit --out DIR`")
    target = manifest.target
    meta = _kit_meta(kit) or {}
    fields = kit_name_fields(kit.name)
    python = str(meta.get("python") or (fields.python if fields else "") or "")
    platform = str(meta.get("platform") or (fields.platform if fields else "") or "")
    if fields is None and not meta:
        ui.note(f"cannot tell {kit.name}'s version, Python or platform from its name "
                f"(expected {KIT_PREFIX}VERSION-cpXY-PLATFORM{KIT_SUFFIX})")
        return sha
    right = kit_file_name(__version__, target.python, target.platform)
    if platform and platform != target.platform:
        raise PolicyError(f"kit {kit.name} is for {platform}; bundle {manifest.name} "
                          f"{manifest.version} is for {target.platform}",
                          hint=f"use a kit for {target.platform} ({right})")
    if python and python != target.python:
        raise PolicyError(f"kit {kit.name} is for CPython {python}; bundle {manifest.name} "
                          f"{manifest.version} is for CPython {target.python} (a kit's "
                          "compiled wheels are for one Python)",
                          hint=f"use {right} (`bundle kit --python {target.python} "
                               f"--platform {target.platform} --out DIR`)")
    version = str(meta.get("bundler") or (fields.version if fields else ""))
    need = required_version(manifest)
    with contextlib.suppress(InvalidVersion):
        if need is not None and version and Version(version) < Version(need):
            raise PolicyError(f"kit {kit.name} is bundler {version}; bundle {manifest.name} "
                              f"{manifest.version} needs bundler {need} or newer",
                              hint="use the kit built with the bundle (`bundle kit --out "
                                   "DIR`)")
    return sha


# ---- the destination's filesystem ----------------------------------------------------------

def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_type(path: Path, mounts: str = "/proc/mounts") -> str:
    """The type of the filesystem holding `path` ("vfat", "ext4", ...), from the mount table:
    the longest mount point that contains it (the last one mounted, if stacked)."""
    real = os.path.realpath(path)
    best, fs_type = "", "unknown"
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return fs_type
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fs_type = point, fields[2]
    return fs_type


def max_file_size(path: Path, fs_type: str) -> int | None:
    """The largest file DEST's filesystem holds, or None for no practical limit."""
    fat = fs_type in FAT_TYPES
    with contextlib.suppress(OSError):
        fat = fat or os.statvfs(path).f_namemax == 12  # 8.3 names only: msdos
    if not fat:
        return None
    hook = os.environ.get(TEST_MAX_FILE_ENV)
    return int(hook) if hook and hook.isdigit() else FAT_MAX_FILE


def _space(path: Path) -> tuple[int | None, int]:
    """(free bytes, allocation unit) of DEST; free is None when the filesystem does not report
    its size (some FUSE filesystems)."""
    st = os.statvfs(path)
    unit = st.f_frsize or st.f_bsize or 1
    if st.f_blocks == 0:
        return None, unit
    return st.f_bavail * unit, unit


# ---- planning ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """The bundle as given: one file, or a volume set (its verified index)."""

    path: Path
    name: str                          # the bundle's base name, NAME-VERSION.bundle
    directory: Path
    index: volumes.PartIndex | None
    index_file: Path | None
    head: Path | None = None           # a volume set's head (NAME.000), if it has one

    @property
    def size(self) -> int:
        if self.index is None:
            return self.path.stat().st_size
        return self.index.total_size + (self.head.stat().st_size if self.head else 0)

    @contextlib.contextmanager
    def stream(self) -> Iterator[io.RawIOBase]:
        """The whole bundle's bytes (a volume set's parts hashed as they stream)."""
        if self.index is None:
            with open(self.path, "rb", buffering=0) as raw:
                yield raw
            return
        assert self.index_file is not None
        if self.head is None:
            with volumes.PartsReader(self.index_file.parent, self.index) as parts:
                yield parts
            return
        with volumes.VolumeSet(self.index_file) as whole:
            whole.attach(self.index, hash_parts=True)  # verified by `export` already
            yield whole


def _key_files(directory: Path, key_path: Path | None) -> list[Path]:
    """Where a bundle's public key may be, as `bundle keygen` and `bundle build --out` lay
    files out: NAME.pub beside the --key NAME.key, any *.pub in the bundle's directory,
    beside --key, and in the current directory (the Quick start's release.pub)."""
    dirs = [directory, *([key_path.parent] if key_path else []), Path.cwd()]
    paths = [*([key_path.with_suffix(".pub")] if key_path else []),
             *(p for d in dirs for p in sorted(d.glob("*.pub")))]
    seen: set[Path] = set()
    out = []
    for path in paths:
        real = path.resolve()
        if real not in seen and path.is_file():
            seen.add(real)
            out.append(path)
    return out


def _public_key(bundle: Path, directory: Path, pub: Path | None,
                key_path: Path | None) -> TrustedKey:
    """--pub, or the public key found (`_key_files`) that verifies the bundle's signature."""
    if pub is not None:
        trusted = load_public_key(pub)
        ui.note(f"public key: {pub} (key id {trusted.keyid}, given)")
        return trusted
    files = _key_files(directory, key_path)
    candidates = []
    for path in files:
        try:
            candidates.append(load_public_key(path))
        except SigningKeyError as exc:  # e.g. an ssh key: not ours, not a reason to stop
            ui.note(f"skipping {path}: {exc.message}")
    where = ", ".join(str(d) for d in dict.fromkeys(
        [directory, *([key_path.parent] if key_path else []), Path.cwd()]))
    hint = ("pass --pub NAME.pub: the NAME.pub that `bundle keygen NAME` wrote beside the "
            "NAME.key the bundle was built with")
    if not candidates:
        raise SigningKeyError(f"no public key given and no *.pub found to verify {bundle} "
                              f"(looked in {where})", hint=hint)
    try:
        keyid = archive.manifest_of(bundle, candidates).keyid
    except SignatureError as exc:
        if "which is not trusted" not in exc.message:
            raise  # a key found did sign it, and the bundle is damaged: that error it is
        raise SigningKeyError(f"none of the public keys found verifies {bundle}'s signature "
                              f"(tried {', '.join(str(k.source) for k in candidates)}): "
                              f"{exc.message}", hint=hint) from None
    trusted = next(k for k in candidates if k.keyid == keyid)
    ui.note(f"public key: {trusted.source} (key id {keyid}: it verifies the bundle's "
            "signature)")
    return trusted


def _source(bundle: Path, pub: Path | None,
            key_path: Path | None) -> tuple[_Source, TrustedKey]:
    index_file = volumes.find_index(bundle)
    directory = (index_file or bundle).parent
    if index_file is None and not bundle.is_file():
        raise ExportError(f"{bundle} is not a bundle file or a volume set",
                          hint="pass the .bundle file (or any part of a volume set)")
    trusted = _public_key(bundle, directory, pub, key_path)
    if index_file is None:
        return _Source(bundle, bundle.name, directory, None, None), trusted
    index = volumes.open_index(index_file, [trusted])
    head = volumes.head_of(index_file)
    return _Source(bundle, index.bundle, directory, index, index_file,
                   head if index.manifest_sha256 else None), trusted


def _existing(dest: Path, item: Item) -> None:
    """Mark `item` unchanged if DEST already has it; refuse a different file of that name
    (but an INSTALL.txt of an earlier export is replaced: it names another bundle)."""
    target = dest / item.name
    if not os.path.lexists(target):
        return
    if target.is_file() and not target.is_symlink() and target.stat().st_size == item.size \
            and sha256_file(target)[0] == item.sha256:
        item.status = "unchanged"
        return
    if item.role == "instructions" and install_txt.written_by_export(target):
        item.replaces = True
        return
    raise ExportError(f"{target} already exists and is not the file this export writes "
                      f"({item.role}, sha256 {item.sha256[:16]}…); nothing was written",
                      hint="remove it (or export to another directory); bundle export never "
                           "overwrites a different file")


# ---- writing -------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot sync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _read_back(path: Path, advance: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        _drop_cache(fd)  # read what the device holds, not what the page cache remembers
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                advance(len(chunk))
    finally:
        os.close(fd)
    return digest.hexdigest()


def _flip_one_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, io.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
        fh.flush()
        os.fsync(fh.fileno())


def _chunks(fh: Any, size: int) -> Iterator[bytes]:
    left = size
    while left:
        chunk = fh.read(min(CHUNK, left))
        if not chunk:
            break
        left -= len(chunk)
        yield chunk


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from _chunks(fh, size)


def _write_item(dest: Path, item: Item, chunks: Iterator[bytes], what: str,
                advance: Callable[[int], None], corrupt: bool) -> None:
    """temp name → fsync → drop cache → read back and compare → rename → fsync the dir."""
    final = dest / item.name
    tmp = dest / f".{item.name}{TMP_SUFFIX}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an export that was killed: ours, by its name
    try:
        digest = hashlib.sha256()
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    digest.update(chunk)
                    size += len(chunk)
                    advance(len(chunk))
                os.fsync(fd)
                _drop_cache(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpaceError(f"{dest} ran out of space while writing {item.name}",
                                 hint="use a larger stick, or free space on it") from None
            raise ExportError(f"cannot write {item.name} on {dest}: {exc.strerror}",
                              hint="check the stick (mounted read-write, not full, not "
                                   "failing), then export again") from None
        if size != item.size or digest.hexdigest() != item.sha256:
            raise IntegrityError(f"{what} changed while it was being exported",
                                 hint="make sure nothing writes to it, then export again")
        if corrupt:
            _flip_one_byte(tmp)
        got = _read_back(tmp, advance)
        if got != item.sha256:
            raise IntegrityError(f"{item.name} on {dest} reads back differently from what was "
                                 f"written (sha256 {got}, expected {item.sha256}); it was "
                                 "removed", hint="the stick may be failing: try another one, "
                                                 "then export again")
        os.replace(tmp, final)
        _fsync_dir(dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    item.status = "written"


def _bundle_items(source: _Source, trusted: TrustedKey, dest: Path, fs_type: str,
                  part_size: int | None, key_path: Path | None,
                  digest: str) -> tuple[list[Item], str]:
    """What carries the bundle onto the stick (the file, its volume set's parts and index as
    they are, or parts split here with an index signed by `key_path`) and the name INSTALL.txt
    passes to `install`."""
    items: list[Item] = []
    if part_size is None and source.index is None:
        items.append(Item(source.name, "bundle", source.size, sha256_file(source.path)[0],
                          source=source.path))
        bundle_arg = source.name
    elif part_size is None:
        assert source.index is not None and source.index_file is not None
        if source.head is not None:  # its envelope verified with the rest, by `export`
            items.append(Item(source.head.name, "head", source.head.stat().st_size,
                              sha256_file(source.head)[0], source=source.head))
        for part in source.index.parts:  # copied as they are; their hashes are signed
            items.append(Item(part.file, "part", part.size, part.sha256,
                              source=source.directory / part.file))
        data = source.index_file.read_bytes()
        items.append(Item(source.index_file.name, "index", len(data),
                          hashlib.sha256(data).hexdigest(), data=data))
        bundle_arg = source.index_file.name
    else:
        if key_path is None:
            raise SigningKeyError(
                f"{source.name} ({human_bytes(source.size)}) must be split into parts of at "
                f"most {part_size} bytes for {dest} ({fs_type}), and a volume set's part index "
                "is signed: pass --key NAME.key (the key that signed the bundle)",
                hint="or build the bundle with `bundle build --volume-size fat32` and export "
                     "that volume set")
        key = load_private_key(key_path)
        if key_id(key.public_key()) != trusted.keyid:
            raise SigningKeyError(f"--key {key_path} (key id {key_id(key.public_key())}) did "
                                  f"not sign {source.name} (key id {trusted.keyid})",
                                  hint="pass the NAME.key that signed the bundle")
        ui.step(f"Splitting {source.name} into parts of at most {part_size} bytes "
                f"({fs_type} on {dest})")
        with source.stream() as whole, ui.bytes_progress("hashing", source.size) as advance:
            _, head = volumes.take_head(whole, source.name)  # the envelope, on its own
            advance(head.size)
            index = volumes.plan_parts(whole, source.name, part_size, advance)
        index = dataclasses.replace(index, manifest_sha256=digest)
        for part in (head, *index.parts):
            items.append(Item(part.file, "head" if part is head else "part", part.size,
                              part.sha256, in_stream=True))
        data = volumes.index_bytes(index, key)
        index_name = source.name + volumes.INDEX_SUFFIX
        items.append(Item(index_name, "index", len(data), hashlib.sha256(data).hexdigest(),
                          data=data))
        bundle_arg = index_name
    return items, bundle_arg


def _refuse_before_writing(dest: Path, source: _Source, manifest: Manifest,
                           items: list[Item], split: bool, fs_type: str) -> list[Item]:
    """Every refusal, before the first byte is written: the other form of the same bundle
    beside it, a different file of an item's name, too little space. Returns the items to
    write (the others are on DEST already, identical)."""
    other_form = [source.name + volumes.INDEX_SUFFIX] if not split else [source.name]
    for name in other_form:
        if os.path.lexists(dest / name):
            raise ExportError(f"{dest / name} is there from another export of "
                              f"{source.name}; a bundle and a volume set of one name must not "
                              "sit side by side (readers would pick one); nothing was written",
                              hint=f"remove {name} (or export to another directory)")
    for item in items:
        _existing(dest, item)
    pending = [i for i in items if i.status == "pending"]
    free, unit = _space(dest)
    needed = sum(-(-i.size // unit) * unit for i in pending)
    if free is None:
        ui.note(f"{dest} ({fs_type}) does not report its free space: it cannot be checked "
                "up front")
    elif needed > free:
        raise SpaceError(f"exporting {manifest.name} {manifest.version} needs "
                         f"{human_bytes(needed)} on {dest} but only {human_bytes(free)} is free "
                         f"({needed} > {free} bytes); nothing was written",
                         hint="use a larger stick, or free space on it")

    return pending


def _write_all(dest: Path, source: _Source, items: list[Item], pending: list[Item]) -> None:
    """Write the pending items in order, each read back and compared; on any failure, remove
    what this export wrote (DEST keeps only what it had before)."""
    ui.step(f"Writing {len(pending)} file(s) ({human_bytes(sum(i.size for i in pending))}) to "
            f"{dest}, each read back and compared")
    corrupt = corrupt_point("export-readback")
    done: list[Item] = []
    try:
        with contextlib.ExitStack() as stack:
            raw: io.RawIOBase | None = None
            if any(i.in_stream for i in items):
                raw = stack.enter_context(source.stream())
            advance = stack.enter_context(
                ui.bytes_progress("exporting", 2 * sum(i.size for i in pending)))
            for item in items:
                if item.in_stream:
                    assert raw is not None
                    chunks = _chunks(raw, item.size)  # consumed even if skipped: in order
                    what = f"bundle {source.name}"
                elif item.source is not None:
                    chunks = _file_chunks(item.source, item.size)
                    what = str(item.source)
                else:
                    assert item.data is not None
                    chunks, what = iter([item.data]), f"{item.role} {item.name}"
                if item.status == "unchanged":
                    for _ in chunks if item.in_stream else ():
                        pass
                    ui.note(f"{item.name} is already on {dest}, identical: skipped")
                    continue
                hit = corrupt and item.role in ("bundle", "part")
                corrupt = corrupt and not hit
                _write_item(dest, item, chunks, what, advance, hit)
                if item.replaces:  # last of all: nothing fails after it to undo it
                    item.status = "replaced"
                else:
                    done.append(item)
                ui.note(f"{item.status} {item.name} ({human_bytes(item.size)}), read back: "
                        "sha256 matches")
    except BaseException:
        for item in done:  # nothing half-done is left: only what DEST had before
            with contextlib.suppress(FileNotFoundError):
                (dest / item.name).unlink()
            item.status = "removed"
        with contextlib.suppress(OSError):
            _fsync_dir(dest)
        raise


def export(bundle: Path, dest: Path, kit: Path | None = None, pub: Path | None = None,
           key_path: Path | None = None, part_size: int | None = None,
           cache: Cache | None = None, kit_from_installed: bool = False) -> ExportResult:
    """`cache`: where a kit is built when none is given or next to the bundle (default: the
    user's bundler cache); `kit_from_installed`: build it from this environment (`bundle kit
    --from-installed`)."""
    if not dest.is_dir():
        raise ExportError(f"{dest} is not a directory",
                          hint="mount the stick first and pass its mount point (or any "
                               "existing directory)")
    source, trusted = _source(bundle, pub, key_path)
    ui.step(f"Verifying {bundle}")
    with archive.open_bundle(bundle, [trusted]) as reader:
        verified = reader.read_envelope()
        manifest, digest, envelope = verified.manifest, verified.digest, reader.envelope
        with ui.bytes_progress("verifying", manifest.travel_size) as advance:
            reader.extract(None, advance)
    if kit is not None:
        kit_source = "given"
    else:
        from bundler.build.cache import default_cache_dir

        kit, kit_source = kit_for(source.directory, manifest, cache or Cache(default_cache_dir()),
                                  from_installed=kit_from_installed)
    kit_sha = _check_kit(kit, manifest)

    fs_type = mount_type(dest)
    max_file = max_file_size(dest, fs_type)
    if part_size is not None and max_file is not None and part_size > max_file:
        raise ExportError(f"--volume-size {part_size} is over the {max_file} byte file limit "
                          f"of {dest} ({fs_type})", hint=f"use --volume-size {max_file} or less")
    largest = max(p.size for p in source.index.parts) if source.index else source.size
    if part_size is None and max_file is not None and largest > max_file:
        part_size = min(volumes.DEFAULT_PART_SIZE, max_file)

    items, bundle_arg = _bundle_items(source, trusted, dest, fs_type, part_size, key_path,
                                      digest)
    split = items[0].role in ("head", "part")

    items.append(Item(kit.name, "kit", kit.stat().st_size, kit_sha, source=kit))
    kit_line = f"{kit_sha}  {kit.name}\n".encode()
    items.append(Item(kit.name + ".sha256", "kit-sha256", len(kit_line),
                      hashlib.sha256(kit_line).hexdigest(), data=kit_line))
    key_src = Path(trusted.source)
    root_doc = install_txt.carried_root(envelope)
    if root_doc is None:
        key_data = key_src.read_bytes()
        items.append(Item(key_src.name, "key", len(key_data),
                          hashlib.sha256(key_data).hexdigest(), data=key_data))
    else:
        items.append(Item(root_doc.name, "root", len(root_doc.data),
                          hashlib.sha256(root_doc.data).hexdigest(), data=root_doc.data))
    text = install_txt.text(manifest, trusted.keyid, [(i.sha256, i.name) for i in items],
                            kit.name, bundle_arg, key_src.name, root_doc)
    items.append(Item(INSTRUCTIONS, "instructions", len(text), hashlib.sha256(text).hexdigest(),
                      data=text))
    names = [i.name.lower() for i in items]  # FAT compares names without case
    if len(set(names)) != len(names):
        raise ExportError("two of the files to export have the same name: "
                          f"{', '.join(i.name for i in items)}",
                          hint="rename the kit or the public key")

    pending = _refuse_before_writing(dest, source, manifest, items, split, fs_type)
    _write_all(dest, source, items, pending)
    return ExportResult(dest, manifest, trusted.keyid, tuple(items), fs_type, max_file, split,
                        kit, kit_source, key_src, root_doc.name if root_doc else None)
