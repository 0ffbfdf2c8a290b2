"""A PostgreSQL server image for compose tests, built with no registry and no network.

There is no registry to pull `postgres:15` from, and debootstrap takes a minute and 630 MB.
Instead the image is `docker import`ed from the host's own PostgreSQL 15 install: the server
and client binaries, their share dir and extension libs, every shared library `ldd` names
(stored under the path ldd printed, symlinks resolved), zoneinfo, a static busybox for the
shell, and an entrypoint in the spirit of the official image's: initdb on an empty data dir
(POSTGRES_USER / POSTGRES_DB), then `postgres` on a unix socket in /var/run/postgresql. It
runs as uid 999 (`postgres`), like the official image. ~60 MB; built in a few seconds and
kept in the engine between runs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests.helpers import unavailable

UID = 999
BINARIES = ("postgres", "initdb", "pg_ctl", "pg_dump", "pg_restore", "psql", "pg_isready")

ENTRYPOINT = """#!/bin/sh
set -e
if [ "$#" -gt 0 ]; then exec "$@"; fi  # as the official image: `run db psql ...` runs psql
sleep "${STARTUP_DELAY:-0}"  # a slow first start (the official image's takes seconds)
export PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" -U "${POSTGRES_USER:-postgres}" -A trust -E UTF8 --no-locale >/dev/null
  if [ -n "$POSTGRES_DB" ]; then
    echo "CREATE DATABASE \\"$POSTGRES_DB\\" OWNER \\"${POSTGRES_USER:-postgres}\\";" \\
      | postgres --single -D "$PGDATA" -j postgres >/dev/null
  fi
fi
# LISTEN_ADDRESSES: TCP too (a swarm's other nodes reach it over the overlay network)
busybox grep -q '^host all all all trust' "$PGDATA/pg_hba.conf" \\
  || echo 'host all all all trust' >> "$PGDATA/pg_hba.conf"
exec postgres -D "$PGDATA" -k /var/run/postgresql -c listen_addresses="${LISTEN_ADDRESSES:-}" \\
  -c fsync=off
"""


# The tag follows this recipe: an edited entrypoint is a new image, never a stale one.
REF = "bundler-test/postgres:15-" + hashlib.sha256(
    (ENTRYPOINT + repr(BINARIES) + str(UID)).encode()).hexdigest()[:12]


def _libs(paths: list[Path]) -> set[str]:
    out: set[str] = set()
    for path in paths:
        done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                out.add(m.group(1))
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644, uid: int = 0) -> None:
    info = tarfile.TarInfo(name.lstrip("/"))
    info.size, info.mode, info.uid, info.gid = len(data), mode, uid, uid
    tf.addfile(info, io.BytesIO(data))


def _dir(tf: tarfile.TarFile, name: str, mode: int = 0o755, uid: int = 0) -> None:
    info = tarfile.TarInfo(name.lstrip("/"))
    info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, uid
    tf.addfile(info)


def _rootfs() -> bytes:
    pg = Path("/usr/lib/postgresql/15")
    share = Path("/usr/share/postgresql/15")
    busybox = next((p for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")) if p.is_file()),
                   None)
    if not (pg / "bin" / "postgres").is_file() or not share.is_dir() or busybox is None:
        unavailable("building the test PostgreSQL image needs the host's PostgreSQL 15 "
                    "(apt-get install postgresql-15) and busybox-static")
    binaries = [pg / "bin" / b for b in BINARIES]
    # not the JIT: llvmjit.so pulls in libLLVM (over 100 MB), and a test server needs no JIT
    modules = sorted(m for m in (pg / "lib").rglob("*.so") if "llvmjit" not in m.name)
    files: dict[str, Path] = {str(b): b for b in binaries}
    files.update({str(m): m for m in modules})
    files.update({lib: Path(lib) for lib in _libs(binaries + modules)})
    for tree in (share, Path("/usr/share/zoneinfo")):
        files.update({str(p): p for p in tree.rglob("*") if p.is_file()})
    dirs = sorted({str(Path(n).parent) for n in files} | {"/bin", "/etc", "/tmp",
                                                           "/usr/local/bin"})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        owned = ("/var/lib/postgresql", "/var/lib/postgresql/data", "/var/run/postgresql")
        every = {str(Path(*Path(d).parts[:i])) for d in (*dirs, *owned)
                 for i in range(2, len(Path(d).parts) + 1)}
        for d in sorted(every - set(owned)):  # sorted: parents first; the engine refuses repeats
            _dir(tf, d, 0o1777 if d == "/tmp" else 0o755)
        for d in owned:
            _dir(tf, d, 0o700 if d.endswith("data") else 0o755, UID)
        for name, src in sorted(files.items()):
            # resolved: a symlinked lib (libpq.so.5 -> libpq.so.5.15) becomes a regular file
            _add(tf, name, Path(os.path.realpath(src)).read_bytes(),
                 0o755 if os.access(src, os.X_OK) else 0o644)
        _add(tf, "/bin/busybox", busybox.read_bytes(), 0o755)
        for applet in ("sh", "cat", "echo", "ls", "sleep"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(info)
        _add(tf, "/etc/passwd", f"root:x:0:0:root:/root:/bin/sh\n"
                                f"postgres:x:{UID}:{UID}::/var/lib/postgresql:/bin/sh\n".encode())
        _add(tf, "/etc/group", f"root:x:0:\npostgres:x:{UID}:\n".encode())
        _add(tf, "/usr/local/bin/pg-entrypoint", ENTRYPOINT.encode(), 0o755)
    return buf.getvalue()


def ensure(client: Any) -> str:
    """The image's ID, importing it first if the engine does not have it."""
    import docker

    try:
        return str(client.api.inspect_image(REF)["Id"])
    except docker.errors.ImageNotFound:
        pass
    repo, tag = REF.rsplit(":", 1)
    client.api.import_image_from_data(
        _rootfs(), repository=repo, tag=tag,
        changes=[f"USER {UID}",
                 "ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/bin",
                 "ENV LANG=C.UTF-8",
                 "ENV TZ=UTC",
                 'ENTRYPOINT ["/usr/local/bin/pg-entrypoint"]'])
    return str(client.api.inspect_image(REF)["Id"])
