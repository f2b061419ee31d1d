#!/usr/bin/env bash
# Run the whole test suite the way CI does: install the system packages the tests use (when root),
# then run pytest inside a loopback-only network namespace so local Ray and Slurm stay on 127.0.0.1.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k whisper -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "tests need system packages: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi

export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ "$(id -u)" = 0 ]; then
  exec unshare -n bash -c 'ip link set lo up && exec python -m pytest "$@"' pytest "$@"
else
  echo "not root: running without a private network namespace (Ray may use the interface address)" >&2
  exec python -m pytest "$@"
fi
