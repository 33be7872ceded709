"""An experiment, not a tool: ``load/bare_proxy.py`` with a minimal keep-alive HTTP/1.1 client in place
of aiohttp's ``ClientSession`` (non-stream, ``Content-Length`` answers only, no TLS, no timeouts). It
measures what aiohttp's client costs per request, the one large lever left under the gateway's hot path
(issue #13). Against the bare proxy, both alone on CPU 1, wrk c=32, two interleaved runs of 3 rounds
(load/README.md "Issue #13's goals"): 49-65 µs CPU per request against 101-126.

    python load/lean_client_proxy.py --port 8612 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from typing import cast

from aiohttp import web


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, though not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        head_end = self.buffer.find(b"\r\n\r\n")
        if waiter is None or head_end < 0:
            return
        head = bytes(self.buffer[:head_end])
        at = head.lower().find(b"\r\ncontent-length:")
        length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
        if len(self.buffer) < head_end + 4 + length:
            return
        body = bytes(self.buffer[head_end + 4 : head_end + 4 + length])
        del self.buffer[: head_end + 4 + length]
        self.waiter = None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed"))


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[_Connection] = deque()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        conn.waiter = loop.create_future()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        assert conn.transport is not None
        conn.transport.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = await conn.waiter
        self.idle.append(conn)
        return answer


POOL = web.AppKey("pool", _Pool)


async def proxy(request: web.Request) -> web.Response:
    status, data = await request.app[POOL].post(request.path, await request.read())
    return web.Response(status=status, body=data, headers={"Content-Type": "application/json"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8612)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000", help="http://host:port, without /v1")
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    host, port = args.upstream.split("//", 1)[1].rstrip("/").split(":")
    app = web.Application()
    app[POOL] = _Pool(host, int(port))
    app.router.add_post("/{tail:.*}", proxy)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
