#!/usr/bin/env bash
# CPU time of a standalone broker per message (utime + stime of its process, from /proc), and
# its lossless rate, with no scripts: the producer and consumer of `cargo bench --bench broker`
# (one PUSH, one SUB, order checked) drive a `temma broker` started here.
#
#   benches/broker_cpu.sh [TEMMA_BINARY...]      # default: target/release/temma
#   ROUNDS=5 MESSAGES=1000000 benches/broker_cpu.sh /tmp/temma-before target/release/temma
#   BROKER_CPUS=0 benches/broker_cpu.sh      # the broker on CPU 0 only (taskset), the driver on
#                                            # the others: a broker with one CPU
#   DRIVER_ARGS=--web-frames benches/broker_cpu.sh   # messages as web nodes send them
#
# With several binaries, the rounds alternate between them (the machine's noise then falls on
# all alike), and the medians are printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/peers.sh
ROUNDS=${ROUNDS:-5}
BROKER_CPUS=${BROKER_CPUS:-}
MESSAGES=${MESSAGES:-1000000}
BINARIES=("$@")
[ "${#BINARIES[@]}" -gt 0 ] || BINARIES=(target/release/temma)

DRIVER=$(broker_driver)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PULL=$(free_port)
PUB=$(free_port)
broker_config "$WORK/etc/temma.toml" "$PULL" "$PUB"

ticks=$(getconf CLK_TCK)
cpu_of() { awk -v t="$ticks" '{print ($14 + $15) / t}' "/proc/$1/stat"; }

# With BROKER_CPUS: the broker on those, the driver on the others.
pin=()
driver=("$DRIVER")
if [ -n "$BROKER_CPUS" ]; then
  others=$(python3 -c 'import os,sys; cpus=set(range(os.cpu_count())); pinned={int(c) for c in sys.argv[1].split(",")}; print(",".join(map(str, sorted(cpus - pinned))) or "0")' "$BROKER_CPUS")
  pin=(taskset -c "$BROKER_CPUS")
  driver=(taskset -c "$others" "$DRIVER")
fi

: > "$WORK/results"
for round in $(seq "$ROUNDS"); do
  for binary in "${BINARIES[@]}"; do
    "${pin[@]}" "$binary" broker -c "$WORK/etc/temma.toml" 2>"$WORK/log" &
    broker=$!
    wait_log "$WORK/log" "broker running"
    before=$(cpu_of "$broker")
    line=$("${driver[@]}" --pull "tcp://127.0.0.1:$PULL" --pub "tcp://127.0.0.1:$PUB" --messages "$MESSAGES" ${DRIVER_ARGS:-})
    after=$(cpu_of "$broker")
    kill "$broker"
    wait "$broker" 2>/dev/null || true
    rate=$(sed -n 's/.*msgs\/s \([0-9]*\).*/\1/p' <<<"$line")
    received=$(sed -n 's/.*received \([0-9]*\).*/\1/p' <<<"$line")
    lossless=$(grep -q "received $MESSAGES in order true" <<<"$line" && echo yes || echo "NO ($received received)")
    us=$(awk -v a="$after" -v b="$before" -v n="$MESSAGES" 'BEGIN {printf "%.2f", (a - b) * 1e6 / n}')
    echo "round $round  $binary  $rate msg/s  lossless and in order: $lossless  CPU $us µs/msg"
    echo "$binary $rate $us" >> "$WORK/results"
  done
done
echo "medians over $ROUNDS rounds of $MESSAGES messages:"
for binary in "${BINARIES[@]}"; do
  awk -v b="$binary" '$1 == b {print $2, $3}' "$WORK/results" | python3 -c '
import statistics, sys
rows = [line.split() for line in sys.stdin]
rate = statistics.median(float(r[0]) for r in rows)
cpu = statistics.median(float(r[1]) for r in rows)
print(f"  {sys.argv[1]}: {rate / 1000:.0f} k msg/s, CPU {cpu:.2f} µs per message")' "$binary"
done
