#!/usr/bin/env bash
# 100 000 SSE connections on this machine: a broker and NODES web nodes (`temma serve`, each its
# own process), PER_NODE subscribers on each from a `temma-load --external` process of its own,
# then one message a second for MESSAGES seconds published by one more `temma-load` (100
# subscribers of its own). Every subscriber must get every message.
#
#   benches/scale.sh                        # 6 nodes × 17 000 = 102 000 connections (+ 100)
#   NODES=2 PER_NODE=1000 MESSAGES=5 benches/scale.sh     # a quick try
#   SERVER=nchan benches/scale.sh           # Nchan, one nginx with NODES workers, same load
#
# Why several nodes: a process may not hold more descriptors than `ulimit -Hn` (20 000 on the
# project's machine, which cannot be raised without CAP_SYS_RESOURCE), and temma is built to
# spread connections over web nodes anyway (one broker, any number of nodes). Loopback only;
# each node listens on its own port, and each load process opens its subscribers from its own
# loopback source addresses (127.0.<node+1>.1, .2 …, one per SOURCE_CONNS connections): one
# address has ≈ 28 000 ephemeral ports, and the kernel's search for a free one scans the range
# when it is nearly full — from one address, 100 000 connections spent the two cores in it.
#
# With SERVER=nchan, the same load goes to one nginx + Nchan (benches/nchan.conf's locations)
# with NODES worker processes (`reuseport`: the kernel spreads the connections over them), each
# allowed PER_NODE + 1000 connections.
#
# Prints, per node and in total: connections held, deliveries (must be 100 %), latency p50/p99
# (wall clock: the publisher's send time in each marker), and the node's RSS per connection.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/peers.sh
NODES=${NODES:-6}
PER_NODE=${PER_NODE:-17000}
MESSAGES=${MESSAGES:-30}
RAMP=${RAMP:-1500}
BASE_PORT=${BASE_PORT:-9100}
SERVER=${SERVER:-temma}
SOURCE_CONNS=${SOURCE_CONNS:-8000}
WORK=$(mktemp -d /tmp/temma-scale.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill -QUIT "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ulimit -n "$(ulimit -Hn)"
echo "--- building (release)"
cargo build --release --quiet --bin temma --example temma-load
TEMMA=target/release/temma
LOAD=target/release/examples/temma-load

# The server's resident memory, all its processes together, in KiB: proportional set sizes
# (a page shared by nginx's workers, such as Nchan's shared memory, counted once).
rss_kib() {
  local total=0 pid kib
  for pid in "${SERVER_PIDS[@]}"; do
    kib=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
    total=$((total + kib))
  done
  echo "$total"
}

SERVER_PIDS=(); NODE_PIDS=()
if [ "$SERVER" = temma ]; then
  pull=$((BASE_PORT + 90)); publish=$((BASE_PORT + 91))
  mkdir -p "$WORK/etc"
  {
    zmq_sources "$pull" "$publish"
    cat <<EOF
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
  } >"$WORK/etc/temma.toml"
  "$TEMMA" broker -c "$WORK/etc/temma.toml" >"$WORK/broker.log" 2>&1 &
  PIDS+=("$!"); SERVER_PIDS+=("$!")
  sleep 0.5
  for i in $(seq 0 $((NODES - 1))); do
    TEMMA_SERVER__LISTEN="127.0.0.1:$((BASE_PORT + i))" "$TEMMA" serve -c "$WORK/etc/temma.toml" >"$WORK/node$i.log" 2>&1 &
    PIDS+=("$!"); NODE_PIDS+=("$!"); SERVER_PIDS+=("$!")
  done
  for i in $(seq 0 $((NODES - 1))); do
    for _ in $(seq 100); do
      curl -sf "http://127.0.0.1:$((BASE_PORT + i))/health" >/dev/null && break
      sleep 0.1
    done
  done
  sub_url() { echo "http://127.0.0.1:$((BASE_PORT + $1))/event/fetch"; }
  PUBLISH="http://127.0.0.1:$BASE_PORT/message/broadcast"
  clients() {
    local total=0 n
    for i in $(seq 0 $((NODES - 1))); do
      n=$(curl -s "http://127.0.0.1:$((BASE_PORT + i))/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sse_clients"])' 2>/dev/null || echo 0)
      total=$((total + n))
    done
    echo "$total"
  }
else
  # benches/nchan.conf with NODES workers, PER_NODE + 1000 connections each, on BASE_PORT.
  start_nchan "$WORK" \
    -e "s#^worker_processes .*#worker_processes $NODES;\nworker_rlimit_nofile $(ulimit -Hn);#" \
    -e "s#worker_connections [0-9]*#worker_connections $((PER_NODE + 1000))#" \
    -e "s#listen 127.0.0.1:8081;#listen 127.0.0.1:$BASE_PORT reuseport backlog=4096;#"
  # shellcheck disable=SC2206  # the pids, one word each
  SERVER_PIDS=("$NCHAN_MASTER" $NCHAN_PIDS)
  sub_url() { echo "http://127.0.0.1:$BASE_PORT/sub/chat"; }
  PUBLISH="http://127.0.0.1:$BASE_PORT/pub/chat"
  clients() {
    local n
    n=$(curl -s "http://127.0.0.1:$BASE_PORT/nchan_status" | awk '/^subscribers:/ {print $2}')
    echo "${n:-0}"
  }
fi

rss_before=$(rss_kib)
echo "--- $SERVER up ($NODES processes); opening $((NODES * PER_NODE)) connections ($RAMP/s per load process)"
started=$(date +%s)
LOADS=()
for i in $(seq 0 $((NODES - 1))); do
  sources=()
  for s in $(seq 1 $(((PER_NODE + SOURCE_CONNS - 1) / SOURCE_CONNS))); do
    sources+=(--source "127.0.$((i + 1)).$s")
  done
  pid=()
  [ "$SERVER" = temma ] && pid=(--pid "${NODE_PIDS[$i]}")
  "$LOAD" "${sources[@]}" --subscribe "$(sub_url "$i")" --subscribers "$PER_NODE" \
    --ramp "$RAMP" --external --messages "$MESSAGES" --drain-ms 10000 --max-secs 900 \
    "${pid[@]}" --json >"$WORK/load$i.json" 2>"$WORK/load$i.err" &
  PIDS+=("$!"); LOADS+=("$!")
done
# Until all are connected, or 30 s pass with no new connection (the rest failed: the load
# processes report why, and the messages are still sent to those connected).
last=-1; still=0
while held=$(clients) && [ "$held" -lt $((NODES * PER_NODE)) ]; do
  if [ "$held" -eq "$last" ]; then still=$((still + 2)); else still=0; last=$held; fi
  if [ "$still" -ge 30 ]; then
    echo "--- NOT ALL CONNECTED: $held of $((NODES * PER_NODE))"
    if [ "$SERVER" = nchan ]; then
      echo "nginx's alerts and errors: $(grep -cE '\[(alert|crit|error)\]' "$WORK/logs/error.log" || true)"
      grep -E '\[(alert|crit|error)\]' "$WORK/logs/error.log" | sed 's/^[^[]*//' | sort | uniq -c | sort -rn | head -5 || true
    fi
    break
  fi
  sleep 2
done
rss_connected=$(rss_kib)
echo "--- $held SSE connections held after $(($(date +%s) - started)) s; server memory (PSS) $rss_before → $rss_connected KiB; publishing $MESSAGES messages, one a second"
sleep 3
"$LOAD" --subscribe "$(sub_url 0)" --subscribers 100 \
  --publish "$PUBLISH" --rate 1 --messages "$MESSAGES" \
  --drain-ms 10000 --json >"$WORK/publisher.json"
for pid in "${LOADS[@]}"; do wait "$pid"; done
python3 - "$WORK" "$NODES" "$SERVER" "$held" "$rss_before" "$rss_connected" <<'EOF'
import json, sys
work, nodes, server = sys.argv[1], int(sys.argv[2]), sys.argv[3]
held, rss_before, rss_connected = (int(x) for x in sys.argv[4:7])
reports = [json.load(open(f"{work}/load{i}.json")) for i in range(nodes)]
p = json.load(open(f"{work}/publisher.json"))
print(f"{server}:")
print("| load process | connections | deliveries | gaps / duplicates | p50 ms | p99 ms | its node's RSS per connection |")
print("|---|---|---|---|---|---|---|")
def row(label, r):
    failures = f" ({r['failed']} failed: {r['errors']})" if r["failed"] else ""
    rss = r.get("rss_kib_per_connection")
    print(f"| {label} | {r['connected']}{failures} | {r['received']}/{r['expected']} "
          f"({100.0 * r['received'] / max(r['expected'], 1):.2f} %) | {r['gaps']} / {r['duplicates']} | "
          f"{r['latency_us']['p50'] / 1000:.1f} | {r['latency_us']['p99'] / 1000:.1f} | "
          f"{f'{rss:.2f} KiB' if rss else '—'} |")
for i, r in enumerate(reports):
    row(i, r)
row("publisher's own", p)
received = sum(r["received"] for r in reports + [p])
expected = sum(r["expected"] for r in reports + [p])
print(f"total: {sum(r['connected'] for r in reports + [p])} connections, {received}/{expected} deliveries "
      f"({100.0 * received / max(expected, 1):.2f} %), worst p99 {max(r['latency_us']['p99'] for r in reports) / 1000:.1f} ms, "
      f"{p['accepted']} messages accepted; server memory (PSS) {(rss_connected - rss_before) / max(held, 1):.2f} KiB "
      f"per connection, all its processes ({rss_before} → {rss_connected} KiB for {held})")
EOF
