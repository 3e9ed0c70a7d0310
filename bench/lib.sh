# Shared helpers for the benchmark scripts (sourced, not run).

# Waits up to 5 s until something accepts TCP connections on 127.0.0.1:$1.
wait_for_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# Stops a server started in the background: SIGTERM, then waits for it.
stop_server() {
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# Turns wrk's text output into one JSON line: wrk_row SERVER MODE CPU_BEFORE CPU_AFTER WRK_OUTPUT
# (req/s, p50/p99, errors including non-2xx answers, and the server's CPU per request).
wrk_row() {
  python3 - "$@" <<'PY'
import json, re, sys
server, mode, before, after, text = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
def lat(label):
    m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m: return None
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
total = int(re.search(r"(\d+) requests in", text).group(1))
errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(json.dumps({"server": server, "mode": mode, "rps": rps, "p50_us": lat("50"), "p99_us": lat("99"),
                  "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
                  "server_cpu_us_per_req": (after - before) * 1e6 / total if total else None}))
PY
}

# Prints the one-service config of an edge-feature variant (bench/edge.sh,
# bench/edge-instructions.sh): edge_config VARIANT PLUGIN PORT DIR, where VARIANT is plain,
# access-log (to DIR/access.log), proxy-v2 or per-source (limits on, not tripped).
edge_config() {
  local variant=$1 plugin=$2 port=$3 dir=$4
  printf '[server]\nworkers = 1\n'
  [ "$variant" = access-log ] && printf '[access_log]\npath = "%s/access.log"\n' "$dir"
  printf '[services.s]\nplugin = "%s"\nlisten = "127.0.0.1:%s"\n' "$plugin" "$port"
  case $variant in
    proxy-v2) printf 'proxy_protocol = "v2"\ntrusted_proxies = ["127.0.0.1/32"]\n' ;;
    per-source) printf 'max_connections_per_source = 1000\nmax_connection_rate = 100000\nmax_connection_rate_per_source = 100000\n' ;;
  esac
  if [ "$plugin" = echo ]; then printf '[services.s.options]\ntransform = "none"\n'; fi
}

# Prints the config wharf's echo runs use (bench/echo.sh, bench/uring.sh): one worker, metrics
# on, one echo service (transform none) on 127.0.0.1:PORT. echo_config PORT
echo_config() {
  printf '[server]\nworkers = 1\n[metrics]\nlisten = "127.0.0.1:0"\n'
  printf '[services.echo]\nplugin = "echo"\nlisten = "127.0.0.1:%s"\n' "$1"
  printf '[services.echo.options]\ntransform = "none"\n'
}

# Starts one of the echo servers the scripts compare in the background, pinned to CPU 0, and
# waits for its port: start_echo_server NAME BIN_DIR CONFIG PORT, NAME one of tokio-baseline,
# wharf-epoll, wharf-io_uring, wharf-io_uring-fallback (tokio-uring), wharf-before ($OLD_WHARF).
# Sets server_pid.
start_echo_server() {
  local name=$1 bin=$2 cfg=$3 port=$4
  case $name in
    tokio-baseline) taskset -c 0 "$bin/tokio-echo-baseline" "127.0.0.1:$port" & ;;
    wharf-epoll) WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$cfg" --backend epoll & ;;
    wharf-io_uring) WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$cfg" --backend io_uring & ;;
    wharf-io_uring-fallback) WHARF_URING_FALLBACK=1 WHARF_LOG=warn taskset -c 0 "$bin/wharf" serve --config "$cfg" --backend io_uring & ;;
    wharf-before) WHARF_LOG=warn taskset -c 0 "$OLD_WHARF" serve --config "$cfg" --backend epoll & ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  server_pid=$!
  wait_for_port "$port"
}

# Writes the two file servers' configs of the download comparisons (bench/fileget.sh,
# bench/download.sh) into DIR, both serving DIR/root: DIR/nginx.conf (1 worker, sendfile,
# 127.0.0.1:18090) and DIR/wharf.toml (file-get, 1 worker, 127.0.0.1:18099). files_configs DIR
files_configs() {
  local work=$1
  cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
error_log $work/error.log warn;
pid $work/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path $work;
  server { listen 127.0.0.1:18090; root $work/root; }
}
NGINX
  cat >"$work/wharf.toml" <<TOML
[server]
workers = 1
[services.files]
plugin = "file-get"
listen = "127.0.0.1:18099"
[services.files.options]
root = "$work/root"
TOML
}

# The download comparisons' files: a fresh directory under PARENT as `work` with a 1 GiB file of
# random bytes in work/root/big.bin (dated an hour back, so file-get caches its digest), and a
# 3 GiB tmpfs at `sink` for the downloads; both removed, and background jobs stopped, on exit.
# files_setup PARENT
files_setup() {
  work=$(mktemp -d -p "$1")
  sink=/mnt/wharf-bench-sink
  mkdir -p "$sink"
  mountpoint -q "$sink" || mount -t tmpfs -o size=3G tmpfs "$sink"
  trap 'kill $(jobs -p) 2>/dev/null || true; umount "$sink" 2>/dev/null || true; rm -rf "$work"' EXIT
  mkdir -p "$work/root"
  head -c 1G /dev/urandom >"$work/root/big.bin"
  touch -d '1 hour ago' "$work/root/big.bin"
}
