"""``/v1/messages`` against upstreams that misbehave in the ways real ones do: CRLF streams, pings
(spelled as Anthropic spells them), errors mid-stream, a hanging count_tokens, lone surrogates; and a
half-open circuit that count_tokens must leave alone. Each was a bug found in review."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web

from gateway.formats.anthropic import sse_event
from tests.api.test_anthropic import HELLO, client, config
from tests.conftest import TEAM_KEY, tenancy_config


def canned_upstream(
    chat_sse: bytes = b"", messages_sse: bytes = b"", hang_count: bool = False, ping_forever: bool = False
):
    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in chat_sse.split(b"\n\n")[:-1]:
            await resp.write(part + b"\n\n")
            await asyncio.sleep(0.05)
        return resp

    async def messages(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(messages_sse)
        while ping_forever:
            await asyncio.sleep(0.1)
            await resp.write(b'event: ping\ndata: {"type": "ping"}\n\n')  # the real API's spelling
        return resp

    async def count(request: web.Request) -> web.Response:
        if hang_count:
            await asyncio.sleep(3600)
        return web.json_response({"input_tokens": 1})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count)
    return app


def claude_at(up: Any, timeouts: dict[str, float]) -> dict[str, Any]:
    """The test config plus a model ``claude`` whose one target is an ``anthropic`` provider at ``up``."""
    cfg = tenancy_config(str(up.make_url("/v1")), redis=False)
    root = str(up.make_url("")).rstrip("/")
    provider = {
        "name": "claude",
        "type": "anthropic",
        "base_url": root,
        "api_key": "sk-ant-x",
        "timeouts": timeouts,
    }
    cfg["providers"].append(provider)
    cfg["models"].append({"name": "claude", "targets": [{"provider": "claude", "model": "c"}]})
    return cfg


async def post_messages(gw: Any, body: dict[str, Any]) -> bytes:
    """POST /v1/messages with the team key, as plain HTTP: the raw answer (events included)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.root.rstrip("/") + "/v1/messages", headers={"x-api-key": TEAM_KEY}, json=body) as r,
    ):
        return await r.read()


async def openai_target(aiohttp_server: Any, chat: Any) -> dict[str, Any]:
    """The test config plus a model ``claude`` served by an OpenAI-compatible upstream answering ``chat``."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    up = await aiohttp_server(app)
    cfg = tenancy_config(str(up.make_url("/v1")), redis=False)
    cfg["models"].append({"name": "claude", "targets": [{"provider": "primary", "model": "x"}]})
    return cfg


def chunk(delta, finish=None):
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )
        + b"\n\n"
    )


async def test_count_tokens_leaves_a_half_open_circuit_to_the_requests(upstream, make_gateway) -> None:
    cfg = config(upstream, "anthropic", "claude-sonnet-4-5:status=500")
    cfg["routing"]["circuit_breaker"] = {"failures": 1, "cooldown_seconds": 0.2}
    gw = await make_gateway(cfg)
    async with client(gw) as c:
        with pytest.raises(anthropic.APIStatusError):
            await c.messages.create(model="claude", max_tokens=10, messages=HELLO)  # opens the circuit
        await asyncio.sleep(0.3)  # cooldown over: the next request is the half-open trial
        await c.messages.count_tokens(model="claude", messages=HELLO)  # must not take that trial
        calls = len(upstream.state.requests)
        with pytest.raises(anthropic.APIStatusError):
            await c.messages.create(model="claude", max_tokens=10, messages=HELLO)
        assert len(upstream.state.requests) > calls  # the trial went to the request


async def test_an_openai_targets_error_mid_stream_is_an_error_event(aiohttp_server, make_gateway) -> None:
    sse = (
        chunk({"role": "assistant", "content": "Hel"})
        + chunk({"content": "lo"})
        + b'data: {"error":{"message":"provider overloaded","code":502}}\n\n'
    )
    up = await aiohttp_server(canned_upstream(chat_sse=sse))
    cfg = tenancy_config(str(up.make_url("/v1")), redis=False)
    cfg["models"].append({"name": "claude", "targets": [{"provider": "primary", "model": "x"}]})
    gw = await make_gateway(cfg)
    body = await post_messages(gw, {"model": "claude", "max_tokens": 10, "messages": HELLO, "stream": True})
    assert b"event: error" in body and b"provider overloaded" in body


@pytest.mark.parametrize("extra", [{"system": 5}, {"system": True}])
async def test_a_bad_system_prompt_is_a_400_not_a_500(upstream, make_gateway, extra) -> None:
    gw = await make_gateway(config(upstream, "openai"))
    body = {"model": "claude", "max_tokens": 10, "messages": HELLO, **extra}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gw.root.rstrip("/") + "/v1/messages", headers={"x-api-key": TEAM_KEY}, json=body
        ) as r:
            status = r.status
        async with s.post(
            gw.root.rstrip("/") + "/v1/messages/count_tokens", headers={"x-api-key": TEAM_KEY}, json=body
        ) as r:
            count_status = r.status
    assert (status, count_status) == (400, 400)


async def test_a_hanging_count_tokens_falls_back_to_the_estimate(aiohttp_server, make_gateway) -> None:
    up = await aiohttp_server(canned_upstream(hang_count=True))
    cfg = claude_at(up, {"connect": 1, "first_byte": 0.5, "idle": 0.5, "total": 1})
    gw = await make_gateway(cfg)
    async with client(gw, timeout=4) as c:
        t = time.monotonic()
        counted = await c.messages.count_tokens(
            model="claude", messages=HELLO
        )  # hangs until the client gives up
        assert time.monotonic() - t < 2 and counted.input_tokens >= 1


async def test_pings_do_not_hold_off_the_idle_timeout(aiohttp_server, make_gateway) -> None:
    start = sse_event(
        "message_start",
        {
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "c",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 1},
            }
        },
    )
    up = await aiohttp_server(canned_upstream(messages_sse=start, ping_forever=True))
    cfg = claude_at(up, {"connect": 1, "first_byte": 1, "idle": 0.5, "total": 4})
    gw = await make_gateway(cfg)
    t = time.monotonic()
    body = await post_messages(gw, {"model": "claude", "max_tokens": 10, "messages": HELLO, "stream": True})
    elapsed = time.monotonic() - t
    assert b"event: error" in body  # the idle timeout, as Anthropic's error event
    assert elapsed < 2, f"idle 0.5 s, but the stream ran {elapsed:.1f}s (to the total timeout)"


async def test_a_crlf_openai_stream_arrives_whole(make_gateway, aiohttp_server) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = (
            chunk({"role": "assistant", "content": "Hel"})
            + chunk({"content": "lo, "})
            + chunk({"content": "world"}, "stop")
            + b"data: [DONE]\n\n"
        )
        await resp.write(events.replace(b"\n", b"\r\n"))  # sse-starlette's default line ending, one TCP write
        return resp

    gw = await make_gateway(await openai_target(aiohttp_server, chat))
    async with client(gw) as c, c.messages.stream(model="claude", max_tokens=10, messages=HELLO) as s:
        final = await s.get_final_message()
    assert final.content[0].text == "Hello, world"


async def test_a_lone_surrogate_from_an_openai_target_is_relayed(make_gateway, aiohttp_server) -> None:
    async def chat(request: web.Request) -> web.Response:
        body = (
            b'{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
            b'"content":"x\\ud800"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
        )
        return web.Response(body=body, content_type="application/json")

    gw = await make_gateway(await openai_target(aiohttp_server, chat))
    body = await post_messages(gw, {"model": "claude", "max_tokens": 10, "messages": HELLO})
    assert b'"type":"message"' in body and b"\\ud800" in body  # relayed as valid JSON, not a 500
