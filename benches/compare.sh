#!/usr/bin/env bash
# temma against Nchan (and Pushpin), same machine, same load tool, same run.
#
#   benches/compare.sh                          # everything (about 20 minutes)
#   SCENARIOS="idle latency" PEERS=nchan benches/compare.sh
#   SCENARIOS="medium permessage" PEERS="nchan floor" benches/compare.sh
#
# Installs Nchan (Debian's nginx + libnginx-mod-nchan), Pushpin (Debian's pushpin) and pyzmq
# if missing, starts Nchan with benches/nchan.conf, Pushpin with Debian's configuration and a
# GRIP origin (benches/pushpin/origin.py), and temma with benches/etc/temma.toml, all on
# 127.0.0.1; runs the scenarios with target/release/examples/temma-load, prints the results and the
# ratios to Nchan, writes every report to $OUT (default target/compare), and stops what it
# started. Pushpin's outbound rate cap (message_rate=2500/s, message_hwm=25000 by default,
# which drops deliveries past it) is raised to 1 000 000 so that its engine is measured.
# `floor` (a peer by default) is temma-floor (benches/floor.rs, two threads, its writes in one
# system call each as temma's are: --io-uring): the least an SSE fan-out server can spend, no
# product; it runs the steady loads with both clients, so that
# each aim can be judged against what any server reaches on this machine.
#
# Scenarios:
#   fanout   1000 subscribers; the rate rises until delivery drops below 100 %, p99 goes over
#            100 ms, or the publishers cannot send at the rate (under 95 % of it); the highest
#            rate held, its deliveries/s and latencies.
#   idle     10 000 SSE connections held; server RSS per connection.
#   latency  1000 subscribers × 100 msg/s for 10 s; p50/p99.
#   light    10 subscribers × 20 msg/s for 30 s (6,000 deliveries: a p99 over 10 s stood on the
#            20 slowest of 2,000, two late messages); medium: 100 subscribers × 50 msg/s for
#            10 s: where the per-message path (not the fan-out) decides.
#   permessage  10 subscribers × 50 msg/s for 10 s: server CPU per message.
#   delivery 1000 subscribers × 20 msg/s for 10 s: server CPU per delivery.
#            These two, the CPU aims' scenarios, run CPU_ROUNDS rounds (default 3), the servers
#            taking turns, and the aims are judged on each server's median: Nchan's own CPU a
#            message moved from 241 to 365 µs between single runs.
#   wide     1000 subscribers × 10 msg/s for 10 s.
#   independent  the light, medium and wide loads, and 500 × 10 msg/s, read by
#            benches/sse_reader.py, a client written apart from temma (Python's standard
#            library: one epoll loop reads every stream, its publisher runs in a process of
#            its own), against temma and Nchan.
# Every scenario that publishes reports the server's CPU time (on-CPU time of every thread of
# its processes, in ns from /proc/PID/task/TID/schedstat; utime + stime, in 10 ms ticks, only if
# a thread ended during the run) per message and per delivery: on two cores shared with the load
# tool, the server's CPU is latency. Before each run the script waits until the machine is quiet
# (under 5 % busy, at most 20 s); each run reports what other processes used meanwhile, and one
# past 2 % of the machine is marked DISTURBED.
#   browser  1000 subscribers × 20 msg/s for 10 s, each stream requested on a kept-alive
#            connection after another request (`temma-load --after-request`), as a browser's
#            EventSource follows the page: temma's `/`, Nchan's `/nchan_status`; temma and Nchan.
#   broker   PUSH → broker → SUB msgs/s, against libzmq's proxy (cargo bench --bench broker;
#            the pass-through scenarios three rounds each, taking turns; medians judged).
# At the end, issue 14's aims judged from the reports (benches/compare_aims.py): each one
# temma's figure, Nchan's, the ratio, met or not; and every report checked for losses.
#   rooms    temma only (the peers name channels in the URL path, which temma-load does not
#            vary): 1000 rooms × 10 subscribers, one message per room per second for 20 s, every
#            delivery checked to be of its room; then 20 000 messages to 5000 rooms with no
#            subscriber (past `rooms.max` = 1000): RSS stays bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SCENARIOS=${SCENARIOS:-fanout idle latency light medium permessage delivery wide browser independent broker}
CPU_ROUNDS=${CPU_ROUNDS:-3}
PEERS=${PEERS-nchan pushpin floor}
# The peers that are products: fan-out, idle memory and the browser's order are theirs alone.
SERVER_PEERS=""
for peer in $PEERS; do [ "$peer" = floor ] || SERVER_PEERS="$SERVER_PEERS $peer"; done
FLOOR_PORT=8093
OUT=${OUT:-$ROOT/target/compare}
WORK=$(mktemp -d /tmp/temma-compare.XXXXXX)
TEMMA_PORT=${TEMMA_PORT:-8090}
NCHAN_PORT=8081
PUSHPIN_PORT=7999
ORIGIN_PORT=8089
rm -rf "$OUT"
mkdir -p "$OUT"

. benches/peers.sh

TEMMA_PID=""
FLOOR_PID=""
NGINX_STARTED=""
PUSHPIN_PIDS=""
cleanup() {
  [ -n "$TEMMA_PID" ] && kill "$TEMMA_PID" 2>/dev/null && wait "$TEMMA_PID" 2>/dev/null || true
  [ -n "$FLOOR_PID" ] && kill "$FLOOR_PID" 2>/dev/null && wait "$FLOOR_PID" 2>/dev/null || true
  if [ -n "$NGINX_STARTED" ] && [ -f "$WORK/nchan/nginx.pid" ]; then
    kill -QUIT "$(cat "$WORK/nchan/nginx.pid")" 2>/dev/null || true
    sleep 1
  fi
  for pid in $PUSHPIN_PIDS; do kill "$pid" 2>/dev/null || true; done
  [ -n "$PUSHPIN_PIDS" ] && sleep 2
  rm -rf "$WORK"
}
trap cleanup EXIT

# 10 000 connections on each side need the descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt 12000 ]; then
  echo "warning: ulimit -n is $(ulimit -n); the idle scenario needs more than 10 000" >&2
fi

echo "--- building (release)"
cargo build --release --bin temma --example temma-load --example temma-floor
LOAD=$ROOT/target/release/examples/temma-load

for peer in $PEERS; do
  case $peer in
    nchan)
      echo "--- starting Nchan on 127.0.0.1:$NCHAN_PORT"
      chmod 755 "$WORK"
      NGINX_STARTED=1
      start_nchan "$WORK/nchan"
      ;;
    pushpin)
      command -v pushpin > /dev/null || install pushpin
      echo "--- starting Pushpin on 127.0.0.1:$PUSHPIN_PORT"
      P=$WORK/pushpin
      mkdir -p "$P/run" "$P/log" "$P/zurlrun"
      sed -e "s#^rundir=.*#rundir=$P/run#" -e "s#^logdir=.*#logdir=$P/log#" \
          -e "s#^http_port=.*#http_port=127.0.0.1:$PUSHPIN_PORT#" \
          -e "s#^include=.*#include=$P/internal.conf#" \
          -e "s#^message_rate=.*#message_rate=1000000#" -e "s#^message_hwm=.*#message_hwm=1000000#" \
          /etc/pushpin/pushpin.conf > "$P/pushpin.conf"
      sed "s#/var/run/zurl#$P/zurlrun#g" /usr/lib/pushpin/internal.conf > "$P/internal.conf"
      sed "s#/var/run/zurl#$P/zurlrun#g" /etc/zurl.conf > "$P/zurl.conf"
      echo "* 127.0.0.1:$ORIGIN_PORT" > "$P/routes"
      python3 benches/pushpin/origin.py "$ORIGIN_PORT" > "$P/origin.log" 2>&1 &
      PUSHPIN_PIDS="$PUSHPIN_PIDS $!"
      zurl --config="$P/zurl.conf" > "$P/zurl.log" 2>&1 &
      PUSHPIN_PIDS="$PUSHPIN_PIDS $!"
      (cd "$P" && exec pushpin --config "$P/pushpin.conf") > "$P/pushpin.log" 2>&1 &
      PUSHPIN_PIDS="$PUSHPIN_PIDS $!"
      for _ in $(seq 100); do grep -q started "$P/pushpin.log" 2>/dev/null && break; sleep 0.1; done
      sleep 1
      PUSHPIN_SERVER_PIDS=$(pgrep -f "condure|pushpin-proxy|pushpin-handler" | tr '\n' ' ')
      ;;
    floor)
      echo "--- starting temma-floor on 127.0.0.1:$FLOOR_PORT"
      "$ROOT/target/release/examples/temma-floor" --listen "127.0.0.1:$FLOOR_PORT" --threads 2 \
        --io-uring 2> "$WORK/floor.log" &
      FLOOR_PID=$!
      for _ in $(seq 100); do grep -q listening "$WORK/floor.log" && break; sleep 0.1; done
      ;;
  esac
done

echo "--- starting temma on 127.0.0.1:$TEMMA_PORT"
env -u RUST_LOG TEMMA_SERVER__LISTEN="127.0.0.1:$TEMMA_PORT" \
  "$ROOT/target/release/temma" serve -c benches/etc/temma.toml > "$WORK/temma.log" 2>&1 &
TEMMA_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$TEMMA_PORT/health" > /dev/null && break; sleep 0.1; done

PUSHPIN_BODY='{"items":[{"channel":"chat","formats":{"http-stream":{"content":"data: load-{seq}-{ts}\n\n"}}}]}'

# Waits (up to 20 s) until the machine is quiet, under 5 % busy over half a second, so that a
# run does not pay for the one before (a peer still draining its backlog, closing connections).
# Each report also says what other processes used during the run (`other_cpu`).
settle() {
  python3 - <<'PYEND' || echo "  (the machine did not settle within 20 s: see other_cpu in the report)"
import sys, time
def busy():
    f = list(map(int, open("/proc/stat").readline().split()[1:]))
    return f[0] + f[1] + f[2] + f[5] + f[6], sum(f)
end = time.monotonic() + 20
while time.monotonic() < end:
    b0, t0 = busy()
    time.sleep(0.5)
    b1, t1 = busy()
    if t1 > t0 and (b1 - b0) / (t1 - t0) < 0.05:
        sys.exit(0)
sys.exit(1)
PYEND
}

# endpoints NAME → where temma, Nchan or the floor streams (SUB) and takes a message (PUB).
endpoints() {
  case $1 in
    temma) SUB="http://127.0.0.1:$TEMMA_PORT/event/fetch"
           PUB="http://127.0.0.1:$TEMMA_PORT/message/broadcast" ;;
    nchan) SUB="http://127.0.0.1:$NCHAN_PORT/sub/chat" PUB="http://127.0.0.1:$NCHAN_PORT/pub/chat" ;;
    floor) SUB="http://127.0.0.1:$FLOOR_PORT/sub" PUB="http://127.0.0.1:$FLOOR_PORT/pub" ;;
  esac
}

# load NAME FILE ARGS… → runs temma-load against NAME, keeps its JSON report in $OUT/FILE.
load() {
  local name=$1 file=$2; shift 2
  local target=()
  case $name in
    temma|floor|nchan)
      endpoints "$name"
      target=(--subscribe "$SUB" --publish "$PUB")
      case $name in
        temma) target+=(--pid "$TEMMA_PID") ;;
        floor) target+=(--pid "$FLOOR_PID") ;;
        nchan) for p in $NCHAN_PIDS; do target+=(--pid "$p"); done ;;
      esac ;;
    pushpin) target=(--subscribe "http://127.0.0.1:$PUSHPIN_PORT/events?channel=chat"
                     --publish "http://127.0.0.1:5561/publish/" --content-type application/json
                     --body "$PUSHPIN_BODY")
             for p in $PUSHPIN_SERVER_PIDS; do target+=(--pid "$p"); done ;;
  esac
  settle
  "$LOAD" "${target[@]}" --json "$@" > "$OUT/$file"
}

# The steady loads, subscribers and messages per second, each for 10 s but light's 30 (the
# independent reader reads light, medium, wide and crowd).
declare -A STEADY=([latency]="1000 100" [light]="10 20" [medium]="100 50" [permessage]="10 50"
                   [delivery]="1000 20" [wide]="1000 10" [crowd]="500 10")
declare -A STEADY_SECS=([light]=30)

# round_file SCENARIO ROUND NAME — a report's file: round 1 is SCENARIO-NAME.json, round N
# SCENARIO-rN-NAME.json (compare_aims.py reads them so).
round_file() {
  if [ "$2" = 1 ]; then echo "$1-$3.json"; else echo "$1-r$2-$3.json"; fi
}

field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, r))" "$@"; }

fanout() {
  local name=$1 best="none"
  for rate in 10 20 50 100 150 200 300 400 500 600 700 800 1000 1200 1500 2000 3000; do
    load "$name" "fanout-$name-$rate.json" --subscribers 1000 --rate "$rate" \
      --messages $((rate * 5)) --drain-ms 3000
    local ratio p99 sent
    ratio=$(field "$OUT/fanout-$name-$rate.json" "delivered_ratio")
    p99=$(field "$OUT/fanout-$name-$rate.json" "latency_us['p99']")
    sent=$(field "$OUT/fanout-$name-$rate.json" "round(published_per_s)")
    printf '  %-6s %5s msg/s: published %s msg/s, delivered %s, p99 %s µs\n' "$name" "$rate" "$sent" "$ratio" "$p99"
    if python3 -c "import sys; sys.exit(0 if float('$ratio') >= 1.0 and int('$p99') <= 100000 and float('$sent') >= 0.95 * $rate else 1)"; then
      best=$rate
    else
      break
    fi
  done
  echo "$best" > "$OUT/fanout-$name-best"
}

summary_fanout() {
  local name=$1 best
  best=$(cat "$OUT/fanout-$name-best")
  if [ "$best" = none ]; then echo "none"; return; fi
  field "$OUT/fanout-$name-$best.json" \
    "f'{$best} msg/s: {deliveries_per_s:.0f} deliveries/s, p50 {latency_us[\"p50\"]/1000:.1f} ms, p99 {latency_us[\"p99\"]/1000:.1f} ms'"
}

for scenario in $SCENARIOS; do
  case $scenario in
    fanout)
      echo "--- scenario 1: fan-out, 1000 subscribers, rising rate"
      fanout temma
      for peer in $SERVER_PEERS; do fanout "$peer"; done
      ;;
    idle)
      echo "--- scenario 2: 10 000 idle SSE connections"
      for name in temma $SERVER_PEERS; do
        load "$name" "idle-$name.json" --subscribers 10000 --ramp 2000 --hold-secs 2
      done
      ;;
    latency|light|medium|permessage|delivery|wide)
      read -r subscribers rate <<<"${STEADY[$scenario]}"
      secs=${STEADY_SECS[$scenario]:-10}
      rounds=1
      case $scenario in permessage|delivery) rounds=$CPU_ROUNDS ;; esac
      echo "--- scenario $scenario: $subscribers subscribers × $rate msg/s for $secs s," \
        "$rounds round(s) taking turns"
      for round in $(seq "$rounds"); do
        for name in temma $PEERS; do
          load "$name" "$(round_file "$scenario" "$round" "$name")" \
            --subscribers "$subscribers" --rate "$rate" --messages $((rate * secs))
        done
      done
      ;;
    browser)
      echo "--- scenario browser: 1000 subscribers × 20 msg/s for 10 s, each stream after a request"
      load temma browser-temma.json --subscribers 1000 --rate 20 --messages 200 --after-request /
      case " $PEERS " in *" nchan "*)
        load nchan browser-nchan.json --subscribers 1000 --rate 20 --messages 200 \
          --after-request /nchan_status ;;
      esac
      ;;
    independent)
      echo "--- scenario: an independent client (benches/sse_reader.py)"
      for label in light medium wide crowd; do
        read -r subscribers rate <<<"${STEADY[$label]}"
        messages=$((rate * ${STEADY_SECS[$label]:-10}))
        echo "  $label: $subscribers × $rate msg/s"
        for name in temma $PEERS; do
          [ "$name" = pushpin ] && continue  # its publish API is not a plain POST
          endpoints "$name"
          settle
          python3 benches/sse_reader.py --subscribe "$SUB" --publish "$PUB" \
            --subscribers "$subscribers" --rate "$rate" --messages "$messages" \
            > "$OUT/independent-$label-$name.json"
        done
      done
      ;;
    broker)
      echo "--- scenario 4: broker"
      python3 -c "import zmq" 2>/dev/null || pip install --quiet pyzmq || echo "pyzmq unavailable: no libzmq reference" >&2
      cargo bench --bench broker -- --json --rounds 3 > "$OUT/broker.jsonl"
      ;;
    rooms)
      echo "--- scenario 5: rooms, 1000 rooms × 10 subscribers, 1 msg/room/s"
      load temma rooms-temma.json --subscribers 10000 --ramp 2000 --rooms 1000 \
        --rate 1000 --messages 20000 --drain-ms 3000
      load temma rooms-cap-temma.json --subscribers 0 --rooms 5000 --rate 2000 --messages 20000
      ;;
  esac
done

echo
echo "=== results ($(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ))"
for scenario in $SCENARIOS; do
  case $scenario in
    fanout)
      echo "fan-out (highest rate held at 100 % delivery and p99 ≤ 100 ms):"
      for name in temma $SERVER_PEERS; do echo "  $name: $(summary_fanout "$name")"; done
      t=$(cat "$OUT/fanout-temma-best"); n=$(cat "$OUT/fanout-nchan-best" 2>/dev/null || echo none)
      if [ "$t" != none ] && [ "$n" != none ]; then
        echo "  ratio: $(python3 -c "
import json
t = json.load(open('$OUT/fanout-temma-$t.json')); n = json.load(open('$OUT/fanout-nchan-$n.json'))
s = json.load(open('$OUT/fanout-temma-$n.json'))
print(f\"{t['deliveries_per_s'] / n['deliveries_per_s']:.2f}× Nchan's deliveries/s; at each one's highest rate p99 {t['latency_us']['p99'] / 1000:.1f} ms vs {n['latency_us']['p99'] / 1000:.1f} ms; at Nchan's ($n msg/s) temma's p99 is {s['latency_us']['p99'] / 1000:.1f} ms\")")"
      fi
      ;;
    idle)
      echo "idle connections (server RSS per connection):"
      for name in temma $SERVER_PEERS; do
        echo "  $name: $(field "$OUT/idle-$name.json" "f'{connected} connected, {rss_kib_per_connection:.1f} KiB per connection ({rss_kib_before} → {rss_kib_connected} KiB)'")"
      done
      [ -f "$OUT/idle-nchan.json" ] && echo "  ratio: $(python3 -c "
import json
t = json.load(open('$OUT/idle-temma.json')); n = json.load(open('$OUT/idle-nchan.json'))
print(f\"{t['rss_kib_per_connection'] / n['rss_kib_per_connection']:.2f}× Nchan's memory per connection\")")"
      ;;
    latency|light|medium|permessage|delivery|wide|browser)
      echo "$scenario:"
      # Round 1's reports, then any later round's.
      for round in $(seq "$CPU_ROUNDS"); do
        for name in temma $PEERS; do
          file="$OUT/$(round_file "$scenario" "$round" "$name")"
          [ -f "$file" ] || continue  # browser: temma and Nchan only
          label=$name
          [ "$round" = 1 ] || label="$name (round $round)"
          echo "  $label: $(field "$file" "f'{delivered_ratio*100:.2f} % delivered ({gaps} gaps, {duplicates} duplicates), p50 {latency_us[\"p50\"]/1000:.2f} ms, p99 {latency_us[\"p99\"]/1000:.2f} ms, POST p50 {post_latency_us[\"p50\"]/1000:.2f} ms; server CPU ' + (f'{server_cpu[\"per_message_us\"]:.0f} µs/message, {server_cpu[\"per_delivery_us\"]:.1f} µs/delivery' + (' (utime + stime: a thread ended)' if server_cpu.get(\"measured_by\") == \"ticks\" else '') if server_cpu else 'not measured') + (f'; other processes {other_cpu[\"share\"]*100:.1f} % of the machine' + (' (DISTURBED)' if other_cpu['share'] > 0.02 else '') if locals().get('other_cpu') else '')")"
        done
      done
      for name in temma floor; do
        [ -f "$OUT/$scenario-nchan.json" ] && [ -f "$OUT/$scenario-$name.json" ] || continue
        echo "  $name/Nchan: $(python3 -c "
import json
t = json.load(open('$OUT/$scenario-$name.json')); n = json.load(open('$OUT/$scenario-nchan.json'))
ratio = lambda a, b: f'{a / b:.2f}×' if b else '—'
print(f\"p50 {ratio(t['latency_us']['p50'], n['latency_us']['p50'])}, p99 {ratio(t['latency_us']['p99'], n['latency_us']['p99'])}, CPU per delivery {ratio(t['server_cpu']['per_delivery_us'], n['server_cpu']['per_delivery_us'])}\")")"
      done
      ;;
    independent)
      echo "independent client (benches/sse_reader.py):"
      for file in "$OUT"/independent-*.json; do
        echo "  $(basename "$file" .json | sed 's/independent-//'): $(field "$file" "f'{received} of {expected} ({delivered_ratio*100:.2f} %), p50 {latency_ms[\"p50\"]:.2f} ms, p99 {latency_ms[\"p99\"]:.2f} ms, max {latency_ms[\"max\"]:.2f} ms'")"
      done
      ;;
    rooms)
      echo "rooms (temma, 1000 rooms × 10 subscribers, 1 msg/room/s for 20 s):"
      echo "  $(field "$OUT/rooms-temma.json" "f'{connected} connected, {received} of {expected} deliveries ({delivered_ratio*100:.2f} %), {misrouted} to another room, {duplicates} duplicates; p50 {latency_us[\"p50\"]/1000:.1f} ms, p99 {latency_us[\"p99\"]/1000:.1f} ms; RSS {rss_kib_connected} KiB connected, {rss_kib_after} KiB after'")"
      echo "  past the room cap: $(field "$OUT/rooms-cap-temma.json" "f'{accepted} messages to 5000 rooms; RSS {rss_kib_before} KiB before, {rss_kib_after} KiB after'")"
      ;;
    broker)
      echo "broker (PUSH → broker → SUB, 100-byte messages):"
      python3 -c "
import json
for line in open('$OUT/broker.jsonl'):
    r = json.loads(line)
    if r['scenario'] == 'per-script':
        continue
    cpu = r.get('cpu_us_per_msg')
    cpu = f', CPU {cpu:.2f} µs/msg' if cpu is not None else ''
    print(f\"  {r['scenario']:<14} #{r.get('round', 1)} {r['msgs_per_s']:>10.0f} msgs/s, {r['received']}/{r['sent']} received, in order: {r['in_order']}{cpu}\")"
      ;;
  esac
done
echo
python3 benches/compare_aims.py "$OUT"
echo "reports: $OUT"
