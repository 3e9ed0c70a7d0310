#!/usr/bin/env bash
# file-get on a 1 GiB file in the page cache (1 worker, both backends) against nginx with
# sendfile, interleaved rounds:
#   - cached digest: `wharf client get` (which verifies the MD5 as it receives) vs curl from nginx
#     (both writing to tmpfs), and a raw discarding client vs curl -o /dev/null (server paths);
#   - cold digest (fresh server): raw client throughput vs md-5 hashing the bytes in memory;
#   - 32 concurrent 1 GiB downloads (cold, then cached): the server's peak RSS.
#
#   bash bench/fileget.sh [ROUNDS]          (needs nginx-light; root, for the tmpfs mount)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-3}
cargo build --release -q -p wharf -p wharf-bench-peers
files_setup "${TMPDIR:-/tmp}"
cat "$work/root/big.bin" >/dev/null
bin=target/release

files_configs "$work"

start_wharf() {
  WHARF_LOG=warn "$bin/wharf" serve --config "$work/wharf.toml" --backend "$1" &
  wharf_pid=$!
  wait_for_port 18099
}
stop_wharf() { stop_server "$wharf_pid"; }
mbps() { python3 -c "print(round(1073741824 / $1 / 1e6))"; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }

nginx -c "$work/nginx.conf" -p "$work" -g 'daemon off;' &
sleep 0.5
echo "md5 in memory: $("$bin/fileget-bench" md5 "$work/root/big.bin")"
for round in $(seq "$rounds"); do
  for backend in epoll io_uring; do
    curl_tmpfs=$(curl -s -o "$sink/nginx.out" -w '%{speed_download}' http://127.0.0.1:18090/big.bin)
    curl_null=$(curl -s -o /dev/null -w '%{speed_download}' http://127.0.0.1:18090/big.bin)
    rm -f "$sink/nginx.out"
    start_wharf "$backend"
    cold=$("$bin/fileget-bench" raw 127.0.0.1:18099 big.bin 1)
    cached_raw=$("$bin/fileget-bench" raw 127.0.0.1:18099 big.bin 1)
    t=$(timed "$bin/wharf" client get 127.0.0.1:18099 big.bin -o "$sink/wharf.out")
    rm -f "$sink/wharf.out"
    stop_wharf
    echo "round=$round backend=$backend nginx_curl_tmpfs_MBps=$(python3 -c "print(round($curl_tmpfs/1e6))") nginx_curl_null_MBps=$(python3 -c "print(round($curl_null/1e6))") wharf_client_get_MBps=$(mbps "$t") cached_raw=$cached_raw cold_raw=$cold"
  done
done
for backend in epoll io_uring; do
  start_wharf "$backend"
  echo "backend=$backend 32x cold: $("$bin/fileget-bench" raw 127.0.0.1:18099 big.bin 32 "$wharf_pid")"
  echo "backend=$backend 32x cached: $("$bin/fileget-bench" raw 127.0.0.1:18099 big.bin 32 "$wharf_pid")"
  stop_wharf
done
