#!/usr/bin/env bash
# temma on separate hosts: network namespaces stand for hosts, joined by a bridge in a namespace
# of its own, with addresses (10.253.7.0/24) that exist only inside them: nothing reaches the
# machine's own network. A broker host, two web hosts, a client host. The client posts on one
# web node and reads SSE on both (tests/netns/sse_log.py, an EventSource-like reader); then:
#   1. web2's link is cut for 5 s and restored: its readers recover without loss;
#   2. the broker is restarted (SIGTERM, new process): posts during the gap get 503, never a
#      200 that is lost; messages flow again;
#   3. web2 is restarted while posts go on through web1: its readers reconnect with
#      Last-Event-ID and the new process replays what they missed from the broker's snapshot;
#   4. a second broker host comes up and both web nodes are moved to it with SIGHUP (their
#      configuration file edited): no stream closes; the first broker is then stopped.
# Every message that got a 200 must be seen once, in order, with no reset, by both readers.
# Then two brokers, one active (`broker.peer`, `event.failover`), new readers, posts going on
# all along: 5. the active broker is killed (SIGKILL), restarted, and rejoins as the backup;
# 6. the active broker host's link is cut for 5 s (a partition): the backup takes over; restored,
# the old one steps down to backup. Same check: every 200 seen once, in order, no reset.
# Needs root, iproute2, curl, python3. Run by .ci/run; alone: sudo tests/netns.sh [TEMMA_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."

TEMMA=$(realpath "${1:-target/debug/temma}")
NET=10.253.7
P=t$$                          # namespace and interface prefix: unique per run, and short
                               # (an interface name has at most 15 characters)
WORK=$(mktemp -d /tmp/temma-netns.XXXXXX)
PIDS=()

cleanup() {
  status=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Whatever still runs in a namespace goes with it.
  for ns in sw broker broker2 web1 web2 client; do
    ip netns pids "$P-$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  wait 2>/dev/null || true
  for ns in sw broker broker2 web1 web2 client; do ip netns del "$P-$ns" 2>/dev/null || true; done
  if [ "$status" -ne 0 ]; then
    echo "--- netns test failed; logs:"
    tail -n 30 "$WORK"/*.log 2>/dev/null || true
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT INT TERM

step() { echo "--- netns: $*"; }

# Hosts: each namespace gets eth0 (a veth whose other end is on the bridge).
ip netns add "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
veth() {  # the bridge side of a host's link: t<pid>b, t<pid>w1, …
  case $1 in broker) echo "${P}b" ;; broker2) echo "${P}b2" ;; web1) echo "${P}w1" ;; web2) echo "${P}w2" ;; client) echo "${P}c" ;; esac
}
add_host() {  # name last-octet
  ip netns add "$P-$1"
  ip link add "$(veth "$1")" type veth peer name eth0 netns "$P-$1"
  ip link set "$(veth "$1")" netns "$P-sw"
  ip -n "$P-sw" link set "$(veth "$1")" master br0 up
  ip -n "$P-$1" addr add "$NET.$2/24" dev eth0
  ip -n "$P-$1" link set eth0 up
  ip -n "$P-$1" link set lo up
}
add_host broker 1
add_host broker2 2
add_host web1 11
add_host web2 12
add_host client 100
in_ns() { local ns=$1; shift; ip netns exec "$P-$ns" "$@"; }

# One configuration (the shipped file) and, per host, environment overrides.
COMMON=(
  TEMMA_BROKER__EMBEDDED=false
  TEMMA_BROKER__SCRIPTS=[]           # the transport is under test, not the rate limit
  TEMMA_SERVER__SHUTDOWN_GRACE_SECS=1
)
# A broker binds its own host's address (the environment of its host).
broker_env() {  # last-octet
  echo TEMMA_BROKER__SNAPSHOT=zmq_broker_snapshot \
    TEMMA_APPLICATION__DATASOURCES__ZMQ_BROKER_PULL="zmq-bind://PULL@$NET.$1:5000" \
    TEMMA_APPLICATION__DATASOURCES__ZMQ_BROKER_PUB="zmq-bind://PUB@$NET.$1:6000" \
    TEMMA_APPLICATION__DATASOURCES__ZMQ_BROKER_SNAPSHOT="zmq-bind://ROUTER@$NET.$1:7000"
}
# Web nodes read where the broker is from a file (SIGHUP reads it again; the environment of a
# running process cannot change); everything else is the shipped file's.
WEB_CONFIG=$WORK/etc/temma.toml
point_web_nodes_at() {  # last-octet of the broker host
  mkdir -p "$WORK/etc"
  sed -e "s|^zmq_client_push = .*|zmq_client_push = \"zmq://PUSH@$NET.$1:5000\"|" \
      -e "s|^zmq_client_sub = .*|zmq_client_sub = \"zmq://SUB@$NET.$1:6000\"|" \
      -e "s|^# zmq_client_snapshot = .*|zmq_client_snapshot = \"zmq://DEALER@$NET.$1:7000\"|" \
      -e "s|^# snapshot = \"zmq_client_snapshot\"|snapshot = \"zmq_client_snapshot\"|" \
      -e "s|^root = \"..\"|root = \"$PWD\"|" etc/temma.toml >"$WEB_CONFIG.new"
  mv "$WEB_CONFIG.new" "$WEB_CONFIG"
}
point_web_nodes_at 1
declare -A PID_OF
start() {  # name command... : runs in the host's namespace, logs to $WORK/name.log
  local name=$1; shift
  # `ip netns exec` and `env` exec: $! is the process itself, for `kill` and `wait`.
  ip netns exec "$P-$name" env "${COMMON[@]}" "$@" >>"$WORK/$name.log" 2>&1 &
  PID_OF[$name]=$!
  PIDS+=("$!")
}
start_broker() {  # [name last-octet]
  local name=${1:-broker} octet=${2:-1}
  # shellcheck disable=SC2046
  start "$name" env $(broker_env "$octet") "$TEMMA" broker -c etc/temma.toml
}
start_web() {  # name address
  start "$1" env TEMMA_SERVER__LISTEN="$2:8000" "$TEMMA" serve -c "$WEB_CONFIG"
}
stop() {  # name: SIGTERM and wait; it must exit cleanly
  kill -TERM "${PID_OF[$1]}"
  wait "${PID_OF[$1]}"
}
wait_log() {  # name text
  for _ in $(seq 100); do grep -q "$2" "$WORK/$1.log" && return 0; sleep 0.1; done
  echo "no \"$2\" in $1's log"; return 1
}

OK=$WORK/ok.txt
: >"$OK"
n=0
post() {  # count: posts on web1 from the client host; remembers what got a 200
  for _ in $(seq "$1"); do
    n=$((n + 1))
    code=$(in_ns client curl -s -o /dev/null -w '%{http_code}' -m 5 \
      --data-urlencode from=netns --data-urlencode "text=m$n" "http://$NET.11:8000/message/broadcast" || true)
    if [ "$code" = 200 ]; then echo "m$n" >>"$OK"; fi
    sleep 0.02
  done
}
count_ok() { wc -l <"$OK"; }
wait_seen() {  # every 200 in both readers' logs
  for _ in $(seq 300); do
    if python3 tests/netns/sse_log.py check "$WORK/r1.log" "$OK" >/dev/null &&
       python3 tests/netns/sse_log.py check "$WORK/r2.log" "$OK" >/dev/null; then return 0; fi
    sleep 0.1
  done
  python3 tests/netns/sse_log.py check "$WORK/r1.log" "$OK" || true
  python3 tests/netns/sse_log.py check "$WORK/r2.log" "$OK" || true
  return 1
}

step "hosts up: broker $NET.1, web1 $NET.11, web2 $NET.12, client $NET.100"
start_broker; wait_log broker "broker running"
start_web web1 "$NET.11"; wait_log web1 "listening on"
start_web web2 "$NET.12"; wait_log web2 "listening on"
: >"$WORK/r1.log"; : >"$WORK/r2.log"
ip netns exec "$P-client" python3 tests/netns/sse_log.py read "http://$NET.11:8000/event/fetch" "$WORK/r1.log" &
PIDS+=("$!")
ip netns exec "$P-client" python3 tests/netns/sse_log.py read "http://$NET.12:8000/event/fetch" "$WORK/r2.log" &
PIDS+=("$!")
# Both web nodes reach the broker: a post on web1 gets a 200 once both SUBs are in.
for _ in $(seq 100); do
  code=$(in_ns client curl -s -o /dev/null -w '%{http_code}' -m 5 \
    --data-urlencode from=netns --data-urlencode text=warm-up "http://$NET.11:8000/message/broadcast" || true)
  [ "$code" = 200 ] && grep -q warm-up "$WORK/r2.log" && break
  sleep 0.1
done
grep -q warm-up "$WORK/r2.log"
post 20; wait_seen
step "$(count_ok) messages across hosts"

step "web2's link down for 5 s"
ip -n "$P-sw" link set "$(veth web2)" down
post 20
sleep 5
ip -n "$P-sw" link set "$(veth web2)" up
post 5; wait_seen
step "web2 back: its reader has all $(count_ok)"

step "broker restart"
stop broker
post 5        # no broker: 503, not remembered
start_broker; wait_log broker "broker running"
sleep 1
post 20; wait_seen
step "after the broker restart: $(count_ok) messages, none lost"

step "web2 restart while web1 takes posts"
stop web2
post 20
start_web web2 "$NET.12"
post 5; wait_seen
# The new web2 took its history from the broker's snapshot.
in_ns client curl -s "http://$NET.12:8000/metrics" | grep 'temma_snapshot_syncs_total{result="Complete"}'

step "a second broker host; both web nodes moved to it by SIGHUP"
start_broker broker2 2; wait_log broker2 "broker running"
opens() { cat "$WORK/r1.log" "$WORK/r2.log" | grep -c '^open ' || true; }
opened=$(opens)
point_web_nodes_at 2
kill -HUP "${PID_OF[web1]}" "${PID_OF[web2]}"
post 20
wait_log web1 "rewired event.sub"
wait_log web2 "rewired event.sub"
post 10; wait_seen
if [ "$(opens)" != "$opened" ]; then echo "an SSE stream was closed by the move"; exit 1; fi
step "the first broker stopped: everything goes through the second"
stop broker
post 20; wait_seen
python3 tests/netns/sse_log.py check "$WORK/r1.log" "$OK"
python3 tests/netns/sse_log.py check "$WORK/r2.log" "$OK"
step "one broker at a time: all green"

step "two brokers, one active: $NET.1 and $NET.2 as a pair, web nodes in failover mode"
for name in web1 web2 broker2; do stop "$name"; done
# The readers of the first part stop; new ones read the pair.
for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
pair_env() {  # my-octet peer-octet
  # shellcheck disable=SC2046
  echo $(broker_env "$1") TEMMA_BROKER__HTTP="$NET.$1:8001" \
    TEMMA_BROKER__PEER=zmq_broker_peer TEMMA_BROKER__PEER_SNAPSHOT=zmq_broker_peer_snapshot \
    TEMMA_APPLICATION__DATASOURCES__ZMQ_BROKER_PEER="zmq://SUB@$NET.$2:6000" \
    TEMMA_APPLICATION__DATASOURCES__ZMQ_BROKER_PEER_SNAPSHOT="zmq://DEALER@$NET.$2:7000"
}
start_pair_broker() {  # name my-octet peer-octet
  # shellcheck disable=SC2046
  start "$1" env $(pair_env "$2" "$3") "$TEMMA" broker -c etc/temma.toml
}
# The web nodes' file lists both brokers, in the same order in each list.
sed -e "s|^zmq_client_push = .*|zmq_client_push = \"zmq://PUSH@$NET.1:5000;$NET.2:5000\"|" \
    -e "s|^zmq_client_sub = .*|zmq_client_sub = \"zmq://SUB@$NET.1:6000;$NET.2:6000\"|" \
    -e "s|^# zmq_client_snapshot = .*|zmq_client_snapshot = \"zmq://DEALER@$NET.1:7000;$NET.2:7000\"|" \
    -e "s|^# snapshot = \"zmq_client_snapshot\"|snapshot = \"zmq_client_snapshot\"|" \
    -e "s|^failover = false|failover = true|" \
    -e "s|^root = \"..\"|root = \"$PWD\"|" etc/temma.toml >"$WEB_CONFIG"
"$TEMMA" check -c "$WEB_CONFIG" | grep -q "failover: this node follows 2 brokers"
: >"$WORK/broker.log"; : >"$WORK/broker2.log"
start_pair_broker broker 1 2; wait_log broker "broker running"
start_pair_broker broker2 2 1; wait_log broker2 "broker running"
start_web web1 "$NET.11"; wait_log web1 "listening on"
start_web web2 "$NET.12"; wait_log web2 "listening on"
state_of() {  # octet: active, backup, or nothing
  in_ns client curl -s -m 1 "http://$NET.$1:8001/health" |
    python3 -c 'import json,sys; p=json.load(sys.stdin)["pair"]; print(p["state"] + ("+" if p["backup_confirmed"] else ""))' 2>/dev/null || true
}
wait_pair() {  # until one broker is active with a confirmed backup; prints its octet
  for _ in $(seq 100); do
    for octet in 1 2; do
      if [ "$(state_of "$octet")" = "active+" ]; then echo "$octet"; return 0; fi
    done
    sleep 0.1
  done
  echo "no broker active with a confirmed backup" >&2; return 1
}
active=$(wait_pair)
OK=$WORK/ok2.txt
: >"$OK"
: >"$WORK/r3.log"; : >"$WORK/r4.log"
ip netns exec "$P-client" python3 tests/netns/sse_log.py read "http://$NET.11:8000/event/fetch" "$WORK/r3.log" &
PIDS+=("$!")
ip netns exec "$P-client" python3 tests/netns/sse_log.py read "http://$NET.12:8000/event/fetch" "$WORK/r4.log" &
PIDS+=("$!")
for _ in $(seq 100); do grep -q '^open' "$WORK/r3.log" && grep -q '^open' "$WORK/r4.log" && break; sleep 0.1; done
wait_seen_pair() {
  for _ in $(seq 300); do
    if python3 tests/netns/sse_log.py check "$WORK/r3.log" "$OK" >/dev/null &&
       python3 tests/netns/sse_log.py check "$WORK/r4.log" "$OK" >/dev/null; then return 0; fi
    sleep 0.1
  done
  python3 tests/netns/sse_log.py check "$WORK/r3.log" "$OK" || true
  python3 tests/netns/sse_log.py check "$WORK/r4.log" "$OK" || true
  return 1
}
# Posts go on all along, alternately through web1 and web2, from the client host.
posting() {
  local i=0 web
  while [ ! -e "$WORK/stop-posting" ]; do
    i=$((i + 1)); web=$((11 + i % 2))
    code=$(in_ns client curl -s -o /dev/null -w '%{http_code}' -m 5 \
      --data-urlencode from=netns --data-urlencode "text=f$i" "http://$NET.$web:8000/message/broadcast" || true)
    if [ "$code" = 200 ]; then echo "f$i" >>"$OK"; fi
    sleep 0.01
  done
}
posting &
POSTER=$!
PIDS+=("$POSTER")
sleep 1
name_of() { if [ "$1" = 1 ]; then echo broker; else echo broker2; fi; }
other_of() { if [ "$1" = 1 ]; then echo 2; else echo 1; fi; }

step "SIGKILL the active broker ($NET.$active) while posts go on"
before=$(count_ok)
kill -KILL "${PID_OF[$(name_of "$active")]}"
wait "${PID_OF[$(name_of "$active")]}" 2>/dev/null || true
for _ in $(seq 50); do [ "$(state_of "$(other_of "$active")")" = active ] && break; sleep 0.1; done
sleep 1
[ "$(count_ok)" -gt "$before" ] || { echo "no post got a 200 after the takeover"; exit 1; }
step "the backup took over; the killed broker comes back and rejoins"
start_pair_broker "$(name_of "$active")" "$active" "$(other_of "$active")"
active=$(wait_pair)
step "pair formed again: $NET.$active active"
sleep 1

step "partition: the active broker host's link ($NET.$active) down for 5 s"
cut=$(name_of "$active")
before=$(count_ok)
ip -n "$P-sw" link set "$(veth "$cut")" down
sleep 5
[ "$(count_ok)" -gt "$before" ] || { echo "no post got a 200 during the partition"; exit 1; }
[ "$(state_of "$(other_of "$active")")" = active ] || { echo "the backup did not take over"; exit 1; }
ip -n "$P-sw" link set "$(veth "$cut")" up
# The isolated broker hears one with a higher term: it steps down and copies it.
for _ in $(seq 100); do
  case $(state_of "$active") in backup) break ;; esac
  sleep 0.1
done
[ "$(state_of "$active")" = backup ] || { echo "the isolated broker did not step down"; exit 1; }
active=$(wait_pair)
step "partition healed: $NET.$active active, the other its backup"
sleep 1
touch "$WORK/stop-posting"
wait "$POSTER"
wait_seen_pair
python3 tests/netns/sse_log.py check "$WORK/r3.log" "$OK"
python3 tests/netns/sse_log.py check "$WORK/r4.log" "$OK"
python3 tests/netns/sse_log.py same "$WORK/r3.log" "$WORK/r4.log" "$OK"
for web in 11 12; do
  health=$(in_ns client curl -s "http://$NET.$web:8000/health")
  grep -q '"failovers":2' <<<"$health" ||
    { echo "web node $NET.$web did not count 2 failovers: $health"; exit 1; }
done
if [ "$(cat "$WORK/r3.log" "$WORK/r4.log" | grep -c '^open ')" != 2 ]; then echo "an SSE stream was closed"; exit 1; fi
step "failover: $(count_ok) messages got a 200 across a kill and a partition; all seen once, in order"
step "all green"
