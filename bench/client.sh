#!/usr/bin/env bash
# Can `wharf bench echo` saturate a peer? Against the minimal tokio echo server (CPU 0), compare
# the round trips per second it drives from one client thread (CPU 1) with those of the
# hand-written single-thread tokio client `echo-load`, in interleaved rounds.
#
#   bash bench/client.sh [ROUNDS] [DURATION_S] [CONNECTIONS...]
#   bash bench/client.sh 3 5 64 512
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-3}
duration=${2:-5}
shift 2 2>/dev/null || true
conns=("$@")
[ ${#conns[@]} -gt 0 ] || conns=(64 512)

cargo build --release -q -p wharf -p wharf-bench-peers
bin=target/release
port=17010
taskset -c 0 "$bin/tokio-echo-baseline" "127.0.0.1:$port" &
server_pid=$!
trap 'stop_server "$server_pid"' EXIT
wait_for_port "$port"
out=$(mktemp)
for round in $(seq "$rounds"); do
  for c in "${conns[@]}"; do
    rps=$(taskset -c 1 "$bin/echo-load" "127.0.0.1:$port" --connections "$c" --size 128 \
      --duration "$duration" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rps"])')
    echo "echo-load $c $rps" | tee -a "$out"
    rps=$(taskset -c 1 "$bin/wharf" bench echo "127.0.0.1:$port" -c "$c" --size 128 \
      --duration "$duration" --threads 1 --json |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["requests_per_sec"])')
    echo "wharf-bench $c $rps" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for client, c, rps in rows:
    by.setdefault((client, int(c)), []).append(float(rps))
for c in sorted({k[1] for k in by}):
    a, b = statistics.median(by[("echo-load", c)]), statistics.median(by[("wharf-bench", c)])
    print(f"conns {c:4}: echo-load {a:9.0f} rt/s   wharf bench {b:9.0f} rt/s   ratio {b/a:.3f}")
PY
rm -f "$out"
