#!/usr/bin/env bash
# A burst from the broker to a web node's SSE clients: `temma broker` and `temma serve`
# (separate, so the burst crosses the node's SUB socket; or, with EMBEDDED=1, the node's own
# embedded broker), CLIENTS curl readers, then MESSAGES
# pushed into the broker as fast as the producer of `cargo bench --bench broker` can. Prints
# how many messages each client got and how many clients the node cut as slow consumers.
#
#   benches/burst.sh [TEMMA_BINARY]                 # default: target/release/temma
#   CLIENTS=20 MESSAGES=5000 NODE_CPUS=0 benches/burst.sh   # the web node on CPU 0 only
#   EMBEDDED=1 benches/burst.sh      # no separate broker: the burst goes into the web node's
#                                    # embedded broker (as from another web node)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/peers.sh
TEMMA=${1:-target/release/temma}
CLIENTS=${CLIENTS:-20}
MESSAGES=${MESSAGES:-5000}
NODE_CPUS=${NODE_CPUS:-}
EMBEDDED=${EMBEDDED:-}

DRIVER=$(broker_driver)

WORK=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  cp -r "$WORK" /tmp/burstwork; rm -rf "$WORK"
}
trap cleanup EXIT
PULL=$(free_port)
PUB=$(free_port)
HTTP=$(free_port)
broker_config "$WORK/etc/temma.toml" "$PULL" "$PUB" \
  "embedded = $([ -n "$EMBEDDED" ] && echo true || echo false)" \
  "[server]" "listen = \"127.0.0.1:$HTTP\"" \
  "[event]" "initial_history = 0" "max_clients = 20000"
if [ -z "$EMBEDDED" ]; then
  "$TEMMA" broker -c "$WORK/etc/temma.toml" 2>"$WORK/broker.log" &
  pids+=($!)
  wait_log "$WORK/broker.log" "broker running"
fi
pin=()
[ -z "$NODE_CPUS" ] || pin=(taskset -c "$NODE_CPUS")
"${pin[@]}" "$TEMMA" serve -c "$WORK/etc/temma.toml" 2>"$WORK/web.log" &
pids+=($!)
wait_log "$WORK/web.log" "listening on"
for i in $(seq "$CLIENTS"); do
  curl -sN "http://127.0.0.1:$HTTP/event/fetch" > "$WORK/client$i.out" &
  pids+=($!)
done
sleep 1
"$DRIVER" --pull "tcp://127.0.0.1:$PULL" --pub "tcp://127.0.0.1:$PUB" --messages "$MESSAGES"
sleep 2
got=()
complete=0
for i in $(seq "$CLIENTS"); do
  # The producer's warm-up messages are counted out: only the burst's.
  n=$(grep -c '"text":"[0-9]\{10\} ' "$WORK/client$i.out" || true)
  got+=("$n")
  [ "$n" -eq "$MESSAGES" ] && complete=$((complete + 1))
done
echo "messages each client got: ${got[*]}"
echo "clients with the whole burst: $complete of $CLIENTS"
curl -s "http://127.0.0.1:$HTTP/metrics" | grep "^temma_slow_consumer_disconnects_total"
