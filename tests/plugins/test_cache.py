"""The response cache and request coalescing, end to end with the SDK and a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    MASTER_KEY,
    TEAM_B_KEY,
    TEAM_KEY,
    RunningGateway,
    Upstream,
    tenancy_config,
)
from tests.helpers import PrivateRedis

MESSAGES = [{"role": "user", "content": "cache me"}]


def cache_config(upstream_url: str, *, redis: bool = True, **cache: Any) -> dict[str, Any]:
    cfg = tenancy_config(upstream_url, redis=redis)
    cfg["plugins"] = ["auth", "rate_limit", "quota", "cache"]
    cfg["cache"] = {"enabled": True, "ttl_seconds": 60, **cache}
    return cfg


async def ask(
    gw: RunningGateway, key: str = TEAM_KEY, headers: dict[str, str] | None = None, **body: Any
) -> Any:
    client = gw.client(api_key=key, default_headers=headers or {})
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=body.pop("messages", MESSAGES), **body
    )
    return raw


async def stream_text(gw: RunningGateway, key: str = TEAM_KEY, **body: Any) -> tuple[str, str, Any]:
    client = gw.client(api_key=key)
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=body.pop("messages", MESSAGES), stream=True, **body
    )
    chunks = [c async for c in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next((c.usage for c in chunks if c.usage), None)
    return text, raw.headers.get("x-gateway-cache"), usage


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
async def test_miss_then_hit_without_calling_upstream(
    upstream: Upstream, make_gateway: Any, redis: bool
) -> None:
    gw = await make_gateway(cache_config(upstream.url, redis=redis))
    first = await ask(gw)
    assert first.headers["x-gateway-cache"] == "miss"
    await gw.gateway.pipeline.drain()
    calls = upstream.state.calls("mock-chat")
    second = await ask(gw)
    assert second.headers["x-gateway-cache"] == "hit"
    assert int(second.headers["age"]) >= 0
    assert upstream.state.calls("mock-chat") == calls
    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage is not None and b.usage.total_tokens == a.usage.total_tokens  # the cached usage


async def test_stream_and_non_stream_replay_each_other(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url))
    text, result, _ = await stream_text(gw, messages=[{"role": "user", "content": "streamed first"}])
    assert result == "miss"
    await gw.gateway.pipeline.drain()
    as_json = await ask(gw, messages=[{"role": "user", "content": "streamed first"}])
    assert as_json.headers["x-gateway-cache"] == "hit"
    assert as_json.parse().choices[0].message.content == text
    assert as_json.parse().usage.completion_tokens > 0

    plain = await ask(gw, messages=[{"role": "user", "content": "json first"}])
    await gw.gateway.pipeline.drain()
    replayed, result, usage = await stream_text(
        gw, messages=[{"role": "user", "content": "json first"}], stream_options={"include_usage": True}
    )
    assert result == "hit"
    assert replayed == plain.parse().choices[0].message.content
    assert usage is not None and usage.total_tokens == plain.parse().usage.total_tokens
    again, result, usage = await stream_text(gw, messages=[{"role": "user", "content": "json first"}])
    assert (again, result, usage) == (replayed, "hit", None)  # no usage chunk unless asked for


async def test_cache_control_no_cache_no_store_and_max_age(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url, max_ttl_seconds=1))
    await ask(gw, headers={"Cache-Control": "no-store"})
    await gw.gateway.pipeline.drain()
    assert (await ask(gw)).headers["x-gateway-cache"] == "miss"  # no-store wrote nothing
    await gw.gateway.pipeline.drain()
    calls = upstream.state.calls("mock-chat")
    no_cache = await ask(gw, headers={"Cache-Control": "no-cache"})
    assert no_cache.headers["x-gateway-cache"] == "miss"
    assert upstream.state.calls("mock-chat") == calls + 1  # the read was skipped
    # max-age beyond the 1 s ceiling: the entry lives 1 s.
    await ask(gw, messages=[{"role": "user", "content": "short"}], headers={"Cache-Control": "max-age=3600"})
    await gw.gateway.pipeline.drain()
    assert (await ask(gw, messages=[{"role": "user", "content": "short"}])).headers[
        "x-gateway-cache"
    ] == "hit"
    await asyncio.sleep(1.3)
    assert (await ask(gw, messages=[{"role": "user", "content": "short"}])).headers[
        "x-gateway-cache"
    ] == "miss"


async def test_teams_never_share_answers(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url))
    await ask(gw, key=TEAM_KEY)
    await gw.gateway.pipeline.drain()
    assert (await ask(gw, key=TEAM_B_KEY)).headers["x-gateway-cache"] == "miss"
    shared = await make_gateway(cache_config(upstream.url, shared=True))
    await ask(shared, key=TEAM_KEY)
    await shared.gateway.pipeline.drain()
    assert (await ask(shared, key=TEAM_B_KEY)).headers["x-gateway-cache"] == "hit"


async def test_every_answer_changing_parameter_is_in_the_key(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url))
    await ask(gw, temperature=0.5, user="alice")
    await gw.gateway.pipeline.drain()
    assert (await ask(gw, temperature=0.5, user="bob")).headers["x-gateway-cache"] == "hit"  # user is not
    for variant in (
        {"temperature": 0.7},
        {"temperature": 0.5, "max_tokens": 5},
        {"temperature": 0.5, "seed": 1},
        {"temperature": 0.5, "tools": [{"type": "function", "function": {"name": "f"}}]},
    ):
        assert (await ask(gw, **variant)).headers["x-gateway-cache"] == "miss", variant
    other = [{"role": "user", "content": "cache me!"}]
    assert (await ask(gw, temperature=0.5, messages=other)).headers["x-gateway-cache"] == "miss"


async def test_deterministic_only(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url, deterministic_only=True))
    assert (await ask(gw, temperature=0.9)).headers["x-gateway-cache"] == "bypass"
    assert (await ask(gw, temperature=0)).headers["x-gateway-cache"] == "miss"
    assert (await ask(gw, seed=7)).headers["x-gateway-cache"] == "miss"


async def test_size_bound_skips_large_answers(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url, max_entry_bytes=200))
    await ask(gw, messages=[{"role": "user", "content": "x" * 300}])
    await gw.gateway.pipeline.drain()
    assert (await ask(gw, messages=[{"role": "user", "content": "x" * 300}])).headers[
        "x-gateway-cache"
    ] == "miss"


async def test_hits_are_not_charged_to_token_limits_or_budgets(upstream: Upstream, make_gateway: Any) -> None:
    cfg = cache_config(upstream.url)
    cfg["teams"][0]["budgets"] = {"daily_tokens": 10_000}
    gw = await make_gateway(cfg)
    await ask(gw)
    await gw.gateway.pipeline.drain()
    spent = await _tokens_today(gw)
    for _ in range(3):
        assert (await ask(gw)).headers["x-gateway-cache"] == "hit"
    await gw.gateway.pipeline.drain()
    assert await _tokens_today(gw) == spent


async def _tokens_today(gw: RunningGateway) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.root + "/api/v1/usage", headers={"Authorization": f"Bearer {TEAM_KEY}"}) as r,
    ):
        total = (await r.json())["total"]
    return int(total["prompt_tokens"] + total["completion_tokens"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_ten_identical_requests_make_one_upstream_call(
    upstream: Upstream, make_gateway: Any, stream: bool
) -> None:
    gw = await make_gateway(cache_config(upstream.url))
    upstream.state.faults["mock-chat"] = {"first_byte_delay": 0.3}
    if stream:
        results = await asyncio.gather(*(stream_text(gw) for _ in range(10)))
        texts = {r[0] for r in results}
        outcomes = sorted(r[1] for r in results)
    else:
        raws = await asyncio.gather(*(ask(gw) for _ in range(10)))
        texts = {r.parse().choices[0].message.content for r in raws}
        outcomes = sorted(r.headers["x-gateway-cache"] for r in raws)
    assert upstream.state.calls("mock-chat") == 1
    assert len(texts) == 1
    assert outcomes == ["hit"] * 9 + ["miss"]


async def test_coalescing_across_two_instances(upstream: Upstream, make_gateway: Any) -> None:
    cfg = cache_config(upstream.url)
    a, b = await make_gateway(cfg), await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"first_byte_delay": 0.4}
    raws = await asyncio.gather(*(ask(a if i % 2 else b) for i in range(6)))
    assert upstream.state.calls("mock-chat") == 1
    assert sorted(r.headers["x-gateway-cache"] for r in raws) == ["hit"] * 5 + ["miss"]


async def test_followers_call_upstream_when_the_leader_fails(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url))
    upstream.state.faults["mock-chat"] = {"first_byte_delay": 0.3, "status": 500}

    async def call() -> int:
        try:
            await ask(gw)
        except Exception as exc:
            return getattr(exc, "status_code", 0)
        return 200

    async def heal() -> None:
        while upstream.state.calls("mock-chat") == 0:  # the leader's call has taken the fault...
            await asyncio.sleep(0.01)
        upstream.state.faults["mock-chat"] = {}  # ...and will fail; calls after it succeed

    statuses, _ = await asyncio.gather(asyncio.gather(*(call() for _ in range(5))), heal())
    assert sorted(statuses) == [200] * 4 + [502]
    assert upstream.state.calls("mock-chat") >= 2  # the followers did not take the failure as their answer


async def test_entries_survive_a_gateway_restart_with_redis(upstream: Upstream, make_gateway: Any) -> None:
    cfg = cache_config(upstream.url)
    first = await make_gateway(cfg)
    await ask(first)
    await first.gateway.pipeline.drain()
    await first.close()
    second = await make_gateway(cfg)
    assert (await ask(second)).headers["x-gateway-cache"] == "hit"


async def test_redis_down_means_no_cache_never_an_error(
    upstream: Upstream, make_gateway: Any, private_redis: PrivateRedis
) -> None:
    cfg = cache_config(upstream.url)
    cfg["redis"] = {"url": private_redis.url, "timeout_seconds": 0.2}
    gw = await make_gateway(cfg)
    await ask(gw)
    await gw.gateway.pipeline.drain()
    private_redis.kill()
    reply = await ask(gw)  # limits fail open; the cache is skipped
    assert reply.headers["x-gateway-cache"] == "miss"
    assert reply.parse().choices[0].message.content


async def test_admin_invalidation(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(cache_config(upstream.url))
    await ask(gw, key=TEAM_KEY)
    await ask(gw, key=TEAM_B_KEY)
    await gw.gateway.pipeline.drain()
    async with aiohttp.ClientSession() as session:
        async with session.delete(
            gw.root + "/admin/cache", headers={"Authorization": f"Bearer {TEAM_KEY}"}
        ) as r:
            assert r.status == 403
        admin = {"Authorization": f"Bearer {MASTER_KEY}"}
        async with session.delete(gw.root + "/admin/cache", params={"team": "team-a"}, headers=admin) as r:
            assert r.status == 204
        assert (await ask(gw, key=TEAM_KEY)).headers["x-gateway-cache"] == "miss"
        assert (await ask(gw, key=TEAM_B_KEY)).headers["x-gateway-cache"] == "hit"
        await gw.gateway.pipeline.drain()
        async with session.delete(gw.root + "/admin/cache", params={"model": "chat"}, headers=admin) as r:
            assert r.status == 204
        assert (await ask(gw, key=TEAM_KEY)).headers["x-gateway-cache"] == "miss"
        assert (await ask(gw, key=TEAM_B_KEY)).headers["x-gateway-cache"] == "miss"
