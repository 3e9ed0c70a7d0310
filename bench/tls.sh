#!/usr/bin/env bash
# TLS: wharf against nginx (Debian's nginx-light, OpenSSL), both with 1 worker, the same ECDSA
# P-256 certificate, TLS 1.3 only, interleaved rounds. Server pinned to CPU 0, load to CPU 1.
#   - keepalive: http-hello over TLS, wrk -t1 -c64 (one handshake per connection, then requests);
#   - handshake: wrk -t1 -c64 with `Connection: close`: every request on a new connection with a
#     full handshake (wrk keeps no TLS session between connections), so req/s = handshakes/s;
#   - file-get: a 1 GiB file in the page cache, `wharf client get --tls` (which verifies the
#     MD5 as it receives) vs curl from nginx https, both writing to tmpfs; the second download
#     of each server is measured (wharf's digest of the file is then cached);
#   - file-get-discard: the same file to clients that decrypt and discard, so the client's own
#     work (writing, wharf client's MD5) does not cap the server: curl -o /dev/null from nginx,
#     `wharf bench get --tls` (no --verify) from wharf, and `wharf bench http --tls` from nginx
#     (the same rustls client for both servers: mode file-get-same-client).
#
#   bash bench/tls.sh [ROUNDS] [DURATION_S]        (defaults: 3 rounds of 10 s)
#
# Needs: wrk, nginx-light, openssl, curl; root for the tmpfs mount.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rounds=${1:-3}
duration=${2:-10}
for tool in wrk nginx openssl curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

cargo build --release -q --bin wharf
bin=target/release
mkdir -p bench-results
out="bench-results/tls-$(date +%Y%m%d-%H%M%S).jsonl"
port=18443
files_port=18444
work=$(mktemp -d)
sink=/mnt/wharf-bench-sink
mkdir -p "$sink"
mountpoint -q "$sink" || mount -t tmpfs -o size=3G tmpfs "$sink"
trap 'kill $(jobs -p) 2>/dev/null || true; umount "$sink" 2>/dev/null || true; rm -rf "$work"' EXIT

# A CA and a leaf signed by it (ECDSA P-256): clients that verify (curl, wharf client) trust the
# CA; a self-signed CA certificate cannot also serve as the leaf for rustls/webpki.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$work/ca.key" -out "$work/ca.pem" -subj "/CN=wharf bench CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$work/key.pem" -out "$work/leaf.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/leaf.ext" -out "$work/cert.pem" 2>/dev/null
mkdir -p "$work/root"
head -c 1G /dev/urandom >"$work/root/big.bin"
cat "$work/root/big.bin" >/dev/null

cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
error_log $work/error.log warn;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  default_type text/plain;
  client_body_temp_path $work;
  ssl_certificate $work/cert.pem;
  ssl_certificate_key $work/key.pem;
  ssl_protocols TLSv1.3;
  ssl_session_cache off;
  ssl_session_tickets off;
  sendfile on;
  server {
    listen 127.0.0.1:$port ssl reuseport;
    location / { return 200 "Hello, World"; }
  }
  server {
    listen 127.0.0.1:$files_port ssl reuseport;
    root $work/root;
  }
}
NGINX
cat >"$work/wharf.toml" <<TOML
[server]
workers = 1
[metrics]
listen = "127.0.0.1:0"
[services.http]
plugin = "http-hello"
listen = "127.0.0.1:$port"
[services.http.tls]
cert = "$work/cert.pem"
key = "$work/key.pem"
min_version = "1.3"
[services.files]
plugin = "file-get"
listen = "127.0.0.1:$files_port"
[services.files.options]
root = "$work/root"
[services.files.tls]
cert = "$work/cert.pem"
key = "$work/key.pem"
min_version = "1.3"
TOML

start_server() {
  case $1 in
    nginx) taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" -g 'daemon off;' & ;;
    wharf-epoll) WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$work/wharf.toml" --backend epoll & ;;
    wharf-io_uring) WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$work/wharf.toml" --backend io_uring & ;;
  esac
  server_pid=$!
  wait_for_port "$port" || exit 1
  wait_for_port "$files_port" || exit 1
}

cpu_seconds() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
server_cpu() {
  local total=0 p
  for p in $server_pids; do total=$(echo "$total + $(cpu_seconds "$p")" | bc); done
  echo "$total"
}

servers=(nginx wharf-epoll wharf-io_uring)
for round in $(seq "$rounds"); do
  for server in "${servers[@]}"; do
    start_server "$server"
    # nginx's work happens in its forked worker: count the server's children too.
    server_pids="$server_pid $(pgrep -P "$server_pid" | tr "\n" " " || true)"
    for mode in keepalive handshake; do
      header=()
      [ "$mode" = handshake ] && header=(-H "Connection: close")
      before=$(server_cpu)
      result=$(taskset -c 1 wrk -t1 -c64 -d"${duration}s" --latency "${header[@]}" "https://127.0.0.1:$port/")
      after=$(server_cpu)
      wrk_row "$server" "$mode" "$before" "$after" "$result" >>"$out"
      tail -1 "$out"
    done
    # file-get: 1 GiB, cached, to tmpfs. One download first: wharf computes the file's MD5 on
    # the first request (nginx has nothing to compute), and the measured one is served cached.
    download() {
      if [ "$server" = nginx ]; then
        taskset -c 1 curl -s --cacert "$work/ca.pem" -o "$1" "https://localhost:$files_port/big.bin"
      else
        taskset -c 1 "$bin/wharf" client get "127.0.0.1:$files_port" big.bin -o "$1" \
          --tls --ca "$work/ca.pem" >/dev/null
      fi
    }
    download "$sink/warm"
    rm -f "$sink/warm"
    before=$(server_cpu)
    t0=$(date +%s.%N)
    download "$sink/out"
    t1=$(date +%s.%N)
    after=$(server_cpu)
    cmp -s "$sink/out" "$work/root/big.bin" || { echo "$server: file-get output differs" >&2; exit 1; }
    rm -f "$sink/out"
    python3 -c "import json; print(json.dumps({'server': '$server', 'mode': 'file-get', 'mbps': 1073741824 / ($t1 - $t0) / 1e6, 'server_cpu_s_per_gib': $after - $before}))" >>"$out"
    tail -1 "$out"
    # file-get-discard: curl to /dev/null from nginx, `wharf bench get` from wharf.
    before=$(server_cpu)
    if [ "$server" = nginx ]; then
      t0=$(date +%s.%N)
      taskset -c 1 curl -s --cacert "$work/ca.pem" -o /dev/null "https://localhost:$files_port/big.bin"
      t1=$(date +%s.%N)
      mbps=$(python3 -c "print(1073741824 / ($t1 - $t0) / 1e6)")
      bytes=1073741824
    else
      r=$(taskset -c 1 "$bin/wharf" bench get "127.0.0.1:$files_port" --path big.bin -c 1 \
        -d "$duration" --warmup 0 --threads 1 --tls --ca "$work/ca.pem" --server-pid "$server_pid" --json)
      mbps=$(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mb_per_sec_in"])')
      bytes=$(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_in"])')
    fi
    after=$(server_cpu)
    python3 -c "import json; print(json.dumps({'server': '$server', 'mode': 'file-get-discard', 'mbps': $mbps, 'server_cpu_s_per_gib': ($after - $before) * 1073741824 / $bytes}))" >>"$out"
    tail -1 "$out"
    if [ "$server" = nginx ]; then
      # The same rustls client against nginx: keep-alive GETs of the file, discarded.
      before=$(server_cpu)
      r=$(taskset -c 1 "$bin/wharf" bench http "127.0.0.1:$files_port" --path /big.bin -c 1 \
        -d "$duration" --warmup 0 --threads 1 --tls --ca "$work/ca.pem" --server-name localhost \
        --json)
      after=$(server_cpu)
      echo "$r" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"server": "nginx", "mode": "file-get-same-client", "mbps": r["mb_per_sec_in"], "server_cpu_s_per_gib": ('"$after"' - '"$before"') * 1073741824 / max(r["bytes_in"], 1)}))' >>"$out"
      tail -1 "$out"
    fi
    stop_server "$server_pid"
  done
  echo "round $round done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
servers = ["nginx", "wharf-epoll", "wharf-io_uring"]
def med(s, m, k):
    v = [r[k] for r in rows if r["server"] == s and r["mode"] == m and r.get(k) is not None]
    return statistics.median(v) if v else float("nan")
print(f"\n{'mode':10} {'server':15} {'median req/s':>13} {'p50 us':>8} {'p99 us':>8} {'srv cpu us/req':>14} {'errors':>6}")
for m in ["keepalive", "handshake"]:
    for s in servers:
        e = sum(r["errors"] for r in rows if r["server"] == s and r["mode"] == m)
        print(f"{m:10} {s:15} {med(s,m,'rps'):13.0f} {med(s,m,'p50_us'):8.0f} {med(s,m,'p99_us'):8.0f} {med(s,m,'server_cpu_us_per_req'):14.2f} {e:6}")
for m in ["file-get", "file-get-discard", "file-get-same-client"]:
    for s in servers:
        if any(r["server"] == s and r["mode"] == m for r in rows):
            print(f"{m:20} {s:15} {med(s,m,'mbps'):10.0f} MB/s  server CPU {med(s,m,'server_cpu_s_per_gib'):.2f} s/GiB")
print()
for m in ["keepalive", "handshake"]:
    n = med("nginx", m, "rps")
    print(f"{m:10}: epoll/nginx {med('wharf-epoll', m, 'rps')/n:.2f}x  io_uring/nginx {med('wharf-io_uring', m, 'rps')/n:.2f}x")
for m, peer in [("file-get", "file-get"), ("file-get-discard", "file-get-discard"), ("file-get-discard", "file-get-same-client")]:
    n = med("nginx", peer, "mbps")
    print(f"{m} vs nginx {peer}: epoll/nginx {med('wharf-epoll',m,'mbps')/n:.2f}x  io_uring/nginx {med('wharf-io_uring',m,'mbps')/n:.2f}x")
PY
echo "raw: $out"
