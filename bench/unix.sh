#!/usr/bin/env bash
# Unix-domain sockets against TCP loopback (issue 19): echo and http-hello, the same wharf
# serving each protocol on both kinds of listener, rounds interleaved, medians reported.
#
#   bench/unix.sh [WHARF] [ROUNDS] [SECONDS] [CONNECTIONS]
#
# One worker pinned to CPU 0, the load generator to CPU 1 (when taskset exists; see "The
# machine" in BENCHMARKS.md); each backend in turn; per round every (protocol, kind) pair runs
# once, so drift on a shared machine hits all pairs alike.
set -euo pipefail
WHARF=${1:-target/release/wharf}
ROUNDS=${2:-5}
SECONDS_EACH=${3:-3}
CONNECTIONS=${4:-16}
pin_server=(); pin_client=()
if command -v taskset >/dev/null; then pin_server=(taskset -c 0); pin_client=(taskset -c 1); fi
dir=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for backend in epoll io_uring; do
  echo_tcp="127.0.0.1:$(port)"; web_tcp="127.0.0.1:$(port)"
  cat > "$dir/wharf.toml" <<TOML
[server]
workers = 1
backend = "$backend"
[services.echo-tcp]
plugin = "echo"
listen = "$echo_tcp"
[services.echo-unix]
plugin = "echo"
listen = "unix:$dir/echo.sock"
[services.web-tcp]
plugin = "http-hello"
listen = "$web_tcp"
[services.web-unix]
plugin = "http-hello"
listen = "unix:$dir/web.sock"
TOML
  "${pin_server[@]}" "$WHARF" serve --config "$dir/wharf.toml" 2>"$dir/log" &
  server=$!
  for _ in $(seq 50); do [ -S "$dir/web.sock" ] && break; sleep 0.1; done
  for round in $(seq "$ROUNDS"); do
    for pair in "echo $echo_tcp tcp" "echo unix:$dir/echo.sock unix" \
                "http $web_tcp tcp" "http unix:$dir/web.sock unix"; do
      set -- $pair
      "${pin_client[@]}" "$WHARF" bench "$1" "$2" --connections "$CONNECTIONS" --duration "$SECONDS_EACH" \
        --warmup 1 --json > "$dir/$backend-$1-$3-$round.json"
    done
  done
  kill "$server"; wait "$server" || true
done
python3 - "$dir" <<'PY'
import glob, json, os, statistics, sys
d = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(d, "*.json")):
    backend, proto, kind, _ = os.path.basename(f)[:-5].rsplit("-", 3)
    r = json.load(open(f))
    rows.setdefault((backend, proto, kind), []).append(
        (r["requests_per_sec"], (r.get("server") or {}).get("us_per_request"), r["latency_us"]["p50"]))
print(f"{'backend':9} {'protocol':8} {'kind':5} {'req/s':>9} {'server µs/req':>14} {'p50 µs':>7}  rounds")
for key in sorted(rows):
    v = rows[key]
    cpu = [c for _, c, _ in v if c is not None]
    print(f"{key[0]:9} {key[1]:8} {key[2]:5} {statistics.median(r for r, _, _ in v):9.0f} "
          f"{statistics.median(cpu) if cpu else float('nan'):14.2f} "
          f"{statistics.median(p for _, _, p in v):7.1f}  {len(v)}")
for backend in sorted({k[0] for k in rows}):
    for proto in ("echo", "http"):
        t, u = rows.get((backend, proto, "tcp")), rows.get((backend, proto, "unix"))
        if t and u:
            rt = statistics.median(r for r, _, _ in u) / statistics.median(r for r, _, _ in t)
            ct = statistics.median(c for _, c, _ in u) / statistics.median(c for _, c, _ in t)
            print(f"{backend} {proto}: unix/tcp req/s {rt:.2f}x, server CPU per request {ct:.2f}x")
PY
