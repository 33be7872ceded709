#!/usr/bin/env bash
# How much of the gateway's cost the contract itself sets: interleaved wrk rounds against
#   bare     load/bare_proxy.py — the baseline load/bench.py uses
#   floor    load/floor_proxy.py — the bare proxy plus only the per-request work issue #3 requires
#            (one admit.lua and one settle.lua through the gateway's Redis pipe, the body parsed
#            once, the usage read, one access line)
#   gateway  the gateway with CONFIG (default load/bench-plugins.yaml: auth, limits, budgets)
# and the medians of the per-round ratios floor/bare and gateway/bare, of req/s and of each server's
# CPU time per request (read from /proc around each wrk run).
#
#   load/floor.sh [ROUNDS] [CONFIG] [MODE]   # default 5 rounds of 4 s per server, non-stream
#   MODE=stream load/floor.sh 3              # the same with "stream": true
#
# MODE: non-stream (default), stream (the same request with "stream": true; every server is first
# checked to answer a whole SSE stream ending in [DONE]) or both (non-stream rounds, then stream).
#
# Needs wrk. Loopback only. Layout as load/bench.py: wrk, the mock and a private Redis on CPU 0,
# the server under test alone on CPU 1 (BENCH_REDIS_URL points at another Redis instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROUNDS=${1:-5}
CONFIG=${2:-load/bench-plugins.yaml}
MODE=${3:-${MODE:-non-stream}}
case "$MODE" in
  non-stream) modes=(non-stream) ;;
  stream) modes=(stream) ;;
  both) modes=(non-stream stream) ;;
  *) echo "MODE must be non-stream, stream or both, not '$MODE'" >&2; exit 2 ;;
esac
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=${MOCK_PORT:-$(free_port)}
export PYTHONPATH=$PWD BENCH_MOCK_PORT=$MOCK_PORT BENCH_API_KEY=${BENCH_API_KEY:-bench-team-key-0123456789}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
if [ -z "${BENCH_REDIS_URL:-}" ]; then
  rport=$(free_port)
  taskset -c 0 redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$work" --logfile "$work/redis.log" &
  pids+=($!)
  export BENCH_REDIS_URL="redis://127.0.0.1:$rport/0"
fi
body_non_stream='{"model":"bench","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}'
body_stream='{"model":"bench","messages":[{"role":"user","content":"hello there"}],"max_tokens":16,"stream":true}'
for mode in non-stream stream; do
  body=body_${mode/-/_}
  cat >"$work/post-$mode.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $BENCH_API_KEY"
wrk.body = '${!body}'
LUA
done
up="http://127.0.0.1:$MOCK_PORT"
taskset -c 0 "$PY" -m gateway.providers.mock --port "$MOCK_PORT" >/dev/null 2>&1 &
pids+=($!)
names=(bare floor gateway)
ports=($(free_port) $(free_port) $(free_port))
taskset -c 1 "$PY" load/bare_proxy.py --port "${ports[0]}" --upstream "$up" >/dev/null 2>&1 &
pids+=($!) spids=($!)
taskset -c 1 "$PY" load/floor_proxy.py --port "${ports[1]}" --upstream "$up" --redis "$BENCH_REDIS_URL" \
  >/dev/null 2>&1 &
pids+=($!) spids+=($!)
taskset -c 1 "$PY" -m gateway serve --config "$CONFIG" --port "${ports[2]}" >/dev/null 2>&1 &
pids+=($!) spids+=($!)
url() { echo "http://127.0.0.1:${ports[$1]}/v1/chat/completions"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, in clock ticks
hz=$(getconf CLK_TCK)
for i in 0 1 2; do
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{}' "$(url $i)" || true)
    [ "$code" != "000" ] && break
    sleep 0.1
  done
  for mode in "${modes[@]}"; do
    if [ "$mode" = stream ]; then  # a whole stream, ending in [DONE], and no usage chunk not asked for
      out=$(curl -sN -X POST -H "Authorization: Bearer $BENCH_API_KEY" -H 'Content-Type: application/json' \
        -d "$body_stream" "$(url $i)")
      if ! grep -q '^data: \[DONE\]' <<<"$out" || grep -q '"usage"' <<<"$out"; then
        echo "${names[$i]} did not stream a whole answer: $out" >&2; exit 1
      fi
    fi
    taskset -c 0 wrk -t1 -c32 -d2s -s "$work/post-$mode.lua" "$(url $i)" >/dev/null
  done
done
for mode in "${modes[@]}"; do
  : >"$work/rounds"
  for r in $(seq "$ROUNDS"); do
    rps="" cpu=""
    for i in 0 1 2; do
      t0=$(ticks "${spids[$i]}")
      out=$(taskset -c 0 wrk -t1 -c32 -d4s -s "$work/post-$mode.lua" "$(url $i)")
      t1=$(ticks "${spids[$i]}")
      if grep -q "Non-2xx" <<<"$out"; then echo "${names[$i]} answered errors: $out" >&2; exit 1; fi
      rps="$rps $(awk '/Requests\/sec/{print $2}' <<<"$out")"
      # the server's CPU time per request, in µs
      cpu="$cpu $(awk -v t=$((t1 - t0)) -v hz="$hz" '/requests in/{printf "%.0f", t * 1e6 / hz / $1}' <<<"$out")"
    done
    echo "$r $rps $cpu" | tee -a "$work/rounds" | awk -v m="$mode" '{printf "%s round %s  req/s bare %s floor %s gateway %s  floor/bare %.2f gateway/bare %.2f  cpu us/req %s %s %s\n",m,$1,$2,$3,$4,$3/$2,$4/$2,$5,$6,$7}'
  done
  "$PY" - "$work/rounds" "$mode" <<'PY'
import statistics, sys
rows = [[float(x) for x in line.split()[1:]] for line in open(sys.argv[1])]
def med(values): return statistics.median(values)
floor, gateway = med([r[1] / r[0] for r in rows]), med([r[2] / r[0] for r in rows])
floor_cpu, gateway_cpu = med([r[4] / r[3] for r in rows]), med([r[5] / r[3] for r in rows])
print(f"{sys.argv[2]}: median of per-round ratios ({len(rows)} rounds): req/s floor/bare {floor:.2f}x "
      f"gateway/bare {gateway:.2f}x; cpu/req floor/bare {floor_cpu:.2f}x gateway/bare {gateway_cpu:.2f}x")
PY
done
