#!/usr/bin/env bash
# Echo benchmark: wharf (epoll and io_uring backends, 1 worker) against a minimal hand-written
# tokio echo server, 128-byte closed-loop ping-pong, interleaved rounds (A B C A B C ...) so
# drift on a shared machine hits every server alike. Server pinned to CPU 0, load to CPU 1.
#
#   bash bench/echo.sh [ROUNDS] [DURATION_S] [CONNECTIONS...]
#   bash bench/echo.sh 5 5 1 64 512
#
# Prints medians per server and connection count, the ratios the issues ask for, and the
# server's CPU time per round trip. Raw JSON lines go to bench-results/.
#
# OLD_WHARF=/path/to/an/older/wharf adds that binary (epoll) to every round, as
# `wharf-before`, for a before/after comparison in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-5}
duration=${2:-5}
shift 2 2>/dev/null || true
conns=("$@")
[ ${#conns[@]} -gt 0 ] || conns=(1 64 512)

cargo build --release -q -p wharf -p wharf-bench-peers
bin=target/release
mkdir -p bench-results
out="bench-results/echo-$(date +%Y%m%d-%H%M%S).jsonl"
port=17000
cfg=$(mktemp)
trap 'rm -f "$cfg"; kill $(jobs -p) 2>/dev/null || true' EXIT
echo_config "$port" >"$cfg"

ulimit -n 65536 2>/dev/null || true
for round in $(seq "$rounds"); do
  for c in "${conns[@]}"; do
    servers=(tokio-baseline wharf-epoll wharf-io_uring)
    [ -z "${OLD_WHARF:-}" ] || servers+=(wharf-before)
    for server in "${servers[@]}"; do
      start_echo_server "$server" "$bin" "$cfg" "$port" || exit 1
      taskset -c 1 "$bin/echo-load" "127.0.0.1:$port" --connections "$c" --size 128 \
        --duration "$duration" --server-pid "$server_pid" --label "$server" | tee -a "$out"
      stop_server "$server_pid"
    done
  done
  echo "round $round done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["label"], r["connections"]), []).append(r)
def med(label, c, key):
    v = [r[key] for r in by.get((label, c), []) if r[key] is not None]
    return statistics.median(v) if v else float("nan")
conns = sorted({r["connections"] for r in rows})
print(f"\n{'server':16} {'conns':>5} {'median rt/s':>12} {'p99 us':>8} {'srv cpu us/rt':>13} {'errors':>6}")
for c in conns:
    for label in ["tokio-baseline", "wharf-epoll", "wharf-io_uring", "wharf-before"]:
        if (label, c) not in by:
            continue
        errs = sum(r["errors"] for r in by.get((label, c), []))
        print(f"{label:16} {c:5} {med(label,c,'rps'):12.0f} {med(label,c,'p99_us'):8.1f} {med(label,c,'server_cpu_us_per_rt'):13.3f} {errs:6}")
print()
for c in conns:
    e, b, u = med("wharf-epoll", c, "rps"), med("tokio-baseline", c, "rps"), med("wharf-io_uring", c, "rps")
    ec, bc, uc = (med(l, c, "server_cpu_us_per_rt") for l in ["wharf-epoll", "tokio-baseline", "wharf-io_uring"])
    print(f"conns {c:4}: epoll/baseline {e/b:.3f} (cpu/rt {bc/ec:.3f} as efficient)   io_uring/epoll {u/e:.3f} (cpu/rt {ec/uc:.3f} as efficient)")
    if ("wharf-before", c) in by:
        w, wc = med("wharf-before", c, "rps"), med("wharf-before", c, "server_cpu_us_per_rt")
        print(f"            epoll now/before {e/w:.3f} (cpu/rt {wc/ec:.3f} as efficient)")
PY
echo "raw: $out"
