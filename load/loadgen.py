"""A closed-loop HTTP load generator on aiohttp, for machines without ``wrk``.

``concurrency`` workers each send one POST, read the whole answer (a stream to its end), and send
the next, for ``duration`` seconds. Prints one JSON line shaped like the one bench.py's wrk script
prints: requests, duration_us, p50_us, p99_us and error counts. It is slower than wrk (Python on
one core), so absolute numbers are lower; bench.py still interleaves targets, so ratios stay usable.

    python load/loadgen.py --url http://127.0.0.1:8100/v1/chat/completions --body-file body.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import orjson


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def run(
    url: str,
    body: bytes,
    concurrency: int,
    duration: float,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> dict[str, int]:
    if not url.startswith("http://127.0.0.1:"):
        raise SystemExit("loadgen: only http://127.0.0.1 targets are allowed")
    latencies: list[float] = []
    errors = {"status": 0, "connect": 0, "read": 0, "timeout": 0}
    if headers is None:
        headers = {
            "Content-Type": "application/json",
            "Authorization": "Bearer " + os.environ.get("BENCH_API_KEY", "none"),
        }
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False
    ) as session:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    return
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except TimeoutError:
                    errors["timeout"] += 1
                    continue
                except aiohttp.ClientConnectorError:
                    errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
                except aiohttp.ClientError:
                    errors["read"] += 1
                    continue
                t1 = time.perf_counter()
                if t1 > deadline:
                    return  # finished after the window closed: not counted, as wrk does
                if status >= 400:
                    errors["status"] += 1
                latencies.append(t1 - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": int(percentile(latencies, 50) * 1e6),
        "p99_us": int(percentile(latencies, 99) * 1e6),
        "status_errors": errors["status"],
        "connect": errors["connect"],
        "read": errors["read"],
        "write": 0,
        "timeout": errors["timeout"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Closed-loop aiohttp load generator (wrk fallback).")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument(
        "--headers", help="every request header, as a JSON object (default: JSON + BENCH_API_KEY)"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    body = Path(args.body_file).read_bytes()
    headers = orjson.loads(args.headers) if args.headers else None
    result = asyncio.run(run(args.url, body, args.concurrency, args.duration, args.timeout, headers))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
