"""Build the container images of seeds 002 and 003 here, from the package registries alone.

No container registry and no Maven repository is reachable, so every image starts from the
bare Debian 12 base of tests/bare_image.py (debootstrap minbase + python3, `docker import`)
and adds Debian packages with apt (`--no-install-recommends`) from the mirror apt uses here:

- nginx: Debian's nginx; the seed's React frontend is that image plus static files: React's
  UMD builds from the npm registry (`npm pack`, no JSX and so no build toolchain: a few
  seconds, nothing to keep warm) and the app's own two files.
- backend: Debian's OpenJDK 17; a small `com.sun.net.httpserver` service compiled with `javac`
  in a build stage stands in for the Spring Boot jar, with Debian's PostgreSQL JDBC driver.
- pyapp: python3-venv and a venv filled from pinned PyPI wheels (`pip download` on this host,
  `pip install --no-index` in the image); the AI server is pyapp plus its code.
- postgres: Debian's postgresql-15 (tests/bare_image.py's pg15 image) with an entrypoint
  like the official image's (initdb with POSTGRES_USER/PASSWORD/DB on an empty volume).
- seed 003: the backend is pyapp plus its drivers' wheels (uvicorn with 4 workers);
  PostgreSQL 17 + pgvector on a Debian 13 (trixie) minbase from the same mirror (Debian 12
  has no pgvector); Debian 12's MariaDB 10.11 and Redis, with entrypoints like the official
  images' (MARIADB_DATABASE/USER/PASSWORD on an empty volume).

Each image is tagged by a hash of its recipe (Dockerfile, files, pinned inputs, base), so an
edited recipe is a new image; a seed whose images are all in the engine is used as is, else
its one `docker save` (shared layers once) in the shared cache dir is loaded, else the missing
images are built and the set saved, under the cache's file lock (other worktrees share the
engine and the cache). The seeds' compose files name stable tags
(`insurance-chatbot/backend:1.2.0`); `ensure_seed()` points them at the recipe's images.

    python scripts/seed_images.py [002] [003] [--cold]   # build or find; prints times, sizes
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: tests.bare_image is the shared base
    sys.path.insert(0, str(REPO))

from tests import bare_image  # noqa: E402

PROFILES = REPO / "profiles"
CHATBOT = PROFILES / "insurance-chatbot"
TOURISM = PROFILES / "tourism"
# Debian 13 (pgvector is packaged there, not in Debian 12): tests/bare_image.py's trixie base
TRIXIE_REF = bare_image.TRIXIE_REF
REPO_PREFIX = "bundler-seed"
APT = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
       "--no-install-recommends {pkgs} && apt-get clean "
       "&& rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin")
REACT = ("react@18.3.1", "react-dom@18.3.1")
REACT_FILES = {"react": "umd/react.production.min.js",
               "react-dom": "umd/react-dom.production.min.js"}

PG_ENTRYPOINT = """#!/bin/sh
# Like the official postgres image: an empty data volume is initialised with POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB; local (socket) connections trust, TCP needs the password.
set -e
if [ "$#" -gt 0 ]; then exec "$@"; fi
export PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s\\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}" > "$pw"
  initdb -D "$PGDATA" -U "${POSTGRES_USER:-postgres}" --pwfile="$pw" -E UTF8 --no-locale \\
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  if [ -n "$POSTGRES_DB" ]; then
    echo "CREATE DATABASE \\"$POSTGRES_DB\\" OWNER \\"${POSTGRES_USER:-postgres}\\";" \\
      | postgres --single -D "$PGDATA" -j postgres >/dev/null
  fi
fi
exec postgres -D "$PGDATA" -k /var/run/postgresql -c listen_addresses='*'
"""

MARIADB_ENTRYPOINT = """#!/bin/sh
# Like the official mariadb image: an empty data volume gets MARIADB_DATABASE and
# MARIADB_USER/MARIADB_PASSWORD (from anywhere and over the socket); root logs in by socket.
set -e
if [ "$#" -gt 0 ]; then exec "$@"; fi
sock=/run/mysqld/mysqld.sock
if [ ! -d /var/lib/mysql/mysql ]; then
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >/dev/null
  mariadbd --user=mysql --datadir=/var/lib/mysql --skip-networking --socket=$sock &
  pid=$!
  for _ in $(seq 120); do mariadb-admin --socket=$sock ping --silent && break; sleep 0.5; done
  mariadb --socket=$sock <<SQL
CREATE DATABASE IF NOT EXISTS \\`${MARIADB_DATABASE:?}\\` CHARACTER SET utf8mb4;
CREATE USER '${MARIADB_USER:?}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD:?}';
CREATE USER '${MARIADB_USER}'@'localhost' IDENTIFIED BY '${MARIADB_PASSWORD}';
GRANT ALL ON \\`${MARIADB_DATABASE}\\`.* TO '${MARIADB_USER}'@'%';
GRANT ALL ON \\`${MARIADB_DATABASE}\\`.* TO '${MARIADB_USER}'@'localhost';
SQL
  mariadb-admin --socket=$sock shutdown
  wait $pid
fi
exec mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=0.0.0.0 --socket=$sock
"""


@dataclass(frozen=True)
class Recipe:
    """One image: a Dockerfile (`{base}` and `{<dep>}` filled with refs) and its context."""

    name: str
    dockerfile: str
    deps: tuple[str, ...] = ()        # other recipes (by name) this one builds FROM
    files: tuple[tuple[str, Path], ...] = ()  # context name -> source file or directory
    fetch: tuple[str, ...] = ()       # inputs fetched from a registry (hashed as pinned text)
    alias: str = ""                   # the stable tag the seed's compose files name
    base: str = "bare"                # the Debian base under it: bare | pg15 | trixie
    extra: tuple[tuple[str, str], ...] = field(default=())  # generated context files


def _digest_path(h: Any, path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(p.relative_to(path).as_posix().encode() + b"\0" + p.read_bytes())
    else:
        h.update(path.read_bytes())


def _requirements(path: Path) -> tuple[str, ...]:
    return tuple(line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
                 if line.split("#", 1)[0].strip())


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("nginx", f"""\
FROM {{base}}
RUN {APT.format(pkgs="nginx")} \\
 && rm -f /etc/nginx/sites-enabled/default \\
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
""", alias="insurance-chatbot/nginx:1.2.0"),
    Recipe("chatbot-frontend", """\
FROM {nginx}
COPY www /srv/www
COPY nginx.conf /etc/nginx/conf.d/frontend.conf
""", deps=("nginx",), files=(("www", CHATBOT / "frontend" / "src"),
                             ("nginx.conf", CHATBOT / "frontend" / "nginx.conf")),
           fetch=REACT, alias="insurance-chatbot/frontend:1.2.0"),
    Recipe("jre17", f"""\
FROM {{base}}
RUN {APT.format(pkgs="openjdk-17-jre-headless libpostgresql-jdbc-java")}
"""),
    Recipe("chatbot-backend", f"""\
FROM {{jre17}} AS build
RUN {APT.format(pkgs="openjdk-17-jdk-headless")}
COPY src /src
RUN javac -d /classes /src/*.java
FROM {{jre17}}
COPY --from=build /classes /opt/backend
USER nobody
EXPOSE 8080
CMD ["java", "-cp", "/opt/backend:/usr/share/java/postgresql.jar", "ChatbotBackend"]
""", deps=("jre17",), files=(("src", CHATBOT / "backend" / "src"),),
           alias="insurance-chatbot/backend:1.2.0"),
    Recipe("pyapp", f"""\
FROM {{base}}
RUN {APT.format(pkgs="python3-venv")}
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/venv \\
 && /opt/venv/bin/pip install -q --no-index --no-deps --disable-pip-version-check \\
      /tmp/wheels/*.whl \\
 && /opt/venv/bin/pip check && rm -rf /tmp/wheels /root/.cache
ENV PATH=/opt/venv/bin:{bare_image.PATH}
""", files=(), fetch=_requirements(CHATBOT / "ai" / "requirements.txt")),
    Recipe("chatbot-ai", """\
FROM {pyapp}
COPY app /app/app
# the vector_store volume takes this directory's owner when compose first creates it
RUN mkdir /app/vector_store && chown nobody:nogroup /app/vector_store
WORKDIR /app
USER nobody
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
""", deps=("pyapp",), files=(("app", CHATBOT / "ai" / "app"),),
           alias="insurance-chatbot/ai:1.2.0"),
    Recipe("postgres15", f"""\
FROM {{base}}
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh \\
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \\
 && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \\
 && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:{bare_image.PATH}
USER postgres
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
""", base="pg15", extra=(("entrypoint.sh", PG_ENTRYPOINT),),
           alias="insurance-chatbot/postgres:15"),
    Recipe("tourism-backend", """\
FROM {pyapp}
COPY wheels /tmp/wheels
RUN pip install -q --no-index --no-deps --disable-pip-version-check /tmp/wheels/*.whl \\
 && pip check && rm -rf /tmp/wheels /root/.cache
COPY app /app/app
WORKDIR /app
USER nobody
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]
""", deps=("pyapp",), files=(("app", TOURISM / "backend" / "app"),),
           fetch=_requirements(TOURISM / "backend" / "requirements.txt"),
           alias="tourism/backend:1.0.0"),
    Recipe("pgvector17", f"""\
FROM {{base}}
# no cluster from the package's postinst: the entrypoint makes one on the data volume
RUN mkdir -p /etc/postgresql-common \\
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \\
 && {APT.format(pkgs="postgresql-17 postgresql-17-pgvector")}
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh \\
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \\
 && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \\
 && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/17/bin:{bare_image.PATH}
USER postgres
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
""", base="trixie", extra=(("entrypoint.sh", PG_ENTRYPOINT),), alias="tourism/pgvector:17"),
    Recipe("mariadb", f"""\
FROM {{base}}
# the package's postinst initialises /var/lib/mysql: emptied, so the entrypoint does it
# on the data volume, with the users the environment names
RUN {APT.format(pkgs="mariadb-server mariadb-client")} \\
 && rm -rf /var/lib/mysql/* && mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
EXPOSE 3306
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
""", extra=(("entrypoint.sh", MARIADB_ENTRYPOINT),), alias="tourism/mariadb:10.11"),
    Recipe("redis", f"""\
FROM {{base}}
RUN {APT.format(pkgs="redis-server")}
USER redis
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", \\
     "--appendonly", "no"]
""", alias="tourism/redis:7"),
)}

SEEDS = {"002": ("chatbot-frontend", "chatbot-backend", "chatbot-ai", "postgres15", "nginx"),
         "003": ("tourism-backend", "pgvector17", "mariadb", "redis")}


def _base_ref(recipe: Recipe) -> str:
    return TRIXIE_REF if recipe.base == "trixie" else bare_image.REFS[recipe.base]


BASES: dict[str, Callable[[Any], bare_image.Built]] = {
    "bare": bare_image.ensure_bare, "pg15": bare_image.ensure_pg15,
    "trixie": bare_image.ensure_trixie_base}


def ref(name: str) -> str:
    """The recipe's tag: a hash of everything that makes up the image, its bases included."""
    recipe = RECIPES[name]
    h = hashlib.sha256()
    h.update(repr((recipe.dockerfile, recipe.fetch, recipe.extra, _base_ref(recipe),
                   [ref(d) for d in recipe.deps])).encode())
    for cname, path in recipe.files:
        h.update(cname.encode())
        _digest_path(h, path)
    return f"{REPO_PREFIX}/{name}:{h.hexdigest()[:12]}"


# --- context ----------------------------------------------------------------------------------

def _fetch_wheels(pins: tuple[str, ...], dest: Path) -> None:
    """Exactly the pinned wheels for Debian 12's CPython 3.11 on x86_64 (host pip settings:
    the index this machine's pip is configured with)."""
    dest.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--python-version", "3.11", "--implementation", "cp", "--disable-pip-version-check",
         "-d", str(dest), *pins], check=False, timeout=600, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _fetch_react(pins: tuple[str, ...], dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "-q", *pins], cwd=tmp, check=True, timeout=600,
                       capture_output=True)
        for tgz in Path(tmp).glob("*.tgz"):
            with tarfile.open(tgz) as tf:
                pkg = tgz.name.rsplit("-", 1)[0]
                member = tf.extractfile(f"package/{REACT_FILES[pkg]}")
                assert member is not None
                (dest / Path(REACT_FILES[pkg]).name).write_bytes(member.read())


FETCHERS: dict[str, Callable[[tuple[str, ...], Path], None]] = {
    "pyapp": lambda pins, ctx: _fetch_wheels(pins, ctx / "wheels"),
    "chatbot-frontend": lambda pins, ctx: _fetch_react(pins, ctx / "www"),
    "tourism-backend": lambda pins, ctx: _fetch_wheels(pins, ctx / "wheels"),
}


def _context(recipe: Recipe, ctx: Path) -> bytes:
    import shutil

    deps = {d: ref(d) for d in recipe.deps}
    dockerfile = recipe.dockerfile.format(base=_base_ref(recipe), **deps)
    (ctx / "Dockerfile").write_text(dockerfile)
    for cname, path in recipe.files:
        if path.is_dir():
            shutil.copytree(path, ctx / cname, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, ctx / cname)
    for cname, text in recipe.extra:
        (ctx / cname).write_text(text)
    if recipe.fetch:
        FETCHERS[recipe.name](recipe.fetch, ctx)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(ctx, arcname=".")
    return buf.getvalue()


# --- building ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    name: str
    ref: str
    how: str  # "present" | "loaded from cache" | "built"
    seconds: float
    size: int

    def describe(self) -> str:
        return (f"{self.name:18} {self.ref}: {self.how} in {self.seconds:.1f} s, "
                f"{self.size / 1e6:.0f} MB")


def _saved(cache: Path, seed: str) -> Path:
    """One `docker save` of all the seed's images: their shared layers stored once."""
    digest = hashlib.sha256(repr([ref(n) for n in SEEDS[seed]]).encode()).hexdigest()[:12]
    return cache / f"seed-{seed}-{digest}.images.tar"


def _build(client: Any, recipe: Recipe, image: str) -> None:
    import docker  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory(prefix=f"seed-{recipe.name}-") as tmp:
        context = _context(recipe, Path(tmp))
    try:
        # host network for the build only: apt, like the host's apt, reaches its mirror
        client.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=image,
                            rm=True, forcerm=True, pull=False, network_mode="host")
    except docker.errors.BuildError as exc:
        log = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
        raise RuntimeError(f"building {image} failed:\n{log[-4000:]}") from exc


def _ensure(client: Any, name: str, done: dict[str, Built]) -> Built:
    """The recipe's image in the engine, built (bases and deps first) if it is not there; the
    caller holds the cache lock."""
    if name in done:
        return done[name]
    recipe = RECIPES[name]
    image = ref(name)
    start = time.monotonic()
    how = "present"
    if not bare_image._has(client, image):  # its base is there: ensure_seed made it first
        for dep in recipe.deps:
            _ensure(client, dep, done)
        _build(client, recipe, image)
        how = "built"
    done[name] = Built(name, image, how, time.monotonic() - start,
                       bare_image._size(client, image))
    return done[name]


def ensure_seed(client: Any, seed: str) -> list[Built]:
    """The seed's images in the engine and their stable aliases pointing at them: present,
    else loaded from the seed's saved set, else built and the set saved (older sets of the
    seed removed). Serialised with other builders by the cache's file lock."""
    names = SEEDS[seed]
    start = time.monotonic()
    cache = bare_image.cache_dir()
    saved = _saved(cache, seed)
    how = "present"
    done: dict[str, Built] = {}
    if not all(bare_image._has(client, ref(n)) for n in names):
        # the bases take the lock themselves: made before this seed's builders hold it
        for base in sorted({RECIPES[n].base for n in names}):
            BASES[base](client)
        with bare_image._locked(cache):
            if saved.is_file() and not all(bare_image._has(client, ref(n)) for n in names):
                with open(saved, "rb") as fh:
                    for message in client.api.load_image(fh):  # the load runs while read
                        if "error" in message:
                            raise RuntimeError(f"loading {saved}: {message['error']}")
                how = "loaded from cache"
            if not all(bare_image._has(client, ref(n)) for n in names):
                for name in names:
                    _ensure(client, name, done)
                partial = saved.with_name(saved.name + ".partial")
                # the CLI saves several images in one archive (the SDK's get_image: one)
                subprocess.run(["docker", "save", "-o", str(partial),
                                *[ref(n) for n in names]], check=True, timeout=900)
                os.replace(partial, saved)
                for old in cache.glob(f"seed-{seed}-*.images.tar"):
                    if old != saved:
                        old.unlink()
    out = []
    for name in names:
        alias = RECIPES[name].alias
        if alias:
            client.api.tag(ref(name), *alias.rsplit(":", 1))
        built = done.get(name)
        out.append(built if built is not None and built.how == "built" else
                   Built(name, ref(name), how, time.monotonic() - start,
                         bare_image._size(client, ref(name))))
    return out


def _forget(client: Any, seed: str) -> None:
    """--cold: remove this seed's images from the engine and its saved set (bases are kept)."""
    names: set[str] = set()

    def walk(name: str) -> None:
        names.add(name)
        for dep in RECIPES[name].deps:
            walk(dep)

    for name in SEEDS[seed]:
        walk(name)
    _saved(bare_image.cache_dir(), seed).unlink(missing_ok=True)
    for name in names:
        for tag in (ref(name), RECIPES[name].alias):
            if tag and bare_image._has(client, tag):
                client.api.remove_image(tag, force=True)


def main(argv: list[str]) -> int:
    import docker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seeds", nargs="*", default=sorted(SEEDS), choices=sorted(SEEDS))
    parser.add_argument("--cold", action="store_true",
                        help="forget the seeds' images first (engine and cache), then build")
    args = parser.parse_args(argv)
    client = docker.from_env(timeout=1800)
    try:
        for seed in args.seeds:
            if args.cold:
                _forget(client, seed)
            start = time.monotonic()
            for built in ensure_seed(client, seed):
                print(built.describe(), flush=True)
            print(f"seed {seed}: {time.monotonic() - start:.1f} s", flush=True)
    except bare_image.Unavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 3
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
