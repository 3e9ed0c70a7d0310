#!/usr/bin/env bash
# The process plugin (issue 19): what running a program per connection costs, against floors.
#
#   bash bench/process.sh [ROUNDS] [DURATION_S]
#
# wharf (release build, 1 worker, pinned to CPU 0; the load on CPU 1), per backend, in
# interleaved rounds:
# - sessions per second: `wharf bench echo --new-conn --size 1` against a process service
#   running `cat` (a connection, a fork and exec, one byte there and back, the close), and the
#   floor: a shell loop that only forks and execs `/bin/true` as fast as it can;
# - MB/s through a program: `wharf bench echo --size 262144 -c 4` (256 KiB there and back) to
#   a process service running `cat`, against the same load to the echo plugin (a direct
#   socket copy inside wharf). On epoll the bytes move with splice(2); on io_uring they are
#   copied through wharf.
# - one stream of 256 MiB each way through `cat` (a Python client sending and reading at
#   once), the way a real pipe-through service is used: MB/s, and wharf's CPU per GB from
#   /proc (what splice saves shows here: the bytes never enter wharf).
# Prints one JSON line per measurement; wharf's CPU (not the programs') per session, or per
# GB moved one way.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-3}
duration=${2:-5}
cargo build --release -q -p wharf
bin=$PWD/target/release/wharf
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

config() {
  cat <<TOML
[server]
workers = 1
backend = "$1"
[services.cat]
plugin = "process"
listen = "127.0.0.1:17601"
max_connections = 1024
[services.cat.options]
argv = ["cat"]
max_concurrent = 256
[services.copy]
plugin = "echo"
listen = "127.0.0.1:17602"
[services.copy.options]
transform = "none"
TOML
}

load() { # load PID ARGS...: one wharf bench run on CPU 1, JSON report
  local pid=$1
  shift
  taskset -c 1 "$bin" bench echo "$@" -d "$duration" --warmup 1 --threads 1 --server-pid "$pid" --json
}

for round in $(seq "$rounds"); do
  for backend in epoll io_uring; do
    config "$backend" >"$work/wharf.toml"
    taskset -c 0 "$bin" serve --config "$work/wharf.toml" 2>"$work/log" &
    pid=$!
    wait_for_port 17601
    wait_for_port 17602
    load "$pid" 127.0.0.1:17601 --new-conn --size 1 -c 8 >"$work/sessions.json"
    load "$pid" 127.0.0.1:17601 --size 262144 -c 4 >"$work/cat.json"
    load "$pid" 127.0.0.1:17602 --size 262144 -c 4 >"$work/copy.json"
    python3 - "$pid" <<'PY' >"$work/stream.json"
import json, socket, sys, threading, time
pid = int(sys.argv[1]); n = 256 << 20
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100  # utime + stime, in clock ticks of 10 ms
s = socket.create_connection(("127.0.0.1", 17601)); chunk = b"x" * (1 << 20); got = [0]
def reader():
    buf = bytearray(1 << 20)
    while (k := s.recv_into(buf)):
        got[0] += k
t = threading.Thread(target=reader); c0 = cpu(); t0 = time.monotonic(); t.start()
for _ in range(n >> 20):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR); t.join(); dt = time.monotonic() - t0; c1 = cpu()
assert got[0] == n, got[0]
print(json.dumps({"mb_per_s": n / dt / 1e6, "wharf_cpu_s_per_gb": (c1 - c0) / (n / 1e9)}))
PY
    stop_server "$pid"
    python3 - "$round" "$backend" "$work" <<'PY'
import json, sys
round_, backend, work = sys.argv[1:4]
def row(name, per):
    r = json.load(open(f"{work}/{name}.json"))
    out = {"round": int(round_), "backend": backend, "load": name, "errors": r.get("errors")}
    rps = r["requests_per_sec"]
    us = (r.get("server") or {}).get("us_per_request")
    if per == "session":
        out["sessions_per_s"] = rps
        out["wharf_cpu_us_per_session"] = us
    else:
        # Each request moves 256 KiB each way; MB/s counts one way.
        out["mb_per_s"] = rps * 262144 / 1e6
        out["wharf_cpu_s_per_gb"] = us * 1e-6 / 262144 * 1e9 if us else None
    print(json.dumps(out))
row("sessions", "session"); row("cat", "mb"); row("copy", "mb")
print(json.dumps({"round": int(round_), "backend": backend, "load": "stream-through-cat", **json.load(open(f"{work}/stream.json"))}))
PY
  done
  # The floor: fork and exec only, no socket and no relay, on the same CPU.
  taskset -c 0 python3 - "$duration" <<'PY'
import json, subprocess, sys, time
duration = float(sys.argv[1])
start = time.monotonic(); n = 0
out = subprocess.run(["bash", "-c", f"end=$((SECONDS+{int(duration)})); n=0; while [ $SECONDS -lt $end ]; do /bin/true; n=$((n+1)); done; echo $n"], capture_output=True, text=True)
n = int(out.stdout.strip()); elapsed = time.monotonic() - start
print(json.dumps({"load": "fork-exec-floor", "execs_per_s": n / elapsed}))
PY
done
