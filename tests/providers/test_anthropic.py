"""The ``anthropic`` provider: the openai SDK against a model whose target is Claude's Messages API
(the project's mock in its Anthropic mode), streamed and not, with tools, images and fallback."""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import RunningGateway, Upstream

ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def claude_config(upstream: Upstream, target: str = "claude-sonnet-4-5", **model: Any) -> dict[str, Any]:
    root = upstream.url.removesuffix("/v1")
    return {
        "providers": [
            {"name": "claude", "type": "anthropic", "base_url": root, "api_key": ANTHROPIC_KEY},
            {"name": "backup", "type": "openai", "base_url": upstream.url, "api_key": "sk-backup-0123456789"},
        ],
        "models": [{"name": "claude", "targets": [{"provider": "claude", "model": target}], **model}],
        "plugins": [],
    }


def sent(upstream: Upstream) -> tuple[dict[str, str], dict[str, Any]]:
    """What the mock's Anthropic side received last: its headers and body."""
    [record] = [r for r in upstream.state.requests if r.model.startswith("claude")][-1:]
    return record.headers, orjson.loads(record.body)


async def test_a_chat_completion_is_translated_both_ways(upstream: Upstream, make_gateway) -> None:
    gw: RunningGateway = await make_gateway(claude_config(upstream))
    answer = await gw.client().chat.completions.create(
        model="claude",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "hello claude"},
        ],
        temperature=0.2,
        top_p=0.9,
        stop=["END"],
        extra_body={"top_k": 5, "service_tier": "priority"},
    )
    assert answer.choices[0].message.content == "Mock answer: hello claude"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    headers, body = sent(upstream)
    assert headers["x-api-key"] == ANTHROPIC_KEY and "Authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert body["model"] == "claude-sonnet-4-5"
    assert body["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Answer in English."},
    ]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello claude"}]}]
    assert body["max_tokens"] == 64000  # not in the request: the model's max_output_tokens (capabilities)
    assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.2, 0.9, ["END"])
    assert body["top_k"] == 5 and "service_tier" not in body  # a billing choice is never the client's


async def test_max_tokens_comes_from_the_request_and_the_version_from_config(upstream, make_gateway) -> None:
    cfg = claude_config(upstream, target="claude-custom")
    cfg["providers"][0]["anthropic_version"] = "2024-01-01"
    gw = await make_gateway(cfg)
    await gw.client().chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "x"}], max_tokens=77
    )
    headers, body = sent(upstream)
    assert body["max_tokens"] == 77 and headers["anthropic-version"] == "2024-01-01"
    await gw.client().chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    assert sent(upstream)[1]["max_tokens"] == 4096  # an unknown model, nothing requested: the default


async def test_a_stream_arrives_as_openai_chunks_with_usage(upstream, make_gateway) -> None:
    gw = await make_gateway(claude_config(upstream))
    stream = await gw.client().chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "stream this please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Mock answer: stream this please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert sent(upstream)[1]["stream"] is True


async def test_tools_round_trip_and_streamed_arguments_arrive_whole(upstream, make_gateway) -> None:
    gw = await make_gateway(claude_config(upstream, target="claude-sonnet-4-5:tool_call"))
    client = gw.client()
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather in Paris?"}]
    answer = await client.chat.completions.create(
        model="claude", messages=messages, tools=[WEATHER_TOOL], tool_choice="required"
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    _, body = sent(upstream)
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert body["tool_choice"] == {"type": "any"}

    stream = await client.chat.completions.create(
        model="claude", messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    pieces: list[str] = []
    names = []
    finish = None
    async for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if delta_call.function and delta_call.function.name:
                names.append(delta_call.function.name)
            if delta_call.function and delta_call.function.arguments:
                pieces.append(delta_call.function.arguments)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert names == ["get_weather"] and finish == "tool_calls"
    assert len(pieces) >= 3  # the arguments arrived in pieces ...
    assert json.loads("".join(pieces)) == {"city": "Paris", "unit": "celsius"}  # ... and whole

    # The tool's answer goes back as a tool_result in a user turn, after the assistant's tool_use.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    await client.chat.completions.create(model="claude", messages=messages, tools=[WEATHER_TOOL])
    _, body = sent(upstream)
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            {
                "type": "tool_use",
                "id": call.id,
                "name": "get_weather",
                "input": {"city": "Paris", "unit": "celsius"},
            }
        ],
    }
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": call.id,
                "content": [{"type": "text", "text": "18 degrees"}],
            }
        ],
    }


async def test_images_thinking_and_cached_tokens(upstream, make_gateway) -> None:
    gw = await make_gateway(claude_config(upstream, target="claude-sonnet-4-5:thinking,cache_read=40"))
    answer = await gw.client().chat.completions.create(
        model="claude",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ],
    )
    message = answer.choices[0].message
    assert message.content == "Mock answer: what is this?"
    assert (
        message.model_extra is not None and message.model_extra["reasoning_content"] == "Thinking about it."
    )
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 40
    _, body = sent(upstream)
    assert body["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
    ]
    stream = await gw.client().chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "think"}], stream=True
    )
    chunks = [c async for c in stream if c.choices]
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    assert reasoning == "Thinking about it."


async def test_errors_take_openais_shape_and_529_falls_back(upstream, make_gateway) -> None:
    cfg = claude_config(upstream, target="claude-sonnet-4-5:status=529")
    cfg["models"][0]["targets"].append({"provider": "backup", "model": "mock-chat"})
    gw = await make_gateway(cfg)
    answer = await gw.client().chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.headers["x-gateway-provider"] == "backup"  # overloaded: the next target answered
    assert answer.parse().choices[0].message.content == "Mock answer: hello"

    gw = await make_gateway(claude_config(upstream, target="claude-sonnet-4-5:status=400"))
    with pytest.raises(openai.BadRequestError) as info:
        await gw.client().chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    error = info.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["message"] == "mock failure 400"


async def test_an_error_mid_stream_ends_the_stream_instead_of_hanging(upstream, make_gateway) -> None:
    # Before anything reached the client: a clean 502 (another target could have served it).
    gw = await make_gateway(claude_config(upstream, target="claude-sonnet-4-5:stream_error"))
    with pytest.raises(openai.InternalServerError):
        await gw.client().chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
    # After the first words went out: the stream ends with an error the SDK raises, never a hang.
    gw = await make_gateway(claude_config(upstream, target="claude-sonnet-4-5:stream_error,chunk_delay=0.02"))
    stream = await gw.client(timeout=10).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(received) == "Mock "


async def test_a_part_anthropic_cannot_take_is_the_clients_error(upstream, make_gateway) -> None:
    gw = await make_gateway(claude_config(upstream))
    with pytest.raises(openai.BadRequestError) as info:
        await gw.client().chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}],
        )
    assert "input_audio" in str(info.value)
    assert upstream.state.calls("claude-sonnet-4-5") == 0


async def test_without_a_key_the_provider_is_unconfigured(upstream, make_gateway) -> None:
    cfg = claude_config(upstream)
    del cfg["providers"][0]["api_key"]
    cfg["models"][0]["targets"].append({"provider": "backup", "model": "mock-chat"})
    gw = await make_gateway(cfg)
    answer = await gw.client().chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.headers["x-gateway-provider"] == "backup"
