# Helpers for the scripts that install packages or run temma's peers (sourced by compare.sh,
# scale.sh and .ci/run).

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
