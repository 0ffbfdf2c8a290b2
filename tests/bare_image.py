"""Docker images of a fresh, bare Debian 12 host: the air-gapped target of issue 9.

- `bare`: `debootstrap --variant=minbase bookworm` plus `python3` and nothing else (no
  python3-venv, no pip, no Node.js, no PostgreSQL client), imported with `docker import`.
- `pg15`: `FROM` that image, plus Debian's `postgresql-15` (server and client tools; seed 001's
  host runs its own PostgreSQL), installed with apt from the same mirror.
- `systemd`: `FROM` the bare image, plus `systemd systemd-sysv dbus`: a host that boots
  (systemd as PID 1, see tests.booted_host).
- `bullseye`: the `bare` recipe on Debian 11 (its python3 is CPython 3.9, the oldest the
  target kit runs on: issue 22), from the same mirror, cached the same way;
  `bullseye-distutils`: FROM it, plus `python3-distutils` (uv needs it for a 3.9 venv).
- `trixie-dockerd`: Debian 13's minbase plus its `docker.io` (Docker 26) and `containerd`: a
  second engine, run in a container with the containerd image store (tests.inner_engine).
- `trixie`: Debian 13's minbase (the one scripts/seed_images.py builds seed 003's pgvector
  on: the same tag and rootfs tar) plus its `python3`, CPython 3.13: a second real Python from
  the Debian mirror (a kit for another Python runs there).

The Debian mirror is read from this machine's apt sources at run time (never committed). Each
image is tagged by a hash of its recipe, so an edited recipe is a new image, never a stale one;
an existing tag is used as is. The artifacts are also kept in a cache directory (the bare
rootfs tar, the pg15 image as `docker save`), so a re-run after `docker system prune` imports
in seconds instead of bootstrapping again. A file lock there serialises concurrent builders
(other worktrees share the engine and the cache).

    python -m tests.bare_image [bare|pg15|seed004|systemd|trixie[-dockerd]|bullseye[-distutils] ...]
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE = "bookworm"
REPO = "bundler-test/bare-bookworm"
CACHE_ENV = "BUNDLER_TEST_CACHE"
MIRROR_ENV = "BUNDLER_TEST_DEBIAN_MIRROR"  # overrides apt's sources (e.g. a local mirror)
APT_SOURCES = Path("/etc/apt")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The recipes: every input that changes the image's content is hashed into its tag.
BARE_INCLUDE = ("python3",)
BARE_CLEAN = ("var/cache/apt/*.bin", "var/lib/apt/lists/*", "var/log/*.log",
              "var/cache/debconf/*-old", "etc/hostname", "etc/resolv.conf")
BARE_CHANGES = (f"ENV PATH={PATH}", 'CMD ["/bin/bash"]')
PG15_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""


def _hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


BARE_TAG = "minbase-" + _hash(SUITE, "minbase", BARE_INCLUDE, BARE_CLEAN, BARE_CHANGES)
BARE_REF = f"{REPO}:{BARE_TAG}"
PG15_REF = f"{REPO}:pg15-" + _hash(BARE_REF, PG15_DOCKERFILE)
# Seed 004's production layer from Debian (issue 13's acceptance): nginx, uvicorn with redis
# and PostgreSQL clients for the backend, redis-server for the shared cache; one image, each
# service runs its own command.
SEED004_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light \\
    python3-uvicorn python3-redis python3-psycopg2 redis-server \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""
SEED004_REF = f"{REPO}:seed004-" + _hash(BARE_REF, SEED004_DOCKERFILE)
# A host that boots (DESIGN.md section 9): systemd as PID 1 in the container, for the reboot
# tests of issue 17 (`docker restart` of it is a power cut). Run it with tests.booted_host.
SYSTEMD_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd \\
    systemd-sysv dbus \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
CMD ["/lib/systemd/systemd"]
"""
SYSTEMD_REF = f"{REPO}:systemd-" + _hash(BARE_REF, SYSTEMD_DOCKERFILE)
# Debian 11 (python3 3.9): the bare recipe on another suite of the same mirror (issue 22).
BULLSEYE_SUITE = "bullseye"
BULLSEYE_REF = f"bundler-test/bare-{BULLSEYE_SUITE}:minbase-" + _hash(
    BULLSEYE_SUITE, "minbase", BARE_INCLUDE, BARE_CLEAN, BARE_CHANGES)
# FROM it, Debian's distutils for its python3: what uv needs to make a venv for 3.9 (a process
# bundle's release there; the bare image shows preflight asking for it).
BULLSEYE_PY_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
    python3-distutils \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""
BULLSEYE_PY_REF = f"bundler-test/bare-{BULLSEYE_SUITE}:distutils-" + _hash(
    BULLSEYE_REF, BULLSEYE_PY_DOCKERFILE)
# Debian 13's minbase, tagged as scripts/seed_images.py tags it (one debootstrap for both), and
# FROM it, Debian 13's python3 (3.13).
TRIXIE_SUITE = "trixie"
TRIXIE_REF = f"bundler-test/bare-{TRIXIE_SUITE}:minbase-" + _hash(
    TRIXIE_SUITE, "minbase", BARE_CLEAN, BARE_CHANGES)
TRIXIE_PY_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""
TRIXIE_PY_REF = f"bundler-test/bare-{TRIXIE_SUITE}:python3-" + _hash(
    TRIXIE_REF, TRIXIE_PY_DOCKERFILE)
# FROM the trixie minbase, Debian 13's Docker engine (docker.io 26.x, its containerd and runc;
# iptables is a hard dependency): a second engine run inside a container with the containerd
# image store (tests.inner_engine), for what the host's classic Docker 20.10 cannot show.
TRIXIE_DOCKERD_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io \\
    containerd iptables \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""
TRIXIE_DOCKERD_REF = f"bundler-test/bare-{TRIXIE_SUITE}:dockerd-" + _hash(
    TRIXIE_REF, TRIXIE_DOCKERD_DOCKERFILE)
REFS = {"bare": BARE_REF, "pg15": PG15_REF, "seed004": SEED004_REF, "systemd": SYSTEMD_REF,
        "trixie": TRIXIE_PY_REF, "bullseye": BULLSEYE_REF,
        "bullseye-distutils": BULLSEYE_PY_REF, "trixie-dockerd": TRIXIE_DOCKERD_REF}


class Unavailable(Exception):
    """A host tool this build needs is missing (tests turn it into skip, or a failure in CI)."""


@dataclass(frozen=True)
class Built:
    ref: str
    how: str  # "present" | "imported from cache" | "built"
    seconds: float
    size: int  # the engine's image size, bytes

    def describe(self) -> str:
        return (f"{self.ref}: {self.how} in {self.seconds:.1f} s, "
                f"image size {self.size / 1e6:.0f} MB")


# --- the Debian mirror, from apt's own configuration ------------------------------------------

def _deb822_mirrors(text: str) -> Iterator[str]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
            yield from fields.get("uris", "").split()


def _one_line_mirrors(text: str) -> Iterator[str]:
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
            yield words[1]


def debian_mirror(apt_dir: Path = APT_SOURCES) -> str:
    """The mirror this machine's apt uses for Debian bookworm (`$BUNDLER_TEST_DEBIAN_MIRROR`
    first). Read at run time: no registry host is ever written into the repository."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    found: list[str] = []
    for path in sorted(apt_dir.glob("sources.list.d/*.sources")):
        found += _deb822_mirrors(path.read_text(errors="replace"))
    for path in [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]:
        if path.is_file():
            found += _one_line_mirrors(path.read_text(errors="replace"))
    found = [u for u in found if u.startswith(("http://", "https://", "file:/"))]
    if not found:
        raise Unavailable(f"no `deb ... {SUITE}` source in {apt_dir}/sources.list*: set "
                          f"{MIRROR_ENV} to a Debian mirror URL")
    return found[0]


# --- cache ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    elif os.geteuid() == 0:
        path = Path("/var/cache/bundler-tests")
    else:
        path = Path.home() / ".cache" / "bundler-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- building ---------------------------------------------------------------------------------

def _has(client: Any, ref: str) -> bool:
    import docker

    try:
        client.api.inspect_image(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def _size(client: Any, ref: str) -> int:
    return int(client.api.inspect_image(ref)["Size"])


def _debootstrap_rootfs(out: Path, suite: str = SUITE,
                        include: tuple[str, ...] = BARE_INCLUDE) -> None:
    """debootstrap `suite` (minbase plus `include`) into a temp dir, clean it, tar it to `out`
    (atomically). Other suites come from the same mirror (scripts/seed_images.py: trixie)."""
    exe = shutil.which("debootstrap")
    if exe is None:
        raise Unavailable("debootstrap is not installed (apt-get install debootstrap; "
                          "scripts/ci-host-setup.sh does it)")
    if os.geteuid() != 0:
        raise Unavailable("debootstrap needs root")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="bare-rootfs-", dir=out.parent) as tmp:
        root = Path(tmp) / "root"
        done = subprocess.run(
            [exe, "--variant=minbase", *([f"--include={','.join(include)}"] if include else []),
             suite, str(root), mirror],
            capture_output=True, text=True, check=False, timeout=1800,
            env={"PATH": PATH, "LANG": "C.UTF-8"})
        if done.returncode != 0:
            log = root / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise RuntimeError(f"debootstrap failed ({done.returncode}):\n"
                               f"{done.stderr[-3000:]}\n{tail}")
        for pattern in BARE_CLEAN:
            for path in root.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        partial = out.with_name(out.name + ".partial")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."],
                       check=True, timeout=600)
        os.replace(partial, out)


def _import(client: Any, tar: Path, ref: str) -> None:
    repo, tag = ref.rsplit(":", 1)
    client.api.import_image_from_file(str(tar), repository=repo, tag=tag,
                                      changes=list(BARE_CHANGES))


def ensure_bare(client: Any) -> Built:
    return _ensure_rootfs(client, BARE_REF, SUITE, BARE_INCLUDE)


def ensure_bullseye(client: Any) -> Built:
    return _ensure_rootfs(client, BULLSEYE_REF, BULLSEYE_SUITE, BARE_INCLUDE)


def ensure_bullseye_distutils(client: Any) -> Built:
    return _ensure_derived(client, BULLSEYE_PY_REF, BULLSEYE_PY_DOCKERFILE, BULLSEYE_REF,
                           ensure_bullseye)


def ensure_trixie_base(client: Any) -> Built:
    return _ensure_rootfs(client, TRIXIE_REF, TRIXIE_SUITE, ())


def _ensure_rootfs(client: Any, ref: str, suite: str, include: tuple[str, ...]) -> Built:
    """A debootstrapped `suite` (minbase plus `include`) as `ref`, its rootfs tar kept in the
    cache dir."""
    start = time.monotonic()
    if _has(client, ref):
        return Built(ref, "present", time.monotonic() - start, _size(client, ref))
    cache = cache_dir()
    with _locked(cache):
        if _has(client, ref):  # another builder finished while we waited
            how = "present"
        else:
            tar = cache / f"bare-{suite}-{ref.rsplit(':', 1)[1]}.rootfs.tar"
            how = "imported from cache"
            if not tar.is_file():
                _debootstrap_rootfs(tar, suite=suite, include=include)
                how = "built"
            _import(client, tar, ref)
    return Built(ref, how, time.monotonic() - start, _size(client, ref))


def ensure_pg15(client: Any) -> Built:
    return _ensure_derived(client, PG15_REF, PG15_DOCKERFILE)


def ensure_seed004(client: Any) -> Built:
    return _ensure_derived(client, SEED004_REF, SEED004_DOCKERFILE)


def ensure_systemd(client: Any) -> Built:
    return _ensure_derived(client, SYSTEMD_REF, SYSTEMD_DOCKERFILE)


def ensure_trixie(client: Any) -> Built:
    return _ensure_derived(client, TRIXIE_PY_REF, TRIXIE_PY_DOCKERFILE, TRIXIE_REF,
                           ensure_trixie_base)


def ensure_trixie_dockerd(client: Any) -> Built:
    return _ensure_derived(client, TRIXIE_DOCKERD_REF, TRIXIE_DOCKERD_DOCKERFILE, TRIXIE_REF,
                           ensure_trixie_base)


def _ensure_derived(client: Any, ref: str, recipe: str, base: str = BARE_REF,
                    ensure_base: Callable[[Any], Built] = ensure_bare) -> Built:
    """An image built FROM `base` by `recipe` (apt from the host's mirror), kept in the engine
    and saved in the cache dir (a later run, or another worktree, loads the save)."""
    start = time.monotonic()
    if _has(client, ref):
        return Built(ref, "present", time.monotonic() - start, _size(client, ref))
    cache = cache_dir()
    saved = cache / f"{ref.replace('/', '_').replace(':', '_')}.image.tar"
    how = "imported from cache"
    with _locked(cache):
        if saved.is_file() and not _has(client, ref):
            with open(saved, "rb") as fh:
                for _ in client.api.load_image(fh):  # read to the end: the load runs meanwhile
                    pass
    if not _has(client, ref):
        ensure_base(client)
        with _locked(cache):
            if not _has(client, ref):
                _build_derived(client, ref, recipe.format(base=base), saved)
                how = "built"
    return Built(ref, how, time.monotonic() - start, _size(client, ref))


def _build_derived(client: Any, ref: str, recipe: str, saved: Path) -> None:
    import docker

    # The base's /etc/apt/sources.list names the mirror debootstrap used (apt's, at run time).
    dockerfile = recipe.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tf.addfile(info, io.BytesIO(dockerfile))
    buf.seek(0)
    try:
        # host network for the build only: apt reaches the mirror as the host's apt does
        client.images.build(fileobj=buf, custom_context=True, tag=ref, rm=True,
                            forcerm=True, pull=False, network_mode="host")
    except docker.errors.BuildError as exc:
        log = "".join(str(chunk.get("stream", chunk.get("error", ""))) for chunk in exc.build_log)
        raise RuntimeError(f"building {ref} failed:\n{log[-4000:]}") from exc
    partial = saved.with_name(saved.name + ".partial")
    with open(partial, "wb") as fh:
        for chunk in client.api.get_image(ref):
            fh.write(chunk)
    os.replace(partial, saved)


ENSURE = {"bare": ensure_bare, "pg15": ensure_pg15, "seed004": ensure_seed004,
          "systemd": ensure_systemd, "trixie": ensure_trixie, "bullseye": ensure_bullseye,
          "bullseye-distutils": ensure_bullseye_distutils,
          "trixie-dockerd": ensure_trixie_dockerd}


def main(argv: list[str]) -> int:
    import docker

    variants = argv or ["bare"]
    unknown = [v for v in variants if v not in ENSURE]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {sorted(ENSURE)}", file=sys.stderr)
        return 2
    client = docker.from_env(timeout=1800)
    try:
        for variant in variants:
            print(ENSURE[variant](client).describe(), flush=True)
    except Unavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 3
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
