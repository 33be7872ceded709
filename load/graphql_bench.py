"""GraphQL ``completionStream`` subscriptions against the native SSE route, on one gateway, one run.

Starts the mock upstream and the gateway exactly as ``load/bench.py`` does (its functions, its
``load/bench.yaml``, its CPU layout: client and mock on CPU 0, the gateway alone on CPU 1), then in
interleaved rounds, the order rotating, drives closed-loop load at ``--concurrency`` for the same
prompt (``bench.request_body``: ``--chunks`` content chunks per answer) with one Python client:

  sse      POST /api/v1/llm/complete/stream, each answer read to its end (last event ``"done": true``)
  graphql  ``completionStream`` subscriptions over ``graphql-transport-ws``: one long-lived WebSocket
           per worker, each running its subscriptions one after another (each must end with
           ``complete``, its last ``next`` carrying ``finishReason``)

and reports per run streams/s, p50/p99 stream latency, the gateway's CPU µs per stream and errors,
plus the median of the per-round ratios graphql/sse for streams/s and CPU per stream. The client is
this file run as a separate process (``--client``), so its CPU is not the gateway's.

    .venv/bin/python load/graphql_bench.py --quick           # 2 rounds x 2 s
    .venv/bin/python load/graphql_bench.py --rounds 5        # 5 rounds x 4 s
    .venv/bin/python load/graphql_bench.py --json gql.json   # also write every run as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (load/bench.py: processes, servers, CPU accounting, noise handling)

SSE, GRAPHQL = "sse", "graphql"
TARGETS = (SSE, GRAPHQL)
SSE_PATH = bench.NATIVE_PATHS["stream"]
GRAPHQL_PATH = "/graphql"
# The fields of the native stream events (content, done → finishReason, usage, costUsd, model, provider).
SUBSCRIPTION = (
    "subscription ($input: CompletionInput!) { completionStream(input: $input) "
    "{ content finishReason usage { promptTokens completionTokens totalTokens } costUsd model provider } }"
)
for _target in TARGETS:  # both run on the gateway's port; their CPU is the gateway's
    bench.SUT_PID[_target] = "gateway"


# --------------------------------------------------------------------------- the client process


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def client(kind: str, port: int, body: bytes, concurrency: int, duration: float) -> dict[str, Any]:
    """Closed loop for ``duration`` s: each worker starts its next stream when the last one ended.
    A stream ending after the window is not counted (as wrk and loadgen.py do)."""
    import aiohttp
    import orjson

    latencies: list[float] = []
    errors = {"status_errors": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0, "incomplete": 0}
    first_error: list[str] = []

    def fail(key: str, detail: str) -> None:
        errors[key] += 1
        if not first_error:
            first_error.append(f"{key}: {detail[:300]}")

    headers = {"Authorization": "Bearer " + os.environ.get("BENCH_API_KEY", "none")}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=10)
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    start = time.perf_counter()
    deadline = start + duration

    async def sse_worker(session: aiohttp.ClientSession) -> None:
        url = f"http://{bench.HOST}:{port}{SSE_PATH}"
        post_headers = {**headers, "Content-Type": "application/json"}
        while (t0 := time.perf_counter()) < deadline:
            try:
                async with session.post(url, data=body, headers=post_headers) as resp:
                    data = await resp.read()
                    status = resp.status
            except TimeoutError:
                fail("timeout", "no answer")
                continue
            except aiohttp.ClientConnectorError as exc:
                fail("connect", repr(exc))
                await asyncio.sleep(0.01)
                continue
            except aiohttp.ClientError as exc:
                fail("read", repr(exc))
                continue
            t1 = time.perf_counter()
            if t1 > deadline:
                return
            if status != 200:
                fail("status_errors", f"HTTP {status}: {data[:200]!r}")
            elif not bench.native_stream_done(data):
                fail("incomplete", repr(data[-300:]))
            else:
                latencies.append(t1 - t0)

    input_json = orjson.dumps({"input": json.loads(body)}).decode()
    payload = '{"query":' + orjson.dumps(SUBSCRIPTION).decode() + ',"variables":' + input_json + "}"

    async def graphql_worker(session: aiohttp.ClientSession) -> None:
        url = f"http://{bench.HOST}:{port}{GRAPHQL_PATH}"
        try:
            ws = await session.ws_connect(url, protocols=["graphql-transport-ws"], max_msg_size=0)
        except aiohttp.ClientError as exc:
            fail("connect", repr(exc))
            return
        async with ws:
            init = {"type": "connection_init", "payload": {"authorization": headers["Authorization"]}}
            await ws.send_str(orjson.dumps(init).decode())
            ack = await ws.receive(timeout=10)
            if ack.type != aiohttp.WSMsgType.TEXT or orjson.loads(ack.data).get("type") != "connection_ack":
                fail("connect", f"no connection_ack: {ack.type} {ack.data!r}")
                return
            n = 0
            while (t0 := time.perf_counter()) < deadline:
                n += 1
                op = str(n)
                await ws.send_str('{"id":"' + op + '","type":"subscribe","payload":' + payload + "}")
                last: dict[str, Any] | None = None
                problem: tuple[str, str] | None = None
                while True:
                    try:
                        msg = await ws.receive(timeout=10)
                    except TimeoutError:
                        fail("timeout", "no message for 10 s")
                        return  # the socket's state is unknown: this worker stops
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        fail("read", f"socket closed: {msg.type} {msg.data!r} {msg.extra!r}")
                        return
                    message = orjson.loads(msg.data)
                    kind = message.get("type")
                    if kind == "ping":
                        await ws.send_str('{"type":"pong"}')
                        continue
                    if message.get("id") != op:
                        problem = problem or ("read", f"message for another operation: {msg.data[:200]}")
                        continue
                    if kind == "next":
                        result = message.get("payload") or {}
                        if result.get("errors"):
                            problem = problem or ("status_errors", msg.data)
                        else:
                            last = (result.get("data") or {}).get("completionStream")
                    elif kind == "error":
                        problem = problem or ("status_errors", msg.data)
                        break  # an operation refused with `error` gets no `complete`
                    elif kind == "complete":
                        break
                t1 = time.perf_counter()
                if t1 > deadline:
                    return
                if problem is not None:
                    fail(*problem)
                elif not last or not last.get("finishReason"):
                    fail("incomplete", f"last event {last!r}")
                else:
                    latencies.append(t1 - t0)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        worker = sse_worker if kind == SSE else graphql_worker
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": int(percentile(latencies, 50) * 1e6),
        "p99_us": int(percentile(latencies, 99) * 1e6),
        **errors,
        # bench.measure sums status_errors, connect, read, write, timeout: count broken streams there too
        "status_errors": errors["status_errors"] + errors["incomplete"],
        "first_error": first_error[0] if first_error else None,
    }


def client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="graphql_bench.py's client (run by the benchmark)")
    p.add_argument("--client", choices=TARGETS, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body", required=True, help="the native request body (JSON)")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    a = p.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    result = asyncio.run(client(a.client, a.port, a.body.encode(), a.concurrency, a.duration))
    sys.stdout.write(json.dumps(result) + "\n")


class Client:
    """Shaped like bench.LoadGenerator (``run(port, request, concurrency, duration)``) so that
    ``bench.measure`` drives it; the request's path says which protocol (its headers are not used:
    the client sends BENCH_API_KEY)."""

    def __init__(self, procs: bench.Processes, layout: bench.Layout) -> None:
        self.procs, self.layout = procs, layout

    def run(self, port: int, request: bench.Request, concurrency: int, duration: int) -> dict[str, Any]:
        path, body, _headers = request
        kind = GRAPHQL if path == GRAPHQL_PATH else SSE
        argv = [
            sys.executable, str(Path(__file__).resolve()), "--client", kind, "--port", str(port),
            "--body", body.decode(), "--concurrency", str(concurrency), "--duration", str(duration),
        ]  # fmt: skip
        proc = self.procs.start("client", argv, cpus=self.layout.load, capture=True)
        try:
            out, err = proc.popen.communicate(timeout=duration + 60)
        finally:
            self.procs.stop(proc)
        lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
        if proc.popen.returncode != 0 or not lines:
            raise bench.BenchError(f"client failed ({proc.popen.returncode}): {err.decode()[-800:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


# --------------------------------------------------------------------------- the benchmark


def run_bench(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    layout = bench.make_layout(args.pin)
    body = bench.request_body(bench.NATIVE, args.model, True, args.chunks)
    requests = {SSE: bench.Request(SSE_PATH, body, {}), GRAPHQL: bench.Request(GRAPHQL_PATH, body, {})}
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmgw-gqlbench-") as tmpdir:
        procs = bench.Processes(Path(tmpdir), args.src, args.nice)
        try:
            log(f"pinning: {describe(layout)}")
            # bench.start_servers checks the native SSE route answers a whole stream (args.targets);
            # the bare proxy it also starts is not needed here.
            servers = bench.start_servers(procs, layout, args)
            for proc in [p for p in procs.procs if p.name == "bare"]:
                procs.stop(proc)
            servers.pids.pop("bare", None)
            for target in TARGETS:
                servers.ports[target] = servers.ports["gateway"]
            log(f"gateway on port {servers.ports['gateway']} (pid {servers.pids['gateway']})")
            client = Client(procs, layout)
            for target in TARGETS:  # warm-up, and a check that every stream comes back whole
                raw = client.run(servers.ports[target], requests[target], args.concurrency, 1)
                if raw["first_error"] or not raw["requests"]:
                    raise bench.BenchError(
                        f"{target} warm-up: {raw['requests']} streams, {raw['first_error']}"
                    )
            started = time.monotonic()
            retries_left, rnd, redone = args.retries, 0, 0
            while rnd < args.rounds:
                bench.wait_quiet(servers, args.max_other, args.quiet_wait, log)
                order = TARGETS[rnd % 2 :] + TARGETS[: rnd % 2]
                round_runs = []
                for target in order:
                    m = bench.measure(
                        client, servers, procs, target, requests[target], args.concurrency, args.duration
                    )
                    m.update(round=rnd, target=target, concurrency=args.concurrency)
                    round_runs.append(m)
                    log(
                        f"[{rnd + 1}/{args.rounds}] {target:<8}{m['rps']:7.0f} streams/s  "
                        f"p50 {m['p50_ms']:6.2f} ms  cpu {fmt(m['sut_cpu_us_per_req'], '.0f')} us/stream  "
                        f"cpu% {bench.fmt_cpu(m['cpu_pct'])} other {m['other_cpu_pct']:.0f}"
                        + (f"  ERRORS {m['errors']} ({m['raw']['first_error']})" if m["errors"] else "")
                    )
                noisiest = max(r["other_cpu_pct"] for r in round_runs)
                if noisiest > args.max_other and retries_left > 0 and redone < 2:
                    retries_left, redone = retries_left - 1, redone + 1
                    log(f"  round redone: other% reached {noisiest:.0f} (> {args.max_other:g})")
                    discarded.extend(round_runs)
                    continue
                runs.extend(round_runs)
                rnd, redone = rnd + 1, 0
            elapsed = time.monotonic() - started
        finally:
            procs.stop_all()
    return summarize(args, runs, discarded, layout, elapsed)


def summarize(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    discarded: list[dict[str, Any]],
    layout: bench.Layout,
    elapsed: float,
) -> dict[str, Any]:
    median = bench.median
    table = {t: {r["round"]: r for r in runs if r["target"] == t} for t in TARGETS}
    summary = {}
    for target in TARGETS:
        rs = list(table[target].values())
        summary[target] = {
            "streams_per_s": median([r["rps"] for r in rs]),
            "streams_per_s_min": min(r["rps"] for r in rs),
            "streams_per_s_max": max(r["rps"] for r in rs),
            "p50_ms": median([r["p50_ms"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs]),
            "cpu_us_per_stream": median([r["sut_cpu_us_per_req"] for r in rs]),
            "client_cpu_pct": median([r["cpu_pct"].get("loadgen") for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "other_cpu_pct": median([r["other_cpu_pct"] for r in rs]),
        }
    rounds = range(args.rounds)
    ratios: dict[str, Any] = {}
    for name, key in (("streams_per_s", "rps"), ("cpu_per_stream", "sut_cpu_us_per_req")):
        ratios[f"graphql_over_sse_{name}"] = bench.per_round_ratio(table, GRAPHQL, SSE, key, rounds)
        ratios[f"graphql_over_sse_{name}_per_round"] = bench.round_ratios(table, GRAPHQL, SSE, key, rounds)
    return {
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "stream_content_chunks": args.chunks,
            "request_body": bench.request_body(bench.NATIVE, args.model, True, args.chunks).decode(),
            "subscription": SUBSCRIPTION,
            "config": str(args.config),
            "gateway_source": str(args.src),
            "gateway_log_level": args.gateway_log_level,
            "gateway_log": args.gateway_log,
            "max_other_cpu_pct": args.max_other,
            "nice": args.nice,
            "pinning": layout.name,
            "pinning_detail": describe(layout),
        },
        "environment": bench.environment("python", args.src),
        "elapsed_s": round(elapsed, 1),
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
        "discarded_runs": discarded,
    }


def describe(layout: bench.Layout) -> str:
    return layout.describe().replace("load generator", "client").replace("bare proxy and gateway", "gateway")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    s, r = result["settings"], result["ratios"]
    c = s["concurrency"]
    lines = [
        f"completionStream (GraphQL over WebSocket) vs POST {SSE_PATH} (SSE): {s['rounds']} rounds x "
        f"{s['duration_s']} s per run, concurrency {c}, {s['stream_content_chunks']} content chunks each",
        f"pinning: {s['pinning_detail']}; gateway log level {s['gateway_log_level']}",
        "medians over rounds; cpu us/stream = the gateway's CPU time per stream; other% = CPU used by "
        "other jobs meanwhile (100 = one core)",
        "",
    ]
    header = (
        f"{'target':<9}{'streams/s':>10}{'(min-max)':>13}{f'p50 ms@{c}':>11}{f'p99 ms@{c}':>11}"
        f"{'cpu us/stream':>15}{'errors':>8}{'other%':>8}"
    )
    lines += [header, "-" * len(header)]
    for target, v in result["summary"].items():
        spread = f"{v['streams_per_s_min']:.0f}-{v['streams_per_s_max']:.0f}"
        lines.append(
            f"{target:<9}{fmt(v['streams_per_s'], '.0f'):>10}{spread:>13}{fmt(v['p50_ms'], '.2f'):>11}"
            f"{fmt(v['p99_ms'], '.2f'):>11}{fmt(v['cpu_us_per_stream'], '.0f'):>15}{v['errors']:>8}"
            f"{fmt(v['other_cpu_pct'], '.0f'):>8}"
        )

    def per_round(key: str) -> str:
        return ", ".join(f"{x:.2f}" for x in r[f"{key}_per_round"])

    lines += [
        "",
        "median of per-round ratios graphql/sse:",
        f"  streams/s       {fmt(r['graphql_over_sse_streams_per_s'], '.2f')}x   "
        f"(per round {per_round('graphql_over_sse_streams_per_s')})",
        f"  cpu per stream  {fmt(r['graphql_over_sse_cpu_per_stream'], '.2f')}x   "
        f"(per round {per_round('graphql_over_sse_cpu_per_stream')})",
        f"\ntook {result['elapsed_s']} s; {len(result['discarded_runs']) // len(TARGETS)} noisy round(s) "
        f"redone (other% > {s['max_other_cpu_pct']:g})",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GraphQL completionStream subscriptions vs the native SSE route, one gateway (loopback)."
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--duration", type=int, default=4, help="seconds per run (default 4)")
    p.add_argument("--concurrency", type=int, default=16, help="streams in flight (default 16)")
    p.add_argument("--quick", action="store_true", help="2 rounds x 2 s: a smoke run")
    p.add_argument("--json", metavar="FILE", help="write the summary and every run as JSON")
    p.add_argument("--chunks", type=int, default=6, help="content chunks per streamed answer (default 6)")
    p.add_argument("--pin", choices=("sut", "split", "none"), default="sut", help="CPU layout (README)")
    p.add_argument("--config", type=Path, default=HERE / "bench.yaml", help="gateway config")
    p.add_argument("--model", default="bench", help="model name the gateway config routes to the mock")
    p.add_argument("--gateway-log-level", default="info")
    p.add_argument("--gateway-log", default=os.devnull, metavar="FILE", help="the gateway's stdout")
    p.add_argument("--src", type=Path, default=bench.ROOT, help="checkout the mock and gateway run from")
    p.add_argument("--max-other", type=float, default=40.0, metavar="PCT", help="noise limit (bench.py)")
    p.add_argument("--retries", type=int, default=4, help="noisy rounds redone at most (4; 2 per round)")
    p.add_argument("--quiet-wait", type=float, default=10.0, help="seconds to wait for quiet per round")
    p.add_argument("--nice", type=int, default=0, help="niceness added to every benchmark process")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = min(args.rounds, 2), min(args.duration, 2)
        args.retries, args.quiet_wait = min(args.retries, 1), min(args.quiet_wait, 5.0)
    if args.rounds < 1 or args.duration < 1 or args.concurrency < 1 or args.chunks < 3:
        p.error("--rounds, --duration and --concurrency must be >= 1, --chunks >= 3")
    args.targets = (bench.NATIVE,)  # what bench.start_servers checks before the runs
    args.modes = bench.MODES
    args.redis = "auto"  # bench.start_servers: a private Redis if the config has a redis section
    args.api_key = os.environ.get("BENCH_API_KEY", "none")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--client" in argv:
        client_main(argv)
        return 0
    args = parse_args(argv)
    code, _ = bench.run_script("bench", lambda log: run_bench(args, log), render, args.json)
    return code


if __name__ == "__main__":
    sys.exit(main())
