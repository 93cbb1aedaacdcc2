#!/usr/bin/env bash
# What a rate limit costs appends: two gateways (one worker each, the native
# server) on one Redis (AOF everysec), one without limits and one with
# DS_RATE_LIMIT high enough never to refuse; wrk -t2 -c32, 100-byte POSTs to
# one stream each, runs alternating between the two. Reports appends/s and the
# CPU per append of the gateway (its process tree) and of Redis: on a shared,
# loaded machine the CPU per append is the steadier figure.
#
#   bench/rate_limit_cost.sh [ROUNDS] [SECONDS]      # defaults: 5 rounds of 6 s
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
seconds=${2:-6}
redis_bin=$(command -v redis-server || echo .venv/bin/redis-server)
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

redis_port=$(free_port)
"$redis_bin" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly yes \
  --appendfsync everysec --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)

start_gateway() {  # name, extra env...; its port goes to $work/<name>.port
  local name=$1 port; shift
  port=$(free_port)
  echo "$port" >"$work/$name.port"
  env REDIS_URL="redis://127.0.0.1:$redis_port/0" "$@" \
    .venv/bin/durable-streams-gateway --host 127.0.0.1 --port "$port" --workers 1 \
    >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.1
  done
  curl -sf -X PUT -H 'Content-Type: text/plain' "http://127.0.0.1:$port/v1/stream/cost-$name" >/dev/null
}

cpu_ms() {  # PID... -> CPU ms used so far by these processes and their descendants
  .venv/bin/python - "$@" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
total, pending = 0, [int(p) for p in sys.argv[1:]]
while pending:
    pid = pending.pop()
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
        pending += [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except FileNotFoundError:
        pass
print(round(total * 1000 / tick))
PY
}

start_gateway plain
plain_pid=${pids[-1]}
start_gateway limited DS_RATE_LIMIT='append=1000000/s'
limited_pid=${pids[-1]}
redis_pid=${pids[0]}
plain=$(cat "$work/plain.port")
limited=$(cat "$work/limited.port")
head -c 100 /dev/zero | tr '\0' 'x' >"$work/body"

run() {  # name port pid -> "appends/s gateway-µs-per-append redis-µs-per-append"
  local gw0 redis0 gw1 redis1 out
  gw0=$(cpu_ms "$3"); redis0=$(cpu_ms "$redis_pid")
  out=$(wrk -t2 -c32 -d"${seconds}s" -s bench/lua/append.lua "http://127.0.0.1:$2" -- \
    "/v1/stream/cost-$1" 1 text/plain "$work/body")
  gw1=$(cpu_ms "$3"); redis1=$(cpu_ms "$redis_pid")
  echo "$out" | .venv/bin/python -c '
import json, sys
gw, redis = (int(sys.argv[2]) - int(sys.argv[1])), (int(sys.argv[4]) - int(sys.argv[3]))
line = next(l for l in sys.stdin if l.startswith("WRKJSON "))
d = json.loads(line[8:])
assert d["status_errors"] == 0 and d["requests"] > 0, d
n = d["requests"]
print(round(n / (d["duration_us"] / 1e6)), round(gw * 1000 / n), round(redis * 1000 / n))' \
    "$gw0" "$gw1" "$redis0" "$redis1"
}

run plain "$plain" "$plain_pid" >/dev/null; run limited "$limited" "$limited_pid" >/dev/null  # warm-up
echo "round | plain: appends/s, gateway µs/append, redis µs/append | limited: the same"
for round in $(seq "$rounds"); do
  if (( round % 2 )); then
    a=$(run plain "$plain" "$plain_pid"); b=$(run limited "$limited" "$limited_pid")
  else
    b=$(run limited "$limited" "$limited_pid"); a=$(run plain "$plain" "$plain_pid")
  fi
  echo "$round | $a | $b"
done
