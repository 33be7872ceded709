"""The project's testing API: helpers any test may import (``from tests.helpers import ...``).

Fixtures stay in ``tests/conftest.py`` (the mock upstream, ``make_gateway``, ``gw``, ``private_redis``);
what a test calls itself lives here:

``free_port() -> int``
    A loopback TCP port that nothing listens on right now: for a server the test starts itself, or
    as an address where nobody answers (a dead upstream, Redis down).
``eventually(check, within=2.0, interval=0.01, message=None)``
    Poll ``check`` (sync, or async) until it gives something truthy and return that value; an
    ``AssertionError`` (with ``message``, if given) after ``within`` seconds.
``openai_client(base_url, api_key, **kw) -> openai.AsyncOpenAI`` and ``openai_sync_client(...)``
    SDK clients as the tests use them: no SDK retries (``max_retries=0``), so every request the test
    makes is exactly one request to the gateway. The caller closes them (``RunningGateway.client()``
    in conftest builds one for a test gateway and closes it when the test ends).
``raw_request(root, method, path, headers, body=None)``
    One HTTP/1.1 request written byte for byte, for what HTTP clients will not send.
``PrivateRedis(workdir, persistent=False)``
    A redis-server of the test's own on a free port, to kill and start again (the ``private_redis``
    fixture gives a started one, skipping the test without ``redis-server``).
``RedisProxy(host, port)``
    A TCP proxy in front of Redis whose reads a test watches, changes or cuts (override ``to_redis`` /
    ``to_client``).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import openai
import orjson
from aiohttp import web


def free_port() -> int:
    """A free loopback port (bound once and released: nothing listens on it when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    check: Callable[[], Any],
    within: float = 2.0,
    interval: float = 0.01,
    message: str | Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` every ``interval`` seconds until it returns something truthy and return that
    (or fail after ``within`` seconds). ``check`` may be async: what it returns is awaited first.
    ``message`` (or what it returns, computed at the failure) is the failure's message."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            if message is None:
                raise AssertionError(f"condition not met within {within} s")
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(interval)


def openai_client(base_url: str, api_key: str, *, max_retries: int = 0, **kw: Any) -> openai.AsyncOpenAI:
    """An async OpenAI SDK client for ``base_url`` (a ``.../v1`` URL) that does not retry;
    ``kw`` goes to ``openai.AsyncOpenAI`` (``timeout=``, ``default_headers=`` ...)."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, **kw)


def openai_sync_client(base_url: str, api_key: str, *, max_retries: int = 0, **kw: Any) -> openai.OpenAI:
    """The blocking ``openai.OpenAI`` counterpart of ``openai_client``."""
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, **kw)


async def raw_request(
    root: str, method: str, path: str, headers: Sequence[tuple[str, str]], body: Any = None
) -> tuple[int, Any]:
    """One HTTP/1.1 request written byte for byte: for what HTTP clients will not send (a header twice,
    in two spellings). Returns the status and the parsed JSON body (None when empty)."""
    url = urlsplit(root)
    data = b"" if body is None else orjson.dumps(body)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower(), head  # every answer read here has a Content-Length
    return int(head.split(b" ", 2)[1]), orjson.loads(content) if content else None


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, which the test may kill and start
    again; with ``persistent`` it comes back with its data (append-only file, fsync always)."""

    def __init__(self, workdir: Any, persistent: bool = False) -> None:
        self.port = free_port()
        self.workdir = str(workdir)
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server (again) on the same port and wait until it answers PING (5 s at most)."""
        import redis as sync_redis

        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += self.persistence or ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *args, "--dir", self.workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = sync_redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    client.ping()
                    return
                except sync_redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """Kill the server (SIGKILL: no shutdown, no final save) and reap it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def echo_credentials_app() -> web.Application:
    """A careless upstream that puts the credentials it got into its error message (a 400)."""

    async def echo_credentials(request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"error": {"message": f"bad key {key}", "type": "x"}}, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo_credentials)
    return app


class RedisProxy:
    """A TCP proxy in front of Redis, for tests that watch or break the wire. Each read passes through
    ``to_redis`` / ``to_client`` with the connection's own ``state`` dict; returning None cuts both
    connections instead of passing the bytes on."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def to_redis(self, state: dict[str, Any], data: bytes) -> bytes | None:
        return data

    def to_client(self, state: dict[str, Any], data: bytes) -> bytes | None:
        return data

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        redis_r, redis_w = await asyncio.open_connection(self.host, self.port)
        self.writers += [client_w, redis_w]
        state: dict[str, Any] = {}

        async def pipe(
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            hook: Callable[[dict[str, Any], bytes], bytes | None],
        ) -> None:
            while data := await reader.read(1 << 20):
                out = hook(state, data)
                if out is None:
                    return  # cut: both connections are closed below
                writer.write(out)

        try:
            await asyncio.wait(
                [
                    asyncio.ensure_future(pipe(client_r, redis_w, self.to_redis)),
                    asyncio.ensure_future(pipe(redis_r, client_w, self.to_client)),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            client_w.transport.abort()
            redis_w.transport.abort()
            self.handlers.discard(task)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        while self.handlers:
            await asyncio.sleep(0.01)
