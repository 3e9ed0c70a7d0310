#!/usr/bin/env bash
# User-space instructions per echo round trip, counted with callgrind: repeatable on a noisy
# machine (instructions, not time; the kernel's share is not counted). Server under callgrind,
# instrumentation on only for the measured window of a closed-loop echo-load run.
#
#   bash bench/echo-instructions.sh [CONNECTIONS] [DURATION_S] [-- SERVER COMMAND...]
#
# Without a server command it measures the minimal tokio echo server, wharf epoll, wharf io_uring
# (the ring path) and wharf io_uring on its tokio-uring fallback (1 worker each); SERVERS="..."
# picks some of tokio-baseline wharf-epoll wharf-io_uring wharf-io_uring-fallback.
# Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-64}
duration=${2:-10}
shift 2 2>/dev/null || true
[ "${1:-}" = "--" ] && shift
cargo build --release -q -p wharf -p wharf-bench-peers
bin=$PWD/target/release
port=17555
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat >"$work/wharf.toml" <<TOML
[server]
workers = 1
[services.echo]
plugin = "echo"
listen = "127.0.0.1:$port"
TOML

measure() {
  local name=$1; shift
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$name.out" "$@" \
    >/dev/null 2>"$work/$name.log" &
  local vpid=$!
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  "$bin/echo-load" "127.0.0.1:$port" --connections "$conns" --size 128 --duration "$duration" \
    >"$work/$name.json" &
  local lpid=$!
  sleep 1.2  # echo-load's 0.2 s start and 1 s warm-up
  callgrind_control -i on "$vpid" >/dev/null 2>&1
  sleep "$duration"
  callgrind_control -i off "$vpid" >/dev/null 2>&1
  wait "$lpid"
  kill -TERM "$vpid"; wait "$vpid" 2>/dev/null || true
  python3 - "$name" "$work/$name.log" "$work/$name.json" "$duration" <<'PY'
import json, re, sys
name, log, load, duration = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ir = int(re.search(r"Collected : (\d+)", open(log).read()).group(1))
rt = json.load(open(load))["rps"] * duration
print(f"{name:20} {ir / rt:8.0f} instructions per round trip ({rt:.0f} round trips)")
PY
}

if [ $# -gt 0 ]; then
  measure custom "$@"
else
  for server in ${SERVERS:-tokio-baseline wharf-epoll wharf-io_uring wharf-io_uring-fallback}; do
    case $server in
      tokio-baseline) measure "$server" "$bin/tokio-echo-baseline" "127.0.0.1:$port" ;;
      wharf-epoll) measure "$server" "$bin/wharf" serve --config "$work/wharf.toml" --backend epoll ;;
      wharf-io_uring) measure "$server" "$bin/wharf" serve --config "$work/wharf.toml" --backend io_uring ;;
      # Exported for the duration of the call: valgrind and the server it runs see it.
      wharf-io_uring-fallback) WHARF_URING_FALLBACK=1 measure "$server" "$bin/wharf" serve \
        --config "$work/wharf.toml" --backend io_uring ;;
      *) echo "unknown server $server" >&2; exit 1 ;;
    esac
  done
fi
