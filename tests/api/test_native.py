"""The native REST API (/api/v1) against real servers: the mock upstream, the gateway, a real Redis."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict

from tests.conftest import (
    MASTER_KEY,
    PROVIDER_KEY,
    TEAM_B_KEY,
    TEAM_KEY,
    RunningGateway,
    Upstream,
    base_config,
    tenancy_config,
)
from tests.helpers import eventually

MESSAGES = [{"role": "user", "content": "Hello there"}]
NATIVE_TYPES = {
    "PROVIDER_ERROR",
    "RATE_LIMIT",
    "CONTEXT_LENGTH",
    "INVALID_REQUEST",
    "MODEL_NOT_FOUND",
    "TIMEOUT",
    "UNKNOWN",
}


async def call(
    gw: RunningGateway, method: str, path: str, body: Any = None, key: str | None = None, **headers: str
) -> tuple[int, CIMultiDict[str], Any]:
    """One HTTP call; a ``bytes`` body is sent as it is (as JSON)."""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    kw: dict[str, Any] = {"json": body}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        kw = {"data": io.BytesIO(body)}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.root + path, headers=headers, **kw) as r,
    ):
        raw = await r.read()
        return r.status, CIMultiDict(r.headers), orjson.loads(raw) if raw else None


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) for every event of a native stream."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        if block.startswith(":"):
            continue  # a keep-alive comment
        name, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        events.append((name, orjson.loads(data)))
    return events


async def stream(
    gw: RunningGateway, body: Any, key: str | None = None, path: str = "/api/v1/llm/complete/stream"
) -> tuple[int, CIMultiDict[str], list[tuple[str, dict[str, Any]]]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.root + path, json=body, headers=headers) as r,
    ):
        raw = await r.read()
        if not r.content_type.startswith("text/event-stream"):
            return r.status, CIMultiDict(r.headers), [("http", orjson.loads(raw))]
        return r.status, CIMultiDict(r.headers), parse_sse(raw)


def assert_native_error(body: Any, type_: str, code: str | None = None) -> dict[str, Any]:
    error = body["error"]
    assert set(error) == {"type", "code", "message", "provider", "requestId"}
    assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    assert error["requestId"].startswith("req_") or error["requestId"]
    assert "Traceback" not in error["message"]
    return error


def priced(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    cfg = base_config(upstream_url, **overrides)
    cfg["models"][0]["pricing"] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    return cfg


# -- completions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/llm/complete", "/api/v1/complete"])
async def test_complete_answers_llm_response(upstream: Upstream, make_gateway: Any, path: str) -> None:
    gw = await make_gateway(priced(upstream.url))
    body = {"messages": MESSAGES, "options": {"model": "chat", "temperature": 0.2, "maxTokens": 64}}
    status, headers, data = await call(gw, "POST", path, body)
    assert status == 200
    assert data["content"] == "Mock answer: Hello there"
    assert data["model"] == "chat"
    assert data["provider"] == "primary"
    assert data["upstreamModel"] == "mock-chat"
    assert data["finishReason"] == "stop"
    usage = data["usage"]
    assert usage["totalTokens"] == usage["promptTokens"] + usage["completionTokens"] > 0
    expected = (usage["promptTokens"] * 1.0 + usage["completionTokens"] * 2.0) / 1_000_000
    assert data["costUsd"] == pytest.approx(expected)
    assert data["cached"] is False and data["latencyMs"] > 0
    assert data["capabilities"]["pricing"] == {"input": 1.0, "output": 2.0, "images": None}
    assert headers["x-gateway-provider"] == "primary" and headers["x-request-id"]
    # The options went upstream in OpenAI's names, and nothing else did.
    sent = orjson.loads(upstream.state.requests[-1].body)
    assert sent == {"model": "mock-chat", "messages": MESSAGES, "temperature": 0.2, "max_tokens": 64}


async def test_stream_matches_the_v1_stream_and_ends_with_usage(
    upstream: Upstream, make_gateway: Any
) -> None:
    gw = await make_gateway(priced(upstream.url))
    content = "one two three four five six"
    messages = [{"role": "user", "content": content}]
    status, headers, events = await stream(gw, {"messages": messages, "options": {"model": "chat"}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    deltas = [d for name, d in events if not d["done"]]
    assert len(deltas) > 3  # relayed as deltas, not one blob
    assert all(name == "message" and set(d) == {"content", "done"} for name, d in events[:-1])
    last = events[-1][1]
    assert [d["done"] for _, d in events].count(True) == 1 and last["done"] is True
    assert last["finishReason"] == "stop" and last["model"] == "chat" and last["provider"] == "primary"
    assert last["usage"]["completionTokens"] > 0
    assert last["costUsd"] == pytest.approx(
        (last["usage"]["promptTokens"] + 2 * last["usage"]["completionTokens"]) / 1_000_000
    )
    v1 = gw.client()
    chunks = await v1.chat.completions.create(model="chat", messages=messages, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert "".join(d["content"] for d in deltas) == text


async def test_stream_alias_and_deltas_arrive_before_the_upstream_ends(
    upstream: Upstream, make_gateway: Any
) -> None:
    gw = await make_gateway(base_config(upstream.url))
    upstream.state.faults["slow"] = {"chunk_delay": 0.3}
    cfg_model = {"messages": [{"role": "user", "content": "a b c d e"}], "options": {"model": "chat"}}
    gw.gateway.router.routes["chat"].targets[0].model = "slow"
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.root + "/api/v1/complete/stream", json=cfg_model) as r,
    ):
        first = await r.content.readuntil(b"\n\n")
        assert orjson.loads(first[5:])["done"] is False
        assert upstream.state.requests[-1].ended is None  # the upstream is still writing
        rest = await r.read()
    assert b'"done":true' in rest


async def test_failure_after_the_first_byte_is_an_error_event(upstream: Upstream, make_gateway: Any) -> None:
    cfg = base_config(upstream.url)
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:cut_after=2"
    gw = await make_gateway(cfg)
    status, _, events = await stream(gw, {"messages": [{"role": "user", "content": "a b c d e f"}]})
    assert status == 200
    assert events[-1][0] == "error"
    assert_native_error(events[-1][1], "PROVIDER_ERROR", "upstream_connection_lost")
    assert all(not d.get("done") for name, d in events if name == "message")


async def test_client_disconnect_cancels_the_upstream(upstream: Upstream, make_gateway: Any) -> None:
    cfg = base_config(upstream.url)
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:chunk_delay=0.2"
    gw = await make_gateway(cfg)
    body = {"messages": [{"role": "user", "content": " ".join(["w"] * 50)}]}
    async with aiohttp.ClientSession() as session:
        r = await session.post(gw.root + "/api/v1/llm/complete/stream", json=body)
        await r.content.readuntil(b"\n\n")
        r.close()
    record = upstream.state.requests[-1]
    await eventually(lambda: record.disconnected)
    # The client left: logged as 499, and not an error of the model's.
    lines = await eventually(lambda: [x for x in gw.log_lines() if x.get("event") == "request"])
    assert lines[-1]["status"] == 499
    assert gw.gateway.performance.report("chat")["sampleSize"] == 0


# -- EventSource tickets ---------------------------------------------------------------------------


async def test_ticket_opens_one_stream_without_headers(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    body = {"messages": MESSAGES, "options": {"model": "chat"}}
    status, _, made = await call(gw, "POST", "/api/v1/llm/complete/stream/ticket", body, TEAM_KEY)
    assert status == 201 and made["expiresIn"] == 30
    assert made["url"] == f"/api/v1/llm/complete/stream?ticket={made['ticket']}"
    assert TEAM_KEY not in orjson.dumps(made).decode()
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.root + made["url"], headers={"Accept": "text/event-stream"}) as r:
            assert r.status == 200
            events = parse_sse(await r.read())
        assert events[-1][1]["done"] is True
        assert "".join(d["content"] for _, d in events) == "Mock answer: Hello there"
        async with session.get(gw.root + made["url"]) as again:  # single use
            assert again.status == 401
            assert_native_error(await again.json(), "INVALID_REQUEST", "invalid_stream_ticket")
    # The stream ran as team-a: it shows in team-a's usage.
    status, usage = await gw.http("GET", "/api/v1/usage", TEAM_KEY)
    assert status == 200 and usage["data"]


async def test_ticket_needs_a_key_and_a_key_in_the_url_is_never_accepted(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["models"].append({"name": "other", "targets": [{"provider": "primary", "model": "m"}]})
    cfg["teams"].append({"id": "team-c", "api_keys": ["team-c-key"], "models": ["other"]})
    gw = await make_gateway(cfg)
    body = {"messages": MESSAGES}
    status, _, err = await call(gw, "POST", "/api/v1/llm/complete/stream/ticket", body)
    assert status == 401
    assert_native_error(err, "INVALID_REQUEST", "missing_api_key")
    for query in (f"ticket={TEAM_KEY}", f"api_key={TEAM_KEY}", "ticket="):
        status, _, err = await call(gw, "GET", f"/api/v1/llm/complete/stream?{query}")
        assert status == 401
        assert TEAM_KEY not in orjson.dumps(err).decode()
    # A request that cannot run fails when the ticket is made, not later in the browser.
    status, _, err = await call(gw, "POST", "/api/v1/llm/complete/stream/ticket", {"messages": []}, TEAM_KEY)
    assert status == 400
    for model, expected in (("nope", 404), ("chat", 403)):
        body = {"messages": MESSAGES, "options": {"model": model}}
        status, _, err = await call(gw, "POST", "/api/v1/llm/complete/stream/ticket", body, "team-c-key")
        assert status == expected, err


async def test_ticket_of_a_key_revoked_since_is_refused(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    status, made = await gw.http("POST", "/admin/keys", MASTER_KEY, {"team": "team-a"})
    assert status == 201
    status, _, ticket = await call(
        gw, "POST", "/api/v1/llm/complete/stream/ticket", {"messages": MESSAGES}, made["key"]
    )
    assert status == 201
    assert (await gw.http("DELETE", f"/admin/keys/{made['id']}", MASTER_KEY))[0] == 204
    await asyncio.sleep(1.05)  # past the runtime-key cache (auth.CACHE_TTL)
    status, _, err = await call(gw, "GET", ticket["url"])
    assert status == 401
    assert_native_error(err, "INVALID_REQUEST", "invalid_api_key")


# -- the pipeline on native routes ------------------------------------------------------------------


async def test_model_allowlist_and_rpm_limit_apply(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url, models=["chat"], limits={"rpm": 2})
    cfg["models"].append({"name": "other", "targets": [{"provider": "primary", "model": "mock-other"}]})
    gw = await make_gateway(cfg)
    status, _, err = await call(
        gw, "POST", "/api/v1/llm/complete", {"messages": MESSAGES, "options": {"model": "other"}}, TEAM_KEY
    )
    assert status == 403
    assert_native_error(err, "INVALID_REQUEST", "model_not_allowed")
    statuses = []
    for _ in range(3):
        status, headers, body = await call(
            gw, "POST", "/api/v1/llm/complete", {"messages": MESSAGES}, TEAM_KEY
        )
        statuses.append(status)
    assert statuses == [200, 200, 429]
    assert int(headers["Retry-After"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert_native_error(body, "RATE_LIMIT", "rate_limit_exceeded")


async def test_native_errors_have_the_native_shape(upstream: Upstream, make_gateway: Any) -> None:
    cfg = base_config(upstream.url)
    cfg["models"].append({"name": "broken", "targets": [{"provider": "primary", "model": "x:status=500"}]})
    cfg["models"].append({"name": "slow", "targets": [{"provider": "primary", "model": "x:hang"}]})
    cfg["providers"][0]["timeouts"]["first_byte"] = 0.3
    gw = await make_gateway(cfg)
    cases: list[tuple[Any, int, str, str | None]] = [
        (b"{not json", 400, "INVALID_REQUEST", "invalid_json"),
        ({"messages": MESSAGES, "options": {"max_tokens": 5}}, 400, "INVALID_REQUEST", "unknown_parameter"),
        ({"messages": MESSAGES, "options": {"temperature": 3}}, 400, "INVALID_REQUEST", "invalid_type"),
        ({"messages": "hi"}, 400, "INVALID_REQUEST", "invalid_type"),
        ({"messages": MESSAGES, "options": {"model": "nope"}}, 404, "MODEL_NOT_FOUND", "model_not_found"),
        ({"messages": MESSAGES, "options": {"model": "broken"}}, 502, "PROVIDER_ERROR", "upstream_error"),
        ({"messages": MESSAGES, "options": {"model": "slow"}}, 504, "TIMEOUT", "upstream_timeout"),
    ]
    async with aiohttp.ClientSession() as session:
        for body, status, type_, code in cases:
            kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(gw.root + "/api/v1/llm/complete", **kw) as r:
                assert r.status == status, body
                error = assert_native_error(await r.json(), type_, code)
                assert error["requestId"] == r.headers["x-request-id"]
                assert PROVIDER_KEY not in error["message"]
        async with session.get(gw.root + "/api/v1/llm/nothing-here") as r:
            assert r.status == 404
            assert_native_error(await r.json(), "MODEL_NOT_FOUND", "unknown_endpoint")
    status, _, body = await call(
        gw, "POST", "/api/v1/llm/complete", {"messages": MESSAGES, "options": {"model": "broken"}}
    )
    assert body["error"]["provider"] == "primary"


# -- providers and models ---------------------------------------------------------------------------


async def test_providers_and_their_models(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url, models=["chat"])
    cfg["providers"].append({"name": "backup", "type": "openai", "base_url": upstream.url})
    cfg["models"].append({"name": "other", "targets": [{"provider": "backup", "model": "deepseek-chat"}]})
    gw = await make_gateway(cfg)
    status, _, data = await call(gw, "GET", "/api/v1/llm/providers", key=TEAM_B_KEY)
    assert status == 200
    by_name = {p["name"]: p for p in data["providers"]}
    assert by_name["primary"] == {"name": "primary", "type": "openai", "status": "up", "models": ["chat"]}
    assert by_name["backup"]["models"] == ["other"]
    # team-a may only use chat: it sees neither the other model nor the provider serving only it.
    status, _, data = await call(gw, "GET", "/api/v1/llm/providers", key=TEAM_KEY)
    assert [p["name"] for p in data["providers"]] == ["primary"]
    status, _, data = await call(gw, "GET", "/api/v1/llm/providers/backup/models", key=TEAM_B_KEY)
    assert status == 200 and data["provider"] == "backup"
    assert data["models"][0]["name"] == "other"
    assert data["models"][0]["capabilities"]["contextWindow"] == 131072  # shipped default of deepseek-chat
    status, _, err = await call(gw, "GET", "/api/v1/llm/providers/nope/models", key=TEAM_KEY)
    assert status == 404
    assert_native_error(err, "MODEL_NOT_FOUND", "provider_not_found")
    status, _, err = await call(gw, "GET", "/api/v1/llm/providers")
    assert status == 401


async def test_models_show_capabilities_and_live_performance(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url, models=["chat"])
    cfg["models"][0]["capabilities"] = {"strengths": ["coding"], "multimodal": True}
    cfg["models"][0]["context_window"] = 9000
    cfg["models"].append({"name": "other", "targets": [{"provider": "primary", "model": "gpt-4o-mini"}]})
    gw = await make_gateway(cfg)
    status, _, data = await call(gw, "GET", "/api/v1/models", key=TEAM_KEY)
    assert [m["name"] for m in data["models"]] == ["chat"]  # only what the caller may use
    chat = data["models"][0]
    assert chat["providers"] == ["primary"]
    assert chat["capabilities"]["contextWindow"] == 9000
    assert chat["capabilities"]["strengths"] == ["coding"] and chat["capabilities"]["multimodal"] is True
    assert chat["performance"] == {
        "p50LatencyMs": None,
        "p50TtftMs": None,
        "outputTokensPerSecond": None,
        "errorRate": None,
        "sampleSize": 0,
    }
    for _ in range(3):
        assert (await call(gw, "POST", "/api/v1/llm/complete", {"messages": MESSAGES}, TEAM_KEY))[0] == 200
    client = gw.client(api_key=TEAM_KEY)
    chunks = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    [c async for c in chunks]
    status, _, data = await call(gw, "GET", "/api/v1/models", key=TEAM_B_KEY)
    assert status == 200
    by_name = {m["name"]: m for m in data["models"]}
    perf = by_name["chat"]["performance"]
    assert perf["sampleSize"] == 4 and perf["errorRate"] == 0
    assert perf["p50LatencyMs"] > 0 and perf["p50TtftMs"] > 0 and perf["outputTokensPerSecond"] > 0
    other = by_name["other"]["capabilities"]  # shipped defaults for gpt-4o-mini
    assert other["contextWindow"] == 128000 and other["pricing"]["output"] == 0.6 and other["multimodal"]


async def test_health_alias(gw: RunningGateway) -> None:
    status, _, data = await call(gw, "GET", "/api/v1/llm/health")
    assert status == 200 and data["status"] == "ok" and "providers" in data["info"]


# -- automatic selection ----------------------------------------------------------------------------


def _auto_config(upstream_url: str) -> dict[str, Any]:
    cfg = tenancy_config(upstream_url, models=["cheap", "vision", "big"])
    cfg["models"] = [
        {
            "name": "cheap",
            "targets": [{"provider": "primary", "model": "m-cheap"}],
            "pricing": {"input_per_mtok": 0.1, "output_per_mtok": 0.2},
            "context_window": 16000,
            "capabilities": {"strengths": ["speed"], "multimodal": False},
        },
        {
            "name": "vision",
            "targets": [{"provider": "primary", "model": "m-vision"}],
            "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 4.0},
            "context_window": 128000,
            "capabilities": {"strengths": ["vision", "coding"], "multimodal": True},
        },
        {
            "name": "big",
            "targets": [{"provider": "primary", "model": "m-big"}],
            "pricing": {"input_per_mtok": 2.0, "output_per_mtok": 3.0},
            "context_window": 1000000,
            "capabilities": {"strengths": ["coding"], "use_cases": ["rag"]},
        },
        {
            "name": "forbidden",
            "targets": [{"provider": "primary", "model": "m-free"}],
            "pricing": {"input_per_mtok": 0, "output_per_mtok": 0},
            "context_window": 1000000,
        },
    ]
    return cfg


@pytest.mark.parametrize(
    ("requirements", "chosen"),
    [
        ({}, "cheap"),
        ({"minContextWindow": 100000}, "big"),  # big's output is cheaper than vision's
        ({"multimodal": True}, "vision"),
        ({"strengths": ["Coding"], "maxOutputPrice": 3.5}, "big"),
        ({"useCases": ["rag"]}, "big"),
    ],
)
async def test_auto_picks_the_cheapest_allowed_model_that_fits(
    upstream: Upstream, make_gateway: Any, requirements: dict[str, Any], chosen: str
) -> None:
    gw = await make_gateway(_auto_config(upstream.url))
    body = {"messages": MESSAGES, "options": {"model": "auto", "requirements": requirements}}
    status, headers, data = await call(gw, "POST", "/api/v1/llm/complete", body, TEAM_KEY)
    assert status == 200, data
    assert data["model"] == chosen and headers["x-gateway-model"] == chosen
    assert data["upstreamModel"] == f"m-{chosen}"


async def test_auto_with_no_fitting_model_says_why(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(_auto_config(upstream.url))
    body = {
        "messages": MESSAGES,
        "options": {"requirements": {"minContextWindow": 2000000, "maxInputPrice": 0.01}},
    }
    status, _, err = await call(gw, "POST", "/api/v1/llm/complete", body, TEAM_KEY)
    assert status == 400
    error = assert_native_error(err, "INVALID_REQUEST", "no_model_meets_requirements")
    assert "minContextWindow=2000000" in error["message"] and "1000000" in error["message"]
    assert "maxInputPrice" in error["message"]
    assert len(upstream.state.requests) == 0


# -- context windows --------------------------------------------------------------------------------


def _window_config(upstream_url: str, fallback: bool, upstream_limit: int | None = None) -> dict[str, Any]:
    cfg = base_config(upstream_url)
    small = "mock-small" + (f":max_context={upstream_limit}" if upstream_limit else "")
    cfg["models"] = [
        {"name": "chat", "targets": [{"provider": "primary", "model": small}], "context_window": 100},
        {
            "name": "long",
            "targets": [{"provider": "primary", "model": "mock-long"}],
            "context_window": 100000,
        },
    ]
    if fallback:
        cfg["models"][0]["context_window_fallback"] = "long"
    return cfg


async def test_a_request_over_the_window_is_refused_on_both_apis(
    upstream: Upstream, make_gateway: Any
) -> None:
    gw = await make_gateway(_window_config(upstream.url, fallback=False))
    long_messages = [{"role": "user", "content": " ".join(["word"] * 150)}]
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.client().chat.completions.create(model="chat", messages=long_messages)
    assert caught.value.code == "context_length_exceeded"
    body = {"messages": long_messages, "options": {"model": "chat"}}
    status, _, err = await call(gw, "POST", "/api/v1/llm/complete", body)
    assert status == 400
    assert_native_error(err, "CONTEXT_LENGTH", "context_length_exceeded")
    # max_tokens counts too; a request that fits goes through.
    fits = [{"role": "user", "content": " ".join(["word"] * 60)}]
    with pytest.raises(openai.BadRequestError):
        await gw.client().chat.completions.create(model="chat", messages=fits, max_tokens=50)
    ok = await gw.client().chat.completions.create(model="chat", messages=fits, max_tokens=40)
    assert ok.choices[0].message.content
    assert len(upstream.state.requests) == 1


async def test_a_request_over_the_window_goes_to_the_fallback(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(_window_config(upstream.url, fallback=True))
    long_messages = [{"role": "user", "content": " ".join(["word"] * 150)}]
    raw = await gw.client().chat.completions.with_raw_response.create(model="chat", messages=long_messages)
    assert raw.headers["x-gateway-model"] == "long"
    assert raw.parse().model == "mock-long"
    status, _, data = await call(gw, "POST", "/api/v1/llm/complete", {"messages": long_messages})
    assert status == 200 and data["model"] == "long" and data["upstreamModel"] == "mock-long"


async def test_an_upstream_context_error_goes_to_the_fallback(upstream: Upstream, make_gateway: Any) -> None:
    # 90 words fit the gateway's floor estimate (90 <= 100) but are ~112 tokens to the upstream.
    gw = await make_gateway(_window_config(upstream.url, fallback=True, upstream_limit=100))
    messages = [{"role": "user", "content": " ".join(["word"] * 90)}]
    status, _, events = await stream(gw, {"messages": messages})
    assert status == 200 and events[-1][1]["model"] == "long"
    assert [r.model for r in upstream.state.requests] == ["mock-small:max_context=100", "mock-long"]
    # Without a fallback the upstream's refusal reaches the client as a context-length error.
    gw2 = await make_gateway(_window_config(upstream.url, fallback=False, upstream_limit=100))
    status, _, err = await call(gw2, "POST", "/api/v1/llm/complete", {"messages": messages})
    assert status == 400
    assert_native_error(err, "CONTEXT_LENGTH", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as caught:  # one code on /v1 too
        await gw2.client().chat.completions.create(model="chat", messages=messages)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 100 tokens" in caught.value.message


async def test_the_fallback_takes_its_own_model_limits_and_gives_back_the_first(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = _window_config(upstream.url, fallback=True)
    cfg.update({k: v for k, v in tenancy_config(upstream.url).items() if k != "models"})
    cfg["teams"][0]["model_limits"] = {"chat": {"rpm": 1}, "long": {"rpm": 1}}
    gw = await make_gateway(cfg)
    long_messages = [{"role": "user", "content": " ".join(["word"] * 150)}]
    status, _, data = await call(gw, "POST", "/api/v1/llm/complete", {"messages": long_messages}, TEAM_KEY)
    assert status == 200 and data["model"] == "long"
    # long's one request a minute is used ...
    status, headers, err = await call(
        gw, "POST", "/api/v1/llm/complete", {"messages": long_messages}, TEAM_KEY
    )
    assert status == 429 and headers["Retry-After"]
    assert_native_error(err, "RATE_LIMIT", "rate_limit_exceeded")
    # ... and chat's was given back when the first request moved: a request that fits chat still runs.
    status, _, data = await call(gw, "POST", "/api/v1/llm/complete", {"messages": MESSAGES}, TEAM_KEY)
    assert status == 200 and data["model"] == "chat"
    status, _, _ = await call(gw, "POST", "/api/v1/llm/complete", {"messages": MESSAGES}, TEAM_KEY)
    assert status == 429


async def test_auto_skips_models_the_request_cannot_fit(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(_auto_config(upstream.url))
    long_messages = [{"role": "user", "content": " ".join(["word"] * 20000)}]
    status, _, data = await call(gw, "POST", "/api/v1/llm/complete", {"messages": long_messages}, TEAM_KEY)
    assert status == 200 and data["model"] == "big"  # cheap's 16k window is too small
    huge = orjson.dumps({"messages": [{"role": "user", "content": " ".join(["w"] * 1_000_001)}]})
    status, _, err = await call(gw, "POST", "/api/v1/llm/complete", huge, TEAM_KEY)
    assert status == 400
    assert_native_error(err, "CONTEXT_LENGTH", "context_length_exceeded")


async def test_ticket_creation_is_bounded(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    big = orjson.dumps({"messages": [{"role": "user", "content": "x" * (1024 * 1024)}]})
    headers = {"Authorization": f"Bearer {TEAM_KEY}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.root + "/api/v1/llm/complete/stream/ticket", data=io.BytesIO(big), headers=headers
        ) as r,
    ):
        assert r.status == 413
        assert_native_error(await r.json(), "INVALID_REQUEST", "request_too_large")
    statuses = [
        (await call(gw, "POST", "/api/v1/llm/complete/stream/ticket", {"messages": MESSAGES}, TEAM_KEY))[0]
        for _ in range(61)
    ]
    assert statuses.count(201) == 60 and statuses[-1] == 429
    # Another team's quota is its own.
    status, _, _ = await call(
        gw, "POST", "/api/v1/llm/complete/stream/ticket", {"messages": MESSAGES}, TEAM_B_KEY
    )
    assert status == 201


async def test_a_fallback_the_team_may_not_use_is_not_taken(upstream: Upstream, make_gateway: Any) -> None:
    cfg = _window_config(upstream.url, fallback=True)
    cfg.update({k: v for k, v in tenancy_config(upstream.url, models=["chat"]).items() if k != "models"})
    cfg["teams"][0]["models"] = ["chat"]
    gw = await make_gateway(cfg)
    long_messages = [{"role": "user", "content": " ".join(["word"] * 150)}]
    status, _, err = await call(gw, "POST", "/api/v1/llm/complete", {"messages": long_messages}, TEAM_KEY)
    assert status == 400
    assert_native_error(err, "CONTEXT_LENGTH")
    status, _, data = await call(gw, "POST", "/api/v1/llm/complete", {"messages": long_messages}, TEAM_B_KEY)
    assert status == 200 and data["model"] == "long"


# -- OpenRouter's live list, and the cache ---------------------------------------------------------


async def test_openrouter_list_refreshes_capabilities_and_config_wins(
    upstream: Upstream, make_gateway: Any
) -> None:
    # A real list is large (it arrives in many TCP segments) and has entries of every shape.
    filler = [
        {"id": f"vendor/model-{i}", "context_length": 8192, "description": "x" * 200} for i in range(3000)
    ]
    odd = [
        {"id": "odd/architecture", "architecture": ["text"], "pricing": "free"},
        {"id": "openrouter/auto", "context_length": 2000000, "pricing": {"prompt": "-1", "completion": "-1"}},
    ]
    upstream.state.models = (
        filler
        + odd
        + [
            {
                "id": "anthropic/claude-sonnet-4",
                "context_length": 1000000,
                "pricing": {"prompt": "0.000003", "completion": "0.000015", "image": "0.0048"},
                "architecture": {"input_modalities": ["text", "image"]},
                "top_provider": {"max_completion_tokens": 64000},
            }
        ]
    )
    cfg = base_config(upstream.url)
    cfg["providers"].append(
        {"name": "or", "type": "openrouter", "base_url": upstream.url, "api_key": "sk-or-x"}
    )
    cfg["models"] = [
        {"name": "claude", "targets": [{"provider": "or", "model": "anthropic/claude-sonnet-4"}]},
        {
            "name": "pinned",
            "targets": [{"provider": "or", "model": "anthropic/claude-sonnet-4"}],
            "context_window": 200000,
        },
        # A variable price ("-1") is unknown, never a negative cost: no price, as for an unknown model.
        {"name": "auto", "targets": [{"provider": "or", "model": "openrouter/auto"}]},
    ]
    gw = await make_gateway(cfg)
    status, _, data = await call(gw, "GET", "/api/v1/models")
    by_name = {m["name"]: m["capabilities"] for m in data["models"]}
    assert by_name["claude"]["contextWindow"] == 1000000  # live, not the shipped 200000
    assert by_name["claude"]["pricing"] == {"input": 3.0, "output": 15.0, "images": 4800.0}
    assert by_name["claude"]["strengths"]  # still the shipped strengths
    assert by_name["pinned"]["contextWindow"] == 200000  # config wins
    assert by_name["auto"]["pricing"]["output"] == 0 and by_name["auto"]["contextWindow"] == 2000000
    # The refreshed price is what requests are charged.
    status, _, answer = await call(
        gw, "POST", "/api/v1/llm/complete", {"messages": MESSAGES, "options": {"model": "claude"}}
    )
    usage = answer["usage"]
    assert status == 200
    assert answer["costUsd"] == pytest.approx(
        (usage["promptTokens"] * 3 + usage["completionTokens"] * 15) / 1e6
    )


async def test_cache_hits_on_native_routes(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(priced(upstream.url, cache={"enabled": True}, plugins=["cache"]))
    body = {"messages": MESSAGES, "options": {"temperature": 0}}
    first = await call(gw, "POST", "/api/v1/llm/complete", body)
    second = await call(gw, "POST", "/api/v1/llm/complete", body)
    assert first[2]["cached"] is False and second[2]["cached"] is True
    assert second[1]["x-gateway-cache"] == "hit" and second[2]["costUsd"] == 0
    assert second[2]["content"] == first[2]["content"]
    status, headers, events = await stream(gw, body)
    assert status == 200 and headers["x-gateway-cache"] == "hit"
    assert "".join(d["content"] for _, d in events) == first[2]["content"]
    assert events[-1][1]["done"] is True and events[-1][1]["finishReason"] == "stop"
    assert len(upstream.state.requests) == 1
