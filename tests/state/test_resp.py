"""RespPipe, the hot path's own Redis connection: replies never cross requests, whatever fails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import hiredis
import pytest

from gateway.state.base import StoreUnavailable
from gateway.state.resp import RespPipe, encode
from tests.conftest import REDIS_URL


class FakeRedis:
    """A loopback server speaking RESP: answers ``+connN:LASTARG`` after a per-connection delay,
    ``+OK`` to AUTH/SELECT (after ``auth_delay``), and records every command it saw."""

    def __init__(self, delays: dict[int, float] | None = None, auth_delay: float = 0.0) -> None:
        self.delays, self.auth_delay = delays or {}, auth_delay
        self.connections = 0
        self.seen: list[tuple[int, str]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections
        self.writers.append(writer)
        parser = hiredis.Reader()
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = command[0].decode().upper()
                    self.seen.append((n, name))
                    handshake = name in ("AUTH", "SELECT")
                    await asyncio.sleep(self.auth_delay if name == "AUTH" else self.delays.get(n, 0.0))
                    text = "OK" if handshake else f"conn{n}:{command[-1].decode()}"
                    writer.write(f"+{text}\r\n".encode())


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeRedis, int]]:
    server_state = FakeRedis()
    server = await asyncio.start_server(lambda r, w: server_state.handle(r, w), "127.0.0.1", 0)
    yield server_state, server.sockets[0].getsockname()[1]
    for writer in server_state.writers:
        writer.close()
    server.close()


def test_encode_is_resp_with_byte_lengths() -> None:
    assert (
        encode(("SET", "k", "é", 1.5, 3))
        == b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n$3\r\n1.5\r\n$1\r\n3\r\n"
    )


async def test_commands_of_one_tick_share_the_connection_and_keep_their_replies() -> None:
    pipe = RespPipe(REDIS_URL, timeout=1.0)
    try:
        replies = await asyncio.gather(*(pipe.call("ECHO", f"m{i}") for i in range(50)))
        assert replies == [f"m{i}".encode() for i in range(50)]
    finally:
        pipe.close()


async def test_late_replies_of_a_timed_out_connection_never_reach_the_next_caller(
    fake: tuple[FakeRedis, int],
) -> None:
    server, port = fake
    # Connection 1 answers A after 0.8 s (past the 0.5 s timeout); connection 2 answers B after 0.4 s,
    # so B is still waiting when A's late answer comes in on the dropped connection.
    server.delays = {1: 0.8, 2: 0.4}
    pipe = RespPipe(f"redis://127.0.0.1:{port}", timeout=0.5)
    with pytest.raises(StoreUnavailable):
        await pipe.call("ECHO", "A")
    assert await pipe.call("ECHO", "B") == b"conn2:B"
    assert await pipe.call("ECHO", "C") == b"conn2:C"
    pipe.close()


async def test_a_cancelled_caller_neither_strands_the_others_nor_half_opens_the_connection(
    fake: tuple[FakeRedis, int],
) -> None:
    server, port = fake
    server.auth_delay = 0.2
    pipe = RespPipe(f"redis://:pw@127.0.0.1:{port}/3", timeout=1.0)
    first = asyncio.create_task(pipe.call("ECHO", "A"))
    second = asyncio.create_task(pipe.call("ECHO", "B"))
    await asyncio.sleep(0.05)
    first.cancel()  # its client went away while the connection was still authenticating
    assert await asyncio.wait_for(second, 2) == b"conn1:B"
    assert server.seen[:2] == [(1, "AUTH"), (1, "SELECT")]  # the handshake completed all the same
    pipe.close()


async def test_an_unreachable_redis_fails_fast_and_is_retried() -> None:
    pipe = RespPipe("redis://127.0.0.1:9/0", timeout=0.5)  # the discard port: connection refused
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(pipe.call("PING"), 1)
