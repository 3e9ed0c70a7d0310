#!/usr/bin/env bash
# Metrics cost and scrape latency (issue 6), 1 worker, server on CPU 0, load on CPU 1:
#   - echo (64 connections, 128-byte ping-pong) and http-hello (wrk -c64) with metrics on vs
#     off, same backend, interleaved rounds;
#   - /metrics scrape time with 20 services configured while one of them is under load.
#
#   bash bench/metrics.sh [ROUNDS] [DURATION_S]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-5}
duration=${2:-5}
cargo build --release -q -p wharf -p wharf-bench-peers
bin=target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

write_config() { # $1 = file, $2 = on|off
  {
    echo '[server]'; echo 'workers = 1'
    if [ "$2" = on ]; then echo '[metrics]'; echo 'listen = "127.0.0.1:19898"'; fi
    echo '[services.echo]'; echo 'plugin = "echo"'; echo 'listen = "127.0.0.1:19001"'
    echo '[services.web]'; echo 'plugin = "http-hello"'; echo 'listen = "127.0.0.1:19002"'
  } >"$1"
}
write_config "$work/on.toml" on
write_config "$work/off.toml" off

start() { # $1 = config, $2 = backend
  WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$1" --backend "$2" &
  pid=$!
  wait_for_port 19001
}
stop() { stop_server "$pid"; }

for backend in epoll io_uring; do
  for round in $(seq "$rounds"); do
    for m in on off; do
      start "$work/$m.toml" "$backend"
      echo_rps=$(taskset -c 1 "$bin/echo-load" 127.0.0.1:19001 --connections 64 --duration "$duration" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rps"])')
      http_rps=$(taskset -c 1 wrk -t1 -c64 -d"${duration}s" http://127.0.0.1:19002/ | awk '/Requests\/sec/ {print $2}')
      stop
      echo "backend=$backend round=$round metrics=$m echo_rps=$echo_rps http_rps=$http_rps"
    done
  done
done

# 20 services, one under load, scrape latency.
{
  echo '[server]'; echo 'workers = 1'
  echo '[metrics]'; echo 'listen = "127.0.0.1:19898"'
  for i in $(seq -w 1 20); do
    echo "[services.s$i]"; echo 'plugin = "http-hello"'; echo "listen = \"127.0.0.1:190$i\""
  done
} >"$work/twenty.toml"
for backend in epoll io_uring; do
  WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$work/twenty.toml" --backend "$backend" &
  pid=$!
  sleep 0.5
  taskset -c 1 wrk -t1 -c64 -d12s http://127.0.0.1:19001/ >/dev/null &
  load=$!
  sleep 1
  times=$(for _ in $(seq 100); do curl -s -o /dev/null -w '%{time_total}\n' http://127.0.0.1:19898/metrics; sleep 0.05; done)
  wait "$load"
  stop_server "$pid"
  echo "$times" | python3 -c "
import sys, statistics
t = sorted(float(x) * 1000 for x in sys.stdin if x.strip())
print('backend=$backend scrape with 20 services under load: median %.2f ms, p99 %.2f ms, max %.2f ms (n=%d)' % (statistics.median(t), t[int(len(t) * 0.99) - 1], t[-1], len(t)))"
done
