#!/usr/bin/env bash
# Config reload under load (issue 9), 1 worker, server on CPU 0, load on CPU 1: a 64-connection
# echo load for DURATION_S seconds, with no reload vs a SIGHUP every 250 ms whose new config
# alternately changes the loaded service itself (max_connections) and another service
# (transform). Interleaved rounds; prints req/s, errors and reloads counted per run.
#
#   bash bench/reload.sh [ROUNDS] [DURATION_S]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-3}
duration=${2:-10}
cargo build --release -q -p wharf
wharf=target/release/wharf
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
loaded=17001 other=17002 metrics=17009

write_config() { # $1 = loaded service's max_connections, $2 = other service's transform
  cat > "$work/c.new" <<C
[server]
workers = 1
shutdown_grace = "30s"
[metrics]
listen = "127.0.0.1:$metrics"
[services.loaded]
plugin = "echo"
listen = "127.0.0.1:$loaded"
max_connections = $1
[services.other]
plugin = "echo"
listen = "127.0.0.1:$other"
[services.other.options]
transform = "$2"
C
  mv "$work/c.new" "$work/c.toml" # a reader never sees half a file
}

run() { # $1 = backend, $2 = yes|no (reloads)
  write_config 10000 none
  taskset -c 0 "$wharf" serve --config "$work/c.toml" --backend "$1" 2> "$work/server.log" &
  local pid=$! hup=
  wait_for_port $loaded
  if [ "$2" = yes ]; then
    (
      i=0
      end=$((SECONDS + duration))
      while [ $SECONDS -lt $end ]; do
        i=$((i + 1))
        if [ $((i % 2)) = 0 ]; then write_config 10000 none; else write_config 9999 upper; fi
        kill -HUP $pid
        sleep 0.25
      done
    ) &
    hup=$!
  fi
  taskset -c 1 "$wharf" bench echo "127.0.0.1:$loaded" -c 64 -d "$duration" --json > "$work/bench.json"
  if [ -n "$hup" ]; then wait "$hup"; fi
  sleep 0.5
  local reloads
  reloads=$(curl -s "127.0.0.1:$metrics/metrics" | awk '/^wharf_config_reloads_total\{result="success"\}/ {print $2}')
  python3 - "$work/bench.json" "$work/server.log" "$1" "$2" "$reloads" <<'PY'
import json, re, statistics, sys
d = json.load(open(sys.argv[1]))
scale = {"ns": 1e-3, "µs": 1, "ms": 1e3, "s": 1e6}
took = [float(v) * scale[u] for v, u in re.findall(r"took=([0-9.]+)(ns|µs|ms|s)\b", open(sys.argv[2]).read())]
median = f"  reload median {statistics.median(took):.0f} us, max {max(took):.0f} us" if took else ""
print(f"{sys.argv[3]:9} reloads={sys.argv[4]:3} {d['requests_per_sec']:>10.0f} req/s  errors {d['errors']}  reloads applied {sys.argv[5]}{median}")
PY
  stop_server $pid
}

for _ in $(seq "$rounds"); do
  for backend in epoll io_uring; do
    run $backend no
    run $backend yes
  done
done
