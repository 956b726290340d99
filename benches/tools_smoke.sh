#!/usr/bin/env bash
# The Python bench tools at smoke size, against a real temma: benches/sse_reader.py (with
# --per-message) and benches/vcpu_gaps.py; then temma-floor driven by temma-load (both built by
# `cargo test`, in target/debug/examples). Run by .ci/run; the argument is the temma binary.
#
#   benches/tools_smoke.sh target/debug/temma
set -euo pipefail
cd "$(dirname "$0")/.."
TEMMA=${1:-target/debug/temma}
. benches/peers.sh
WORK=$(mktemp -d /tmp/temma-tools.XXXXXX)
PORT=$(free_port)
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

TEMMA_SERVER__LISTEN="127.0.0.1:$PORT" "$TEMMA" serve -c benches/etc/temma.toml > "$WORK/temma.log" 2>&1 &
PID=$!
python3 - "$PORT" <<'PYEND'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
PYEND

python3 benches/sse_reader.py --subscribe "http://127.0.0.1:$PORT/event/fetch" \
  --publish "http://127.0.0.1:$PORT/message/broadcast" --subscribers 3 --rate 20 --messages 10 \
  --per-message "$WORK/per-message.txt" > "$WORK/report.json"
python3 - "$WORK/report.json" "$WORK/per-message.txt" <<'PYEND'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["received"] == 30 and report["duplicates"] == 0, report
lines = [line.split() for line in open(sys.argv[2])]
assert [int(l[0]) for l in lines] == list(range(10)), lines
for seq, sent, fastest, slowest, count in lines:
    assert int(count) == 3 and 0 < int(fastest) <= int(slowest), lines
print(f"sse_reader: {report['received']} deliveries, one line per message: ok")
PYEND

python3 benches/vcpu_gaps.py --cpus 0 --seconds 1 > "$WORK/gaps.json"
python3 - "$WORK/gaps.json" <<'PYEND'
import json, sys
report = json.load(open(sys.argv[1]))
cpu = report["cpus"]["0"]
assert cpu["gaps"] == sum(cpu["by_ms"].values()) and cpu["total_ms"] >= cpu["longest_ms"] >= 0, report
print(f"vcpu_gaps: {cpu['gaps']} gaps in 1 s on CPU 0, longest {cpu['longest_ms']} ms: ok")
PYEND

# temma-floor (benches/floor.rs), inline and with a task per subscriber, driven by temma-load:
# every delivery made, in order, and the server's CPU measured.
for tasks in "" --tasks; do
  FLOOR_PORT=$(free_port)
  target/debug/examples/temma-floor --listen "127.0.0.1:$FLOOR_PORT" --threads 2 $tasks \
    2> "$WORK/floor.log" &
  FLOOR=$!
  for _ in $(seq 100); do grep -q listening "$WORK/floor.log" && break; sleep 0.1; done
  target/debug/examples/temma-load --subscribe "http://127.0.0.1:$FLOOR_PORT/sub" \
    --publish "http://127.0.0.1:$FLOOR_PORT/pub" --pid "$FLOOR" --subscribers 5 --rate 50 \
    --messages 20 --json > "$WORK/floor.json"
  kill "$FLOOR"; wait "$FLOOR" 2>/dev/null || true
  python3 - "$WORK/floor.json" "$tasks" <<'PYEND'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["received"] == 100 and report["gaps"] == 0 and report["duplicates"] == 0, report
assert report["server_cpu"]["total_ms"] > 0, report
print(f"temma-floor {sys.argv[2] or '(inline)'}: {report['received']} deliveries in order: ok")
PYEND
done

# benches/compare_aims.py judges the aims from compare.sh's reports: written here by hand, the
# three verdicts of an aim set against Nchan (met; missed where the floor reaches it; missed
# where the floor misses it too), and a loss of the floor's not counted against the servers.
python3 - "$WORK/aims" <<'PYEND'
import json, os, subprocess, sys
out = sys.argv[1]
def write(name, per_message_us=None, p99_us=1000, received=10, expected=10):
    os.makedirs(out, exist_ok=True)
    json.dump({"latency_us": {"p50": 500, "p99": p99_us}, "received": received, "expected": expected,
               "gaps": 0, "duplicates": 0,
               "server_cpu": {"per_message_us": per_message_us or 100, "per_delivery_us": 10}},
              open(os.path.join(out, name), "w"))
def aims():
    text = subprocess.run([sys.executable, "benches/compare_aims.py", out], check=True,
                          capture_output=True, text=True).stdout
    return {line.split(":")[0].strip(): line for line in text.splitlines()}, text
write("permessage-temma.json", per_message_us=100)
write("permessage-nchan.json", per_message_us=300)
lines, text = aims()
assert "aim ≤ 0.5× Nchan's: MET" in lines["10 × 50"], text
write("permessage-temma.json", per_message_us=200)
write("permessage-floor.json", per_message_us=100, received=9)
lines, text = aims()
assert "none (fan-out" in text, "the floor's loss is not the servers': " + text
assert "the floor lost messages, no reference; aim ≤ 0.5× Nchan's: not met" in lines["10 × 50"], text
write("permessage-floor.json", per_message_us=100)
lines, text = aims()
assert "the floor 100.00 µs (0.33×); aim ≤ 0.5× Nchan's: not met" in lines["10 × 50"], text
assert "out of reach" not in lines["10 × 50"], text
write("permessage-floor.json", per_message_us=180)
lines, text = aims()
assert "not met (out of reach here: the floor misses it too)" in lines["10 × 50"], text
write("permessage-nchan.json", per_message_us=300, received=9)
lines, text = aims()
assert "permessage-nchan.json: 9 of 10" in text, "a server's loss is counted: " + text
print("compare_aims: met, missed, out of reach, losses: ok")
PYEND
