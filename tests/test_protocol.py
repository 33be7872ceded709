"""``gateway.protocol`` over raw sockets: slow and idle clients, the connection cap, malformed requests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from tests.conftest import RunningGateway, Upstream, base_config
from tests.helpers import eventually

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
MakeGateway = Callable[[dict[str, Any]], Awaitable[RunningGateway]]

LIVE = b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n"
CHAT = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
CHAT_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(CHAT)).encode() + b"\r\n\r\n"
)
SECRET = "caller-secret-5f4e3d2c1b0a9988"


async def connect(gw: RunningGateway) -> Streams:
    url = urlsplit(gw.root)
    return await asyncio.open_connection(url.hostname, url.port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").strip().split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return int(status_line.split(" ")[1]), headers, body


async def request(streams: Streams, raw: bytes = LIVE) -> tuple[int, dict[str, str], bytes]:
    reader, writer = streams
    writer.write(raw)
    await writer.drain()
    return await read_response(reader)


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server still sent before closing the connection; fails if it is open after ``within``."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:  # it closed while our bytes were still arriving
        return b""


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float = 0.1) -> None:
    """Send ``data`` one byte per ``every`` seconds (until the server closes the connection)."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def trickling(writer: asyncio.StreamWriter, data: bytes) -> Any:
    task = asyncio.create_task(trickle(writer, data))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.close()


def server(upstream: Upstream, **settings: Any) -> dict[str, Any]:
    return base_config(upstream.url, server=settings)


# --- slow and idle clients ------------------------------------------------------------------------------


async def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_head_timeout(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(server(upstream, head_timeout_seconds=0.5))
    reader, writer = await connect(gw)
    started = time.monotonic()
    async with trickling(writer, CHAT_HEAD) as sending:  # ~10 s of head at this pace
        assert await closed_by_server(reader, within=5) == b""  # closed, and nothing answered
        assert 0.4 < time.monotonic() - started < 2.5
        assert not sending.done()  # the client was still sending its head


async def test_a_connection_that_sends_nothing_is_closed_at_the_head_timeout(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(server(upstream, head_timeout_seconds=0.3))
    reader, writer = await connect(gw)
    started = time.monotonic()
    assert await closed_by_server(reader, within=5) == b""
    assert 0.2 < time.monotonic() - started < 2
    writer.close()


async def test_idle_keepalive_is_bounded_by_its_own_timeout_not_the_head_timeout(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(server(upstream, head_timeout_seconds=0.3, keepalive_timeout_seconds=1.5))
    streams = await connect(gw)
    assert (await request(streams))[0] == 200
    await asyncio.sleep(0.8)  # idle past the head timeout: the head deadline starts with a request's bytes
    assert (await request(streams))[0] == 200
    idle_from = time.monotonic()
    assert await closed_by_server(streams[0], within=5) == b""
    assert 1.2 < time.monotonic() - idle_from < 3.5
    streams[1].close()


async def test_the_next_request_on_a_kept_alive_connection_has_its_own_head_deadline(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(server(upstream, head_timeout_seconds=0.5, keepalive_timeout_seconds=30))
    reader, writer = streams = await connect(gw)
    assert (await request(streams))[0] == 200
    started = time.monotonic()
    async with trickling(writer, LIVE + b"X-Pad: " + b"p" * 100 + b"\r\n\r\n"):
        assert await closed_by_server(reader, within=5) == b""
        assert 0.4 < time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    ("path", "error_type"),
    [
        ("/v1/chat/completions", "invalid_request_error"),  # read_json, OpenAI's shape
        ("/api/v1/llm/complete", "INVALID_REQUEST"),  # the native API's shape
        ("/admin/teams", "invalid_request_error"),  # a body read without read_json
    ],
)
async def test_a_body_sent_a_byte_at_a_time_gets_408_and_the_connection_closes(
    upstream: Upstream, make_gateway: MakeGateway, path: str, error_type: str
) -> None:
    cfg = server(upstream, body_timeout_seconds=0.5)
    cfg["admin"] = {"master_key": SECRET}
    gw = await make_gateway(cfg)
    reader, writer = await connect(gw)
    head = CHAT_HEAD.replace(b"/v1/chat/completions", path.encode())
    writer.write(head.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode()))
    started = time.monotonic()
    async with trickling(writer, CHAT):  # ~7 s of body at this pace
        status, headers, body = await read_response(reader)
        assert 0.4 < time.monotonic() - started < 2.5
        assert status == 408
        assert headers["connection"] == "close"
        assert headers["content-type"].startswith("application/json")
        error = orjson.loads(body)["error"]
        assert (error["type"], error["code"]) == (error_type, "request_timeout")
        assert error["message"] == "the request body stalled for 0.5 s"
        assert await closed_by_server(reader, within=3) == b""


async def test_a_body_that_arrives_in_parts_within_the_body_timeout_is_served(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(server(upstream, body_timeout_seconds=1))
    streams = _, writer = await connect(gw)
    writer.write(CHAT_HEAD + CHAT[:10])
    await asyncio.sleep(0.2)
    writer.write(CHAT[10:20])
    await asyncio.sleep(0.2)
    status, _, body = await request(streams, CHAT[20:])
    assert status == 200, body
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "Mock answer: hi"
    # the connection stays usable past the deadline: it ended with the body
    await asyncio.sleep(0.8)
    assert (await request(streams))[0] == 200
    writer.close()


async def test_a_slow_but_real_upload_outlives_the_body_timeout(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    """A large body over a poor uplink keeps moving (≥ 1 KiB per body_timeout_seconds): it is served,
    though it takes several timeouts to arrive."""
    gw = await make_gateway(server(upstream, body_timeout_seconds=0.5))
    body = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * 12_000}]})
    head = CHAT_HEAD.replace(f"Content-Length: {len(CHAT)}".encode(), f"Content-Length: {len(body)}".encode())
    assert head != CHAT_HEAD
    streams = _, writer = await connect(gw)
    writer.write(head)
    started = time.monotonic()
    for i in range(0, len(body) - 2000, 2000):  # 2 KB every 0.3 s: ~1.8 s in all
        writer.write(body[i : i + 2000])
        await asyncio.sleep(0.3)
    status, _, answer = await request(streams, body[i + 2000 :])
    assert time.monotonic() - started > 1.0
    assert status == 200, answer
    writer.close()


# --- the connection cap -----------------------------------------------------------------------------------


async def test_past_max_connections_new_ones_are_shed_with_503_while_open_ones_keep_working(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(server(upstream, max_connections=2))
    first, second = await connect(gw), await connect(gw)
    for streams in (first, second):
        assert (await request(streams))[0] == 200

    shed = await connect(gw)
    status, headers, body = await request(shed)
    assert status == 503
    assert (headers["connection"], headers["retry-after"]) == ("close", "1")
    assert orjson.loads(body) == {
        "error": {
            "message": "the gateway has too many open connections; retry shortly",
            "type": "service_unavailable",
            "param": None,
            "code": "too_many_connections",
        }
    }
    assert await closed_by_server(shed[0], within=3) == b""
    shed[1].close()
    for streams in (first, second):  # the open connections were not disturbed
        assert (await request(streams))[0] == 200
    shed_lines = [e for e in gw.log_lines() if e["event"] == "connections_shed"]
    assert len(shed_lines) == 1
    assert (shed_lines[0]["level"], shed_lines[0]["max_connections"]) == ("warning", 2)

    first[1].close()  # a slot frees up once the server sees the close

    async def admitted() -> bool:
        streams = await connect(gw)
        status = (await request(streams))[0]
        streams[1].close()
        return status == 200

    await eventually(
        admitted, within=3, interval=0.05, message="the closed connection's slot was never freed"
    )
    second[1].close()


# --- malformed requests -----------------------------------------------------------------------------------

MALFORMED = {
    "bare-cr-in-a-header": (
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Note: a\rb\r\n"
        b"Authorization: Bearer " + SECRET.encode() + b"\r\n\r\n"
    ),
    "over-long-authorization-header": (
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        + SECRET.encode()
        + b"A" * 9000
        + b"\r\n\r\n"
    ),
    "over-long-request-line": b"GET /v1/models?key=" + SECRET.encode() + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET.encode() + b"\r\n\r\n",
}
MALFORMED_BODY = {
    "error": {
        "message": "malformed HTTP request",
        "type": "invalid_request_error",
        "param": None,
        "code": "malformed_request",
    }
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_gets_a_terse_json_400_and_one_warning_without_traceback(
    gw: RunningGateway, raw: bytes
) -> None:
    reader, writer = await connect(gw)
    writer.write(raw)
    await writer.drain()
    status, headers, body = await read_response(reader)
    rest = await closed_by_server(reader, within=3)
    writer.close()

    assert status == 400
    assert headers["connection"] == "close"
    assert headers["content-type"].startswith("application/json")
    assert orjson.loads(body) == MALFORMED_BODY
    assert rest == b""
    assert SECRET.encode() not in body + rest + b"".join(f"{k}{v}".encode() for k, v in headers.items())

    logs = gw.logs.getvalue()
    assert b"Traceback" not in logs
    assert SECRET.encode() not in logs
    lines = gw.log_lines()
    assert not [e for e in lines if e.get("level") in ("error", "critical") or "exception" in e]
    warnings = [e for e in lines if e["event"] == "malformed_request"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["suppressed"] == 0
    assert warnings[0]["peer"] == "127.0.0.1"


async def test_malformed_requests_are_logged_at_most_once_per_interval(gw: RunningGateway) -> None:
    for raw in [*MALFORMED.values(), *MALFORMED.values()]:
        streams = await connect(gw)
        assert (await request(streams, raw))[0] == 400
        streams[1].close()
    # one line for the first; the next seven wait for the next interval, whose line will count them
    assert len([e for e in gw.log_lines() if e["event"] == "malformed_request"]) == 1
    assert (await gw.http("GET", "/health/live"))[0] == 200  # well-formed requests are unaffected
