#!/usr/bin/env bash
# User-space instructions per request that the edge features add (issue 17), counted with
# callgrind: repeatable on a noisy machine (instructions, not time; the kernel's share is not
# counted, the access log's writer thread is). wharf with 1 worker under callgrind,
# instrumentation on for the whole of a closed-loop `wharf bench` run, for echo
# and http-hello, each variant of bench/edge.sh (plain, access-log, proxy-v2, per-source).
#
#   bash bench/edge-instructions.sh [CONNECTIONS] [DURATION_S]
#
# Environment (all optional):
#   PLUGINS="http-hello"            only these plugins (default: echo http-hello)
#   VARIANTS="plain access-log"     only these variants (default: all four)
#   OLD_WHARF=/path/to/wharf        also measure this build, each variant right after the
#                                   current build's (rows say "before"): before and after in
#                                   one run, under the same load on the machine
#   KEEP=DIR                        keep each run's callgrind output in DIR, for
#                                   `callgrind_annotate --inclusive=yes DIR/<name>.out`
#
# Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
conns=${1:-64}
duration=${2:-5}
cargo build --release -q -p wharf
bin=$PWD/target/release/wharf
port=17556
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
if [ -n "${OLD_WHARF:-}" ]; then builds=("before=$OLD_WHARF" "after=$bin"); else builds=("current=$bin"); fi

for plugin in ${PLUGINS:-echo http-hello}; do
  for variant in ${VARIANTS:-plain access-log proxy-v2 per-source}; do
    for build in "${builds[@]}"; do
      label=${build%%=*}
      server=${build#*=}
      cfg="$work/$plugin-$variant.toml"
      edge_config "$variant" "$plugin" "$port" "$work" >"$cfg"
      valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/out" \
        "$server" serve --config "$cfg" >/dev/null 2>"$work/log" &
      vpid=$!
      for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
      extra=()
      [ "$variant" = proxy-v2 ] && extra=(--send-proxy v2)
      kind=echo
      [ "$plugin" = http-hello ] && kind=http
      # Counting covers the whole load (no warm-up), so every instruction counted belongs to a
      # request counted (plus the load's 'conns' connection setups).
      callgrind_control -i on "$vpid" >/dev/null 2>&1
      "$bin" bench "$kind" "127.0.0.1:$port" -c "$conns" -d "$duration" --warmup 0 --threads 1 \
        --server-pid "$vpid" --json "${extra[@]}" >"$work/load.json"
      callgrind_control -i off "$vpid" >/dev/null 2>&1
      kill -TERM "$vpid"; wait "$vpid" 2>/dev/null || true
      python3 - "$plugin" "$variant" "$label" "$work/log" "$work/load.json" <<'PY'
import json, re, sys
plugin, variant, label, log, load = sys.argv[1:6]
ir = int(re.search(r"Collected : (\d+)", open(log).read()).group(1))
r = json.load(open(load))
print(json.dumps({"plugin": plugin, "variant": variant, "build": label, "instructions_per_request": round(ir / r["requests"]), "requests": r["requests"], "errors": r["errors"]}))
PY
      if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$work/out" "$KEEP/$plugin-$variant-$label.out"
      fi
      rm -f "$work/access.log"
    done
  done
done
