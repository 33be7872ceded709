"""Exact limits across two gateway instances sharing one Redis."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gateway.limits.refusal import duration
from tests.conftest import MASTER_KEY, REDIS_URL, TEAM_B_KEY, TEAM_KEY, RunningGateway, tenancy_config
from tests.helpers import eventually


async def test_rpm_exact_across_two_instances(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"rpm": 20})
    a, b = await make_gateway(cfg), await make_gateway(cfg)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {TEAM_KEY}"}
    async with aiohttp.ClientSession() as session:

        async def call(url: str) -> int:
            async with session.post(url + "/chat/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(call(a.url if i % 2 else b.url) for i in range(60)))
    assert statuses.count(200) == 20
    assert statuses.count(429) == 40


# --------------------------------------------------------------------------------------------------------
# What a client sees of its limits: 429s, headers, per-key and per-model limits, parallel slots, tokens.

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": " ".join(["word"] * 40)}]
RESET = re.compile(r"^(\d+ms|\d+(\.\d)?s|\d+m\d+s)$")


async def post(
    gw: RunningGateway, key: str = TEAM_KEY, **body: Any
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One raw HTTP chat call: status, headers and parsed body."""
    payload = {"model": "chat", "messages": MESSAGES, **body}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)


async def usage_total(gw: RunningGateway, team: str = "team-a") -> dict[str, Any]:
    await gw.gateway.pipeline.drain()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.root + "/api/v1/usage",
            params={"team": team},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as r,
    ):
        assert r.status == 200
        total: dict[str, Any] = (await r.json())["total"]
        return total


async def tpm_bucket(cfg: dict[str, Any], scope: str = "{team-a}") -> float:
    """The team's tpm bucket level as stored in Redis right now (refilled to this instant)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        tokens, ts = await client.hmget(f"{cfg['redis']['prefix']}:{scope}:tpm", "t", "ts")
        now_s, now_us = await client.time()
    finally:
        await client.aclose()
    assert tokens is not None
    rate = cfg["teams"][0]["limits"]["tpm"] / 60_000  # per ms
    elapsed = now_s * 1000 + now_us // 1000 - int(ts)
    return min(float(cfg["teams"][0]["limits"]["tpm"]), float(tokens) + elapsed * rate)


def limited(team: str, limit: str) -> float:
    return REGISTRY.get_sample_value("llm_gateway_rate_limited_total", {"team": team, "limit": limit}) or 0.0


async def test_429_has_openai_shape_retry_after_and_ratelimit_headers(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"rpm": 2}))
    client = gw.client(api_key=TEAM_KEY)
    before = limited("team-a", "rpm")
    for _ in range(2):
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    err = caught.value
    assert (err.status_code, err.code, err.type) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert "requests per minute" in err.message
    headers = err.response.headers
    assert 1 <= int(headers["retry-after"]) <= 30  # one request comes back every 30 s at rpm=2
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert RESET.match(headers["x-ratelimit-reset-requests"])
    assert limited("team-a", "rpm") == before + 1
    # The refused request is not billed as a request in the usage report.
    assert (await usage_total(gw))["requests"] == 2


async def test_ratelimit_headers_on_successful_responses(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"rpm": 10, "tpm": 60_000}))
    client = gw.client(api_key=TEAM_KEY)
    seen = []
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=MESSAGES, max_tokens=100
        )
        assert raw.parse().choices[0].message.content == "Mock answer: hi"
        seen.append(raw.headers)
    first, second = seen
    assert first["x-ratelimit-limit-requests"] == "10"
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["9", "8"]
    assert first["x-ratelimit-reset-requests"] == "6s"  # one request back every 6 s at rpm=10
    assert second["x-ratelimit-limit-tokens"] == "60000"
    reserved = 60_000 - int(first["x-ratelimit-remaining-tokens"])
    assert 100 < reserved < 150  # max_tokens plus an estimate of the prompt
    assert RESET.match(first["x-ratelimit-reset-tokens"])
    # Streams carry the same headers.
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    assert stream.response.headers["x-ratelimit-remaining-requests"] == "7"
    assert "x-ratelimit-remaining-tokens" in stream.response.headers
    async for _ in stream:
        pass


async def test_per_key_limits_apply_on_top_of_team_limits(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"rpm": 3}))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.root + "/admin/keys",
            json={"team": "team-a", "name": "batch", "limits": {"rpm": 2}},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as r,
    ):
        assert r.status == 201, await r.text()
        key = (await r.json())["key"]
    statuses = [(await post(gw, key))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, headers, body = await post(gw, key)
    assert status == 429
    assert headers["x-ratelimit-limit-requests"] == "2"  # the key's limit is the tighter one
    assert body["error"]["code"] == "rate_limit_exceeded"
    # The key's two requests count against the team as well: one left for the team key.
    assert [(await post(gw, TEAM_KEY))[0] for _ in range(2)] == [200, 429]
    # Another team is not affected.
    assert (await post(gw, TEAM_B_KEY))[0] == 200


async def test_per_model_limits_apply_on_top_of_team_limits(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"rpm": 3}, model_limits={"chat": {"rpm": 2}})
    cfg["models"].append({"name": "other", "targets": [{"provider": "primary", "model": "mock-chat"}]})
    gw = await make_gateway(cfg)
    client = gw.client(api_key=TEAM_KEY)
    for _ in range(2):
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.response.headers["x-ratelimit-limit-requests"] == "2"
    # Another model of the same team is not held by the chat limit, only by the team's.
    await client.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="other", messages=MESSAGES)
    assert caught.value.response.headers["x-ratelimit-limit-requests"] == "3"


async def test_max_parallel_refuses_the_third_concurrent_request_and_frees_slots(
    upstream, make_gateway
) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"max_parallel": 2}))
    upstream.state.faults["mock-chat"] = {"first_byte_delay": 0.4}
    client = gw.client(api_key=TEAM_KEY)
    slow = [
        asyncio.create_task(client.chat.completions.create(model="chat", messages=MESSAGES)) for _ in range(2)
    ]

    await eventually(lambda: len(upstream.state.requests) == 2, interval=0.02)
    before = limited("team-a", "parallel")
    status, headers, body = await post(gw)
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert "parallel requests (2)" in body["error"]["message"]
    assert headers["Retry-After"] == "1"
    assert limited("team-a", "parallel") == before + 1
    assert len(upstream.state.requests) == 2  # the refused request never reached the upstream
    for reply in await asyncio.gather(*slow):
        assert reply.choices[0].message.content == "Mock answer: hi"
    upstream.state.faults.clear()
    # Both slots are free the moment the answers are out: two concurrent requests pass.
    statuses = await asyncio.gather(post(gw), post(gw))
    assert [s for s, _, _ in statuses] == [200, 200]


async def test_a_shared_request_id_cannot_bypass_max_parallel(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"max_parallel": 2}))
    upstream.state.faults["mock-chat"] = {"first_byte_delay": 0.4}
    client = gw.client(api_key=TEAM_KEY, default_headers={"x-request-id": "same-id"})
    slow = [
        asyncio.create_task(client.chat.completions.create(model="chat", messages=MESSAGES)) for _ in range(2)
    ]

    await eventually(lambda: len(upstream.state.requests) == 2, interval=0.02)
    with pytest.raises(openai.RateLimitError):  # a third parallel request, whatever its x-request-id
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    for reply in await asyncio.gather(*slow):
        assert reply.choices[0].message.content == "Mock answer: hi"


async def test_client_disconnect_mid_stream_releases_the_parallel_slot(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"max_parallel": 1}))
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.1}
    client = gw.client(api_key=TEAM_KEY)
    stream = await client.chat.completions.create(model="chat", messages=LONG, stream=True)
    await stream.__anext__()
    assert (await post(gw))[0] == 429  # the stream holds the only slot
    await stream.close()

    await eventually(lambda: upstream.state.requests[0].ended is not None, interval=0.02)
    await gw.gateway.pipeline.drain()
    upstream.state.faults.clear()
    assert (await post(gw))[0] == 200  # the slot was released, not leaked until it goes stale
    # And a stream that ends normally releases it too.
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    await gw.gateway.pipeline.drain()
    assert (await post(gw))[0] == 200


async def test_tpm_reservations_are_held_by_concurrent_requests(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"tpm": 1000})
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"first_byte_delay": 0.3}
    before = limited("team-a", "tpm")
    results = await asyncio.gather(*(post(gw, max_tokens=300) for _ in range(5)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 200, 429, 429]  # ~320 tokens reserved each out of 1000
    assert limited("team-a", "tpm") == before + 2
    refused = [(headers, body) for status, headers, body in results if status == 429]
    for headers, body in refused:
        assert "tokens per minute (1000)" in body["error"]["message"]
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert int(headers["x-ratelimit-remaining-tokens"]) < 320
        assert 1 <= int(headers["Retry-After"]) <= 20
    # Once they finished, their unused reservations came back: the same request fits again.
    upstream.state.faults.clear()
    await gw.gateway.pipeline.drain()
    assert (await post(gw, max_tokens=300))[0] == 200
    assert (await post(gw, max_tokens=300))[0] == 200


async def test_a_request_larger_than_tpm_is_refused_with_a_clear_message(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"tpm": 200}))
    client = gw.client(api_key=TEAM_KEY)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=500)
    err = caught.value
    assert err.code == "rate_limit_exceeded"
    assert "more than the limit of 200" in err.message and "max_tokens" in err.message
    assert err.response.headers["retry-after"] == "60"
    assert upstream.state.requests == []
    # Nothing was reserved for it: a request that fits gets (almost) the whole bucket.
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, max_tokens=50
    )
    assert 200 - 50 - 30 < int(raw.headers["x-ratelimit-remaining-tokens"]) < 200 - 50


async def test_success_charges_the_real_usage_not_the_reservation(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"tpm": 600})  # refills 10 tokens a second
    gw = await make_gateway(cfg)
    client = gw.client(api_key=TEAM_KEY)
    started = time.monotonic()
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, max_tokens=300
    )
    used = raw.parse().usage.total_tokens
    after_first = int(raw.headers["x-ratelimit-remaining-tokens"])
    reserved = 600 - after_first
    assert reserved > 300 > used
    await gw.gateway.pipeline.drain()
    assert await tpm_bucket(cfg) == pytest.approx(600 - used, abs=10 * (time.monotonic() - started) + 1)
    # The next identical request sees the first one's real usage taken, its reservation returned.
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, max_tokens=300
    )
    refill = 10 * (time.monotonic() - started)
    remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert after_first - used <= remaining <= after_first - used + refill + 1


async def test_an_upstream_error_refunds_the_whole_reservation(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"tpm": 600})
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"status": 502}
    status, headers, body = await post(gw, max_tokens=300)
    assert (status, body["error"]["type"]) == (502, "upstream_error")
    reserved_left = int(headers["x-ratelimit-remaining-tokens"])
    assert reserved_left < 300
    await gw.gateway.pipeline.drain()
    assert await tpm_bucket(cfg) == 600  # everything refunded (and capped at the capacity)
    upstream.state.faults.clear()
    status, headers, _ = await post(gw, max_tokens=300)
    assert (status, int(headers["x-ratelimit-remaining-tokens"])) == (200, reserved_left)


async def test_client_disconnect_charges_partial_usage_and_refunds_the_rest(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"tpm": 600})
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.05}
    client = gw.client(api_key=TEAM_KEY)
    started = time.monotonic()
    stream = await client.chat.completions.create(model="chat", messages=LONG, max_tokens=300, stream=True)
    reserved = 600 - int(stream.response.headers["x-ratelimit-remaining-tokens"])
    for _ in range(4):
        await stream.__anext__()
    await stream.close()

    await eventually(lambda: upstream.state.requests[0].ended is not None, interval=0.02)
    total = await usage_total(gw)
    charged = total["prompt_tokens"] + total["completion_tokens"]
    assert total["completion_tokens"] >= 3  # what was relayed before the client left
    assert 0 < charged < reserved
    # The bucket holds exactly what the usage report says was charged; the rest was refunded.
    level = await tpm_bucket(cfg)
    assert level == pytest.approx(600 - charged, abs=10 * (time.monotonic() - started) + 1)
    assert level > 600 - reserved


async def test_reservations_never_leak_after_mixed_outcomes(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"tpm": 30_000, "max_parallel": 20})  # 500 tokens/s back
    cfg["models"] += [
        {"name": "broken", "targets": [{"provider": "primary", "model": "mock-chat:status=502"}]},
        {"name": "slow", "targets": [{"provider": "primary", "model": "mock-chat:chunk_delay=0.05"}]},
    ]
    gw = await make_gateway(cfg)
    client = gw.client(api_key=TEAM_KEY)

    async def ok() -> None:
        await client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2000)

    async def streamed() -> None:
        stream = await client.chat.completions.create(
            model="chat", messages=MESSAGES, max_tokens=2000, stream=True
        )
        async for _ in stream:
            pass

    async def failed() -> None:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="broken", messages=MESSAGES, max_tokens=2000)

    async def abandoned() -> None:
        stream = await client.chat.completions.create(
            model="slow", messages=LONG, max_tokens=2000, stream=True
        )
        await stream.__anext__()
        await stream.__anext__()
        await stream.close()

    await asyncio.gather(
        *(f() for f in (ok, ok, ok, streamed, streamed, failed, failed, abandoned, abandoned))
    )

    await eventually(lambda: all(r.ended is not None for r in upstream.state.requests), interval=0.02)
    total = await usage_total(gw)
    charged = total["prompt_tokens"] + total["completion_tokens"]
    assert 0 < charged < 1000  # nine requests reserved ~18 000 tokens; only the real usage stays taken
    level = await tpm_bucket(cfg)
    assert level >= 30_000 - charged
    await asyncio.sleep((30_000 - level) / 500 + 0.1)  # the time the real usage takes to refill
    assert await tpm_bucket(cfg) == 30_000
    status, headers, _ = await post(gw, max_tokens=2000)
    assert status == 200
    assert 30_000 - 2000 - 30 < int(headers["x-ratelimit-remaining-tokens"]) < 30_000 - 2000


async def test_a_request_without_max_tokens_fits_a_small_tpm_limit(upstream, make_gateway) -> None:
    # The default completion reservation (1024 tokens) must not refuse every request of a team whose
    # tpm is smaller: the client asked for nothing the limit forbids.
    gw = await make_gateway(tenancy_config(upstream.url, limits={"tpm": 500}))
    client = gw.client(api_key=TEAM_KEY)
    raw = await client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "Mock answer: hi"
    assert raw.headers["x-ratelimit-limit-tokens"] == "500"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 200  # about half the bucket reserved
    # Reconciled like any other request: the next one is admitted too.
    await gw.gateway.pipeline.drain()
    await client.chat.completions.create(model="chat", messages=MESSAGES)


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.25, "250ms"), (1, "1s"), (6, "6s"), (12.5, "12.5s"), (60, "1m0s"), (90, "1m30s"), (119.97, "2m0s")],
)
def test_reset_headers_use_openai_duration_format(seconds: float, header: str) -> None:
    assert duration(seconds) == header
