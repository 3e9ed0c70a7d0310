#!/usr/bin/env bash
# What the edge features cost (issue 17): echo and http-hello at saturation, 1 worker pinned to
# CPU 0, `wharf bench` pinned to CPU 1, in interleaved rounds (A B C A B C ...) so drift on a
# shared machine hits every variant alike:
#   plain       the feature set off
#   access-log  [access_log] on, to a file (one line per connection; per request for http-hello)
#   proxy-v2    proxy_protocol = "v2" and every bench connection starts with a v2 header
#   per-source  max_connections_per_source and both connection rates on (not tripped)
#
#   bash bench/edge.sh [ROUNDS] [DURATION_S] [CONNECTIONS...]
#   bash bench/edge.sh 5 5 64 512
#
# Prints median req/s and server CPU per request per variant, and each variant's ratio to
# plain. Raw JSON lines go to bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-5}
duration=${2:-5}
shift 2 2>/dev/null || true
conns=("$@")
[ ${#conns[@]} -gt 0 ] || conns=(64 512)

cargo build --release -q -p wharf
bin=target/release/wharf
mkdir -p bench-results
out="bench-results/edge-$(date +%Y%m%d-%H%M%S).jsonl"
dir=$(mktemp -d)
trap 'rm -rf "$dir"; kill $(jobs -p) 2>/dev/null || true' EXIT
port=17100

ulimit -n 65536 2>/dev/null || true
variants=(plain access-log proxy-v2 per-source)
for round in $(seq "$rounds"); do
  for plugin in echo http-hello; do
    for c in "${conns[@]}"; do
      for variant in "${variants[@]}"; do
        rm -f "$dir/access.log"
        cfg="$dir/$variant-$plugin.toml"
        edge_config "$variant" "$plugin" "$port" "$dir" >"$cfg"
        WHARF_LOG=warn taskset -c 0 "$bin" serve --config "$cfg" &
        pid=$!
        wait_for_port "$port"
        extra=()
        [ "$variant" = proxy-v2 ] && extra=(--send-proxy v2)
        kind=echo
        [ "$plugin" = http-hello ] && kind=http
        taskset -c 1 "$bin" bench "$kind" "127.0.0.1:$port" -c "$c" -d "$duration" --threads 1 \
          --server-pid "$pid" --json "${extra[@]}" |
          python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"variant": sys.argv[1], "plugin": sys.argv[2], "connections": r["connections"], "rps": r["requests_per_sec"], "errors": r["errors"], "cpu_us": r["server"]["us_per_request"], "p99_us": r["latency_us"]["p99"]}))' "$variant" "$plugin" |
          tee -a "$out"
        stop_server "$pid"
        if [ "$variant" = access-log ]; then
          echo "access log: $(wc -l <"$dir/access.log") lines" >&2
        fi
      done
    done
  done
  echo "round $round done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["plugin"], r["connections"], r["variant"]), []).append(r)
med = lambda k, key: statistics.median(r[key] for r in by[k])
print(f"\n{'plugin':10} {'conns':>5} {'variant':11} {'median req/s':>12} {'vs plain':>8} {'cpu us/req':>10} {'vs plain':>8} {'errors':>6}")
for (plugin, c, variant) in sorted(by):
    base = (plugin, c, "plain")
    rps, cpu = med((plugin, c, variant), "rps"), med((plugin, c, variant), "cpu_us")
    errs = sum(r["errors"] for r in by[(plugin, c, variant)])
    print(f"{plugin:10} {c:5} {variant:11} {rps:12.0f} {rps/med(base,'rps'):8.3f} {cpu:10.3f} {cpu/med(base,'cpu_us'):8.3f} {errs:6}")
PY
echo "raw: $out"
