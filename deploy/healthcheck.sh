#!/bin/bash
# Container health check for ingest: GET /healthz on the admin listener must answer
# 200. Pure bash (/dev/tcp), so the runtime image needs no curl or wget.
#
#   ingest-healthcheck [PATH]    PATH defaults to /healthz; /readyz also works
#
# The port comes from INGEST_ADMIN_LISTEN (default 0.0.0.0:9464); the check always
# connects to 127.0.0.1, as the listener is inside the same container.
set -euo pipefail

path="${1:-/healthz}"
listen="${INGEST_ADMIN_LISTEN:-0.0.0.0:9464}"
port="${listen##*:}"

exec 3<>"/dev/tcp/127.0.0.1/${port}"
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$path" "$port" >&3
IFS=' ' read -r -t 3 _ code _ <&3
exec 3<&-
if [ "$code" != 200 ]; then
  echo "GET $path on :$port answered ${code:-nothing}" >&2
  exit 1
fi
