#!/usr/bin/env bash
# exec benchmarks on both backends (1 worker):
# - round trip of an allowlisted `true`, against spawning /bin/true directly from Rust;
# - echo latency (1 connection) idle, then while 64 clients run commands back to back:
#   `sleep 1` (64 commands always running) and `sleep 0.1` (~600 spawns/s, which keeps about
#   one of this machine's two cores busy with fork/exec/exit).
#
#   bash bench/exec.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
cargo build --release -q -p wharf -p wharf-bench-peers
cfg=$(mktemp)
trap 'rm -f "$cfg"; kill $(jobs -p) 2>/dev/null || true' EXIT
for busy in 1 0.1; do
  cat >"$cfg" <<TOML
[server]
workers = 1
[services.exec]
plugin = "exec"
listen = "127.0.0.1:18000"
[services.exec.options]
max_concurrent = 64
[services.exec.options.commands]
true = { argv = ["/bin/true"] }
busy = { argv = ["/bin/sleep", "$busy"] }
[services.echo]
plugin = "echo"
listen = "127.0.0.1:18001"
TOML
  for backend in epoll io_uring; do
    WHARF_LOG=warn target/release/wharf serve --config "$cfg" --backend "$backend" &
    pid=$!
    wait_for_port 18000
    if [ "$busy" = 1 ]; then
      echo "backend=$backend $(target/release/exec-bench roundtrip 127.0.0.1:18000)"
    fi
    echo "backend=$backend busy=sleep-$busy $(target/release/exec-bench stall 127.0.0.1:18000 127.0.0.1:18001)"
    stop_server "$pid"
  done
done
