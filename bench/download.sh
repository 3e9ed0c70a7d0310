#!/usr/bin/env bash
# Verified downloads of a 1 GiB file (issue 18): `wharf client get` from wharf's file-get
# (receives, hashes and writes at once; verifies the MD5 before the rename) against the same
# work done one step after the other by standard tools: `curl` from nginx to a file, then
# `md5sum` of that file. Interleaved rounds, medians, for:
#   - cached: the served file in the page cache;
#   - cold: the page cache dropped before each download (`echo 3 > /proc/sys/vm/drop_caches`),
#     so the server reads the file from disk. wharf's digest of the file is known (the server
#     hashed it once at start); the client still hashes every byte it receives.
# And one core's MD5 speed by CPU time, for reference: wharf's (wharf_core::md5: md-5 with its
# assembly backend; `fileget-bench md5`, bytes in memory), `md5sum` and `openssl md5` of a file
# on tmpfs.
#
# Servers (nginx, 1 worker process with sendfile; wharf, 1 worker) are pinned to CPU 0; the
# clients are not pinned: both `wharf client get`'s threads and curl/md5sum run where the
# scheduler puts them, on either CPU. Downloads are written to a tmpfs, as curl's are.
#
# With OLD_WHARF=path/to/an/older/wharf, that binary's `client get` runs in the same rounds
# too (against the same server), as "before".
#
#   bash bench/download.sh [ROUNDS] [BACKEND]     (root: tmpfs mount, drop_caches; nginx-light)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-5}
backend=${2:-epoll}
command -v nginx >/dev/null || { echo "needs nginx (apt-get install nginx-light)" >&2; exit 1; }
cargo build --release -q -p wharf -p wharf-bench-peers
bin=target/release
# The served file sits on a disk (the cold rounds read it from there), not on a tmpfs.
files_setup "${DOWNLOAD_BENCH_DIR:-/var/tmp}"
sync
size=$(stat -c %s "$work/root/big.bin")

files_configs "$work"

taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" -g 'daemon off;' &
WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$work/wharf.toml" --backend "$backend" &
wait_for_port 18090
wait_for_port 18099
# The server hashes the file once (a cold digest); every measured download has it cached.
"$bin/fileget-bench" raw 127.0.0.1:18099 big.bin 1 >/dev/null

# Runs a shell command line; prints its wall seconds and the CPU seconds (user+system) it and
# its children used.
timed() {
  python3 - "$1" <<'PY'
import resource, subprocess, sys, time
t = time.perf_counter()
subprocess.run(["bash", "-c", sys.argv[1]], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
wall = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{wall:.4f} {r.ru_utime + r.ru_stime:.4f}")
PY
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
warm() { cat "$work/root/big.bin" >/dev/null; }

curl_md5=(curl -s -o "$sink/curl.out" http://127.0.0.1:18090/big.bin)
curl_then_md5sum="${curl_md5[*]} && md5sum $sink/curl.out"
client_get="$bin/wharf client get 127.0.0.1:18099 big.bin -o $sink/wharf.out"
clients=(curl+md5sum wharf-client-get)
[ -n "${OLD_WHARF:-}" ] && clients+=(before)
out=$(mktemp)
for round in $(seq "$rounds"); do
  for cache in cached cold; do
    for who in "${clients[@]}"; do
      rm -f "$sink/curl.out" "$sink/wharf.out"
      if [ "$cache" = cold ]; then drop_caches; else warm; fi
      case $who in
        curl+md5sum) line="$curl_then_md5sum" ;;
        wharf-client-get) line="$client_get" ;;
        before) line="$OLD_WHARF client get 127.0.0.1:18099 big.bin -o $sink/wharf.out" ;;
      esac
      read -r wall cpu < <(timed "$line")
      echo "$round $cache $who $wall $cpu" | tee -a "$out"
    done
  done
  # One core's MD5 speed, by CPU time (the machine is shared: wall times of a lone hash vary
  # more), over a tmpfs copy of the file (the wharf download just made).
  read -r _ cpu < <(timed "md5sum $sink/wharf.out")
  echo "$round md5 md5sum $cpu $cpu" | tee -a "$out"
  read -r _ cpu < <(timed "openssl md5 $sink/wharf.out")
  echo "$round md5 openssl-md5 $cpu $cpu" | tee -a "$out"
  json=$("$bin/fileget-bench" md5 "$sink/wharf.out")
  ours=$(echo "$json" | sed 's/.*"mb_per_s":\([0-9]*\).*/\1/')
  secs=$(python3 -c "print($size / $ours / 1e6)")
  echo "$round md5 wharf-md5 $secs $secs" | tee -a "$out"
done
rm -f "$sink/curl.out" "$sink/wharf.out"

python3 - "$out" "$size" "$backend" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
size, backend = int(sys.argv[2]), sys.argv[3]
by = {}
for _, cache, who, wall, cpu in rows:
    by.setdefault((cache, who), []).append((float(wall), float(cpu)))
def mbps(key):
    return size / statistics.median(w for w, _ in by[key]) / 1e6
def cpu(key):
    return statistics.median(c for _, c in by[key])
print(f"backend {backend}, {len(by[('cached', 'curl+md5sum')])} rounds, medians:")
for impl in ("wharf-md5", "md5sum", "openssl-md5"):
    print(f"  md5 one core (CPU time), {impl:12} {mbps(('md5', impl)):6.0f} MB/s")
for cache in ("cached", "cold"):
    a, b = mbps((cache, "curl+md5sum")), mbps((cache, "wharf-client-get"))
    print(f"  {cache:6}: curl+md5sum {a:5.0f} MB/s ({cpu((cache, 'curl+md5sum')):.2f} s CPU)   "
          f"wharf client get {b:5.0f} MB/s ({cpu((cache, 'wharf-client-get')):.2f} s CPU)   "
          f"ratio {b / a:.2f}   client / wharf md5 {b / mbps(('md5', 'wharf-md5')):.2f}")
    if (cache, "before") in by:
        c = mbps((cache, "before"))
        print(f"          before: wharf client get {c:5.0f} MB/s ({cpu((cache, 'before')):.2f} s CPU)   "
              f"ratio to curl+md5sum {c / a:.2f}   now / before {b / c:.2f}")
PY
rm -f "$out"
