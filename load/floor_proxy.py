"""The bare proxy plus only the per-request work issue #3 mandates: the floor under the gateway.

On top of ``bare_proxy.py``: parse the request body once (orjson); one ``admit.lua`` call through the
gateway's own auto-pipelined Redis connection (rpm, tpm, a parallel slot and two budgets, as
``bench-plugins.yaml`` sets them); parse the upstream answer for its usage; one ``settle.lua`` call
(tpm reconcile, slot release, two budget counters, the usage book); one JSON access line. No
context, no plugins, no routing, no metrics: whatever the gateway costs above this floor is its own
design, and the floor's cost over the bare proxy is what the contract asks of every request.

    python load/floor_proxy.py --port 8300 --upstream http://127.0.0.1:9000 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import aiohttp
import orjson
from aiohttp import web

from gateway.state.base import Check, Op
from gateway.state.redis import RedisStore

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
STORE = web.AppKey("store", RedisStore)
FORWARD_HEADERS = {"Content-Type": "application/json"}
BASE = "llmgw-floor:{bench}"
RPM = Check("bucket", f"{BASE}:rpm", 1e8, "rpm", rate=1e8 / 60, cost=1)
BUDGETS = (
    Check("budget", f"{BASE}:usd:d", 1e9, "budget", ends_ms=2_000_000_000_000),
    Check("budget", f"{BASE}:tok:m", 1e12, "budget", ends_ms=2_000_000_000_000),
)
_members = itertools.count(1)
WITH_REDIS = os.environ.get("FLOOR_REDIS", "1") != "0"  # 0: parse and log only, to split the cost
_prefix = os.urandom(4).hex()


def _lost(ops: object) -> None:
    pass


async def proxy(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw)
    reserve = len(raw) // 4 + int(body.get("max_tokens") or 256)
    member = f"{_prefix}{next(_members):x}"
    checks = [
        RPM,
        Check("bucket", f"{BASE}:tpm", 1e9, "tpm", rate=1e9 / 60, cost=reserve),
        Check("parallel", f"{BASE}:par", 100000, "parallel", member=member, stale_ms=660_000),
        *BUDGETS,
    ]
    store = request.app[STORE]
    if WITH_REDIS:
        decision = await store.admit(checks)
        if decision.failed is not None:
            return web.Response(status=429)
    session = request.app[SESSION]
    url = request.app[UPSTREAM] + request.path
    async with session.post(url, data=body_bytes(body), headers=FORWARD_HEADERS) as up:
        data = await up.read()
        status = up.status
    usage = orjson.loads(data).get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    used = prompt + completion
    ops = [
        Op("bucket", f"{BASE}:tpm", (1e9, 1e9 / 60, used - reserve)),
        Op("release", f"{BASE}:par", (member,)),
        Op("incr", f"{BASE}:usd:d", (used * 1e-6, 3 * 86400)),
        Op("incr", f"{BASE}:tok:m", (used, 40 * 86400)),
        Op("usage", f"{BASE}:usage:d", ("bench", prompt, completion, used * 1e-6, 400 * 86400)),
    ]
    if WITH_REDIS:
        store.settle_soon(ops, _lost)
    sys.stdout.buffer.write(
        orjson.dumps(
            {"event": "request", "path": request.path, "status": status, "prompt_tokens": prompt},
            option=orjson.OPT_APPEND_NEWLINE,
        )
    )
    return web.Response(status=status, body=data, content_type="application/json")


def body_bytes(body: dict[str, object]) -> bytes:
    body["model"] = "mock-chat"  # the gateway maps the model name to the target's
    return orjson.dumps(body)


def build_app(upstream: str, redis_url: str) -> web.Application:
    async def resources(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
        )
        app[STORE] = RedisStore(redis_url, "llmgw-floor")
        yield
        await app[SESSION].close()
        await app[STORE].close()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(resources)
    app.router.add_post("/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Bare proxy + the mandated per-request work (floor).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000", help="base URL, without /v1")
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    web.run_app(
        build_app(args.upstream, args.redis), host=args.host, port=args.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
