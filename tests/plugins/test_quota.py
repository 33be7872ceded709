"""Budgets: USD and token ceilings per UTC day and month, what a team sees when one is spent, and
the calendar windows they reset on."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import REGISTRY

from gateway.accounting import windows
from gateway.state.base import Op
from tests.conftest import MASTER_KEY, TEAM_KEY, RunningGateway, tenancy_config

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]  # 1 prompt + 3 completion tokens at the mock
DOLLAR_A_TOKEN = {"input_per_mtok": 1_000_000.0, "output_per_mtok": 1_000_000.0}
BACKENDS = pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
UTC = dt.UTC


def budget_config(
    upstream_url: str, redis: bool, target: str = "mock-chat", **budgets: Any
) -> dict[str, Any]:
    cfg = tenancy_config(upstream_url, redis=redis, budgets=budgets)
    cfg["models"][0]["pricing"] = DOLLAR_A_TOKEN
    cfg["models"][0]["targets"][0]["model"] = target
    return cfg


async def usage_total(gw: RunningGateway) -> dict[str, Any]:
    await gw.gateway.pipeline.drain()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.root + "/api/v1/usage",
            params={"team": "team-a"},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as r,
    ):
        assert r.status == 200
        total: dict[str, Any] = (await r.json())["total"]
        return total


def refused_for_budget() -> float:
    labels = {"team": "team-a", "limit": "budget"}
    return REGISTRY.get_sample_value("llm_gateway_rate_limited_total", labels) or 0.0


@BACKENDS
@pytest.mark.parametrize(
    "budget", ["daily_usd", "monthly_usd", "daily_tokens", "monthly_tokens"], ids=lambda b: b
)
async def test_spent_budget_refuses_with_insufficient_quota_until_the_window_ends(
    upstream, make_gateway, redis: bool, budget: str
) -> None:
    # Each request costs $4 and 4 tokens: the second (a stream) still starts at 4 of 6 spent, which
    # takes the spend to 8, and the third is refused.
    gw = await make_gateway(budget_config(upstream.url, redis, **{budget: 6}))
    client = gw.client(api_key=TEAM_KEY)
    reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.usage is not None and reply.usage.total_tokens == 4
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    await gw.gateway.pipeline.drain()
    before = refused_for_budget()
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    err = caught.value
    assert (err.status_code, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    assert "budget" in err.message
    _, _, day_left, month_left = windows()
    window = day_left if budget.startswith("daily") else month_left
    assert abs(int(err.response.headers["retry-after"]) - window) <= 5  # until the next UTC day/month
    assert refused_for_budget() == before + 1
    assert len(upstream.state.requests) == 2
    total = await usage_total(gw)
    assert (total["requests"], total["cost_usd"], total["prompt_tokens"] + total["completion_tokens"]) == (
        2,
        8.0,
        8,
    )


@BACKENDS
async def test_upstream_reported_cost_is_used_instead_of_the_price_table(
    upstream, make_gateway, redis: bool
) -> None:
    # OpenRouter reports the real cost in usage.cost: $0.50 a request, where the price table says $4.
    gw = await make_gateway(budget_config(upstream.url, redis, target="mock-chat:cost=0.5", daily_usd=1.2))
    client = gw.client(api_key=TEAM_KEY)
    for _ in range(3):  # 0 → 0.5 → 1.0 → 1.5: three requests start below the budget
        await client.chat.completions.create(model="chat", messages=MESSAGES)
        await gw.gateway.pipeline.drain()
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.code == "insufficient_quota"
    assert (await usage_total(gw))["cost_usd"] == pytest.approx(1.5)


@BACKENDS
async def test_a_key_budget_applies_on_top_of_the_team_budget(upstream, make_gateway, redis: bool) -> None:
    gw = await make_gateway(budget_config(upstream.url, redis, daily_usd=6))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.root + "/admin/keys",
            json={"team": "team-a", "name": "intern", "budgets": {"daily_usd": 3}},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as r,
    ):
        assert r.status == 201, await r.text()
        key = (await r.json())["key"]
    keyed, team = gw.client(api_key=key), gw.client(api_key=TEAM_KEY)
    await keyed.chat.completions.create(model="chat", messages=MESSAGES)  # $4 of the key's $3
    await gw.gateway.pipeline.drain()
    with pytest.raises(openai.RateLimitError) as caught:
        await keyed.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.type == "insufficient_quota"
    # The team's own key still has $2 left of its $6, and the key's spend counted there too.
    await team.chat.completions.create(model="chat", messages=MESSAGES)
    await gw.gateway.pipeline.drain()
    with pytest.raises(openai.RateLimitError):
        await team.chat.completions.create(model="chat", messages=MESSAGES)


@BACKENDS
async def test_spend_of_a_past_window_does_not_count(upstream, make_gateway, redis: bool) -> None:
    cfg = budget_config(upstream.url, redis, daily_usd=1, monthly_tokens=10)
    gw = await make_gateway(cfg)
    prefix = cfg["redis"]["prefix"] if redis else "llmgw"
    store = gw.gateway.store
    now = dt.datetime.now(UTC)
    yesterday, _, _, _ = windows(now - dt.timedelta(days=1))
    _, last_month, _, _ = windows(now.replace(day=1) - dt.timedelta(days=1))
    today, this_month, _, _ = windows(now)
    base = f"{prefix}:{{team-a}}"
    # Far over both budgets, yesterday and last month.
    await store.settle(
        [
            Op("incr", f"{base}:usd:d:{yesterday}", (100, 60)),
            Op("incr", f"{base}:tok:m:{last_month}", (1e6, 60)),
        ]
    )
    client = gw.client(api_key=TEAM_KEY)
    await client.chat.completions.create(model="chat", messages=MESSAGES)
    await gw.gateway.pipeline.drain()
    # The same spend today is what closes the daily budget.
    await store.settle([Op("incr", f"{base}:usd:d:{today}", (100, 60))])
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.code == "insufficient_quota"
    assert await store.counter(f"{base}:tok:m:{this_month}") == 4  # this month: only the real request


@pytest.mark.parametrize(
    ("now", "day", "month", "day_left", "month_left"),
    [
        (dt.datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC), "20251231", "202512", 30, 30),
        (dt.datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC), "20260101", "202601", 86_400, 31 * 86_400),
        (dt.datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC), "20260131", "202601", 43_200, 43_200),
        (dt.datetime(2024, 2, 28, 12, 0, 0, tzinfo=UTC), "20240228", "202402", 43_200, 86_400 + 43_200),
        (dt.datetime(2025, 2, 28, 12, 0, 0, tzinfo=UTC), "20250228", "202502", 43_200, 43_200),
        (dt.datetime(2026, 4, 30, 23, 0, 0, tzinfo=UTC), "20260430", "202604", 3_600, 3_600),
        (dt.datetime(2026, 11, 30, 0, 0, 0, 500_000, tzinfo=UTC), "20261130", "202611", 86_399.5, 86_399.5),
    ],
    ids=["new-year-eve", "new-year", "jan-31", "leap-feb", "feb", "30-day-month", "nov-30"],
)
def test_budget_windows_follow_the_utc_calendar(
    now: dt.datetime, day: str, month: str, day_left: float, month_left: float
) -> None:
    assert windows(now) == (day, month, day_left, month_left)


def test_window_ids_change_exactly_at_utc_midnight() -> None:
    before = windows(dt.datetime(2025, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC))
    after = windows(dt.datetime(2026, 1, 1, tzinfo=UTC))
    assert (before[0], before[1]) == ("20251231", "202512")
    assert (after[0], after[1]) == ("20260101", "202601")
    assert before[2] == pytest.approx(1e-6)


async def test_budget_plans_stay_one_per_team_as_runtime_teams_are_re_read(upstream, make_gateway) -> None:
    """Issue #12 item 10: a runtime team is re-read from the store every second as a new object; each
    used to add a budget plan, so memory grew with uptime. Now there is one plan per team and key."""
    from plugins.quota import QuotaPlugin
    from tests.conftest import MASTER_KEY, tenancy_config

    gw = await make_gateway(tenancy_config(upstream.url, redis=False))
    status, _ = await gw.http("POST", "/admin/teams", MASTER_KEY, {"id": "rt", "budgets": {"daily_usd": 5}})
    assert status == 201
    status, made = await gw.http("POST", "/admin/keys", MASTER_KEY, {"team": "rt"})
    assert status == 201
    quota = next(p for p in gw.gateway.pipeline.plugins if isinstance(p, QuotaPlugin))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        status, _ = await gw.http("POST", "/v1/chat/completions", made["key"], body)
        assert status == 200
        await asyncio.sleep(1.05)  # past the team cache: the next request re-reads the team
    assert quota.plan_count == 1
