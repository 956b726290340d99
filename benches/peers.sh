# Helpers for the scripts that install packages, run temma's peers or drive temma (sourced by
# compare.sh, scale.sh, broker_cpu.sh, burst.sh, subscription_flood.sh and .ci/run).

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# install PACKAGE… — Debian packages, for a machine that lacks them.
install() {
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# start_nchan DIR [SED_ARGS…] — nginx + Nchan (installed if missing) in the work folder DIR,
# with benches/nchan.conf (its @DIR@ replaced, then SED_ARGS applied, e.g. -e 's#…#…#'); waits
# for nginx to start. Sets NCHAN_MASTER (the pid in DIR/nginx.pid: `kill -QUIT` stops it) and
# NCHAN_PIDS (its workers, space-separated). Logs in DIR/logs.
start_nchan() {
  local dir=$1
  shift
  [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || install nginx libnginx-mod-nchan
  mkdir -p "$dir/logs" "$dir/tmp"
  chmod 755 "$dir" "$dir/tmp"
  sed -e "s#@DIR@#$dir#g" "$@" benches/nchan.conf >"$dir/nginx.conf"
  nginx -p "$dir" -c nginx.conf >"$dir/out.log" 2>&1 &
  for _ in $(seq 50); do [ -f "$dir/nginx.pid" ] && break; sleep 0.1; done
  sleep 0.5
  NCHAN_MASTER=$(cat "$dir/nginx.pid")
  NCHAN_PIDS=$(pgrep -P "$NCHAN_MASTER" | tr '\n' ' ')
}

# free_port — a TCP port of 127.0.0.1 free right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# broker_driver — builds temma and `cargo bench --bench broker` (release) and prints the bench
# binary: run with `--pull ADDR --pub ADDR --messages N`, it is a producer (PUSH) and a consumer
# (SUB, order checked) for a broker started by hand.
broker_driver() {
  cargo build --release --quiet
  cargo bench --bench broker --no-run --message-format=json 2>/dev/null | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "broker" and m.get("executable"):
        print(m["executable"])'
}

# zmq_sources PULL_PORT PUB_PORT — the head of a temma.toml: the repository as root, and a
# broker's PULL and PUB bound on 127.0.0.1 with the web node's PUSH and SUB connected to them.
zmq_sources() {
  cat <<EOF
[application]
root = "$PWD"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:$1"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:$1"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:$2"
zmq_client_sub = "zmq://SUB@127.0.0.1:$2"
EOF
}

# broker_config FILE PULL_PORT PUB_PORT [TOML_LINE...] — a temma.toml for the benches' brokers
# and nodes: zmq_sources, `[broker] watch = false`, the given lines (keys of [broker], then any
# later tables), and warnings only in the log (with the lines saying it runs).
broker_config() {
  local file=$1 pull=$2 pub=$3
  shift 3
  mkdir -p "$(dirname "$file")"
  {
    zmq_sources "$pull" "$pub"
    echo "[broker]"
    echo "watch = false"
    printf '%s\n' "$@"
    echo "[log]"
    echo 'level = "warn,temma::app=info"'
  } >"$file"
}

# wait_log FILE TEXT — waits up to 5 s for TEXT to appear in FILE (a server saying it runs);
# exits the script if it does not.
wait_log() {
  for _ in $(seq 100); do grep -q "$2" "$1" && return; sleep 0.05; done
  echo "no '$2' in $1" >&2
  exit 1
}
