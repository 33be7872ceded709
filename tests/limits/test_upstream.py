"""Gateway-wide limits per provider and per upstream target: exact across instances, fall back, never leak."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import REGISTRY

from gateway.context import RequestContext
from tests.conftest import REDIS_URL, TEAM_KEY, RunningGateway, base_config, tenancy_config
from tests.helpers import openai_client

MESSAGES = [{"role": "user", "content": "hi"}]


def two_targets(upstream_url: str, *, first: dict[str, Any], redis: bool = True) -> dict[str, Any]:
    """Model ``chat``: ``primary`` (mock-chat, with ``first`` as its target limits), then ``backup``."""
    cfg = base_config(upstream_url)
    cfg["providers"].append({**cfg["providers"][0], "name": "backup"})
    cfg["models"] = [
        {
            "name": "chat",
            "targets": [
                {"provider": "primary", "model": "mock-chat", "limits": first},
                {"provider": "backup", "model": "mock-backup"},
            ],
        }
    ]
    if redis:
        cfg["redis"] = {"url": REDIS_URL, "prefix": f"t{uuid.uuid4().hex[:12]}"}
    return cfg


async def chat(gw: RunningGateway, model: str = "chat", **body: Any) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/chat/completions",
            json={"model": model, "messages": MESSAGES, **body},
            headers={"Authorization": f"Bearer {TEAM_KEY}"},
        ) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
async def test_target_rpm_full_falls_back_to_the_next_target(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(two_targets(upstream.url, first={"rpm": 2}, redis=redis))
    providers = [(await chat(gw))[1]["x-gateway-provider"] for _ in range(4)]
    assert providers == ["primary", "primary", "backup", "backup"]
    assert upstream.state.calls("mock-chat") == 2  # the limited upstream was never called a third time
    assert upstream.state.calls("mock-backup") == 2


async def test_all_targets_limited_is_a_429_with_retry_after(upstream, make_gateway) -> None:
    cfg = base_config(upstream.url)
    cfg["providers"][0]["limits"] = {"rpm": 1}  # on the provider: the whole account
    cfg["redis"] = {"url": REDIS_URL, "prefix": f"t{uuid.uuid4().hex[:12]}"}
    gw = await make_gateway(cfg)
    assert (await chat(gw))[0] == 200
    before = REGISTRY.get_sample_value(
        "llm_gateway_rate_limited_total", {"team": "none", "limit": "upstream"}
    )
    status, headers, body = await chat(gw)
    assert status == 429
    after = REGISTRY.get_sample_value("llm_gateway_rate_limited_total", {"team": "none", "limit": "upstream"})
    assert (after or 0) - (before or 0) == 1
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert upstream.state.calls("mock-chat") == 1
    client = openai_client(gw.url, TEAM_KEY)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="chat", messages=MESSAGES)  # type: ignore[arg-type]
    await client.close()


async def test_provider_rpm_is_exact_across_two_instances(upstream, make_gateway) -> None:
    cfg = base_config(upstream.url)
    cfg["providers"][0]["limits"] = {"rpm": 15}
    cfg["redis"] = {"url": REDIS_URL, "prefix": f"t{uuid.uuid4().hex[:12]}"}
    a, b = await make_gateway(cfg), await make_gateway(cfg)
    statuses = await asyncio.gather(*(chat(a if i % 2 else b) for i in range(50)))
    assert [s for s, _, _ in statuses].count(200) == 15
    assert upstream.state.calls("mock-chat") == 15


async def test_parallel_slot_is_held_for_the_stream_and_then_freed(upstream, make_gateway) -> None:
    cfg = two_targets(upstream.url, first={"max_parallel": 1})
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:chunks=4,chunk_delay=0.15"
    gw = await make_gateway(cfg)
    client = openai_client(gw.url, TEAM_KEY)

    async def stream() -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        async for _ in raw.parse():
            pass
        return raw.headers["x-gateway-provider"]

    first = asyncio.create_task(stream())
    await asyncio.sleep(0.1)  # the first stream holds primary's only slot while it runs
    assert await stream() == "backup"
    assert await first == "primary"
    await gw.gateway.pipeline.drain()
    assert await stream() == "primary"  # the slot came back when the stream ended
    await client.close()


async def test_failed_attempt_gives_its_slot_and_tokens_back(upstream, make_gateway) -> None:
    # Each attempt reserves ~120 tokens (prompt estimate + max_tokens 100): two fit in 250, three only
    # if the failed ones were refunded.
    cfg = two_targets(upstream.url, first={"max_parallel": 1, "tpm": 250})
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:status=500"
    gw = await make_gateway(cfg)
    for _ in range(3):  # each attempt fails upstream and falls back; nothing stays held
        status, headers, _ = await chat(gw, max_tokens=100)
        assert (status, headers["x-gateway-provider"]) == (200, "backup")
    await gw.gateway.pipeline.drain()
    assert upstream.state.calls("mock-chat") == 3  # the slot was free and the tokens back each time


async def test_tokens_reconcile_with_real_usage(upstream, make_gateway) -> None:
    # tpm 300 and max_tokens 200: a reservation of ~210 fits once; after the answer (a few tokens) it
    # is reconciled, so the next call fits again instead of waiting for the bucket to refill.
    gw = await make_gateway(two_targets(upstream.url, first={"tpm": 300}))
    for _ in range(3):
        _, headers, _ = await chat(gw, max_tokens=200)
        assert headers["x-gateway-provider"] == "primary"
        await gw.gateway.pipeline.drain()


async def test_team_limits_and_upstream_limits_together(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"rpm": 3})
    cfg["providers"][0]["limits"] = {"rpm": 2}
    gw = await make_gateway(cfg)
    results = [await chat(gw) for _ in range(4)]
    assert [s for s, _, _ in results] == [200, 200, 429, 429]
    # The team's own limit headers still describe the team's limit, not the upstream's.
    assert results[0][1]["x-ratelimit-limit-requests"] == "3"
    assert "upstream" in results[2][2]["error"]["message"]
    assert "requests per minute (3)" in results[3][2]["error"]["message"]  # the team's limit now


async def test_redis_down_falls_back_to_a_local_limit(upstream, make_gateway, private_redis) -> None:
    cfg = two_targets(upstream.url, first={"rpm": 2})
    cfg["redis"] = {"url": private_redis.url, "prefix": "t", "timeout_seconds": 0.2}
    gw = await make_gateway(cfg)
    private_redis.kill()
    providers = [(await chat(gw))[1]["x-gateway-provider"] for _ in range(3)]
    assert providers == ["primary", "primary", "backup"]


def test_targets_of_one_upstream_must_agree_on_limits(upstream) -> None:
    from gateway.config import ConfigError
    from gateway.config_parser import parse

    cfg = base_config("http://127.0.0.1:1/v1")
    cfg["models"] = [
        {"name": "a", "targets": [{"provider": "primary", "model": "m", "limits": {"rpm": 1}}]},
        {"name": "b", "targets": [{"provider": "primary", "model": "m", "limits": {"rpm": 2}}]},
    ]
    with pytest.raises(ConfigError, match="different limits"):
        parse(cfg)
    cfg["models"][1]["targets"][0]["limits"] = {"rpm": 0}
    with pytest.raises(ConfigError, match="must be at least 1"):
        parse(cfg)


async def test_a_team_reservation_larger_than_the_upstream_tpm_still_fits(upstream, make_gateway) -> None:
    # No max_tokens: the team (tpm 100k) reserves its default; the provider's own (tpm 1000) reservation
    # is capped against the provider's limit, so the request is served, not refused for good.
    cfg = tenancy_config(upstream.url, limits={"tpm": 100_000})
    cfg["providers"][0]["limits"] = {"tpm": 1000}
    gw = await make_gateway(cfg)
    assert [(await chat(gw))[0] for _ in range(2)] == [200, 200]


async def test_a_request_above_the_whole_upstream_tpm_is_told_so(upstream, make_gateway) -> None:
    cfg = base_config(upstream.url)
    cfg["providers"][0]["limits"] = {"tpm": 100}
    cfg["redis"] = {"url": REDIS_URL, "prefix": f"t{uuid.uuid4().hex[:12]}"}
    gw = await make_gateway(cfg)
    status, _, body = await chat(gw, max_tokens=500)
    assert status == 429
    assert "lower max_tokens" in body["error"]["message"]
    assert upstream.state.calls("mock-chat") == 0


async def test_a_half_open_trial_refused_by_the_limit_does_not_lock_the_target(
    upstream, make_gateway
) -> None:
    cfg = two_targets(upstream.url, first={"rpm": 1})
    cfg["routing"]["circuit_breaker"] = {"failures": 1, "cooldown_seconds": 0.05}
    gw = await make_gateway(cfg)
    target = gw.gateway.router.routes["chat"].targets[0]
    assert target.breaker.failure()  # the circuit opens
    await asyncio.sleep(0.1)  # cooldown over: the next caller is the half-open trial
    await chat(gw)  # primary's only rpm token: taken by the trial, which succeeds and closes the circuit
    assert target.breaker.failure()
    await asyncio.sleep(0.1)
    _, headers, _ = await chat(gw)  # the trial is refused by the empty bucket: backup serves it
    assert headers["x-gateway-provider"] == "backup"
    assert not target.breaker.trial  # the trial was handed back: the target is not locked out
    assert target.breaker.allow()


async def test_a_client_leaving_during_the_upstream_admission_frees_its_slot(upstream, make_gateway) -> None:
    cfg = base_config(upstream.url)
    cfg["providers"][0]["limits"] = {"max_parallel": 1}
    cfg["redis"] = {"url": REDIS_URL, "prefix": f"t{uuid.uuid4().hex[:12]}"}
    gw = await make_gateway(cfg)
    assert (await chat(gw))[0] == 200  # connects the pipe
    target = gw.gateway.router.routes["chat"].targets[0]
    upstream_limits = gw.gateway.router.upstream
    assert upstream_limits is not None and target.limits is not None
    ctx = RequestContext("r1", "chat", {"model": "chat", "messages": MESSAGES}, target_model(gw), EMPTY, 50)
    taking = asyncio.create_task(upstream_limits.take(ctx, target.limits))
    await asyncio.sleep(0)  # the admission is queued on the pipe ...
    await asyncio.sleep(0)  # ... and written
    taking.cancel()  # ... and its caller goes away before the answer
    with pytest.raises(asyncio.CancelledError):
        await taking
    await gw.gateway.pipeline.drain()
    assert (await chat(gw))[0] == 200  # the slot did not stay taken


EMPTY: Any = CIMultiDictProxy(CIMultiDict())


def target_model(gw: RunningGateway) -> Any:
    return gw.gateway.router.routes["chat"].model


async def test_a_caller_that_is_not_the_trial_never_ends_someone_elses(upstream, make_gateway) -> None:
    cfg = two_targets(upstream.url, first={"rpm": 100})
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:first_byte_delay=1"
    cfg["routing"]["circuit_breaker"] = {"failures": 1, "cooldown_seconds": 0.05}
    gw = await make_gateway(cfg)
    breaker = gw.gateway.router.routes["chat"].targets[0].breaker
    request = asyncio.create_task(chat(gw))  # A: let in while the circuit is closed, now waiting
    await asyncio.sleep(0.2)
    breaker.failure()  # meanwhile the circuit opens ...
    await asyncio.sleep(0.1)
    assert breaker.allow()  # ... and after the cooldown B becomes the one half-open trial
    request.cancel()  # A's client goes away
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.sleep(0.2)  # the gateway has seen the disconnect and cancelled A's handler
    assert breaker.trial  # B's trial is still B's: no second trial can start
    assert not breaker.allow()
