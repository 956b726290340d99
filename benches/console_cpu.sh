#!/bin/bash
# The operator's console: CPU of an idle `temma serve` over 60 s, console off, then on with
# one stream open; twice. Needs target/release/temma (cargo build --release). BENCHMARKS.md.
set -u
cd "$(dirname "$0")/.."
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() {
  local label=$1; shift
  env "$@" target/release/temma serve -c benches/etc/temma.toml 2>/dev/null &
  local pid=$!
  sleep 2
  local reader=""
  if [ "$label" = "on" ]; then
    local cookie=$(curl -s -i -X POST -d "token=$TOKEN" http://127.0.0.1:8000/console/login | grep -i '^set-cookie' | sed 's/^[Ss]et-[Cc]ookie: //; s/;.*//')
    curl -s -N -H "Cookie: $cookie" http://127.0.0.1:8000/console/stats > /tmp/console_stream.txt &
    reader=$!
  fi
  sleep 1
  local a=$(cpu $pid)
  sleep 60
  local b=$(cpu $pid)
  echo "$label: $((b-a)) ticks in 60 s ($(awk "BEGIN { printf \"%.3f\", ($b - $a) / 60 }") % of one core)"
  [ -n "$reader" ] && kill $reader
  kill $pid; wait $pid 2>/dev/null
  grep -c "event: stats" /tmp/console_stream.txt 2>/dev/null | sed "s/^/$label: stats events received: /"
  rm -f /tmp/console_stream.txt
}
export TOKEN=console-bench-token-0123456789
run off
run on TEMMA_CONSOLE__ENABLED=true TEMMA_CONSOLE_TOKEN=$TOKEN
run off
run on TEMMA_CONSOLE__ENABLED=true TEMMA_CONSOLE_TOKEN=$TOKEN
