"""Memory with many streams open: peak RSS of the gateway (and of the bare proxy) with N streams at once.

Starts, as load/bench.py does (its functions; the client and the mock on CPU 0, the server under
test on CPU 1): a private Redis, the mock upstream, the gateway with ``load/bench-plugins.yaml``
(auth, limits, budgets: plugins on) and the bare proxy. The mock is told to hold every stream open
(``POST /_mock/faults`` with ``chunk_delay``: it waits that long between content chunks), and the
gateway's provider and the bare proxy may open N upstream connections (both default to 256, which
would queue the rest). Then, one server at a time, N streams are opened at once from this process and
read to their end, while the server's RSS is sampled from /proc; its ``VmHWM`` (the kernel's peak) is
read at the end.

Every stream must answer 200 with ``text/event-stream``, carry exactly the mock's answer and end with
``data: [DONE]``; "open at once" holds when the last stream got its first chunk before the first one
ended.

    .venv/bin/python load/streams_rss.py                       # 1,000 streams, ~1 min
    .venv/bin/python load/streams_rss.py --streams 200 --json rss.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (load/bench.py: processes, CPU layout, free ports, the private Redis)

PROVIDER_BASE_URL = "    base_url: http://127.0.0.1:${BENCH_MOCK_PORT:-9000}/v1\n"


@dataclass
class StreamStats:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    first_chunk: list[float] = field(default_factory=list)  # monotonic time of each stream's first chunk
    ended: list[float] = field(default_factory=list)  # monotonic time each stream ended

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if not self.first_error:
            self.first_error = f"{kind}: {detail[:300]}"


def rss_kb(pid: int, key: str) -> int:
    """``VmRSS`` or ``VmHWM`` of one process, KB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def expected_content(words: int) -> str:
    return "Mock answer: " + " ".join(f"w{i}" for i in range(words))


async def open_streams(
    port: int, model: str, headers: dict[str, str], n: int, words: int, pid: int
) -> tuple[StreamStats, int, int]:
    """N streams at once through the server on ``port``; return their outcome, the largest VmRSS
    sampled while all N were open and the largest sampled at all (KB)."""
    import aiohttp
    import orjson

    body = orjson.dumps(
        {
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": expected_content(words)[13:]}],
        }
    )
    want = expected_content(words)
    stats = StreamStats()
    started = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal started
        url = f"http://{bench.HOST}:{port}{bench.PATH}"
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                    stats.fail("status", f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
                    return
                data = bytearray()
                first = True
                async for chunk in resp.content.iter_any():
                    if first:
                        stats.first_chunk.append(time.monotonic())
                        started += 1
                        first = False
                    data += chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.fail("connection", repr(exc))
            return
        stats.ended.append(time.monotonic())
        text = bytes(data)
        if not text.rstrip().endswith(b"data: [DONE]"):
            stats.fail("incomplete", repr(text[-200:]))
            return
        content = ""
        for event in text.split(b"\n\n"):
            if event.startswith(b"data: {"):
                chunk = orjson.loads(event[6:])
                if "error" in chunk:
                    stats.fail("error event", repr(event[:200]))
                    return
                for choice in chunk.get("choices") or ():
                    content += (choice.get("delta") or {}).get("content") or ""
        if content != want:
            stats.fail("content", f"{content[:100]!r} != {want[:100]!r}")
            return
        stats.ok += 1

    peak_all_open = peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak_all_open, peak
        while not done.is_set():
            kb = rss_kb(pid, "VmRSS")
            peak = max(peak, kb)
            if started == n and not stats.ended:
                peak_all_open = max(peak_all_open, kb)
            await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(one(session) for _ in range(n)))
        done.set()
        await sampler
    return stats, peak_all_open, peak


def raise_nofile(need: int) -> int:
    """Open-files limit for this process and the servers it starts: at least ``need`` if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(max(soft, need), hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            try:  # as root the hard limit may be raised too
                resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            except (ValueError, OSError):
                return soft
            return need
        return want
    return soft


def gateway_config(config: Path, connections: int, tmp: Path) -> Path:
    """The config with its provider allowed ``connections`` upstream connections (default 256)."""
    text = config.read_text()
    if PROVIDER_BASE_URL not in text:
        raise bench.BenchError(f"{config}: no provider line {PROVIDER_BASE_URL.strip()!r} to extend")
    out = tmp / "gateway.yaml"
    out.write_text(
        text.replace(PROVIDER_BASE_URL, f"{PROVIDER_BASE_URL}    max_connections: {connections}\n")
    )
    return out


def wait_up(procs: bench.Processes, port: int, body: bytes, headers: dict[str, str], name: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        procs.check_alive()
        try:
            status, _, data = bench.post(port, bench.PATH, body, headers)
        except OSError:
            if time.monotonic() > deadline:
                raise bench.BenchError(f"{name} did not come up on port {port}") from None
            time.sleep(0.1)
            continue
        if status != 200:
            raise bench.BenchError(f"{name} answered HTTP {status}: {data[:300]!r}")
        return


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    n = args.streams
    limit = raise_nofile(4 * n + 256)  # the server: a client and an upstream socket per stream
    log(f"open-files limit: {limit}")
    if limit < 2 * n + 64:
        raise bench.BenchError(f"open-files limit {limit} is too low for {n} streams")
    layout = bench.make_layout("sut")
    py = sys.executable
    connections = n + 64
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmgw-streams-rss-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Processes(tmp)
        try:
            if layout.load:
                os.sched_setaffinity(0, layout.load)  # this process is the client: CPU 0, with the mock
            args.redis = "auto"
            url, _ = bench.redis_url(procs, layout, args)
            mock_port, gateway_port, bare_port = bench.free_port(), bench.free_port(), bench.free_port()
            procs.start(
                "mock", [py, "-m", "gateway.providers.mock", "--host", bench.HOST, "--port", str(mock_port)],
                cpus=layout.mock,
            )  # fmt: skip
            config = gateway_config(args.config, connections, tmp)
            gateway_bin = Path(py).with_name("llm-gateway")
            gateway_cmd = [str(gateway_bin)] if gateway_bin.exists() else [py, "-m", "gateway.cli"]
            env = {"BENCH_MOCK_PORT": str(mock_port), **({"BENCH_REDIS_URL": url} if url else {})}
            servers = {
                "gateway": procs.start(
                    "gateway",
                    [*gateway_cmd, "serve", "--config", str(config), "--host", bench.HOST,
                     "--port", str(gateway_port), "--log-level", "info"],
                    cpus=layout.proxies, env=env, stdout=os.devnull,
                ),
                "bare": procs.start(
                    "bare",
                    [py, str(HERE / "bare_proxy.py"), "--host", bench.HOST, "--port", str(bare_port),
                     "--upstream", f"http://{bench.HOST}:{mock_port}", "--connections", str(connections)],
                    cpus=layout.proxies,
                ),
            }  # fmt: skip
            ports = {"gateway": gateway_port, "bare": bare_port}
            models = {"gateway": args.model, "bare": bench.UPSTREAM_MODEL}
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"}
            for name in args.targets:
                probe = json.dumps({"model": models[name], "messages": [{"role": "user", "content": "hi"}]})
                wait_up(procs, ports[name], probe.encode(), headers, name)
            # From now on every mock-chat stream waits chunk_delay between its content chunks.
            faults = {"model": bench.UPSTREAM_MODEL, "options": {"chunk_delay": args.chunk_delay}}
            status, _, data = bench.post(mock_port, "/_mock/faults", json.dumps(faults).encode(), headers)
            if status != 200:
                raise bench.BenchError(f"mock /_mock/faults answered HTTP {status}: {data[:200]!r}")
            for name in args.targets:
                pid = servers[name].popen.pid
                idle = rss_kb(pid, "VmRSS")
                log(f"{name}: {n} streams of {args.words + 2} chunks, {args.chunk_delay} s apart ...")
                t0 = time.monotonic()
                stats, all_open_kb, sampled_kb = asyncio.run(
                    open_streams(ports[name], models[name], headers, n, args.words, pid)
                )
                procs.check_alive()
                hwm = rss_kb(pid, "VmHWM")
                first_end = min(stats.ended) if stats.ended else None
                last_start = max(stats.first_chunk) if stats.first_chunk else None
                at_once = (
                    len(stats.first_chunk) == n
                    and first_end is not None
                    and last_start is not None
                    and last_start < first_end
                )
                results[name] = {
                    "streams": n,
                    "completed_ok": stats.ok,
                    "errors": stats.errors,
                    "first_error": stats.first_error,
                    "all_open_at_once": at_once,
                    "all_open_for_s": round(first_end - last_start, 2)
                    if at_once and first_end and last_start
                    else 0,
                    "last_first_chunk_s": round(last_start - t0, 2) if last_start else None,
                    "took_s": round(time.monotonic() - t0, 2),
                    "rss_idle_mb": round(idle / 1024, 1),
                    "rss_all_open_mb": round(all_open_kb / 1024, 1),
                    "rss_peak_sampled_mb": round(sampled_kb / 1024, 1),
                    "peak_rss_mb": round(max(hwm, sampled_kb) / 1024, 1),
                    "kb_per_stream": round((max(hwm, sampled_kb) - idle) / n, 1),
                }
                log(f"{name}: {json.dumps(results[name])}")
        finally:
            procs.stop_all()
    return {
        "settings": {
            "streams": n,
            "content_chunks": args.words + 2,
            "chunk_delay_s": args.chunk_delay,
            "config": str(args.config),
            "upstream_connections": connections,
            "open_files_limit": limit,
            "pinning": (
                f"client and mock on CPU {bench.fmt_cpus(layout.load)}, "
                f"server on CPU {bench.fmt_cpus(layout.proxies)}"
                if layout.load
                else layout.describe()
            ),
        },
        "environment": bench.environment("python", bench.ROOT),
        "results": results,
    }


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"{s['streams']} streams at once, each {s['content_chunks']} content chunks {s['chunk_delay_s']} s "
        f"apart (mock chunk_delay); upstream connections {s['upstream_connections']}; {s['pinning']}",
        "",
        f"{'target':<9}{'completed':>11}{'open at once':>14}{'RSS idle MB':>13}{'RSS all open MB':>17}"
        f"{'peak RSS MB':>13}{'KB/stream':>11}",
    ]
    for name, r in result["results"].items():
        at_once = f"yes, {r['all_open_for_s']:.1f} s" if r["all_open_at_once"] else "no"
        completed = f"{r['completed_ok']}/{r['streams']}"
        lines.append(
            f"{name:<9}{completed:>11}{at_once:>14}{r['rss_idle_mb']:>13.1f}"
            f"{r['rss_all_open_mb']:>17.1f}{r['peak_rss_mb']:>13.1f}{r['kb_per_stream']:>11.1f}"
        )
        if r["errors"]:
            lines.append(f"  {name} errors {r['errors']}: {r['first_error']}")
    lines.append(
        "peak RSS = max(VmHWM, sampled VmRSS) of the server process; KB/stream = (peak - idle) / streams"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Peak RSS of the gateway and the bare proxy with N streams open.")
    p.add_argument("--streams", type=int, default=1000, help="streams open at once (1000)")
    p.add_argument("--chunk-delay", type=float, default=0.5, help="seconds between content chunks (0.5)")
    p.add_argument("--words", type=int, default=18, help="prompt words: the answer has words+2 chunks (18)")
    p.add_argument("--config", type=Path, default=bench.PLUGINS_CONFIG, help="gateway config (bench-plugins)")
    p.add_argument("--model", default="bench", help="model name the gateway config routes to the mock")
    p.add_argument("--targets", default="gateway,bare", help="gateway,bare (default) or one of them")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets or any(t not in ("gateway", "bare") for t in args.targets):
        p.error("--targets: gateway, bare or both")
    if args.streams < 1 or args.words < 1 or args.chunk_delay < 0:
        p.error("--streams and --words must be >= 1, --chunk-delay >= 0")
    default = bench.PLUGINS_API_KEY if args.config.resolve() == bench.PLUGINS_CONFIG else "none"
    args.api_key = os.environ.get("BENCH_API_KEY", default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, result = bench.run_script("streams_rss", lambda log: run(args, log), render, args.json)
    if result is None:
        return code
    ok = all(r["completed_ok"] == r["streams"] and r["all_open_at_once"] for r in result["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
