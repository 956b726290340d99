#!/usr/bin/env bash
# temma's `[runtime]` settings side by side: worker threads (0: one per CPU, or 1) and the
# threads' scheduling policy ("normal", the default, or "batch"), and Nchan with
# `worker_processes` 2 and 1, at the steady loads of compare.sh, the runs alternating; server CPU
# per message (each thread's schedstat) and latencies from temma-load.
#
#   benches/workers.sh                      # 2 rounds (about 8 minutes)
#   ROUNDS=3 LOADS="10x20 10x50" TEMMA_SETTINGS="0/batch 0/normal" NCHAN_SETTINGS=2 benches/workers.sh
#   TEMMA_BINARIES="/tmp/before/target/release/temma target/release/temma" TEMMA_SETTINGS=0/batch \
#     NCHAN_SETTINGS=2 benches/workers.sh     # two builds side by side (a setting is then
#                                             # labelled SETTING@DIR, DIR the build's folder)
#   TEMMA_SETTINGS="0/normal 0/normal/64" NCHAN_SETTINGS= benches/workers.sh  # a third part:
#                                   # `event.shard_size` (clients a writer shard)
#   CLIENT=sse_reader LOADS=1000x10 TEMMA_SETTINGS="0/normal/512 0/normal/1024" benches/workers.sh
#                                   # the independent client (benches/sse_reader.py) instead of
#                                   # temma-load; the server's CPU then from its threads' schedstat
#   FLOOR_SETTINGS="1 2 2t 2u" benches/workers.sh   # and temma-floor (benches/floor.rs: the
#                                   # least a fan-out server can spend) with 1 and 2 threads; "2t":
#                                   # 2 threads and a task per subscriber (--tasks); "2u": 2
#                                   # threads, the writes in one system call (--io-uring)
#
# Prints one line per run: server, setting (temma: threads/scheduling[/shard size]; Nchan:
# processes; floor: threads, "t" for --tasks, "u" for --io-uring), load, p50, p99, CPU per
# message and per delivery, the server's threads' sleeps a message (voluntary context
# switches: each is a wake-up later) and preemptions a message (involuntary ones; both counted
# over the whole run, its subscribers' connections included: at 1,000 clients a share of
# them), delivered.
# Reports in $OUT (default target/workers).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
LOADS=${LOADS:-10x20 10x50 100x50 1000x20}
TEMMA_SETTINGS=${TEMMA_SETTINGS:-0/normal 0/batch 1/normal}
NCHAN_SETTINGS=${NCHAN_SETTINGS-2 1}
FLOOR_SETTINGS=${FLOOR_SETTINGS-}
TEMMA_BINARIES=${TEMMA_BINARIES:-target/release/temma}
CLIENT=${CLIENT:-temma-load}
case $CLIENT in temma-load|sse_reader) ;; *) echo "CLIENT: temma-load or sse_reader" >&2; exit 2 ;; esac
OUT=${OUT:-target/workers}
WORK=$(mktemp -d /tmp/temma-workers.XXXXXX)
PORT=8092
NCHAN_PORT=8081
rm -rf "$OUT"
mkdir -p "$OUT"
. benches/peers.sh
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --bin temma --example temma-load --example temma-floor
LOAD=target/release/examples/temma-load

# cpu_ns PID… — the run time of every thread of these processes, in ns (schedstat).
cpu_ns() {
  cat $(printf '/proc/%s/task/*/schedstat ' "$@") 2>/dev/null | awk '{ns += $1} END {print ns + 0}'
}

# switches PID… — voluntary and involuntary context switches of every thread of these
# processes, so far.
switches() {
  cat $(printf '/proc/%s/task/*/status ' "$@") 2>/dev/null |
    awk '/^voluntary_ctxt_switches/ {v += $2} /^nonvoluntary_ctxt_switches/ {n += $2}
         END {print v + 0, n + 0}'
}

PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  [ -f "$WORK/nchan/nginx.pid" ] && kill -QUIT "$(cat "$WORK/nchan/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# run SERVER SETTING LOAD: one temma-load run against a server started for it.
run() {
  local server=$1 setting=$2 load=$3
  local subscribers=${load%x*} rate=${load#*x}
  local messages=$((rate * 10))
  local target=()
  if [ "$server" = temma ]; then
    local bin=${BIN:-target/release/temma} threads scheduling shards
    IFS=/ read -r threads scheduling shards <<< "$setting"
    local vars=(TEMMA_SERVER__LISTEN="127.0.0.1:$PORT" TEMMA_RUNTIME__WORKER_THREADS="$threads"
                TEMMA_RUNTIME__SCHEDULING="$scheduling")
    [ -n "$shards" ] && vars+=(TEMMA_EVENT__SHARD_SIZE="$shards")
    env "${vars[@]}" "$bin" serve -c benches/etc/temma.toml > "$WORK/temma.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.1; done
    target=(--subscribe "http://127.0.0.1:$PORT/event/fetch"
            --publish "http://127.0.0.1:$PORT/message/broadcast" --pid "$PID")
  elif [ "$server" = floor ]; then
    local tasks=()
    [ "${setting%t}" != "$setting" ] && tasks=(--tasks)
    [ "${setting%u}" != "$setting" ] && tasks=(--io-uring)
    local threads=${setting%[tu]}
    target/release/examples/temma-floor --listen "127.0.0.1:$PORT" --threads "$threads" \
      "${tasks[@]}" 2> "$WORK/floor.log" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$WORK/floor.log" && break; sleep 0.1; done
    target=(--subscribe "http://127.0.0.1:$PORT/sub" --publish "http://127.0.0.1:$PORT/pub"
            --pid "$PID")
  else
    rm -rf "$WORK/nchan"
    start_nchan "$WORK/nchan" -e "s#^worker_processes .*#worker_processes $setting;#"
    target=(--subscribe "http://127.0.0.1:$NCHAN_PORT/sub/chat"
            --publish "http://127.0.0.1:$NCHAN_PORT/pub/chat")
    for p in $NCHAN_PIDS; do target+=(--pid "$p"); done
  fi
  local label=$setting
  if [ "$server" = temma ] && [ "$(wc -w <<< "$TEMMA_BINARIES")" -gt 1 ]; then
    # The build's folder: target/release/temma → target, /tmp/before/target/release/temma →
    # before.
    local dir=${BIN%/target/release/temma}
    label="$setting@${dir##*/}"
  fi
  local file="$OUT/$server-${label//\//-}-$load-$round.json"
  # The servers' processes (the --pid arguments).
  local pids=() i
  for ((i = 0; i < ${#target[@]}; i++)); do
    [ "${target[i]}" = --pid ] && pids+=("${target[i + 1]}")
  done
  local switched
  switched=$(switches "${pids[@]}")
  if [ "$CLIENT" = temma-load ]; then
    "$LOAD" "${target[@]}" --subscribers "$subscribers" --rate "$rate" \
      --messages "$messages" --json > "$file"
  else
    # The servers' threads' run time before and after.
    local before after
    before=$(cpu_ns "${pids[@]}")
    python3 benches/sse_reader.py --subscribe "${target[1]}" --publish "${target[3]}" \
      --subscribers "$subscribers" --rate "$rate" --messages "$messages" > "$file.reader"
    after=$(cpu_ns "${pids[@]}")
    python3 - "$file.reader" "$((after - before))" "$subscribers" > "$file" <<'PYEND'
import json, sys
r = json.load(open(sys.argv[1]))
ns, subscribers = int(sys.argv[2]), int(sys.argv[3])
print(json.dumps({
    "latency_us": {k: v * 1000 for k, v in r["latency_ms"].items()},
    "server_cpu": {"per_message_us": ns / 1000 / r["accepted"],
                   "per_delivery_us": ns / 1000 / r["accepted"] / subscribers,
                   "measured_by": "schedstat"},
    "delivered_ratio": r["delivered_ratio"], "gaps": "-", "duplicates": r["duplicates"],
}))
PYEND
  fi
  switched="$switched $(switches "${pids[@]}")"
  if [ "$server" != nchan ]; then
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  else
    kill -QUIT "$NCHAN_MASTER"
    for _ in $(seq 50); do kill -0 "$NCHAN_MASTER" 2>/dev/null || break; sleep 0.1; done
  fi
  python3 - "$file" "$server" "$label" "$load" "$messages" $switched <<'PYEND'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = r["server_cpu"]
messages = int(sys.argv[5])
v0, n0, v1, n1 = map(int, sys.argv[6:10])
print(f"{sys.argv[2]:6} {sys.argv[3]:>14} {sys.argv[4]:>8}  p50 {r['latency_us']['p50']/1000:6.2f} ms"
      f"  p99 {r['latency_us']['p99']/1000:6.2f} ms  CPU {cpu['per_message_us']:7.1f} µs/message"
      f" {cpu['per_delivery_us']:6.2f} µs/delivery ({cpu['measured_by']})"
      f"  sleeps {(v1 - v0) / messages:5.2f}/message, preempted {(n1 - n0) / messages:5.2f}"
      f"  delivered {r['delivered_ratio']*100:.2f} %, gaps {r['gaps']}, duplicates {r['duplicates']}")
PYEND
}

echo "server setting (threads/scheduling or processes)  load (subscribers x msg/s), client $CLIENT"
for round in $(seq "$ROUNDS"); do
  for load in $LOADS; do
    # temma: 0 is one worker per CPU; Nchan: worker_processes as in compare.sh (2) and 1.
    for BIN in $TEMMA_BINARIES; do
      for setting in $TEMMA_SETTINGS; do run temma "$setting" "$load"; done
    done
    for setting in $NCHAN_SETTINGS; do run nchan "$setting" "$load"; done
    for setting in $FLOOR_SETTINGS; do run floor "$setting" "$load"; done
  done
done
