"""The relay, end to end: real gateway and real mock upstream on loopback, the official SDK as client.

Byte comparisons use a raw aiohttp client; everything a user would do goes through ``openai``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import (
    PROVIDER_KEY,
    TEAM_B_KEY,
    TEAM_KEY,
    RunningGateway,
    Upstream,
    base_config,
    tenancy_config,
)
from tests.helpers import eventually

MakeGateway = Callable[[dict[str, Any]], Awaitable[RunningGateway]]
AiohttpServer = Callable[..., Awaitable[TestServer]]

UNICODE = "h\u00e9llo \u2713 \U0001f600 \u4f60\u597d \u3053\u3093\u306b\u3061\u306f"  # é ✓ 😀 CJK
JSON = {"Authorization": "Bearer client-key", "Content-Type": "application/json"}


# --------------------------------------------------------------------------------------- helpers


def config(upstream: Upstream, model: str = "mock-chat", **timeouts: float) -> dict[str, Any]:
    """One provider, model ``chat`` → ``model`` on the mock, with the given timeouts."""
    cfg = base_config(upstream.url)
    cfg["providers"][0]["timeouts"].update(timeouts)
    cfg["models"][0]["targets"][0]["model"] = model
    return cfg


def fallback_config(upstream: Upstream, first: str, second: str, **timeouts: float) -> dict[str, Any]:
    """Model ``chat`` → ``primary/first``, then ``backup/second`` (both on the mock)."""
    cfg = config(upstream, first, **timeouts)
    cfg["providers"].append({**cfg["providers"][0], "name": "backup"})
    cfg["models"][0]["targets"].append({"provider": "backup", "model": second})
    return cfg


async def post(url: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Any:
    """POST JSON with a raw client; return (status, headers, body bytes)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.post(url, data=orjson.dumps(body), headers={**JSON, **(headers or {})}) as resp,
    ):
        return resp.status, resp.headers, await resp.read()


def gateway_url(gw: RunningGateway) -> str:
    return gw.url + "/chat/completions"


def upstream_url(upstream: Upstream) -> str:
    return upstream.url + "/chat/completions"


def sent_upstream(upstream: Upstream, index: int = -1) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(upstream.state.requests[index].body)
    return body


async def access_line(gw: RunningGateway, count: int = 1) -> dict[str, Any]:
    """The last access-log line of a chat request (written just after the response ends)."""

    def lines() -> list[dict[str, Any]]:
        found = [
            line
            for line in gw.log_lines()
            if line.get("event") == "request" and line.get("path") == "/v1/chat/completions"
        ]
        return found if len(found) >= count else []

    found: list[dict[str, Any]] = await eventually(lines)
    return found[-1]


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


# ------------------------------------------------------------------------------ 1. non-stream


async def test_non_stream_body_is_byte_exact_with_unicode(gw: RunningGateway, upstream: Upstream) -> None:
    request = {
        "model": "chat",
        "messages": [{"role": "user", "content": UNICODE}],
        "temperature": 0.2,
    }
    for _ in range(3):  # the mock stamps "created" in whole seconds: retry if a second ticked over
        status, headers, body = await post(gateway_url(gw), request)
        _, _, direct = await post(upstream_url(upstream), {**request, "model": "mock-chat"})
        if orjson.loads(body)["created"] == orjson.loads(direct)["created"]:
            break
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body == direct
    assert UNICODE.encode() in body  # raw UTF-8, not re-escaped as \\uXXXX

    reply = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": UNICODE}]
    )
    assert reply.choices[0].message.content == f"Mock answer: {UNICODE}"
    assert reply.model == "mock-chat"  # the upstream's answer, not rewritten


async def test_non_stream_deepseek_blank_lines_before_the_body(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:blank_lines=3"))
    request = {"model": "chat", "messages": [{"role": "user", "content": UNICODE}]}
    reply = await gw.client(timeout=5).chat.completions.create(**request)
    assert reply.choices[0].message.content == f"Mock answer: {UNICODE}"
    _, _, body = await post(gateway_url(gw), request)
    assert body.startswith(b"\n\n\n{")  # relayed as sent; JSON parsers skip the whitespace


async def test_large_non_stream_body_is_relayed_whole(gw: RunningGateway, upstream: Upstream) -> None:
    # A body much larger than one socket read (~130 kB of embeddings) arrives in several pieces.
    request = {"model": "chat", "input": [f"{i} {UNICODE}" for i in range(2000)]}
    status, _, body = await post(gw.url + "/embeddings", request)
    _, _, direct = await post(upstream.url + "/embeddings", {**request, "model": "mock-chat"})
    assert status == 200
    assert len(body) > 100_000
    assert body == direct
    reply = await gw.client(timeout=5).embeddings.create(model="chat", input=request["input"])
    assert len(reply.data) == 2000


# ---------------------------------------------------------------------------------- 2. streams


@pytest.mark.parametrize("options", ["", ":reasoning", ":chunks=2", ":keepalive=2,processing"])
async def test_stream_with_include_usage_is_byte_exact(
    upstream: Upstream, make_gateway: MakeGateway, options: str
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat" + options))
    request = {
        "model": "chat",
        "messages": [{"role": "user", "content": UNICODE}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, _, body = await post(gateway_url(gw), request)
    _, _, direct = await post(upstream_url(upstream), {**request, "model": "mock-chat" + options})
    assert status == 200
    assert body == direct
    assert b'"choices":[],"usage":{' in body  # the usage chunk the client asked for is kept
    assert body.endswith(b"data: [DONE]\n\n")
    assert sent_upstream(upstream, -2)["stream_options"] == {"include_usage": True}


async def test_stream_without_include_usage_strips_the_usage_chunk_but_logs_tokens(
    gw: RunningGateway, upstream: Upstream
) -> None:
    request = {"model": "chat", "messages": [{"role": "user", "content": UNICODE}], "stream": True}
    status, _, body = await post(gateway_url(gw), request)
    assert status == 200
    # The gateway asked for usage upstream ...
    assert sent_upstream(upstream)["stream_options"] == {"include_usage": True}
    # ... and the client gets exactly what the upstream sends to a client that did not ask for it.
    _, _, direct = await post(upstream_url(upstream), {**request, "model": "mock-chat"})
    assert b'"usage"' not in direct
    assert body == direct

    line = await access_line(gw)
    assert line["stream"] is True
    assert line["prompt_tokens"] > 0
    assert line["completion_tokens"] > 0
    assert line["error"] is None

    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": UNICODE}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"Mock answer: {UNICODE}"


async def test_a_litellm_shaped_usage_chunk_never_reaches_a_client_that_did_not_ask(
    gw: RunningGateway, upstream: Upstream
) -> None:
    upstream.state.faults["mock-chat"] = {"litellm_usage": True}
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": UNICODE}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"Mock answer: {UNICODE}"
    line = await access_line(gw)
    assert line["completion_tokens"] > 0  # still read and billed


async def test_client_stream_options_are_kept_alongside_the_added_include_usage(
    gw: RunningGateway, upstream: Upstream
) -> None:
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"stream_options": {"include_usage": False, "continuous_usage_stats": False}},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert sent_upstream(upstream)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": False,
    }


async def test_sdk_stream_with_include_usage_gets_the_usage_chunk(gw: RunningGateway) -> None:
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "count my tokens please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    line = await access_line(gw)
    assert line["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert line["prompt_tokens"] == chunks[-1].usage.prompt_tokens


# ---------------------------------------------------------------------------- 3. incremental


async def test_chunks_reach_the_client_as_the_upstream_sends_them(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:chunks=4,chunk_delay=0.2"))
    client = gw.client(timeout=5)
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a b c d e f"}], stream=True
    )
    arrivals: list[float] = []
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].delta.content
    total = time.monotonic() - started
    assert text == "Mock answer: a b c d e f"
    assert len(arrivals) == 4
    assert total >= 0.55  # three 0.2 s gaps upstream
    assert arrivals[0] < 0.3  # the first piece did not wait for the rest
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap > 0.12 for gap in gaps), gaps


# ----------------------------------------------------------------------- 4. provider fields


async def test_deepseek_reasoning_content_survives(upstream: Upstream, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:reasoning"))
    client = gw.client(timeout=5)
    reply = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "why"}])
    message = reply.choices[0].message
    assert getattr(message, "reasoning_content", None) == "Thinking about it."
    assert message.content == "Mock answer: why"

    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "why"}], stream=True
    )
    deltas = [chunk.choices[0].delta async for chunk in stream if chunk.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "Thinking."
    assert "".join(d.content or "" for d in deltas) == "Mock answer: why"


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_request_fields_reach_the_upstream_untouched(
    gw: RunningGateway, upstream: Upstream, stream: bool
) -> None:
    extra = {
        "foo": {"bar": 1, "nested": [1, 2.5, None, "\u2713"]},
        "top_k": 40,  # provider-specific (routing and billing fields are stripped: tests/test_steering.py)
        "thinking": {"type": "enabled"},
    }
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": UNICODE}]},
    ]
    stream_options = {"include_usage": True}
    kwargs: dict[str, Any] = {"stream": True, "stream_options": stream_options} if stream else {}
    reply: Any = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=messages, temperature=0.3, max_tokens=50, extra_body=extra, **kwargs
    )
    if stream:
        assert [chunk async for chunk in reply]
    expected = {"model": "mock-chat", "messages": messages, "temperature": 0.3, "max_tokens": 50, **extra}
    if stream:
        expected |= {"stream": True, "stream_options": stream_options}
    assert sent_upstream(upstream) == expected  # only "model" was rewritten
    record = upstream.state.requests[-1]
    assert record.model == "mock-chat"
    assert record.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"  # not the client's key


async def upstream_post(base_url: str, body: Mapping[str, Any]) -> str:
    """The Set-Cookie header of a direct call to the mock."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/chat/completions", json=body) as resp,
    ):
        return resp.headers.get("Set-Cookie", "")


async def test_a_cookie_set_by_the_upstream_never_reaches_another_teams_request(
    upstream: Upstream, make_gateway: Callable[..., Awaitable[RunningGateway]]
) -> None:
    # Real providers sit behind CDNs that set cookies; the upstream session is shared by every team.
    cfg = tenancy_config(upstream.url.replace("127.0.0.1", "localhost"), redis=False)  # IP hosts get none
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:set_cookie"
    gw = await make_gateway(cfg)
    direct = await upstream_post(
        upstream.url, {"model": "mock-chat:set_cookie", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert "upstream_session=" in direct  # the mock does set one
    upstream.state.requests.clear()
    for key in (TEAM_KEY, TEAM_B_KEY):
        reply = await gw.client(api_key=key).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
    first, second = upstream.state.requests
    assert "Cookie" not in first.headers
    assert "Cookie" not in second.headers  # team B's request carries nothing team A's answer set


# -------------------------------------------------------------------- 5. comments before data


@pytest.mark.parametrize("options", ["keepalive=3", "processing", "processing,keepalive=2,reasoning"])
async def test_comments_before_the_first_chunk_do_not_break_the_sdk(
    upstream: Upstream, make_gateway: MakeGateway, options: str
) -> None:
    gw = await make_gateway(config(upstream, f"mock-chat:{options}"))
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "still there?"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Mock answer: still there?"
    line = await access_line(gw)
    assert line["status"] == 200 and line["error"] is None and line["attempts"] == 1


# ------------------------------------------------------------------------------- 6. timeouts


async def test_only_keepalives_trigger_the_first_byte_timeout_and_fall_back(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(
        fallback_config(upstream, "mock-chat:no_data,keepalive=1", "mock-chat", first_byte=0.3, idle=0.3)
    )
    started = time.monotonic()
    raw = await gw.client(timeout=5).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "anyone?"}], stream=True
    )
    stream = raw.parse()
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    elapsed = time.monotonic() - started
    assert text == "Mock answer: anyone?"
    assert 0.3 <= elapsed < 1.5  # comments did not hold the dead stream open
    assert raw.headers["x-gateway-provider"] == "backup"
    assert raw.headers["x-gateway-attempts"] == "2"
    # The stream that only sent comments was closed, not left running upstream.
    first = upstream.state.requests[0]
    await eventually(lambda: first.ended is not None)
    assert first.disconnected


async def test_only_keepalives_with_no_fallback_is_a_504(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:no_data", first_byte=0.3))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client(timeout=5).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "anyone?"}], stream=True
        )
    assert time.monotonic() - started < 1.5
    assert info.value.status_code == 504
    assert info.value.body["code"] == "upstream_timeout"  # type: ignore[index]


async def test_stall_after_data_ends_the_stream_with_an_error_after_idle_seconds(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:stall_after=2", first_byte=2, idle=0.4))
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "one two three four"}], stream=True
    )
    text = ""
    last_data = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            last_data = time.monotonic()
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    waited = time.monotonic() - last_data
    assert text == "Mock answer: "  # the two pieces sent before the stall
    assert 0.3 <= waited < 1.0  # comments every 0.05 s did not keep it alive
    assert "idle" in info.value.message
    assert not isinstance(info.value, openai.APIStatusError)  # an SSE error event inside the 200

    line = await access_line(gw)
    assert line["error"] == "upstream_idle_timeout"
    assert line["status"] == 502
    record = upstream.state.requests[-1]
    await eventually(lambda: record.ended is not None)
    assert record.disconnected  # the stalled upstream stream was closed


async def test_stall_error_event_has_openai_shape_and_no_done(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:stall_after=1", idle=0.3))
    request = {"model": "chat", "messages": [{"role": "user", "content": "x y"}], "stream": True}
    status, _, body = await post(gateway_url(gw), request)
    assert status == 200
    assert b"[DONE]" not in body
    last = sse_events(body)[-1]
    assert last.startswith(b"data: ")
    error = orjson.loads(last[6:])["error"]
    assert error["code"] == "upstream_timeout"
    assert set(error) == {"message", "type", "param", "code"}


# ------------------------------------------------------------------------------ 7. mid-stream cut


async def test_connection_cut_mid_stream_is_an_error_for_the_sdk(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:cut_after=2"))
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "one two three four five"}], stream=True
    )
    text = ""
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert text == "Mock answer: "  # what arrived before the cut, and nothing invented after it
    line = await access_line(gw)
    assert line["error"] in ("upstream_connection_lost", "upstream_incomplete")
    assert line["status"] == 502


async def test_connection_cut_raw_stream_ends_with_an_error_event(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:cut_after=1"))
    request = {"model": "chat", "messages": [{"role": "user", "content": "x y z"}], "stream": True}
    status, _, body = await post(gateway_url(gw), request)
    assert status == 200
    assert b"[DONE]" not in body
    events = sse_events(body)
    assert orjson.loads(events[-1][6:])["error"]["code"] in (
        "upstream_connection_lost",
        "upstream_incomplete",
    )
    assert all(orjson.loads(e[6:]) for e in events)  # every event is whole JSON


FIRST = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
)
HALF = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hal'


async def half_event_upstream(aiohttp_server: AiohttpServer, *, abort: bool) -> str:
    """An upstream that sends one event, then half of the next, then drops (or closes) the stream."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(FIRST)
        await asyncio.sleep(0.02)
        await resp.write(HALF)
        await asyncio.sleep(0.02)
        if abort:
            assert request.transport is not None
            request.transport.abort()
        else:
            await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("abort", [True, False], ids=["dropped", "closed"])
async def test_upstream_ending_mid_event_gives_a_clean_error(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway, abort: bool, include_usage: bool
) -> None:
    gw = await make_gateway(base_config(await half_event_upstream(aiohttp_server, abort=abort)))
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    request = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": True, **options}
    status, _, body = await post(gateway_url(gw), request)
    assert status == 200
    events = sse_events(body)
    assert events[0] == FIRST.rstrip(b"\n")
    assert b"hal" not in body  # half an event is never relayed ...
    error = orjson.loads(events[-1][6:])["error"]  # ... so the error event after it is readable
    assert error["code"] in ("upstream_connection_lost", "upstream_incomplete")

    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}], stream=True, **options
    )
    text = ""
    with pytest.raises(openai.APIError) as info:  # not a JSONDecodeError from a garbled event
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text == "ok"
    assert info.value.message == error["message"]
    line = await access_line(gw, count=2)
    assert line["error"] in ("upstream_connection_lost", "upstream_incomplete")


# ------------------------------------------------------------------ 8. error event in a 200 stream


async def test_stream_error_as_first_event_falls_back(upstream: Upstream, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(fallback_config(upstream, "mock-chat:stream_error", "mock-chat"))
    raw = await gw.client(timeout=5).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    stream = raw.parse()
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Mock answer: hello"
    assert raw.headers["x-gateway-provider"] == "backup"
    assert raw.headers["x-gateway-attempts"] == "2"
    assert [r.model for r in upstream.state.requests] == ["mock-chat:stream_error", "mock-chat"]


async def test_stream_error_without_fallback_is_an_error_for_the_client(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:stream_error"))
    with pytest.raises(openai.APIStatusError) as info:
        stream = await gw.client(timeout=5).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        [chunk async for chunk in stream]
    assert info.value.status_code == 502
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "upstream_error"
    assert "mock provider error" in body["message"]
    line = await access_line(gw)
    assert line["status"] == 502


# ----------------------------------------------------------------------- 9. client disconnects


async def test_client_closing_a_stream_closes_the_upstream_stream(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:chunks=20,chunk_delay=0.5"))
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": " ".join("w" * 30)}], stream=True
    )
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    await stream.close()
    closed = time.monotonic()
    record = upstream.state.requests[-1]
    await eventually(lambda: record.ended is not None, within=1.0)
    assert record.ended is not None and record.ended - closed < 1.0
    assert record.disconnected


async def test_client_giving_up_on_a_non_stream_request_frees_the_upstream(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:hang"))
    request = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
            await session.post(gateway_url(gw), data=orjson.dumps(request), headers=JSON)
    gave_up = time.monotonic()
    record = await eventually(lambda: upstream.state.requests and upstream.state.requests[-1])
    await eventually(lambda: record.ended is not None, within=1.0)
    assert record.disconnected
    assert record.ended - gave_up < 1.0  # not the 5 s first_byte timeout


async def test_cancelled_sdk_task_frees_the_upstream(upstream: Upstream, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(config(upstream, "mock-chat:hang"))
    task = asyncio.create_task(
        gw.client(timeout=5).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hello"}]
        )
    )
    await eventually(lambda: upstream.state.requests)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = upstream.state.requests[-1]
    await eventually(lambda: record.ended is not None, within=1.0)
    assert record.disconnected


# ------------------------------------------------------------------------------- 10. headers


async def test_stream_response_headers(gw: RunningGateway) -> None:
    request = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    status, headers, body = await post(gateway_url(gw), request)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert headers["x-gateway-provider"] == "primary"
    assert headers["x-gateway-upstream-model"] == "mock-chat"
    assert headers["x-gateway-attempts"] == "1"
    assert headers["x-request-id"]
    assert body.endswith(b"data: [DONE]\n\n")

    _, echoed, _ = await post(gateway_url(gw), request, {"x-request-id": "my-trace-42"})
    assert echoed["x-request-id"] == "my-trace-42"
    line = await access_line(gw, count=2)
    assert line["request_id"] == "my-trace-42"


async def test_sdk_sees_gateway_headers_on_streams(gw: RunningGateway) -> None:
    raw = await gw.client(timeout=5).chat.completions.with_raw_response.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-request-id": "sdk-req-1"},
    )
    assert raw.headers["x-request-id"] == "sdk-req-1"
    assert raw.headers["x-gateway-upstream-model"] == "mock-chat"
    stream = raw.parse()
    assert [chunk async for chunk in stream]


async def test_non_stream_response_headers(gw: RunningGateway) -> None:
    request = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, _ = await post(gateway_url(gw), request, {"x-request-id": "abc-1"})
    assert status == 200
    assert headers["x-request-id"] == "abc-1"
    assert headers["x-gateway-provider"] == "primary"
    assert headers["x-gateway-upstream-model"] == "mock-chat"
    assert headers["x-gateway-attempts"] == "1"


async def test_valid_json_that_orjson_refuses_is_relayed_byte_for_byte(
    gw: RunningGateway, upstream: Upstream
) -> None:
    """A lone-surrogate escape is valid JSON (Python's json and the SDKs accept it): never a 502."""
    upstream.state.faults["mock-chat"] = {"lone_surrogate": True}
    request = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    status, _, body = await post(gateway_url(gw), request)
    assert status == 200 and b"\\ud800" in body
    _, _, direct = await post(upstream_url(upstream), {**request, "model": "mock-chat"})
    assert (
        body.replace(b'"created":', b"").split(b",", 3)[3:]
        == direct.replace(b'"created":', b"").split(b",", 3)[3:]
    )
    line = await access_line(gw)
    assert line["status"] == 200 and line["completion_tokens"] > 0
    reply = await gw.client(timeout=5).chat.completions.create(model="chat", messages=request["messages"])
    assert reply.choices[0].message.content.endswith("\ud800")
    stream = await gw.client(timeout=5).chat.completions.create(
        model="chat", messages=request["messages"], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.endswith("\ud800")
