#!/usr/bin/env bash
# Replays the build stage of deploy/Dockerfile without a Docker engine, then runs the
# image's health check (deploy/healthcheck.sh) against the binary it produced.
#
#   bash deploy/docker-build-natively.sh
#
# What it shows: the dependency layer builds from Cargo.toml, Cargo.lock, build.rs and
# proto/ alone (a placeholder src/); the second step really rebuilds the crate after
# the placeholder (the touch matters: without it cargo can keep the empty binary);
# the result is the service; /healthz answers 200 while /readyz answers 503 with no
# broker (so a container is not "unhealthy" just because RabbitMQ is down); SIGTERM
# drains and exits 0. What it cannot show: the base images, apt-get in the runtime
# stage, and the image's file permissions, which need `docker build`.
#
# Works in target/docker-native/ (kept between runs, like Docker's layer cache).
# Keep the steps in step with deploy/Dockerfile.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$repo/target/docker-native"
mkdir -p "$work"
cd "$work"
export CARGO_TARGET_DIR="$work/target" # as in the image: /src/target

echo "== Dockerfile build stage, step 1: dependencies with a placeholder crate"
rm -rf src proto
# The build context as .dockerignore lets it through.
cp "$repo/Cargo.toml" "$repo/Cargo.lock" "$repo/build.rs" .
cp -a "$repo/proto" ./proto
mkdir -p src
echo 'fn main() {}' > src/main.rs
touch src/lib.rs
cargo build --release --locked --bin ingest
rm -rf src

echo "== Dockerfile build stage, step 2: the service"
cp -a "$repo/src" ./src # -a keeps modification times, as COPY does
find src -name '*.rs' -exec touch {} +
cargo build --release --locked --bin ingest
bin="$work/target/release/ingest"
"$bin" --help | grep -q INGEST_AMQP_URL || {
  echo "target/release/ingest is not the service (still the placeholder?)" >&2
  exit 1
}

echo "== health check against the built binary (no broker reachable)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
admin="127.0.0.1:$(free_port)"
INGEST_LISTEN="127.0.0.1:$(free_port)" INGEST_ADMIN_LISTEN="$admin" \
  INGEST_AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2f" RUST_LOG=error "$bin" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
export INGEST_ADMIN_LISTEN="$admin"
for _ in $(seq 1 50); do
  "$repo/deploy/healthcheck.sh" 2>/dev/null && break
  sleep 0.2
done
"$repo/deploy/healthcheck.sh"
echo "/healthz: 200"
if "$repo/deploy/healthcheck.sh" /readyz 2>/dev/null; then
  echo "/readyz answered 200 with no broker; expected 503" >&2
  exit 1
fi
echo "/readyz: not ready (no broker), as expected"

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
trap - EXIT
if [ "$status" != 0 ]; then
  echo "ingest exited $status after SIGTERM; expected 0" >&2
  exit 1
fi
echo "SIGTERM: drained and exited 0"
echo "== the Dockerfile's build steps and health check work natively"
