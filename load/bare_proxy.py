"""The least a proxy on the gateway's stack can do: the baseline the gateway is measured against.

uvloop, read the request body, POST it upstream through one shared ``ClientSession``, relay the
answer. A streamed answer (``text/event-stream``) is relayed chunk by chunk as it arrives through a
``StreamResponse``; anything else is read whole and returned. No parsing, no logging, no metrics.

    python load/bare_proxy.py --port 8100 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
CONNECTIONS = web.AppKey("connections", int)
FORWARD_HEADERS = {"Content-Type": "application/json"}


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    url = request.app[UPSTREAM] + request.path
    async with session.post(url, data=body, headers=FORWARD_HEADERS) as up:
        content_type = up.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": content_type})
            await resp.prepare(request)
            while chunk := await up.content.readany():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        data = await up.read()
        return web.Response(status=up.status, body=data, headers={"Content-Type": content_type})


async def _session(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(limit=app[CONNECTIONS], keepalive_timeout=30)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
    )
    yield
    await app[SESSION].close()


def build_app(upstream: str, connections: int = 256) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app[CONNECTIONS] = connections
    app.cleanup_ctx.append(_session)
    app.router.add_post("/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Bare aiohttp reverse proxy (benchmark baseline).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000", help="base URL, without /v1")
    parser.add_argument(
        "--connections", type=int, default=256, help="upstream connections at most (256, as the gateway)"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(
        build_app(args.upstream, args.connections),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
