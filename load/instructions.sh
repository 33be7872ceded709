#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: a repeatable figure for comparing two
# versions of the hot path on a noisy machine, where req/s and CPU time move by 20-50 % from run to
# run. It counts the server's user-space instructions only (not the kernel's share of its syscalls,
# nor cache misses), so it complements load/bench.py rather than replacing it.
#
#   load/instructions.sh                              # the bare proxy, then load/bench.yaml
#   load/instructions.sh load/bench-plugins.yaml      # any gateway config on the mock
#   load/instructions.sh bare                         # the bare proxy only
#
# Needs valgrind and wrk (Debian: apt-get install valgrind wrk). Loopback only. The server runs under
# valgrind on CPU 1 (~50x slower), wrk and the mock on CPU 0; after a warm-up, instrumentation is
# switched on for a fixed time and the count is divided by the requests wrk completed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MOCK_PORT=${MOCK_PORT:-9000}
PORT=${PORT:-8200}
SECONDS_MEASURED=${SECONDS_MEASURED:-15}
export BENCH_MOCK_PORT=$MOCK_PORT BENCH_API_KEY=${BENCH_API_KEY:-bench-team-key-0123456789}
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(bare load/bench.yaml)

work=$(mktemp -d)
cat >"$work/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $BENCH_API_KEY"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}'
EOF
taskset -c 0 "$PY" -m gateway.providers.mock --port "$MOCK_PORT" >/dev/null 2>&1 &
mock=$!
trap 'kill $mock 2>/dev/null; rm -rf "$work"' EXIT
url="http://127.0.0.1:$PORT/v1/chat/completions"

for config in "${configs[@]}"; do
  out="$work/callgrind.out"
  if [ "$config" = floor ]; then
    server=("$PY" load/floor_proxy.py --port "$PORT" --upstream "http://127.0.0.1:$MOCK_PORT")
  elif [ "$config" = bare ]; then
    server=("$PY" load/bare_proxy.py --port "$PORT" --upstream "http://127.0.0.1:$MOCK_PORT")
  else
    server=("$PY" -m gateway serve --config "$config" --port "$PORT")
  fi
  taskset -c 1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "${server[@]}" >/dev/null 2>&1 &
  vg=$!
  for _ in $(seq 120); do
    sleep 1
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{}' "$url" || true)
    [ "$code" != "000" ] && break
  done
  taskset -c 0 wrk -t1 -c8 -d4s -s "$work/post.lua" "$url" >/dev/null  # warm-up
  callgrind_control -i on $vg >/dev/null 2>&1
  n=$(taskset -c 0 wrk -t1 -c8 -d"${SECONDS_MEASURED}s" -s "$work/post.lua" "$url" | awk '/requests in/{print $1}')
  callgrind_control -i off $vg >/dev/null 2>&1
  callgrind_control -d $vg >/dev/null 2>&1
  sleep 1
  ir=$(grep -h '^summary:\|^totals:' "$out"* | tail -1 | awk '{print $2}')
  kill $vg 2>/dev/null || true
  wait $vg 2>/dev/null || true
  rm -f "$out"*
  printf '%-32s %8d requests  %10d instructions/request\n' "$config" "$n" $((ir / n))
done
