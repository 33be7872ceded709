"""One auto-pipelined Redis connection for the per-request limit scripts.

Why: through redis-py's asyncio pipeline one ``EVALSHA`` costs ~300 µs of gateway CPU (argument
encoding per value, connection-pool locks, a timeout context per read) — more than the whole proxy.
Here every request's command is encoded once into RESP bytes, the commands of one event-loop tick
leave in one write, and replies are parsed by hiredis (the parser redis-py itself uses) in FIFO
order on a single long-lived connection. redis-py keeps everything else (directory, cache, health).

Failure model: a lost or silent connection fails every waiting call with ``StoreUnavailable`` at
once (the caller applies its fail-open/closed policy); the next call reconnects (one attempt at a
time; after a connect *timeout*, not before ``RECONNECT_SECONDS``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from gateway.state.base import StoreUnavailable

RECONNECT_SECONDS = 1.0
ReplyError = hiredis.ReplyError


def encode(args: tuple[Any, ...]) -> bytes:
    """A command as a RESP array of bulk strings (hiredis' own packer: str as UTF-8, numbers exact)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


class _Protocol(asyncio.Protocol):
    def __init__(self, pipe: RespPipe) -> None:
        self.pipe = pipe
        self.reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        if self.pipe.protocol is not self:
            return  # a dropped connection's late bytes: its callers were already failed
        self.reader.feed(data)
        waiting = self.pipe.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            future, _ = waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pipe.protocol is self:  # not an old connection closing after a reconnect
            self.pipe.lost("connection lost")


class RespPipe:
    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        self.timeout = timeout
        self.ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self.unix = parts.path if parts.scheme == "unix" else None
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.handshake: list[tuple[Any, ...]] = []
        if parts.password:
            password = unquote(parts.password)
            self.handshake.append(
                ("AUTH", unquote(parts.username), password) if parts.username else ("AUTH", password)
            )
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        if db and db != "0":
            self.handshake.append(("SELECT", db))
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self.protocol: _Protocol | None = None
        self._ready = False  # connected *and* authenticated / on the right database
        self._out: list[bytes] = []
        self._connecting: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._watching = False
        self.closed = False  # for good: never connects again

    @property
    def ready(self) -> bool:
        return self._ready

    def is_closed(self) -> bool:
        return self.closed

    def at(self, host: str, port: int) -> RespPipe:
        """A pipe to another node with the same credentials and TLS (Redis Cluster)."""
        pipe = RespPipe("redis://", timeout=self.timeout)
        pipe.ssl, pipe.host, pipe.port = self.ssl, host, port
        pipe.handshake = [c for c in self.handshake if c[0] == "AUTH"]  # a cluster has only database 0
        return pipe

    async def call(self, *args: Any, key: str | None = None) -> Any:
        """Send one command (batched with the others of this tick); its reply, or ReplyError.
        ``key`` is for ``ClusterPipe``, which routes by it; one Redis has one node."""
        if not self._ready:
            await self._connect()
            if not self._ready:  # lost again while this caller was waking up
                raise StoreUnavailable("redis connection lost")
        return await self._send(encode(args))

    def send_now(self, *args: Any, key: str | None = None) -> asyncio.Future[Any] | None:
        """Queue one command without waiting (its reply arrives on the future); None when the
        connection is not up (use ``call``, which connects)."""
        return self._send(encode(args)) if self._ready else None

    def _send(self, command: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((future, loop.time()))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(command)
        if not self._watching:
            self._watching = True
            loop.call_later(self.timeout, self._watch)
        return future

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if self._transport is not None and data:
            self._transport.write(data)

    def _watch(self) -> None:
        """A reply overdue by ``timeout``: the connection is stuck; drop it and fail everything now."""
        self._watching = False
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self.waiting[0][1] >= self.timeout:
            self.reset("timed out")  # its late replies must never reach the next connection's callers
            return
        self._watching = True
        loop.call_later(self.timeout, self._watch)

    async def _connect(self) -> None:
        """Wait for the one connection attempt in progress (starting it if needed).

        The attempt runs as its own task, so a caller that is cancelled (its client left) neither
        strands the other callers nor leaves a connection half set up (AUTH sent, SELECT not)."""
        if self.closed:
            raise StoreUnavailable("closed")
        if self._connecting is None:
            if time.monotonic() < self._retry_at:
                raise StoreUnavailable("redis unreachable")
            task = self._connecting = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(self._opened)
        try:
            await asyncio.shield(self._connecting)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self.is_closed() and me is not None and not me.cancelling():
                raise StoreUnavailable("closed") from None  # the attempt stopped with the pipe
            raise

    def _opened(self, task: asyncio.Task[None]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here: no "never retrieved" warning when every caller left

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        transport: Any = None
        try:
            async with asyncio.timeout(self.timeout):
                if self.unix:
                    transport, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(self), self.unix
                    )
                else:
                    transport, protocol = await loop.create_connection(
                        lambda: _Protocol(self), self.host, self.port, ssl=self.ssl
                    )
                if self.closed:  # closed while connecting
                    raise StoreUnavailable("closed")
                self._transport, self.protocol = transport, protocol
                for command in self.handshake:
                    reply = await self._send(encode(command))
                    if isinstance(reply, ReplyError):
                        raise StoreUnavailable(f"redis refused {command[0]}")
            self._ready = True
        except (OSError, TimeoutError, StoreUnavailable) as exc:
            if isinstance(exc, TimeoutError):
                # A silent (blackholed) Redis: fail fast for a while instead of making every request
                # wait out the connect timeout. A refused connection costs nothing: retry at once.
                self._retry_at = time.monotonic() + RECONNECT_SECONDS
            self.lost("connect failed")
            if transport is not None:
                transport.abort()
            raise exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(type(exc).__name__) from None

    def reset(self, reason: str) -> None:
        """Drop the connection on purpose (e.g. it reached a read-only replica after a failover);
        waiting calls fail now, the next call connects again."""
        transport = self._transport
        self.lost(reason)
        if transport is not None:
            transport.abort()

    def lost(self, reason: str) -> None:
        self._ready = False
        self._transport = None
        self.protocol = None
        self._out = []
        waiting, self.waiting = self.waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(StoreUnavailable(reason))

    def close(self) -> None:
        self.closed = True
        if self._connecting is not None:
            self._connecting.cancel()  # its waiting callers fail now, not after the connect timeout
        transport = self._transport
        self.lost("closed")
        if transport is not None:
            transport.close()
