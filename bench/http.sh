#!/usr/bin/env bash
# http-hello against nginx (Debian's nginx-light), both with 1 worker, interleaved rounds.
# Load: wrk -t1 -c64, plain keep-alive and 16-deep pipelining (bench/pipeline.lua).
# Server pinned to CPU 0, wrk to CPU 1.
#
#   bash bench/http.sh [ROUNDS] [DURATION_S]        (defaults: 3 rounds of 10 s)
#
# Needs: wrk, nginx-light (apt-get install wrk nginx-light).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-3}
duration=${2:-10}
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx-light" >&2; exit 1; }

cargo build --release -q --bin wharf
mkdir -p bench-results
out="bench-results/http-$(date +%Y%m%d-%H%M%S).jsonl"
port=18080
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
error_log $work/error.log warn;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  default_type text/plain;
  client_body_temp_path $work;
  server {
    listen 127.0.0.1:$port reuseport;
    location / { return 200 "Hello, World"; }
  }
}
NGINX
cat >"$work/wharf.toml" <<TOML
[server]
workers = 1
[metrics]
listen = "127.0.0.1:0"
[services.http]
plugin = "http-hello"
listen = "127.0.0.1:$port"
TOML

start_server() {
  case $1 in
    nginx) taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" -g 'daemon off;' & ;;
    wharf-epoll) WHARF_LOG=warn taskset -c 0 target/release/wharf serve --config "$work/wharf.toml" --backend epoll & ;;
    wharf-io_uring) WHARF_LOG=warn taskset -c 0 target/release/wharf serve --config "$work/wharf.toml" --backend io_uring & ;;
  esac
  server_pid=$!
  wait_for_port "$port" || exit 1
}

cpu_seconds() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }

for round in $(seq "$rounds"); do
  for mode in plain pipeline16; do
    for server in nginx wharf-epoll wharf-io_uring; do
      start_server "$server"
      script=()
      [ "$mode" = pipeline16 ] && script=(-s bench/pipeline.lua)
      # nginx's work happens in its forked worker: count the server's children too.
      pids="$server_pid $(pgrep -P "$server_pid" | tr "\n" " " || true)"
      before=0; for p in $pids; do before=$(echo "$before + $(cpu_seconds "$p")" | bc); done
      result=$(taskset -c 1 wrk -t1 -c64 -d"${duration}s" --latency "${script[@]}" "http://127.0.0.1:$port/")
      after=0; for p in $pids; do after=$(echo "$after + $(cpu_seconds "$p")" | bc); done
      stop_server "$server_pid"
      wrk_row "$server" "$mode" "$before" "$after" "$result" >>"$out"
      tail -1 "$out"
    done
  done
  echo "round $round done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(s, m, k):
    v = [r[k] for r in rows if r["server"] == s and r["mode"] == m and r[k] is not None]
    return statistics.median(v) if v else float("nan")
print(f"\n{'mode':11} {'server':15} {'median req/s':>13} {'p50 us':>8} {'p99 us':>8} {'srv cpu us/req':>14} {'errors':>6}")
for m in ["plain", "pipeline16"]:
    for s in ["nginx", "wharf-epoll", "wharf-io_uring"]:
        e = sum(r["errors"] for r in rows if r["server"] == s and r["mode"] == m)
        print(f"{m:11} {s:15} {med(s,m,'rps'):13.0f} {med(s,m,'p50_us'):8.0f} {med(s,m,'p99_us'):8.0f} {med(s,m,'server_cpu_us_per_req'):14.2f} {e:6}")
print()
for m in ["plain", "pipeline16"]:
    n = med("nginx", m, "rps")
    print(f"{m:11}: epoll/nginx {med('wharf-epoll', m, 'rps')/n:.2f}x  io_uring/nginx {med('wharf-io_uring', m, 'rps')/n:.2f}x  "
          f"p99 nginx {med('nginx', m, 'p99_us'):.0f} us, epoll {med('wharf-epoll', m, 'p99_us'):.0f} us, io_uring {med('wharf-io_uring', m, 'p99_us'):.0f} us")
PY
echo "raw: $out"
