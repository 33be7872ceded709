#!/usr/bin/env bash
# How much of the gateway's cost the contract itself sets: interleaved wrk rounds against
#   bare     load/bare_proxy.py — the baseline load/bench.py uses
#   floor    load/floor_proxy.py — the bare proxy plus only the per-request work issue #3 requires
#            (one admit.lua and one settle.lua through the gateway's Redis pipe, the body parsed
#            once, the usage read, one access line)
#   gateway  the gateway with CONFIG (default load/bench-plugins.yaml: auth, limits, budgets)
# and the medians of the per-round ratios floor/bare and gateway/bare (non-stream requests).
#
#   load/floor.sh [ROUNDS] [CONFIG]        # default 5 rounds of 4 s per server
#
# Needs wrk. Loopback only. Layout as load/bench.py: wrk, the mock and a private Redis on CPU 0,
# the server under test alone on CPU 1 (BENCH_REDIS_URL points at another Redis instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROUNDS=${1:-5}
CONFIG=${2:-load/bench-plugins.yaml}
MOCK_PORT=${MOCK_PORT:-9000}
export PYTHONPATH=$PWD BENCH_MOCK_PORT=$MOCK_PORT BENCH_API_KEY=${BENCH_API_KEY:-bench-team-key-0123456789}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
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
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $BENCH_API_KEY"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}'
LUA
up="http://127.0.0.1:$MOCK_PORT"
taskset -c 0 "$PY" -m gateway.providers.mock --port "$MOCK_PORT" >/dev/null 2>&1 &
pids+=($!)
names=(bare floor gateway)
ports=($(free_port) $(free_port) $(free_port))
taskset -c 1 "$PY" load/bare_proxy.py --port "${ports[0]}" --upstream "$up" >/dev/null 2>&1 &
pids+=($!)
taskset -c 1 "$PY" load/floor_proxy.py --port "${ports[1]}" --upstream "$up" --redis "$BENCH_REDIS_URL" \
  >/dev/null 2>&1 &
pids+=($!)
taskset -c 1 "$PY" -m gateway serve --config "$CONFIG" --port "${ports[2]}" >/dev/null 2>&1 &
pids+=($!)
for port in "${ports[@]}"; do
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{}' "http://127.0.0.1:$port/v1/chat/completions" || true)
    [ "$code" != "000" ] && break
    sleep 0.1
  done
  taskset -c 0 wrk -t1 -c32 -d2s -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done
for r in $(seq "$ROUNDS"); do
  line=""
  for i in 0 1 2; do
    out=$(taskset -c 0 wrk -t1 -c32 -d4s -s "$work/post.lua" "http://127.0.0.1:${ports[$i]}/v1/chat/completions")
    if grep -q "Non-2xx" <<<"$out"; then echo "${names[$i]} answered errors: $out" >&2; exit 1; fi
    line="$line $(awk '/Requests\/sec/{print $2}' <<<"$out")"
  done
  echo "$r $line" | tee -a "$work/rounds" | awk '{printf "round %s  req/s bare %s floor %s gateway %s  floor/bare %.2f gateway/bare %.2f\n",$1,$2,$3,$4,$3/$2,$4/$2}'
done
"$PY" - "$work/rounds" <<'PY'
import statistics, sys
rows = [[float(x) for x in line.split()[1:]] for line in open(sys.argv[1])]
floor = statistics.median(f / b for b, f, _ in rows)
gateway = statistics.median(g / b for b, _, g in rows)
print(f"median of per-round ratios: floor/bare {floor:.2f}x  gateway/bare {gateway:.2f}x  ({len(rows)} rounds)")
PY
