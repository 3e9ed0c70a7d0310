#!/usr/bin/env bash
# io_uring: what fewer operations buy (issue 18). Echo, 128-byte messages, one server thread
# pinned to CPU 0, load pinned to CPU 1, interleaved rounds (every server at every point,
# then the next round), closed loop (bench/peers echo-load: round trips/s) and open loop at a
# fixed rate (`wharf bench echo --rate`: server CPU per request at equal work).
#
#   bash bench/uring.sh [ROUNDS] [DURATION_S] [RATE] [CONNECTIONS...]
#   bash bench/uring.sh 3 5 100000 64 512
#
# Servers: tokio-echo-baseline, wharf epoll, wharf io_uring (the ring path), wharf io_uring
# on its tokio-uring fallback (WHARF_URING_FALLBACK=1), and the uring-echo peer (the ring
# path without wharf's framework) with DEFER_TASKRUN and with COOP_TASKRUN (--no-defer).
# SERVERS="a b ..." runs a subset. Prints medians per server, point
# and mode, the ratios to wharf epoll, and uring-echo's ring operations per request; raw
# JSON lines go to bench-results/uring-*.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-3}
duration=${2:-5}
rate=${3:-100000}
shift 3 2>/dev/null || true
conns=("$@")
[ ${#conns[@]} -gt 0 ] || conns=(64 512)
servers=(${SERVERS:-tokio-baseline wharf-epoll wharf-io_uring wharf-io_uring-fallback uring-all uring-no-defer})

cargo build --release -q -p wharf -p wharf-bench-peers
bin=target/release
mkdir -p bench-results
out="bench-results/uring-$(date +%Y%m%d-%H%M%S).jsonl"
port=17100
cfg=$(mktemp)
errlog=$(mktemp)
trap 'rm -f "$cfg" "$errlog"; kill $(jobs -p) 2>/dev/null || true' EXIT
echo_config "$port" >"$cfg"

start_server() {
  : >"$errlog"
  case $1 in
    uring-all) taskset -c 0 "$bin/uring-echo" "127.0.0.1:$port" >/dev/null 2>"$errlog" & ;;
    uring-no-*) taskset -c 0 "$bin/uring-echo" "127.0.0.1:$port" "--${1#uring-}" >/dev/null 2>"$errlog" & ;;
    *) start_echo_server "$1" "$bin" "$cfg" "$port" || exit 1; return ;;
  esac
  server_pid=$!
  wait_for_port "$port" || exit 1
}

# One JSON line from either load generator, plus the uring-echo counters if any.
row() {
  python3 - "$@" <<'PY'
import json, sys
server, mode, conns, text, errlog, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], float(sys.argv[6])
r = json.loads(text)
if mode == "closed":
    row = {"rps": r["rps"], "p99_us": r["p99_us"], "cpu_us": r["server_cpu_us_per_rt"], "errors": r["errors"],
           "requests": r["rps"] * window}
else:
    srv = r.get("server") or {}
    row = {"rps": r["ok_per_sec"], "p99_us": r["latency_us"]["p99"], "cpu_us": srv.get("us_per_request"),
           "errors": r["errors"] + r.get("stalled", 0), "requests": r["requests"]}
row.update({"label": server, "mode": mode, "connections": conns})
try:
    lines = [l for l in open(errlog) if l.startswith("{")]
    if lines:
        row["ring"] = json.loads(lines[-1])
except OSError:
    pass
print(json.dumps(row))
PY
}

ulimit -n 65536 2>/dev/null || true
for round in $(seq "$rounds"); do
  for c in "${conns[@]}"; do
    for mode in closed open; do
      for server in "${servers[@]}"; do
        start_server "$server"
        if [ "$mode" = closed ]; then
          text=$(taskset -c 1 "$bin/echo-load" "127.0.0.1:$port" --connections "$c" --size 128 \
            --duration "$duration" --server-pid "$server_pid" --label "$server")
        else
          text=$(taskset -c 1 "$bin/wharf" bench echo "127.0.0.1:$port" --connections "$c" \
            --duration "$duration" --rate "$rate" --threads 1 --json --server-pid "$server_pid")
        fi
        stop_server "$server_pid"
        row "$server" "$mode" "$c" "$text" "$errlog" "$duration" | tee -a "$out"
      done
    done
  done
  echo "round $round done" >&2
done

python3 - "$out" "$duration" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
window = float(sys.argv[2])
by = {}
for r in rows:
    by.setdefault((r["label"], r["mode"], r["connections"]), []).append(r)
def med(key, *k):
    v = [r[key] for r in by.get(k, []) if r.get(key) is not None]
    return statistics.median(v) if v else float("nan")
labels = list(dict.fromkeys(r["label"] for r in rows))
for mode in ["closed", "open"]:
    print(f"\n{mode} loop" + ("" if mode == "closed" else " (fixed rate)"))
    print(f"{'server':20} {'conns':>5} {'req/s':>9} {'p99 us':>8} {'cpu us/req':>10} {'cpu/epoll':>9} {'req/s/epoll':>11} {'errors':>6} {'n':>2}")
    for c in sorted({r["connections"] for r in rows}):
        ec, er = med("cpu_us", "wharf-epoll", mode, c), med("rps", "wharf-epoll", mode, c)
        for l in labels:
            k = (l, mode, c)
            if k not in by:
                continue
            errs = sum(r["errors"] for r in by[k])
            cpu, rps = med("cpu_us", *k), med("rps", *k)
            print(f"{l:20} {c:5} {rps:9.0f} {med('p99_us', *k):8.0f} {cpu:10.2f} {cpu/ec:9.3f} {rps/er:11.3f} {errs:6} {len(by[k]):2}")
print("\nuring-echo ring operations (whole run incl. warm-up; per request approximate)")
print(f"{'server':20} {'mode':6} {'conns':>5} {'enters/req':>10} {'sqes/req':>8} {'cqes/req':>8} {'cqes/enter':>10} {'enobufs':>7} {'rearms':>6}")
for (l, mode, c), rs in sorted(by.items()):
    rs = [r for r in rs if "ring" in r and r["requests"]]
    if not rs:
        continue
    def per(key):
        # The counters cover warm-up (about 1.2 s) and the window; requests only the window.
        return statistics.median(r["ring"][key] / (r["requests"] * (window + 1.2) / window) for r in rs)
    cpe = statistics.median(r["ring"]["cqes"] / max(r["ring"]["enters"], 1) for r in rs)
    print(f"{l:20} {mode:6} {c:5} {per('enters'):10.3f} {per('sqes'):8.3f} {per('cqes'):8.3f} {cpe:10.1f} {sum(r['ring']['enobufs'] for r in rs):7} {sum(r['ring']['multishot_rearms'] for r in rs):6}")
PY
echo "raw: $out"
