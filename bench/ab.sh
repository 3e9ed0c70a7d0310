#!/usr/bin/env bash
# Before/after on the same run: two wharf binaries serve the same config (1 worker, epoll,
# pinned to CPU 0) and `wharf bench` (CPU 1) loads each in turn, interleaved per round, for
# http-hello, file-get and exec, the binary that goes first alternating per round (ABBA: on this
# shared VM the first and second run of a pair differ by up to 25% either way). For a change to
# the framework's connection path: "no throughput lost elsewhere". Echo has its own, finer
# script (bench/echo.sh with OLD_WHARF).
#
#   bash bench/ab.sh OLD_WHARF NEW_WHARF [ROUNDS] [DURATION_S]
#
# Prints the median req/s and server CPU per request of each binary and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
old=$1 new=$2 rounds=${3:-3} duration=${4:-5}
client=$new
out="bench-results/ab-$(date +%Y%m%d-%H%M%S).jsonl"
mkdir -p bench-results
root=$(mktemp -d)
cfg=$(mktemp)
trap 'rm -rf "$root" "$cfg"; kill $(jobs -p) 2>/dev/null || true' EXIT
head -c 1048576 /dev/urandom >"$root/1m.bin"
cat >"$cfg" <<TOML
[server]
workers = 1
[services.http]
plugin = "http-hello"
listen = "127.0.0.1:17100"
[services.files]
plugin = "file-get"
listen = "127.0.0.1:17101"
[services.files.options]
root = "$root"
[services.exec]
plugin = "exec"
listen = "127.0.0.1:17102"
[services.exec.options]
max_concurrent = 64
[services.exec.options.commands]
true = { argv = ["true"] }
TOML

ulimit -n 65536 2>/dev/null || true
for round in $(seq "$rounds"); do
  # ABBA: the binary that runs first alternates, so warm-up and drift favour neither.
  order=(old new)
  [ $((round % 2)) -eq 1 ] || order=(new old)
  for which in "${order[@]}"; do
    bin=${!which}
    WHARF_LOG=warn taskset -c 0 "$bin" serve --config "$cfg" --backend epoll &
    pid=$!
    wait_for_port 17102 || exit 1
    for load in "http 127.0.0.1:17100 -c 64" "get 127.0.0.1:17101 -c 16 --path 1m.bin" "exec 127.0.0.1:17102 -c 16"; do
      set -- $load
      taskset -c 1 "$client" bench "$@" -d "$duration" --threads 1 --server-pid "$pid" --json \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['binary']='$which'; r['load']='$1'; print(json.dumps(r))" >>"$out"
    done
    stop_server "$pid"
  done
  echo "round $round done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'load':6} {'binary':6} {'median req/s':>12} {'srv cpu us/req':>14}")
for load in ["http", "get", "exec"]:
    med = {}
    for which in ["old", "new"]:
        rs = [r for r in rows if r["load"] == load and r["binary"] == which]
        rps = statistics.median(r["ok_per_sec"] for r in rs)
        cpu = [(r["server"] or {}).get("us_per_request") for r in rs]
        cpu = statistics.median(c for c in cpu if c is not None) if any(c is not None for c in cpu) else float("nan")
        med[which] = (rps, cpu)
        print(f"{load:6} {which:6} {rps:12.0f} {cpu:14.2f}")
    (ro, co), (rn, cn) = med["old"], med["new"]
    print(f"{load:6} new/old req/s {rn/ro:.3f}, cpu/req {cn/co:.3f}")
PY
echo "raw: $out"
