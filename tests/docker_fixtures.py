"""Real Docker test material without any registry on the internet.

- the engine: reached through DOCKER_HOST or the local socket; started here (`dockerd` in the
  background, as root) when it is not running. No engine: skip locally, FAIL in CI.
- images: `docker import` of a tar holding a static busybox (Debian's busybox-static), and
  children of it built with COPY (no RUN: no container or network needed to build), so two
  children share the base layer.
- a registry: Debian's `docker-registry serve` on 127.0.0.1:<free port>, filesystem storage in
  a temp dir (127.0.0.1 registries are insecure-allowed by the engine by default).
- archives: `docker save` (the engine's own layout), OCI archives written by skopeo, and a
  Docker-25-style archive (OCI layout plus manifest.json, uncompressed layers).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from tests.helpers import free_port, unavailable

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
DOCKERD_LOG = Path("/tmp/bundler-test-dockerd.log")




def _connect() -> Any | None:
    import docker

    try:
        client = docker.from_env(timeout=600)
        client.ping()
        return client
    except docker.errors.DockerException:
        return None


@dataclass
class Engine:
    client: Any
    started: subprocess.Popen[bytes] | None  # the dockerd we started, if we did

    def stop(self) -> None:
        self.client.close()
        if self.started is not None:
            self.started.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.started.wait(timeout=30)


def start_engine() -> Engine:
    """The running engine, or one started now; skip (fail in CI) when neither can be had."""
    client = _connect()
    if client is not None:
        return Engine(client, None)
    if os.environ.get("DOCKER_HOST"):
        unavailable(f"the docker engine at DOCKER_HOST={os.environ['DOCKER_HOST']} does not "
                    "answer")
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        unavailable("no docker engine is running and dockerd cannot be started here "
                    "(needs root and `apt-get install docker.io`)")
    with open(DOCKERD_LOG, "ab") as log:
        proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        client = _connect()
        if client is not None:
            return Engine(client, proc)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.terminate()
    unavailable(f"dockerd did not come up within 60 s (see {DOCKERD_LOG})")
    raise AssertionError("unreachable")


def _busybox() -> Path:
    for path in BUSYBOX_CANDIDATES:
        if path.is_file():
            return path
    unavailable("busybox is not installed (apt-get install busybox-static)")
    raise AssertionError("unreachable")


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None,
         executable: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        dirs = sorted({str(Path(n).parent) for n in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name in executable else 0o644
            tf.addfile(info, io.BytesIO(data))
        for name, target in sorted((links or {}).items()):
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def import_base(client: Any, ref: str, marker: str = "") -> str:
    """A base image: static busybox as /bin/busybox (+ /bin/sh), and a marker file that makes
    its layer (and so its Image ID) unique to this call. Returns the Image ID."""
    busybox = _busybox().read_bytes()
    files = {"bin/busybox": busybox, "etc/marker": (marker or unique()).encode()}
    data = _tar(files, links={"bin/sh": "busybox"}, executable=("bin/busybox",))
    repo, tag = ref.rsplit(":", 1)
    client.api.import_image_from_data(data, repository=repo, tag=tag)
    return str(client.api.inspect_image(ref)["Id"])


def build_child(client: Any, base: str, ref: str, files: dict[str, bytes]) -> str:
    """`FROM base` + one COPY layer holding `files`. Returns the Image ID."""
    dockerfile = f"FROM {base}\nCOPY payload/ /payload/\n".encode()
    context = _tar({"Dockerfile": dockerfile,
                    **{f"payload/{k}": v for k, v in files.items()}})
    image, _logs = client.images.build(fileobj=io.BytesIO(context), custom_context=True,
                                       tag=ref, rm=True, pull=False)
    return str(image.id)


@dataclass(frozen=True)
class Pair:
    """Two images that share one base layer."""

    base: str
    a: str
    b: str
    ids: dict[str, str]

    def diff_ids(self, client: Any, ref: str) -> list[str]:
        return [d.removeprefix("sha256:")
                for d in client.api.inspect_image(ref)["RootFS"]["Layers"]]


def make_pair(client: Any, prefix: str) -> Pair:
    tag = unique()
    base, a, b = (f"bundler-test/{prefix}-{n}:{tag}" for n in ("base", "a", "b"))
    ids = {base: import_base(client, base)}
    ids[a] = build_child(client, base, a, {"a.txt": f"a {tag}\n".encode()})
    ids[b] = build_child(client, base, b, {"b.txt": f"b {tag}\n".encode()})
    return Pair(base, a, b, ids)


def remove_images(client: Any, *refs: str) -> None:
    import docker

    for ref in refs:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.api.remove_image(ref, force=True)


def has_image(client: Any, ref: str) -> bool:
    import docker

    try:
        client.api.inspect_image(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def save(client: Any, ref: str, path: Path) -> int:
    """`docker save ref` (one image) to a file; returns its size."""
    with open(path, "wb") as fh:
        for chunk in client.api.get_image(ref):
            fh.write(chunk)
    return path.stat().st_size


def run_echo(client: Any, ref: str) -> bytes:
    """Run `busybox echo ok` in a container of `ref` (no network); returns its output."""
    out = client.containers.run(ref, ["busybox", "echo", "ok"], remove=True,
                                network_mode="none")
    return bytes(out)


# --- archives ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    name: str
    type: bytes
    size: int
    sha256: str


def zst_members(path: Path) -> list[Member]:
    """Every member of a zstd-compressed tar, with the sha256 of regular members' content."""
    out = []
    with open(path, "rb") as fh, \
            zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as raw, \
            tarfile.open(fileobj=raw, mode="r|") as tf:
        for m in tf:
            digest = ""
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                h = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                digest = h.hexdigest()
            out.append(Member(m.name, m.type, m.size, digest))
    return out


def zst_json(path: Path, name: str) -> Any:
    with open(path, "rb") as fh, \
            zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as raw, \
            tarfile.open(fileobj=raw, mode="r|") as tf:
        for m in tf:
            if m.name == name:
                f = tf.extractfile(m)
                assert f is not None
                return json.loads(f.read())
    raise KeyError(name)


def skopeo(*args: str) -> None:
    if shutil.which("skopeo") is None:
        unavailable("skopeo is not installed (apt-get install skopeo)")
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, f"skopeo {' '.join(args)}: {done.stderr}"


def oci_archive(ref: str, path: Path, decompress: bool = False) -> str:
    """An OCI image-layout tar of an engine image (skopeo; gzip layers unless `decompress`).
    Returns its Image ID: skopeo writes an OCI config, so the digest is not the engine's."""
    args = ["copy", "--quiet"]
    if decompress:
        args.append("--dest-decompress")
    skopeo(*args, f"docker-daemon:{ref}", f"oci-archive:{path}:{ref}")
    with tarfile.open(path) as tf:
        index = json.loads(_read(tf, "index.json"))
        manifest = json.loads(_read(tf, _blob(index["manifests"][0]["digest"])))
    return str(manifest["config"]["digest"])


def docker25_archive(ref: str, path: Path) -> str:
    """What Docker 25+ `docker save` writes: an OCI layout (index.json, blobs, uncompressed
    layers) AND a manifest.json whose paths point into blobs/. Returns the Image ID."""
    oci = path.with_suffix(".oci.tar")
    image_id = oci_archive(ref, oci, decompress=True)
    with tarfile.open(oci) as src, tarfile.open(path, "w") as dst:
        index = json.loads(_read(src, "index.json"))
        manifest = json.loads(_read(src, _blob(index["manifests"][0]["digest"])))
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        legacy = [{"Config": _blob(manifest["config"]["digest"]), "RepoTags": [ref],
                   "Layers": [_blob(layer["digest"]) for layer in manifest["layers"]]}]
        data = json.dumps(legacy).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    oci.unlink()
    return image_id


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _read(tf: tarfile.TarFile, name: str) -> bytes:
    f = tf.extractfile(name)
    assert f is not None
    return f.read()


# --- a local registry -------------------------------------------------------------------------

@contextlib.contextmanager
def registry(workdir: Path) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1:<free port>; yields "127.0.0.1:PORT"."""
    exe = shutil.which("docker-registry")
    if exe is None:
        unavailable("docker-registry is not installed (apt-get install docker-registry)")
        raise AssertionError("unreachable")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    with open(workdir / "registry.log", "ab") as log:
        proc = subprocess.Popen([exe, "serve", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"docker-registry did not start: {(workdir / 'registry.log').read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def push(client: Any, source: str, target: str) -> None:
    """Tag `source` as `target` (on a 127.0.0.1 registry) and push it."""
    repo, tag = target.rsplit(":", 1)
    client.api.tag(source, repo, tag)
    for msg in client.api.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in msg, msg


def rewrite_tar(src: Path, dst: Path, change: dict[str, bytes] | None = None,
                add: dict[str, bytes] | None = None) -> None:
    """Copy a tar, replacing the content of members named in `change` and appending `add`."""
    change = change or {}
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if m.name in change:
                data = change[m.name]
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
        for name, data in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def member_bytes(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tf:
        return _read(tf, name)


def oci_multiplatform(oci: Path, dst: Path) -> None:
    """Wrap an OCI archive's one image manifest in an image index that offers it as
    linux/amd64 and (falsely) as linux/arm64: a multi-platform layout, as buildx writes."""
    with tarfile.open(oci) as tf:
        index = json.loads(_read(tf, "index.json"))
    desc = index["manifests"][0]
    ref_ann = desc.get("annotations", {})
    plain = {k: v for k, v in desc.items() if k != "annotations"}
    inner = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{**plain, "platform": {"os": "linux", "architecture": "arm64",
                                                  "variant": "v8"}},
                           {**plain, "platform": {"os": "linux", "architecture": "amd64"}}]}
    data = json.dumps(inner).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    outer = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
        "size": len(data), "annotations": ref_ann}]}
    rewrite_tar(oci, dst, change={"index.json": json.dumps(outer).encode()},
                add={_blob(digest): data})


def compose_profile(base: Path, name: str, images: list[str], compose: str) -> Path:
    """A compose stack's profile (version 1.0.0): `compose` written as app/docker-compose.yml,
    carried as files/stack, with `images`."""
    app = base / "app"
    app.mkdir(parents=True)
    (app / "docker-compose.yml").write_text(compose)
    profile = base / "bundle.yaml"
    refs = "".join(f"  - ref: {ref}\n" for ref in images)
    profile.write_text(f"schema: 1\nname: {name}\nversion: 1.0.0\nimages:\n{refs}"
                       "files:\n  - {src: app, dest: stack}\n"
                       "compose:\n  files: [stack/docker-compose.yml]\n")
    return profile

