#!/usr/bin/env bash
# A hostile subscriber against a standalone broker (no scripts): its rate, CPU per message and
# RSS before and after one peer sends 2,000,000 subscriptions to its PUB socket
# (benches/subscription_flood.py; needs python3 with pyzmq).
#
#   benches/subscription_flood.sh [TEMMA_BINARY...]    # default: target/release/temma
#   SUBSCRIPTIONS=5000000 benches/subscription_flood.sh /tmp/temma-before target/release/temma
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/peers.sh
SUBSCRIPTIONS=${SUBSCRIPTIONS:-2000000}
BINARIES=("$@")
if [ "${#BINARIES[@]}" -eq 0 ]; then
  cargo build --release --quiet
  BINARIES=(target/release/temma)
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PULL=$(free_port)
PUB=$(free_port)
broker_config "$WORK/etc/temma.toml" "$PULL" "$PUB"

for binary in "${BINARIES[@]}"; do
  echo "== $binary"
  "$binary" broker -c "$WORK/etc/temma.toml" 2>"$WORK/log" &
  broker=$!
  wait_log "$WORK/log" "broker running"
  python3 benches/subscription_flood.py "127.0.0.1:$PULL" "127.0.0.1:$PUB" "$broker" "$SUBSCRIPTIONS"
  kill "$broker"
  wait "$broker" 2>/dev/null || true
done
