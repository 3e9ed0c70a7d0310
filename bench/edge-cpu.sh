#!/usr/bin/env bash
# What a feature of bench/edge.sh costs with the kernel counted (issue 17): the server's user
# and system CPU time per request, apart, and, where `perf` can count them, its instructions
# (user and kernel), page faults and context switches per request. Hardware counters are often
# missing in a VM; the script says so and counts what it can (software events, /proc times).
#
#   bash bench/edge-cpu.sh [ROUNDS] [DURATION_S] [CONNECTIONS]
#
# Environment: PLUGINS (default http-hello), VARIANTS (default "plain access-log"). 1 worker
# pinned to CPU 0, `wharf bench` to CPU 1, variants interleaved round by round; medians.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-5}
duration=${2:-5}
conns=${3:-64}
cargo build --release -q -p wharf
bin=$PWD/target/release/wharf
port=17557
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || true

events=task-clock,page-faults,context-switches
if perf stat -x, -e instructions:u,instructions:k true 2>&1 | grep -q 'not supported\|not counted'; then
  echo "perf: no hardware counters here (instructions not counted); software events only" >&2
elif command -v perf >/dev/null; then
  events=$events,instructions:u,instructions:k
fi
command -v perf >/dev/null || events=

out=$work/rows.jsonl
for round in $(seq "$rounds"); do
  for plugin in ${PLUGINS:-http-hello}; do
    for variant in ${VARIANTS:-plain access-log}; do
      cfg="$work/$plugin-$variant.toml"
      edge_config "$variant" "$plugin" "$port" "$work" >"$cfg"
      WHARF_LOG=warn taskset -c 0 "$bin" serve --config "$cfg" &
      pid=$!
      wait_for_port "$port"
      extra=()
      [ "$variant" = proxy-v2 ] && extra=(--send-proxy v2)
      kind=echo
      [ "$plugin" = http-hello ] && kind=http
      before=$(cut -d' ' -f14-15 "/proc/$pid/stat")
      if [ -n "$events" ]; then
        perf stat -x, -e "$events" -p "$pid" -o "$work/perf" &
        perf_pid=$!
      fi
      taskset -c 1 "$bin" bench "$kind" "127.0.0.1:$port" -c "$conns" -d "$duration" \
        --warmup 0 --threads 1 --json "${extra[@]}" >"$work/load.json"
      [ -n "$events" ] && { kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; }
      after=$(cut -d' ' -f14-15 "/proc/$pid/stat")
      stop_server "$pid"
      python3 - "$plugin" "$variant" "$before" "$after" "$work/load.json" "$work/perf" \
        "$(getconf CLK_TCK)" <<'PY' | tee -a "$out"
import json, os, sys
plugin, variant, before, after, load, perf, hz = sys.argv[1:8]
r = json.load(open(load))
n = r["requests"]
(u0, s0), (u1, s1) = [map(int, x.split()) for x in (before, after)]
row = {"plugin": plugin, "variant": variant, "requests": n, "rps": r["requests_per_sec"],
       "user_us": (u1 - u0) / float(hz) * 1e6 / n, "sys_us": (s1 - s0) / float(hz) * 1e6 / n}
if os.path.exists(perf):
    for line in open(perf):
        f = line.strip().split(",")
        if len(f) > 2 and f[0] and f[0][0].isdigit():
            value, name = float(f[0]), f[2].replace("-", "_").replace(":", "_")
            if f[1] == "msec":
                value, name = value * 1000, name + "_us"
            row[name] = value / n
print(json.dumps(row))
PY
      rm -f "$work/access.log" "$work/perf"
    done
  done
  echo "round $round done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = [k for k in rows[0] if k not in ("plugin", "variant", "requests")]
by = {}
for r in rows:
    by.setdefault((r["plugin"], r["variant"]), []).append(r)
print("per request, medians of", len(next(iter(by.values()))), "rounds")
print(f"{'plugin':10} {'variant':11} " + " ".join(f"{k:>18}" for k in keys))
for (plugin, variant), rs in sorted(by.items()):
    print(f"{plugin:10} {variant:11} " + " ".join(
        f"{statistics.median(r.get(k, float('nan')) for r in rs):18.4g}" for k in keys))
PY
