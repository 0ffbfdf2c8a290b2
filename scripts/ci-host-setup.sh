#!/usr/bin/env bash
# Host services the test suite needs that a fresh machine lacks. Idempotent: safe to re-run.
set -euo pipefail
need=()
command -v unshare >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
