"""The bare proxy plus only the per-request work issue #3 mandates: the floor under the gateway.

On top of ``bare_proxy.py``: parse the request body once (orjson); one ``admit.lua`` call through the
gateway's own auto-pipelined Redis connection (rpm, tpm, a parallel slot and two budgets, as
``bench-plugins.yaml`` sets them); parse the upstream answer for its usage; one ``settle.lua`` call
(tpm reconcile, slot release, two budget counters, the usage book); one JSON access line. No
context, no plugins, no routing, no metrics: whatever the gateway costs above this floor is its own
design, and the floor's cost over the bare proxy is what the contract asks of every request.

A ``"stream": true`` request takes the same admit and settle, and in between: ask the upstream for
``stream_options.include_usage`` (as the gateway does), relay its SSE bytes as they arrive (whole
reads forwarded untouched), take the usage from the final usage chunk, and drop that chunk when the
client did not ask for it. One access line when the stream has ended.

    python load/floor_proxy.py --port 8300 --upstream http://127.0.0.1:9000 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

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
    response: web.StreamResponse
    if body.get("stream"):
        options = body.get("stream_options")
        strip = not (isinstance(options, dict) and options.get("include_usage") is True)
        body["stream_options"] = {"include_usage": True}
        response, status, usage = await relay_stream(request, session, url, body, strip)
    else:
        async with session.post(url, data=body_bytes(body), headers=FORWARD_HEADERS) as up:
            data = await up.read()
            status = up.status
        usage = orjson.loads(data).get("usage") or {}
        response = web.Response(status=status, body=data, content_type="application/json")
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
    return response


async def relay_stream(
    request: web.Request, session: aiohttp.ClientSession, url: str, body: dict[str, Any], strip: bool
) -> tuple[web.StreamResponse, int, dict[str, Any]]:
    """Relay the upstream's SSE bytes as they arrive; return the response, status and usage."""
    async with session.post(url, data=body_bytes(body), headers=FORWARD_HEADERS) as up:
        content_type = up.headers.get("Content-Type", "")
        if up.status != 200 or not content_type.startswith("text/event-stream"):
            data = await up.read()
            return web.Response(status=up.status, body=data, content_type="application/json"), up.status, {}
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        usage: dict[str, Any] = {}
        held = b""  # the start of an event not yet complete, kept back until its end arrives
        while chunk := await up.content.readany():
            if not held and chunk.endswith(b"\n\n") and b'"usage"' not in chunk:
                await resp.write(chunk)  # the usual read: whole events, nothing to look at
                continue
            data = held + chunk
            end = data.rfind(b"\n\n") + 2
            if end < 2:
                held = data
                continue
            held = data[end:]
            out = data[:end]
            if b'"usage"' in out:
                out = take_usage(out, usage, strip)
            if out:
                await resp.write(out)
        if held:
            await resp.write(held)
        await resp.write_eof()
        return resp, 200, usage


def take_usage(events: bytes, usage: dict[str, Any], strip: bool) -> bytes:
    """Whole events, one of which has ``"usage"``: record the usage; drop the usage-only chunk
    (``choices: []``) when the client did not ask for it."""
    kept = []
    for event in events.split(b"\n\n")[:-1]:
        if b'"usage"' in event and event.startswith(b"data: {"):
            chunk = orjson.loads(event[6:])
            if isinstance(chunk.get("usage"), dict):
                usage.update(chunk["usage"])
                if strip and not chunk.get("choices"):
                    continue
        kept.append(event + b"\n\n")
    return b"".join(kept)


def body_bytes(body: dict[str, Any]) -> bytes:
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
