"""Fields that would let a client steer routing or billing upstream never reach it (issue #12, item 4),
unless the provider or model config allows them; every other field arrives exactly as sent.

Real gateway and real mock upstream on loopback; the mock records the bytes it received.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import main
from gateway.steering import STEERING_FIELDS
from tests.conftest import RunningGateway, Upstream, base_config

MakeGateway = Callable[[dict[str, Any]], Awaitable[RunningGateway]]
UNICODE = "h\u00e9llo \u2713 \U0001f600 \u4f60\u597d \u3053\u3093\u306b\u3061\u306f"

# A realistic value for each stripped field (what a client would send to steer).
STEERING = {
    "models": ["openai/gpt-4o", "anthropic/claude-opus-4"],
    "provider": {"order": ["Together"], "allow_fallbacks": False, "max_price": {"prompt": 100}},
    "route": "fallback",
    "preset": "expensive-preset",
    "plugins": [{"id": "web", "max_results": 10}],
    "transforms": ["middle-out"],
    "web_search_options": {"search_context_size": "high"},
    "service_tier": "priority",
    "api_base": "http://attacker.example/v1",
    "base_url": "http://attacker.example/v1",
    "api_key": "sk-attacker",
    "api_version": "2099-01-01",
    "organization": "org-other",
    "custom_llm_provider": "openai",
    "extra_headers": {"Authorization": "Bearer sk-attacker"},
    "extra_body": {"models": ["openai/o1-pro"]},
    "extra_query": {"api-version": "x"},
    "litellm_params": {"api_base": "http://attacker.example/v1", "model": "gpt-4o"},
    "fallbacks": [{"chat": ["gpt-4o"]}],
    "context_window_fallback_dict": {"chat": "gpt-4o"},
    "user_config": {"model_list": [{"model_name": "x", "litellm_params": {"model": "gpt-4o"}}]},
    "tags": ["paid-tier"],
    "mcp_servers": [{"type": "url", "url": "https://attacker.example/mcp", "name": "x"}],
    "container": "container_reused_by_another_team",
    "server_tools": True,  # allowances, not fields: stripped all the same if a body carries them
    "context_1m": True,
}
# Everything else a client may send, with values JSON encoders like to get wrong.
KEPT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": UNICODE}]},
    ],
    "temperature": 0.30000000000000004,
    "top_p": 1e-07,
    "max_tokens": 50,
    "seed": 9007199254740993,  # above 2**53: an int, not a float
    "logit_bias": {"50256": -100},
    "stop": ["\u2713", "\n\n"],
    "user": "\u00e9quipe-\U0001f600",
    "metadata": {"ticket": "T-1", "\u4f60\u597d": "\u3053\u3093\u306b\u3061\u306f"},
    "reasoning": {"effort": "high"},  # OpenRouter's, but billed as ordinary tokens: kept
    "foo": {"bar": [1, 2.5, -0.0, 1e300, None, True, "\u2713"]},
}


def body_with(**fields: Any) -> dict[str, Any]:
    return {"model": "chat", **KEPT, **fields}


async def chat(gw: RunningGateway, body: Mapping[str, Any], path: str = "/v1/chat/completions") -> int:
    async with aiohttp.ClientSession() as session, session.post(gw.root + path, json=body) as resp:
        await resp.read()
        return resp.status


def sent_upstream(upstream: Upstream) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(upstream.state.requests[-1].body)
    return body


def expected(sent: Mapping[str, Any], *dropped: str) -> dict[str, Any]:
    """What the upstream must get: ``sent`` in the same order, ``model`` replaced, ``dropped`` gone."""
    return {k: ("mock-chat" if k == "model" else v) for k, v in sent.items() if k not in dropped}


def test_the_documented_list_is_the_stripped_list() -> None:
    assert set(STEERING) == STEERING_FIELDS


@pytest.mark.parametrize("name", sorted(STEERING))
async def test_a_steering_field_never_reaches_the_upstream(
    gw: RunningGateway, upstream: Upstream, name: str
) -> None:
    sent = body_with(**{name: STEERING[name]})
    assert await chat(gw, sent) == 200
    record = upstream.state.requests[-1]
    assert name not in sent_upstream(upstream)
    # Every other field arrives as sent: equal values, in the client's order, as orjson writes them.
    assert sent_upstream(upstream) == expected(sent, name)
    assert record.body == orjson.dumps(expected(sent, name))


@pytest.mark.parametrize("stream", [False, True])
async def test_all_of_them_at_once(gw: RunningGateway, upstream: Upstream, stream: bool) -> None:
    sent = body_with(**STEERING, stream=stream)
    assert await chat(gw, sent) == 200
    want = expected(sent, *STEERING)
    if stream:  # the gateway's own usage request is still added
        want["stream_options"] = {"include_usage": True}
    assert sent_upstream(upstream) == want


async def test_embeddings_are_stripped_too(
    make_gateway: MakeGateway, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    received: list[bytes] = []

    async def embeddings(request: web.Request) -> web.Response:
        received.append(await request.read())
        usage = {"prompt_tokens": 1, "total_tokens": 1}
        return web.json_response({"object": "list", "data": [], "model": "m", "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    server = await aiohttp_server(app)
    gw = await make_gateway(base_config(str(server.make_url("/v1"))))
    sent = {"model": "chat", "input": [UNICODE, "x"], "encoding_format": "float", **STEERING}
    assert await chat(gw, sent, "/v1/embeddings") == 200
    assert orjson.loads(received[-1]) == expected(sent, *STEERING)


async def test_steering_names_inside_metadata_and_litellm_containers_are_removed(
    gw: RunningGateway, upstream: Upstream
) -> None:
    nested = {"metadata": {"provider": {"order": ["x"]}, "k": "v"}}
    metadata = {"ticket": "T-1", "api_base": "http://attacker.example", "models": ["x"], "n": 1.5, **nested}
    sent = body_with(
        metadata=metadata,
        litellm_params={"api_base": "http://attacker.example", "custom_llm_provider": "azure"},
        extra_body={"models": ["openai/o1-pro"], "provider": {"order": ["x"]}, "top_k": 3},
    )
    assert await chat(gw, sent) == 200
    assert sent_upstream(upstream) == {
        **expected(sent, "litellm_params", "extra_body"),
        "metadata": {"ticket": "T-1", "n": 1.5, "metadata": {"k": "v"}},
    }
    assert metadata["api_base"] and nested["metadata"]["provider"]  # the client's request is unchanged


async def test_the_sdk_extra_body_models_and_provider_are_stripped(
    gw: RunningGateway, upstream: Upstream
) -> None:
    # The SDK merges extra_body into the top level: this is how a team would try it.
    client = gw.client(timeout=5)
    steer = {"models": ["openai/gpt-4o", "openai/o1-pro"], "provider": {"order": ["OpenAI"]}, "top_k": 40}
    reply = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], extra_body=steer
    )
    assert reply.choices[0].message.content == "Mock answer: hi"
    assert sent_upstream(upstream) == {
        "messages": [{"role": "user", "content": "hi"}],
        "model": "mock-chat",
        "top_k": 40,
    }
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True, extra_body=steer
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)  # the gateway's usage chunk is still held back
    got = sent_upstream(upstream)
    assert "models" not in got and "provider" not in got
    assert got["top_k"] == 40 and got["stream_options"] == {"include_usage": True}


async def test_the_model_and_its_suffix_come_from_config_only(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = base_config(upstream.url)
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:online"  # an OpenRouter-style suffix, in config
    gw = await make_gateway(cfg)
    client = gw.client(timeout=5)
    await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], extra_body={"models": ["x:online"]}
    )
    assert sent_upstream(upstream) == {
        "messages": [{"role": "user", "content": "hi"}],
        "model": "mock-chat:online",
    }
    before = len(upstream.state.requests)
    with pytest.raises(openai.NotFoundError):  # a client cannot add a suffix to a gateway model name
        await client.chat.completions.create(
            model="chat:online", messages=[{"role": "user", "content": "hi"}]
        )
    assert len(upstream.state.requests) == before


# --- allow_fields -----------------------------------------------------------------------------------------


async def test_provider_allow_fields_lets_named_fields_through(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = base_config(upstream.url)
    cfg["providers"][0]["allow_fields"] = ["provider", "extra_body"]
    gw = await make_gateway(cfg)
    sent = body_with(
        provider=STEERING["provider"],
        models=STEERING["models"],
        extra_body={"top_k": 3, "models": ["x"], "provider": {"order": ["y"]}},
    )
    assert await chat(gw, sent) == 200
    got = sent_upstream(upstream)
    assert got["provider"] == STEERING["provider"]
    assert "models" not in got
    # Inside an allowed container the other names are still removed; allowed ones stay.
    assert got["extra_body"] == {"top_k": 3, "provider": {"order": ["y"]}}


async def test_model_allow_fields_lets_named_fields_through_for_that_model_only(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = base_config(upstream.url)
    cfg["models"][0]["allow_fields"] = ["plugins", "web_search_options"]
    cfg["models"].append({"name": "plain", "targets": [{"provider": "primary", "model": "mock-chat"}]})
    gw = await make_gateway(cfg)
    sent = body_with(plugins=STEERING["plugins"], web_search_options={"search_context_size": "low"})
    assert await chat(gw, sent) == 200
    assert sent_upstream(upstream) == expected(sent)  # nothing removed
    assert await chat(gw, {**sent, "model": "plain"}) == 200
    assert sent_upstream(upstream) == expected(sent, "plugins", "web_search_options")


async def test_each_target_strips_by_its_own_config_and_the_request_is_not_changed(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = base_config(upstream.url)
    cfg["providers"].append({**cfg["providers"][0], "name": "backup", "allow_fields": ["provider", "models"]})
    cfg["models"][0]["targets"] = [
        {"provider": "primary", "model": "mock-chat:status=503"},
        {"provider": "backup", "model": "mock-chat"},
    ]
    gw = await make_gateway(cfg)
    metadata = {"ticket": "T-1", "models": ["x"]}
    sent = body_with(provider={"order": ["x"]}, models=["y"], route="fallback", metadata=metadata)
    assert await chat(gw, sent) == 200
    first, second = (orjson.loads(r.body) for r in upstream.state.requests)
    assert first == {
        **expected(sent, "provider", "models", "route"),
        "model": "mock-chat:status=503",
        "metadata": {"ticket": "T-1"},
    }
    # The first attempt's stripping did not touch the request the fallback is built from.
    assert second == expected(sent, "route")


# --- check-config ------------------------------------------------------------------------------------------


def with_allow_fields(where: str, value: Any) -> dict[str, Any]:
    cfg = base_config("http://127.0.0.1:9/v1")
    (cfg["providers"] if where == "providers" else cfg["models"])[0]["allow_fields"] = value
    return cfg


@pytest.mark.parametrize("where", ["providers", "models"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("provider", "allow_fields: must be a list of strings"),
        ({"provider": True}, "allow_fields: must be a list of strings"),
        (["provider", 3], "allow_fields: must be a list of strings"),
        (["provider", "temperature"], "allow_fields[1]: 'temperature' is never stripped"),
    ],
)
def test_check_config_refuses_a_bad_allow_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, value: Any, problem: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(with_allow_fields(where, value)))
    with pytest.raises(SystemExit) as exit_info:
        main(["check-config", str(path)])
    assert exit_info.value.code == 2
    assert f"{where}[0].{problem}" in capsys.readouterr().err
