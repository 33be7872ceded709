"""``/v1/messages``: the official ``anthropic`` SDK against the gateway, once over an Anthropic-format
upstream (relayed byte for byte) and once over an OpenAI-compatible one (translated)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import orjson
import pytest

from tests.conftest import TEAM_KEY, RunningGateway, Upstream, tenancy_config
from tests.helpers import eventually

ANTHROPIC_KEY = "sk-ant-upstream-0123456789abcdef"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HELLO = [{"role": "user", "content": "hello claude"}]


def config(upstream: Upstream, kind: str, target: str = "", **team: Any) -> dict[str, Any]:
    """A gateway with auth, limits and budgets whose model ``claude`` goes to an ``anthropic``
    target (kind "anthropic") or an OpenAI-compatible one (kind "openai"), both the project's mock."""
    cfg = tenancy_config(upstream.url, redis=False, **team)
    root = upstream.url.removesuffix("/v1")
    cfg["providers"].append(
        {"name": "claude", "type": "anthropic", "base_url": root, "api_key": ANTHROPIC_KEY}
    )
    if kind == "anthropic":
        targets = [{"provider": "claude", "model": target or "claude-sonnet-4-5"}]
    else:
        targets = [{"provider": cfg["providers"][0]["name"], "model": target or "mock-chat"}]
    cfg["models"].append({"name": "claude", "targets": targets})
    return cfg


def client(gw: RunningGateway, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.root.rstrip("/"), api_key=TEAM_KEY, max_retries=0, **kw)


def last_body(upstream: Upstream) -> dict[str, Any]:
    return orjson.loads(upstream.state.requests[-1].body)


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_a_message_round_trip(upstream: Upstream, make_gateway, kind: str) -> None:
    gw = await make_gateway(config(upstream, kind))
    async with client(gw) as c:
        message = await c.messages.create(model="claude", max_tokens=100, messages=HELLO, system="Be brief.")
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Mock answer: hello claude"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    body = last_body(upstream)
    if kind == "anthropic":  # the body went up as it was, but for the model
        assert body == {
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "messages": HELLO,
            "system": "Be brief.",
        }
    else:
        assert body["messages"] == [{"role": "system", "content": "Be brief."}, *HELLO]
        assert body["model"] == "mock-chat" and body["max_tokens"] == 100
    lines = [e for e in gw.log_lines() if e.get("event") == "request"]
    assert lines[-1]["path"] == "/v1/messages" and lines[-1]["team"] == "team-a"
    assert lines[-1]["prompt_tokens"] > 0  # usage booked like any completion


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_a_stream_is_a_valid_event_sequence(upstream: Upstream, make_gateway, kind: str) -> None:
    gw = await make_gateway(config(upstream, kind))
    async with client(gw) as c, c.messages.stream(model="claude", max_tokens=100, messages=HELLO) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert final.content[0].text == "Mock answer: hello claude"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_tools_streamed_in_pieces_arrive_whole(upstream: Upstream, make_gateway, kind: str) -> None:
    target = "claude-sonnet-4-5:tool_call" if kind == "anthropic" else "mock-chat:tool_call"
    gw = await make_gateway(config(upstream, kind, target))
    ask = [{"role": "user", "content": "weather in Paris?"}]
    async with client(gw) as c:
        message = await c.messages.create(model="claude", max_tokens=100, messages=ask, tools=[WEATHER])
        [call] = [b for b in message.content if b.type == "tool_use"]
        assert call.name == "get_weather" and call.input == {"city": "Paris", "unit": "celsius"}
        assert message.stop_reason == "tool_use"
        async with c.messages.stream(model="claude", max_tokens=100, messages=ask, tools=[WEATHER]) as stream:
            pieces = [
                e.delta.partial_json
                async for e in stream
                if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
            ]
            final = await stream.get_final_message()
    assert len([p for p in pieces if p]) >= 3  # in pieces, none of them lost
    assert json.loads("".join(pieces)) == {"city": "Paris", "unit": "celsius"}
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == {"city": "Paris", "unit": "celsius"} and final.stop_reason == "tool_use"
    if kind == "openai":
        assert last_body(upstream)["tools"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_count_tokens(upstream: Upstream, make_gateway, kind: str) -> None:
    gw = await make_gateway(config(upstream, kind))
    async with client(gw) as c:
        counted = await c.messages.count_tokens(model="claude", messages=HELLO)
    if kind == "anthropic":
        assert counted.input_tokens > 1000  # the target's own count (the mock adds 1000)
        assert upstream.state.requests[-1].model == "count_tokens"
    else:
        assert 0 < counted.input_tokens < 1000  # the gateway's estimate


async def test_client_version_and_betas_reach_an_anthropic_target(upstream: Upstream, make_gateway) -> None:
    cfg = config(upstream, "anthropic")
    cfg["providers"][-1]["anthropic_version"] = "2020-01-01"
    gw = await make_gateway(cfg)
    betas = {"anthropic-beta": "prompt-caching-2024-07-31", "anthropic-version": "2023-06-01"}
    async with client(gw, default_headers=betas) as c:
        await c.messages.create(model="claude", max_tokens=10, messages=HELLO)
    headers = upstream.state.requests[-1].headers
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert headers["anthropic-version"] == "2023-06-01"  # the client's, not the configured one
    assert headers["x-api-key"] == ANTHROPIC_KEY  # the gateway's key, never the client's
    assert TEAM_KEY not in json.dumps(headers)


async def test_errors_take_anthropics_shape(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream, "anthropic", limits={"rpm": 1}))
    async with anthropic.AsyncAnthropic(
        base_url=gw.root.rstrip("/"), api_key="sk-wrong-key-0123456789", max_retries=0
    ) as bad:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await bad.messages.create(model="claude", max_tokens=10, messages=HELLO)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": info.value.body["error"]["message"]},
    }  # type: ignore[index]
    async with client(gw) as c:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await c.messages.create(model="nope", max_tokens=10, messages=HELLO)
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError) as bad_request:
            await c.post("/v1/messages", body={"model": "claude", "messages": HELLO}, cast_to=object)
        assert bad_request.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        await c.messages.create(model="claude", max_tokens=10, messages=HELLO)
        with pytest.raises(anthropic.RateLimitError) as limited:  # rpm 1: the team's limit applies
            await c.messages.create(model="claude", max_tokens=10, messages=HELLO)
        assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert limited.value.response.headers["retry-after"]


async def test_overloaded_falls_back_and_a_late_error_is_an_error_event(
    upstream: Upstream, make_gateway
) -> None:
    cfg = config(upstream, "anthropic", "claude-sonnet-4-5:status=529")
    cfg["models"][-1]["targets"].append({"provider": cfg["providers"][0]["name"], "model": "mock-chat"})
    gw = await make_gateway(cfg)
    async with client(gw) as c:
        raw = await c.messages.with_raw_response.create(model="claude", max_tokens=10, messages=HELLO)
        assert raw.headers["x-gateway-provider"] == cfg["providers"][0]["name"]  # 529: the next target
        assert (await raw.parse()).content[0].text == "Mock answer: hello claude"  # type: ignore[union-attr]

    gw = await make_gateway(config(upstream, "anthropic", "claude-sonnet-4-5:stream_error,chunk_delay=0.02"))
    async with client(gw) as c:
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async with c.messages.stream(
                model="claude", max_tokens=10, messages=[{"role": "user", "content": "a b"}]
            ) as s:
                async for _ in s:
                    pass


async def test_a_client_that_leaves_cancels_the_upstream(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream, "anthropic", "claude-sonnet-4-5:chunk_delay=0.3"))
    async with client(gw) as c, c.messages.stream(model="claude", max_tokens=10, messages=HELLO) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                break  # the client goes away mid-stream
    record = upstream.state.requests[-1]
    await eventually(lambda: record.disconnected, within=3)


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_an_upstream_lost_mid_stream_is_an_error_event(
    upstream: Upstream, make_gateway, kind: str
) -> None:
    target = "claude-sonnet-4-5:cut_after=4" if kind == "anthropic" else "mock-chat:cut_after=2"
    gw = await make_gateway(config(upstream, kind, target))
    kinds: list[str] = []
    async with client(gw) as c:
        with pytest.raises(anthropic.APIStatusError) as info:
            async with c.messages.stream(
                model="claude", max_tokens=10, messages=[{"role": "user", "content": "a b c d e f"}]
            ) as s:
                async for event in s:
                    kinds.append(event.type)
    assert kinds[0] == "message_start" and "content_block_delta" in kinds  # it had started
    assert info.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "the upstream connection was lost mid-stream"},
    }


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_the_cache_answers_again_in_either_form(upstream: Upstream, make_gateway, kind: str) -> None:
    cfg = config(upstream, kind)
    cfg["plugins"] = [*cfg["plugins"], "cache"]
    cfg["cache"] = {"enabled": True, "ttl_seconds": 60}
    gw = await make_gateway(cfg)
    ask = [{"role": "user", "content": "cache me"}]
    async with client(gw) as c:
        async with c.messages.stream(model="claude", max_tokens=20, messages=ask) as stream:
            streamed = await stream.get_final_message()
        await gw.gateway.pipeline.drain()  # the cache write runs after the answer
        calls = len(upstream.state.requests)
        raw = await c.messages.with_raw_response.create(model="claude", max_tokens=20, messages=ask)
        assert raw.headers["x-gateway-cache"] == "hit"
        again = await raw.parse()
        async with c.messages.stream(model="claude", max_tokens=20, messages=ask) as stream:
            kinds = [e.type async for e in stream]
            replayed = await stream.get_final_message()
    assert len(upstream.state.requests) == calls  # both answered from the cache
    assert (
        again.content[0].text
        == streamed.content[0].text
        == replayed.content[0].text
        == "Mock answer: cache me"
    )  # type: ignore[union-attr]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert again.usage.output_tokens == streamed.usage.output_tokens


async def test_reasoning_from_an_openai_compatible_target_is_a_thinking_block(
    upstream: Upstream, make_gateway
) -> None:
    gw = await make_gateway(config(upstream, "openai", "mock-chat:reasoning"))
    async with client(gw) as c:
        message = await c.messages.create(model="claude", max_tokens=50, messages=HELLO)
        async with c.messages.stream(model="claude", max_tokens=50, messages=HELLO) as stream:
            deltas = [e.delta.type async for e in stream if e.type == "content_block_delta"]
            final = await stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Thinking about it."  # type: ignore[union-attr]
    assert deltas[0] == "thinking_delta" and "text_delta" in deltas
    assert [b.type for b in final.content] == ["thinking", "text"]  # a new block when the kind changes
    assert final.content[1].text == "Mock answer: hello claude"  # type: ignore[union-attr]


async def test_billing_and_routing_features_stay_the_operators_choice(
    upstream: Upstream, make_gateway
) -> None:
    web_search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    betas = {"anthropic-beta": "context-1m-2025-08-07,interleaved-thinking-2025-05-14"}
    gw = await make_gateway(config(upstream, "anthropic"))
    async with client(gw, default_headers=betas) as c:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await c.messages.create(model="claude", max_tokens=10, messages=HELLO, tools=[web_search])  # type: ignore[list-item]
        assert "web_search_20250305" in refused.value.body["error"]["message"]  # type: ignore[index]
        await c.messages.create(
            model="claude",
            max_tokens=10,
            messages=HELLO,
            extra_body={
                "service_tier": "auto",
                "mcp_servers": [{"type": "url", "url": "https://evil.example/mcp"}],
            },
        )
    body, headers = last_body(upstream), upstream.state.requests[-1].headers
    assert "service_tier" not in body and "mcp_servers" not in body
    assert (
        headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    )  # context-1m is billed above the table

    cfg = config(upstream, "anthropic")
    cfg["providers"][-1]["allow_fields"] = ["server_tools", "context_1m"]  # the operator opts in
    gw = await make_gateway(cfg)
    async with client(gw, default_headers=betas) as c:
        await c.messages.create(model="claude", max_tokens=10, messages=HELLO, tools=[web_search])  # type: ignore[list-item]
    assert last_body(upstream)["tools"] == [web_search]
    assert upstream.state.requests[-1].headers["anthropic-beta"] == betas["anthropic-beta"]
