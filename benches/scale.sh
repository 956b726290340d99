#!/usr/bin/env bash
# 100 000 SSE connections on this machine: a broker and NODES web nodes (`temma serve`, each its
# own process), PER_NODE subscribers on each from a `temma-load --external` process of its own,
# then one message a second for MESSAGES seconds published by one more `temma-load` (100
# subscribers of its own). Every subscriber must get every message.
#
#   benches/scale.sh                        # 6 nodes × 17 000 = 102 000 connections (+ 100)
#   NODES=2 PER_NODE=1000 MESSAGES=5 benches/scale.sh     # a quick try
#
# Why several nodes: a process may not hold more descriptors than `ulimit -Hn` (20 000 on the
# project's machine, which cannot be raised without CAP_SYS_RESOURCE), and temma is built to
# spread connections over web nodes anyway (one broker, any number of nodes). Loopback only;
# each node listens on its own port, so source ports never run out.
#
# Prints, per node and in total: connections held, deliveries (must be 100 %), latency p50/p99
# (wall clock: the publisher's send time in each marker), and the node's RSS per connection.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-6}
PER_NODE=${PER_NODE:-17000}
MESSAGES=${MESSAGES:-30}
RAMP=${RAMP:-1500}
BASE_PORT=${BASE_PORT:-9100}
WORK=$(mktemp -d /tmp/temma-scale.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ulimit -n "$(ulimit -Hn)"
echo "--- building (release)"
cargo build --release --quiet --bin temma --example temma-load
TEMMA=target/release/temma
LOAD=target/release/examples/temma-load

pull=$((BASE_PORT + 90)); publish=$((BASE_PORT + 91))
mkdir -p "$WORK/etc"
cat >"$WORK/etc/temma.toml" <<EOF
[application]
root = "$PWD"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:$pull"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:$pull"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:$publish"
zmq_client_sub = "zmq://SUB@127.0.0.1:$publish"
[server]
max_connections = $((PER_NODE + 1000))
max_pending_heads = 4096
[broker]
embedded = false
[event]
max_clients = $((PER_NODE + 1000))
initial_history = 0
[log]
level = "warn"
EOF

"$TEMMA" broker -c "$WORK/etc/temma.toml" >"$WORK/broker.log" 2>&1 &
PIDS+=("$!")
sleep 0.5
NODE_PIDS=()
for i in $(seq 0 $((NODES - 1))); do
  TEMMA_SERVER__LISTEN="127.0.0.1:$((BASE_PORT + i))" "$TEMMA" serve -c "$WORK/etc/temma.toml" >"$WORK/node$i.log" 2>&1 &
  PIDS+=("$!"); NODE_PIDS+=("$!")
done
for i in $(seq 0 $((NODES - 1))); do
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$((BASE_PORT + i))/health" >/dev/null && break
    sleep 0.1
  done
done
echo "--- $NODES web nodes up; opening $((NODES * PER_NODE)) connections ($RAMP/s per node)"
started=$(date +%s)
for i in $(seq 0 $((NODES - 1))); do
  "$LOAD" --subscribe "http://127.0.0.1:$((BASE_PORT + i))/event/fetch" --subscribers "$PER_NODE" \
    --ramp "$RAMP" --external --messages "$MESSAGES" --drain-ms 10000 --max-secs 900 \
    --pid "${NODE_PIDS[$i]}" --json >"$WORK/load$i.json" 2>"$WORK/load$i.err" &
  PIDS+=("$!"); LOADS+=("$!")
done
clients() {
  local total=0 n
  for i in $(seq 0 $((NODES - 1))); do
    n=$(curl -s "http://127.0.0.1:$((BASE_PORT + i))/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sse_clients"])' 2>/dev/null || echo 0)
    total=$((total + n))
  done
  echo "$total"
}
while [ "$(clients)" -lt $((NODES * PER_NODE)) ]; do
  if [ $(($(date +%s) - started)) -gt 600 ]; then echo "not all connected: $(clients)"; exit 1; fi
  sleep 2
done
echo "--- $(clients) SSE connections held after $(($(date +%s) - started)) s; publishing $MESSAGES messages, one a second"
sleep 3
"$LOAD" --subscribe "http://127.0.0.1:$BASE_PORT/event/fetch" --subscribers 100 \
  --publish "http://127.0.0.1:$BASE_PORT/message/broadcast" --rate 1 --messages "$MESSAGES" \
  --drain-ms 10000 --json >"$WORK/publisher.json"
for pid in "${LOADS[@]}"; do wait "$pid"; done
python3 - "$WORK" "$NODES" <<'EOF'
import json, sys
work, nodes = sys.argv[1], int(sys.argv[2])
rows, connected, received, expected, p99s = [], 0, 0, 0, []
for i in range(nodes):
    r = json.load(open(f"{work}/load{i}.json"))
    connected += r["connected"]; received += r["received"]; expected += r["expected"]
    p99s.append(r["latency_us"]["p99"] / 1000)
    rows.append((i, r["connected"], r["received"], r["expected"], r["latency_us"]["p50"] / 1000,
                 r["latency_us"]["p99"] / 1000, r.get("rss_kib_per_connection") or 0.0))
p = json.load(open(f"{work}/publisher.json"))
print("| node | connections | deliveries | p50 ms | p99 ms | node RSS per connection |")
print("|---|---|---|---|---|---|")
for i, c, got, exp, p50, p99, rss in rows:
    print(f"| {i} | {c} | {got}/{exp} ({100.0 * got / max(exp, 1):.2f} %) | {p50:.1f} | {p99:.1f} | {rss:.2f} KiB |")
print(f"| publisher's own | {p['connected']} | {p['received']}/{p['expected']} | {p['latency_us']['p50'] / 1000:.1f} | {p['latency_us']['p99'] / 1000:.1f} | |")
total = connected + p["connected"]
print(f"total: {total} connections, {received + p['received']}/{expected + p['expected']} deliveries "
      f"({100.0 * (received + p['received']) / max(expected + p['expected'], 1):.2f} %), worst p99 {max(p99s):.1f} ms, "
      f"{p['accepted']} messages accepted")
EOF
