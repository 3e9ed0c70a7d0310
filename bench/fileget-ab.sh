#!/usr/bin/env bash
# Two wharf builds' file-get throughput side by side, interleaved rounds in one run: cold digest
# (fresh server, first download) and cached digest (second download), both backends, 1 worker,
# a 512 MiB file in the page cache. Usage: bash bench/fileget-ab.sh OLD_WHARF NEW_WHARF [ROUNDS]
# (build the old one from another checkout with `cargo build --release`). Prints one line per
# run; take the medians per binary and backend.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
old_bin=${1:?usage: fileget-ab.sh OLD_WHARF NEW_WHARF [ROUNDS]}
new_bin=${2:?usage: fileget-ab.sh OLD_WHARF NEW_WHARF [ROUNDS]}
rounds=${3:-5}
cargo build --release --quiet -p wharf-bench-peers --bin fileget-bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/root"
head -c 512M /dev/urandom >"$work/root/big.bin"
touch -d '1 hour ago' "$work/root/big.bin"
cat "$work/root/big.bin" >/dev/null
cat >"$work/wharf.toml" <<TOML
[server]
workers = 1
[services.files]
plugin = "file-get"
listen = "127.0.0.1:18199"
[services.files.options]
root = "$work/root"
TOML
bench=${CARGO_TARGET_DIR:-target}/release/fileget-bench
# One download's throughput in MB/s, from fileget-bench's JSON line.
download_mbps() {
  "$bench" raw 127.0.0.1:18199 big.bin 1 | sed 's/.*"mb_per_s":\([0-9]*\).*/\1/'
}
for round in $(seq "$rounds"); do
  for bin in "$old_bin" "$new_bin"; do
    for backend in epoll io_uring; do
      WHARF_LOG=warn "$bin" serve --config "$work/wharf.toml" --backend "$backend" &
      pid=$!
      wait_for_port 18199
      cold=$(download_mbps)
      cached=$(download_mbps)
      stop_server "$pid"
      echo "round=$round bin=$bin backend=$backend cold_MBps=$cold cached_MBps=$cached"
    done
  done
done
