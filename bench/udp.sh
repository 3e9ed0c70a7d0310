#!/usr/bin/env bash
# UDP echo benchmark: wharf (epoll and io_uring backends, 1 worker) against a minimal
# hand-written tokio UDP echo server (bench/peers tokio-udp-echo-baseline, 1 thread), 64-byte
# datagrams, closed loop (`wharf bench udp-echo`: SENDERS sockets, WINDOW datagrams in flight
# each), interleaved rounds (A B C A B C ...) so drift on a shared machine hits every server
# alike. Server pinned to CPU 0, load to CPU 1.
#
#   bash bench/udp.sh [ROUNDS] [DURATION_S] [SENDERS] [WINDOW]
#   bash bench/udp.sh 5 5 4 8
#
# Prints medians per server: datagrams per second, loss, p99, and the server's CPU time per
# datagram; then the ratios. Raw JSON lines go to bench-results/.
#
# OLD_WHARF=/path/to/an/older/wharf adds that binary on both backends to every round, as
# `before-epoll` and `before-io_uring`, for a before/after comparison in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-5}
duration=${2:-5}
senders=${3:-4}
window=${4:-8}

cargo build --release -q -p wharf -p wharf-bench-peers
bin=target/release
mkdir -p bench-results
out="bench-results/udp-$(date +%Y%m%d-%H%M%S).jsonl"
port=17969
cfg=$(mktemp)
trap 'rm -f "$cfg"; kill $(jobs -p) 2>/dev/null || true' EXIT
# One source sends everything here: the per-source rate limit (on by default) is turned off.
cat >"$cfg" <<TOML
[server]
workers = 1
[services.echo]
plugin = "echo"
listen = "udp:127.0.0.1:$port"
max_datagram_rate_per_source = 0
[services.echo.options]
transform = "none"
TOML

wait_for_udp_port() {
  for _ in $(seq 100); do
    grep -qi ":$(printf '%04X' "$1") " /proc/net/udp && return 0
    sleep 0.05
  done
  echo "nothing bound to UDP port $1" >&2
  return 1
}

start_server() {
  case $1 in
    tokio-udp-baseline) taskset -c 0 "$bin/tokio-udp-echo-baseline" "127.0.0.1:$port" 1 & ;;
    wharf-epoll) WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$cfg" --backend epoll & ;;
    wharf-io_uring) WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$cfg" --backend io_uring & ;;
    before-epoll) WHARF_LOG=warn taskset -c 0 "$OLD_WHARF" serve --config "$cfg" --backend epoll & ;;
    before-io_uring) WHARF_LOG=warn taskset -c 0 "$OLD_WHARF" serve --config "$cfg" --backend io_uring & ;;
  esac
  server_pid=$!
  wait_for_udp_port "$port" || exit 1
}

servers=(tokio-udp-baseline wharf-epoll wharf-io_uring)
[ -z "${OLD_WHARF:-}" ] || servers+=(before-epoll before-io_uring)
for round in $(seq "$rounds"); do
  for server in "${servers[@]}"; do
    start_server "$server"
    taskset -c 1 "$bin/wharf" bench udp-echo "127.0.0.1:$port" --size 64 --senders "$senders" \
      --window "$window" --duration "$duration" --warmup 1 --server-pid "$server_pid" --json |
      python3 -c 'import json,sys; d=json.load(sys.stdin); d["label"]=sys.argv[1]; print(json.dumps(d))' "$server" |
      tee -a "$out"
    stop_server "$server_pid"
  done
  echo "round $round done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append(r)
def med(label, f):
    v = [f(r) for r in by.get(label, []) if f(r) is not None]
    return statistics.median(v) if v else float("nan")
dps = lambda r: r["datagrams_per_sec"]
cpu = lambda r: (r["server"] or {}).get("us_per_request")
print(f"\n{'server':20} {'median dgram/s':>14} {'loss %':>8} {'p99 us':>8} {'srv cpu us/dgram':>16}")
for label in ["tokio-udp-baseline", "wharf-epoll", "wharf-io_uring", "before-epoll", "before-io_uring"]:
    if label not in by:
        continue
    print(f"{label:20} {med(label, dps):14.0f} {med(label, lambda r: r['loss_ratio']*100):8.3f} "
          f"{med(label, lambda r: r['latency_us']['p99']):8.1f} {med(label, cpu):16.3f}")
e, b, u = (med(l, dps) for l in ["wharf-epoll", "tokio-udp-baseline", "wharf-io_uring"])
ec, bc, uc = (med(l, cpu) for l in ["wharf-epoll", "tokio-udp-baseline", "wharf-io_uring"])
print(f"\nepoll/baseline {e/b:.3f} (cpu/dgram: {bc/ec:.3f} as efficient)   "
      f"io_uring/epoll {u/e:.3f} (cpu/dgram: {ec/uc:.3f} as efficient)")
for backend in ["epoll", "io_uring"]:
    if f"before-{backend}" in by:
        n, o = med(f"wharf-{backend}", dps), med(f"before-{backend}", dps)
        nc, oc = med(f"wharf-{backend}", cpu), med(f"before-{backend}", cpu)
        print(f"{backend} now/before {n/o:.3f} (cpu/dgram: {oc/nc:.3f} as efficient)")
PY
echo "raw: $out"
