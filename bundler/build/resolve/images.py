"""Container images for the target: ONE docker-save archive, zstd-compressed into the cache.

Images from the engine, a registry (skopeo) or an archive file are merged here into one legacy
docker-save tar, a layer stored once per diff_id and every layer checked against its config,
streamed through zstd into the cache. Why and how: docs/design/bundle-format.md, "Images".
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from bundler import proc
from bundler.build.cache import Cache
from bundler.build.profile import IMAGE_SOURCES
from bundler.bundle.imagearchive import (
    SMALL,
    ImageRecord,
    LayoutImage,
    Scan,
    config_facts,
    norm_member,
)
from bundler.bundle.imageref import REF_HINT, canonical_tag, parse_ref, ref_problem
from bundler.engine import ENGINE_TIMEOUT, docker_sdk, engine_client, first_line, transport_errors
from bundler.errors import BuildError, CommandError
from bundler.fsutil import CHUNK, human_bytes

ZSTD_LEVEL = 3
# Multithreaded zstd keeps a few jobs' buffers per worker. With its default job for level 3
# and one worker per core, `bundle lock` of 20 incompressible images peaked at 160 MiB RSS on
# 2 cores (zstd alone: 122 MiB; 242 MiB with 8 workers), flat in the stack's size but above
# the 150 MiB bound and growing with the cores. 4 MiB jobs and at most 4 workers bound it
# (zstd alone: ~63 MiB at 4 workers) at the same speed here (bench/README.md, the scale run).
ZSTD_JOB = 4 * 1024 * 1024
ZSTD_MAX_WORKERS = 4
SKOPEO_TIMEOUT = 3600.0
_LAYOUT_FILES = ("manifest.json", "index.json", "oci-layout", "repositories")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ImageSpec:
    ref: str                       # the name:tag the image gets on the target
    source: str = "engine"         # "engine" | "registry" (skopeo, no engine) | "archive"
    archive: Path | None = None    # for source == "archive": a docker-save or OCI tar
    platform: str = "linux/amd64"  # os/arch[/variant]: picks from registry manifest lists,
    #                                and every image's config must say the same
    tls_verify: bool = True        # registry only


@dataclass(frozen=True)
class ImagesFetched:
    sha256: str        # of the zstd-compressed combined archive, as stored in the cache
    size: int
    path: Path         # cache.path(sha256)
    uncompressed_size: int
    images: tuple[ImageRecord, ...]


def _platform(text: str) -> tuple[str, str, str | None]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform {text!r} is not os/arch[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


# --- writing the combined archive ------------------------------------------------------------

class _Counter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.count = 0
        self.aborted = False  # after a failure: drop what tarfile still flushes when collected

    def write(self, data: bytes) -> int:
        if not self.aborted:
            self.count += len(data)
            self.out.write(data)
        return len(data)


class _Prefixed:
    """`head` (bytes already read to sniff the format), then the rest of `src`."""

    def __init__(self, src: IO[bytes], head: bytes = b"") -> None:
        self.src = src
        self.head = head

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.src.read(n)
        if 0 <= n < len(self.head):
            data, self.head = self.head[:n], self.head[n:]
            return data
        data, self.head = self.head, b""
        return data + self.src.read(n - len(data) if n >= 0 else -1)


class _HashingReader:
    def __init__(self, src: IO[bytes] | _Prefixed) -> None:
        self.src = src
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.digest.update(data)
        return data


@dataclass
class _Entry:
    config: str
    layers: tuple[str, ...]
    tags: list[str] = field(default_factory=list)


class _Out:
    """The combined docker-save tar: fixed header fields, content-keyed de-duplication."""

    def __init__(self, sink: _Counter) -> None:
        self.tar = tarfile.open(  # noqa: SIM115  (closed by close(), after manifest.json)
            fileobj=cast(IO[bytes], sink), mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK)
        self.names: dict[str, str] = {}   # member -> sha256 ("" for dirs and links)
        self.layers: dict[str, str] = {}  # diff_id hex -> member holding that layer, verified
        self.configs: dict[str, str] = {}  # config hex (Image ID) -> member
        self.entries: dict[str, _Entry] = {}

    @staticmethod
    def _info(name: str, kind: bytes, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = size
        info.linkname = linkname
        info.mtime = 0
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def dir(self, name: str) -> None:
        if name not in self.names:
            self.tar.addfile(self._info(name, tarfile.DIRTYPE))
            self.names[name] = ""

    def link(self, name: str, member: tarfile.TarInfo) -> None:
        if name not in self.names:
            self.tar.addfile(self._info(name, member.type, linkname=member.linkname))
            self.names[name] = ""

    def file(self, name: str, size: int, src: IO[bytes], head: bytes = b"") -> str:
        reader = _HashingReader(_Prefixed(src, head))
        if name in self.names:
            raise BuildError(f"two different image archive members are both called {name}",
                             hint="this is a bug in bundler; please report it")
        self.tar.addfile(self._info(name, tarfile.REGTYPE, size), cast(IO[bytes], reader))
        sha = reader.digest.hexdigest()
        self.names[name] = sha
        return sha

    def config(self, hexid: str, data: bytes) -> str:
        if hexid not in self.configs:
            name = f"{hexid}.json"
            if name not in self.names:
                self.file(name, len(data), io.BytesIO(data))
            self.configs[hexid] = name
        return self.configs[hexid]

    def image(self, hexid: str, layers: tuple[str, ...], tag: str) -> None:
        entry = self.entries.setdefault(hexid, _Entry(self.configs[hexid], layers))
        if tag not in entry.tags:
            entry.tags.append(tag)

    def close(self) -> None:
        doc = [{"Config": e.config, "RepoTags": e.tags, "Layers": list(e.layers)}
               for e in self.entries.values()]
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self.tar.addfile(self._info("manifest.json", tarfile.REGTYPE, len(data)),
                         io.BytesIO(data))
        self.tar.close()


# --- the sources -----------------------------------------------------------------------------

def _engine_ids(client: Any, specs: Sequence[ImageSpec]) -> dict[str, str]:
    docker = docker_sdk()
    ids: dict[str, str] = {}
    for spec in specs:
        try:
            ids[spec.ref] = str(client.api.inspect_image(spec.ref)["Id"])
        except docker.errors.ImageNotFound:
            raise BuildError(
                f"image {spec.ref} is not in the local docker engine",
                hint=f"`docker pull {spec.ref}` or `docker build -t {spec.ref} .` first, or "
                     "set `source: registry` to pull it with skopeo") from None
        except docker.errors.APIError as exc:
            raise BuildError(f"docker could not inspect {spec.ref}: "
                             f"{first_line(str(exc.explanation or exc))}") from None
    return ids


@contextlib.contextmanager
def _engine_save(client: Any, ids: Sequence[str]) -> Iterator[IO[bytes]]:
    """The engine's `docker save ID...` as one stream. docker-py only saves one image per call
    (multi-image save was never merged: docker-py#1149, #2050, #2458), so this calls the Engine
    API's `GET /images/get?names=...` through the SDK's own session and transport."""
    api = client.api
    url = f"{api.base_url}/v{api.api_version}/images/get"
    res = api.get(url, params={"names": list(ids)}, stream=True, timeout=ENGINE_TIMEOUT)
    try:
        if res.status_code != 200:
            raise BuildError(f"docker save failed: HTTP {res.status_code}: "
                             f"{first_line(res.text)}")
        yield cast(IO[bytes], res.raw)
    finally:
        res.close()


def _skopeo_pull(spec: ImageSpec, dest: Path, log: Log) -> None:
    if shutil.which("skopeo") is None:
        raise BuildError(f"skopeo is needed to pull {spec.ref} from its registry, and it is "
                         "not installed",
                         hint="apt-get install skopeo (or use `source: engine` after "
                              "`docker pull`)")
    ref = parse_ref(spec.ref)
    os_name, arch, variant = _platform(spec.platform)
    src = f"docker://{ref.name}@{ref.digest}" if ref.digest else f"docker://{ref.tagged}"
    args = ["skopeo", "--override-os", os_name, "--override-arch", arch]
    if variant:
        args += ["--override-variant", variant]
    args += ["copy", "--retry-times", "2",
             f"--src-tls-verify={'true' if spec.tls_verify else 'false'}",
             src, f"docker-archive:{dest}:{ref.tagged}"]
    log(f"pulling {spec.ref} ({spec.platform}) with skopeo")
    try:
        proc.run(args, what=f"skopeo copy {spec.ref}", timeout=SKOPEO_TIMEOUT)
    except CommandError as exc:
        text = exc.message
        low = text.lower()
        if "manifest unknown" in low or "name unknown" in low or "not found" in low:
            raise BuildError(f"image {spec.ref} is not in its registry",
                             hint=f"check the name and tag: `skopeo inspect {src}`") from None
        if "http response to https client" in low:
            raise BuildError(f"the registry of {spec.ref} speaks plain HTTP",
                             hint="set `tls_verify: false` for this image (trusted networks "
                                  "only)") from None
        if "unauthorized" in low or "authentication required" in low or "denied" in low:
            raise BuildError(f"the registry refused {spec.ref}: not authorized",
                             hint=f"`skopeo login {ref.name.split('/')[0]}` first") from None
        if "no image found in manifest list" in low or "choosing image instance" in low:
            raise BuildError(f"image {spec.ref} has no {spec.platform} variant",
                             hint="set `platform:` to one the image is published for") from None
        if "connection refused" in low or "no such host" in low or "timeout" in low:
            raise BuildError(f"the registry of {spec.ref} is not reachable: "
                             f"{first_line(text.splitlines()[-1])}",
                             hint="check the name, the network, and proxies") from None
        raise BuildError(f"pulling {spec.ref} failed: {text}") from None


def _sniff(src: IO[bytes]) -> bytes:
    head = b""
    while len(head) < 4:
        more = src.read(4 - len(head))
        if not more:
            break
        head += more
    return head


def _inflated(src: IO[bytes], head: bytes) -> IO[bytes]:
    stream = _Prefixed(src, head)
    if head.startswith(_GZIP_MAGIC):
        return cast(IO[bytes], gzip.GzipFile(fileobj=cast(IO[bytes], stream), mode="rb"))
    return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], stream), read_across_frames=True))


def _add_layer(out: _Out, diff: str, src: IO[bytes], size: int, tmpdir: Path,
               where: str) -> str:
    """Write one layer as `<diff_id>/layer.tar`, uncompressed, and check its diff_id."""
    name = f"{diff}/layer.tar"
    head = _sniff(src)
    out.dir(diff)
    if head.startswith(_GZIP_MAGIC) or head.startswith(_ZSTD_MAGIC):
        with tempfile.TemporaryFile(dir=tmpdir) as spool:
            inflated = _inflated(src, head)
            try:
                shutil.copyfileobj(inflated, spool, CHUNK)
            except (OSError, EOFError, zstandard.ZstdError) as exc:
                raise BuildError(f"{where}: layer {diff[:12]} does not decompress: {exc}",
                                 hint="the archive is damaged; make it again") from None
            spooled = spool.tell()
            spool.seek(0)
            sha = out.file(name, spooled, cast(IO[bytes], spool))
    else:
        sha = out.file(name, size, src, head)
    if sha != diff:
        raise BuildError(f"{where}: layer {diff[:12]} does not match its image config "
                         f"(content is sha256:{sha[:12]})",
                         hint="the archive is damaged or was edited; make it again")
    out.layers[diff] = name
    return name


def _check_platform(ref: str, want: str, config: bytes) -> None:
    os_want, arch_want, variant_want = _platform(want)
    _diffs, os_name, arch, variant = config_facts(config)
    if (os_name, arch) != (os_want, arch_want) or (
            variant_want and variant and variant != variant_want):
        have = "/".join(p for p in (os_name, arch, variant) if p)
        raise BuildError(f"image {ref} is for {have}, the target is {want}",
                         hint="build or pull the image for the target platform (docker buildx "
                              "--platform, or `source: registry` with `platform:`)")


def _from_engine(client: Any, specs: Sequence[ImageSpec], ids: Mapping[str, str], out: _Out,
                 log: Log) -> None:
    """Pass the engine's save stream through (it already stores shared layers once), hashing
    every member, then check each config against the Image ID the engine reported."""
    unique = list(dict.fromkeys(ids.values()))
    log(f"saving {len(specs)} image(s) from the docker engine in one pass")
    scan = Scan()
    heads: dict[str, bytes] = {}
    docker = docker_sdk()
    try:
        with _engine_save(client, unique) as raw, \
                tarfile.open(fileobj=raw, mode="r|", bufsize=CHUNK) as tf:
            for member in tf:
                name = norm_member(member.name)
                if name == ".":
                    continue
                if name in _LAYOUT_FILES:
                    for _ in scan.read(tf, member, hash_all=False):
                        pass
                elif member.isdir():
                    out.dir(name)
                elif member.issym() or member.islnk():
                    scan.note_link(member)
                    out.link(name, member)
                elif member.isreg():
                    fh = tf.extractfile(member)
                    assert fh is not None
                    buf = _KeepSmall(fh, member.size <= SMALL)
                    scan.hashes[name] = out.file(name, member.size, cast(IO[bytes], buf))
                    heads[name] = buf.head
                    if buf.kept is not None and bytes(buf.kept[:1]) in (b"{", b"["):
                        scan.docs[name] = bytes(buf.kept)
    except (tarfile.TarError, ValueError, OSError, docker.errors.DockerException,
            *transport_errors()) as exc:
        raise BuildError(f"reading `docker save` output failed: {first_line(str(exc))}",
                         hint="check the engine's log (is /var/lib/docker full?) and "
                              "retry") from None
    try:
        images = scan.layout()
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"`docker save` wrote an archive bundler cannot read: {exc}") from None
    by_id: dict[str, LayoutImage] = {}
    for img in images:
        sha = scan.hashes.get(img.config)
        if sha is not None:
            by_id[sha] = img
    for spec in specs:
        hexid = ids[spec.ref].removeprefix("sha256:")
        saved = by_id.get(hexid)
        if saved is None:
            raise BuildError(f"docker save did not return image {spec.ref} ({ids[spec.ref]})",
                             hint="was it removed or rebuilt during the build? run it again")
        config = scan.docs.get(saved.config)
        if config is None:
            raise BuildError(f"image {spec.ref}: its config is missing from `docker save` or "
                             f"larger than {human_bytes(SMALL)}")
        _check_platform(spec.ref, spec.platform, config)
        diffs = config_facts(config)[0]
        if len(diffs) != len(saved.layers):
            raise BuildError(f"image {spec.ref}: its config lists {len(diffs)} layers, the "
                             f"archive {len(saved.layers)}")
        for diff, layer in zip(diffs, saved.layers, strict=True):
            # the engine writes layers uncompressed (diff_id == sha256), except the containerd
            # image store, which may keep compressed blobs: those are checked by docker load
            if scan.hashes.get(layer) == diff:
                out.layers.setdefault(diff, layer)
            elif not heads.get(layer, b"").startswith((_GZIP_MAGIC, _ZSTD_MAGIC)):
                raise BuildError(f"image {spec.ref}: layer {diff[:12]} from `docker save` does "
                                 "not match its config",
                                 hint="the engine's storage may be damaged; check its log")
        out.configs[hexid] = saved.config
        out.image(hexid, saved.layers, parse_ref(spec.ref).tagged)


class _KeepSmall:
    """Reads through, keeping the first bytes (to tell compressed layers) and a copy of small
    members (configs) for parsing afterwards."""

    def __init__(self, src: IO[bytes], keep: bool) -> None:
        self.src = src
        self.head = b""
        self.kept: bytearray | None = bytearray() if keep else None

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        if len(self.head) < 4:
            self.head += data[:4 - len(self.head)]
        if self.kept is not None:
            self.kept += data
        return data


def _select(path: Path, images: Sequence[LayoutImage], spec: ImageSpec) -> LayoutImage:
    want = canonical_tag(spec.ref)
    found = [img for img in images if want in img.tags]
    if not found and len({img.config for img in images}) == 1:
        found = list(images)  # a one-image archive: it is the image, whatever its tag
    if len(found) > 1:
        fitting = [img for img in found if img.platform in (None, spec.platform)]
        found = fitting or found
    if len({img.config for img in found}) > 1:
        raise BuildError(f"{path} holds several images tagged {spec.ref} "
                         f"({', '.join(sorted({i.platform or '?' for i in found}))})",
                         hint="set `platform:` to pick one")
    if not found:
        tags = sorted({t for img in images for t in img.tags}) or ["(untagged images)"]
        raise BuildError(f"{path} holds no image tagged {spec.ref}",
                         hint=f"it holds: {', '.join(tags)}")
    return found[0]


def _from_file(path: Path, specs: Sequence[ImageSpec], out: _Out, tmpdir: Path,
               log: Log) -> None:
    """Merge the chosen images of a docker-save or OCI tar (two streaming passes: the JSON
    documents first, then only the layers the combined archive does not have yet)."""
    scan = Scan()
    try:
        with tarfile.open(path, mode="r|*", bufsize=CHUNK) as tf:
            for member in tf:
                if member.issym() or member.islnk():
                    scan.note_link(member)
                elif member.isreg():
                    for _ in scan.read(tf, member, hash_all=False):
                        pass
        images = scan.layout()
    except (tarfile.TarError, ValueError, KeyError, TypeError, OSError, EOFError,
            zstandard.ZstdError) as exc:
        raise BuildError(f"{path} is not a readable docker-save or OCI image archive: {exc}",
                         hint="make it with `docker save -o FILE IMAGE` or `skopeo copy ... "
                              "oci-archive:FILE`") from None
    need: dict[str, tuple[str, str]] = {}  # member -> (diff_id, ref) still to be written
    plans: list[tuple[ImageSpec, str, LayoutImage, tuple[str, ...]]] = []
    for spec in specs:
        img = _select(path, images, spec)
        config = scan.docs.get(img.config)
        if config is None:
            raise BuildError(f"{path}: the config of {spec.ref} ({img.config}) is missing")
        hexid = hashlib.sha256(config).hexdigest()
        if img.config.startswith("blobs/sha256/") and img.config[13:] != hexid:
            raise BuildError(f"{path}: the config of {spec.ref} does not match its digest",
                             hint="the archive is damaged; make it again")
        try:
            _check_platform(spec.ref, spec.platform, config)
            diffs = config_facts(config)[0]
        except (ValueError, KeyError, TypeError) as exc:
            raise BuildError(f"{path}: the config of {spec.ref} is invalid: {exc}") from None
        if len(diffs) != len(img.layers):
            raise BuildError(f"{path}: {spec.ref} lists {len(img.layers)} layers, its config "
                             f"{len(diffs)}", hint="the archive is damaged; make it again")
        if hexid not in out.configs:
            for diff, layer in zip(diffs, img.layers, strict=True):
                if layer in need and need[layer][0] != diff:
                    raise BuildError(f"{path}: member {layer} stands for two different layers",
                                     hint="the archive is damaged; make it again")
                if diff not in out.layers and all(d != diff for d, _ in need.values()):
                    need[layer] = (diff, spec.ref)
        plans.append((spec, hexid, img, diffs))
    if need:
        try:
            with tarfile.open(path, mode="r|*", bufsize=CHUNK) as tf:
                for member in tf:
                    name = norm_member(member.name)
                    if member.isreg() and name in need:
                        diff, ref = need.pop(name)
                        fh = tf.extractfile(member)
                        assert fh is not None
                        _add_layer(out, diff, fh, member.size, tmpdir, f"{path} ({ref})")
        except (tarfile.TarError, ValueError, OSError, EOFError, zstandard.ZstdError) as exc:
            raise BuildError(f"{path}: reading its layers failed: {exc}",
                             hint="the archive is damaged or was changed during the build; "
                                  "make it again") from None
        if need:
            raise BuildError(f"{path}: layer(s) {', '.join(sorted(need))} are missing",
                             hint="the archive is incomplete; make it again")
    for spec, hexid, img, diffs in plans:
        if hexid in out.entries:  # the same image came from an earlier source
            layers = out.entries[hexid].layers
        else:
            out.config(hexid, scan.docs[img.config])
            layers = tuple(out.layers[d] for d in diffs)
        out.image(hexid, layers, parse_ref(spec.ref).tagged)
    log(f"merged {len(specs)} image(s) from {path.name}")


# --- the public entry point ------------------------------------------------------------------

def _validate(specs: Sequence[ImageSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        where = f"image {spec.ref!r}"
        problem = ref_problem(spec.ref, registry=spec.source == "registry")
        if problem is not None:
            raise BuildError(f"{where}: {problem}", hint=REF_HINT)
        try:
            _platform(spec.platform)
        except ValueError as exc:
            raise BuildError(f"{where}: {exc}", hint="write platforms as os/arch") from None
        if spec.source not in IMAGE_SOURCES:
            raise BuildError(f"{where}: unknown source {spec.source!r}",
                             hint=f"use one of: {', '.join(IMAGE_SOURCES)}")
        if spec.source == "archive":
            if spec.archive is None or not spec.archive.is_file():
                raise BuildError(f"{where}: archive {spec.archive} does not exist",
                                 hint="give the path of a `docker save` or OCI tar file")
        elif spec.archive is not None:
            raise BuildError(f"{where}: `archive` is only for source: archive")
        key = canonical_tag(spec.ref)
        if key in seen:
            raise BuildError(f"{where} is listed twice (also as {seen[key]!r})",
                             hint="each target tag can name one image only")
        seen[key] = spec.ref


def compression_params(cpus: int | None = None) -> zstandard.ZstdCompressionParameters:
    """The images archive's zstd: level 3, one worker per core up to ZSTD_MAX_WORKERS,
    ZSTD_JOB-sized jobs (memory bounded whatever the machine)."""
    workers = max(1, min(cpus or os.cpu_count() or 1, ZSTD_MAX_WORKERS))
    return zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, threads=workers, job_size=ZSTD_JOB, write_checksum=True)


def compressor(cpus: int | None = None) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(compression_params=compression_params(cpus))


def fetch(specs: Sequence[ImageSpec], cache: Cache, log: Log) -> ImagesFetched:
    """Put every image in ONE docker-save tar (shared layers once), zstd it into the cache."""
    _validate(specs)
    engine = [s for s in specs if s.source == "engine"]
    registry = [s for s in specs if s.source == "registry"]
    archives: dict[Path, list[ImageSpec]] = {}
    for s in specs:
        if s.source == "archive" and s.archive is not None:
            archives.setdefault(s.archive.resolve(), []).append(s)
    client = engine_client(BuildError) if engine else None
    engine_ids = _engine_ids(client, engine) if engine else {}  # fail fast: before any pull
    cache.tmp.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="images-", dir=cache.tmp))
    started = time.monotonic()
    try:
        pulled: list[tuple[Path, ImageSpec]] = []
        for i, spec in enumerate(registry):  # pull first: no half-written cache object waits
            dest = work / f"pull-{i}.tar"
            _skopeo_pull(spec, dest, log)
            pulled.append((dest, spec))
        cctx = compressor()
        with cache.writer() as sink, \
                cctx.stream_writer(cast(IO[bytes], sink), closefd=False) as zw:
            counter = _Counter(cast(IO[bytes], zw))
            out = _Out(counter)
            try:
                if client is not None:
                    _from_engine(client, engine, engine_ids, out, log)
                for dest, spec in pulled:
                    _from_file(dest, [spec], out, work, log)
                    dest.unlink()
                for path, group in archives.items():
                    _from_file(path, group, out, work, log)
                out.close()
            except BaseException:
                counter.aborted = True
                raise
        records = tuple(
            ImageRecord(parse_ref(s.ref).tagged, "sha256:" + _id_of(out, s)) for s in specs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    secs = time.monotonic() - started
    ratio = counter.count / sink.size if sink.size else 0.0
    log(f"images: {len(specs)} image(s), tar {human_bytes(counter.count)} -> zstd "
        f"{human_bytes(sink.size)} (x{ratio:.2f}) in {secs:.1f}s")
    return ImagesFetched(sha256=sink.sha256, size=sink.size, path=cache.path(sink.sha256),
                         uncompressed_size=counter.count, images=records)


def _id_of(out: _Out, spec: ImageSpec) -> str:
    tag = parse_ref(spec.ref).tagged
    for hexid, entry in out.entries.items():
        if tag in entry.tags:
            return hexid
    raise AssertionError(f"{spec.ref} was not written")
