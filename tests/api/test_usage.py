"""``GET /api/v1/usage``: each team sees its own requests, tokens and cost — the numbers its SDK saw."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import defaultdict
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import openai
import orjson
import pytest

from gateway.limits.keys import usage as usage_key
from gateway.state.base import Op
from tests.conftest import MASTER_KEY, REDIS_URL, TEAM_B_KEY, TEAM_KEY, RunningGateway, tenancy_config
from tests.helpers import RedisProxy

MESSAGES = [{"role": "user", "content": "how many tokens is this?"}]
BACKENDS = pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
PRICING = {
    "chat": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
    "fast": {"input_per_mtok": 0.5, "output_per_mtok": 1.25},
}
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd")
JWT_SECRET = "usage-jwt-secret-" + "0123456789abcdef" * 3


def usage_config(upstream_url: str, *, redis: bool = True, **team_a: Any) -> dict[str, Any]:
    cfg = tenancy_config(upstream_url, redis=redis, **team_a)
    cfg["models"][0]["pricing"] = PRICING["chat"]
    cfg["models"].append(
        {
            "name": "fast",
            "targets": [{"provider": "primary", "model": "mock-fast"}],
            "pricing": PRICING["fast"],
        }
    )
    return cfg


async def get_usage(gw: RunningGateway, key: str | None, query: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gw.root}/api/v1/usage{query}", headers=headers) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


class Expected:
    """What the SDK was told, summed per model: the usage API must report the same."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0.0))

    def add(self, model: str, usage: Any) -> None:
        assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
        row = self.rows[model]
        row["requests"] += 1
        row["prompt_tokens"] += usage.prompt_tokens
        row["completion_tokens"] += usage.completion_tokens
        price = PRICING[model]
        row["cost_usd"] += (
            usage.prompt_tokens * price["input_per_mtok"] + usage.completion_tokens * price["output_per_mtok"]
        ) / 1e6

    def total(self) -> dict[str, float]:
        return {k: sum(row[k] for row in self.rows.values()) for k in FIELDS}


async def use(client: openai.AsyncOpenAI, expected: Expected, model: str, *, stream: bool = False) -> None:
    if stream:
        chunks = await client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        usage = [c.usage async for c in chunks if c.usage is not None]
        assert len(usage) == 1
        expected.add(model, usage[0])
    else:
        reply = await client.chat.completions.create(model=model, messages=MESSAGES)
        expected.add(model, reply.usage)


def assert_report(report: dict[str, Any], team: str, expected: Expected) -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert report["team"] == team
    assert report["end"] == today
    assert report["start"] <= today
    by_model: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in report["data"]:
        assert report["start"] <= row["date"] <= report["end"]
        for k in FIELDS:
            by_model[row["model"]][k] += row[k]
    assert set(by_model) == set(expected.rows)
    for model, want in expected.rows.items():
        got = by_model[model]
        for k in ("requests", "prompt_tokens", "completion_tokens"):
            assert got[k] == want[k], (model, k)
        assert got["cost_usd"] == pytest.approx(want["cost_usd"], rel=1e-6, abs=1e-9)
    total = expected.total()
    for k in ("requests", "prompt_tokens", "completion_tokens"):
        assert report["total"][k] == total[k], k
    assert report["total"]["cost_usd"] == pytest.approx(total["cost_usd"], rel=1e-6, abs=1e-9)
    assert report["total"]["cost_usd"] > 0


async def settled(gw: RunningGateway) -> None:
    await gw.gateway.pipeline.drain()


@BACKENDS
async def test_each_team_sees_its_own_usage(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(usage_config(upstream.url, redis=redis))
    a, b = Expected(), Expected()
    client_a, client_b = gw.client(api_key=TEAM_KEY), gw.client(api_key=TEAM_B_KEY)
    await use(client_a, a, "chat")
    await use(client_a, a, "chat", stream=True)
    await use(client_a, a, "fast")
    await use(client_a, a, "chat")
    await use(client_b, b, "fast")
    await use(client_b, b, "fast", stream=True)
    await settled(gw)

    status, report = await get_usage(gw, TEAM_KEY)
    assert status == 200, report
    assert_report(report, "team-a", a)
    assert report["total"]["requests"] == 4
    # Asking for its own team by name is the same report.
    status, same = await get_usage(gw, TEAM_KEY, "?team=team-a")
    assert status == 200
    assert same["data"] == report["data"]

    status, report = await get_usage(gw, TEAM_B_KEY)
    assert status == 200
    assert_report(report, "team-b", b)

    status, report = await get_usage(gw, MASTER_KEY, "?team=team-b")
    assert status == 200, report
    assert_report(report, "team-b", b)


@BACKENDS
async def test_a_runtime_key_counts_for_its_team(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(usage_config(upstream.url, redis=redis))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.root + "/admin/keys",
            json={"team": "team-a"},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as resp,
    ):
        key = (await resp.json())["key"]
    expected = Expected()
    await use(gw.client(api_key=key), expected, "chat")
    await use(gw.client(api_key=TEAM_KEY), expected, "chat", stream=True)
    await settled(gw)
    for caller in (key, TEAM_KEY):
        status, report = await get_usage(gw, caller)
        assert status == 200
        assert_report(report, "team-a", expected)


async def test_usage_access_rules(upstream, make_gateway) -> None:
    gw = await make_gateway(usage_config(upstream.url))
    b = Expected()
    await use(gw.client(api_key=TEAM_B_KEY), b, "chat")
    await settled(gw)

    status, body = await get_usage(gw, TEAM_KEY, "?team=team-b")
    assert status == 403
    assert body["error"]["type"] == "permission_error"
    assert "prompt_tokens" not in orjson.dumps(body).decode()

    status, body = await get_usage(gw, MASTER_KEY)
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "team"

    for key in (None, "wrong-key-0123456789"):
        status, body = await get_usage(gw, key, "?team=team-b")
        assert status == 401
        assert body["error"]["type"] == "authentication_error"

    # A team that made no calls has an empty, well-formed report.
    status, report = await get_usage(gw, TEAM_KEY)
    assert status == 200
    assert report["data"] == []
    assert report["total"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0}


async def test_refused_requests_cost_nothing(upstream, make_gateway) -> None:
    gw = await make_gateway(usage_config(upstream.url, models=["chat"], limits={"rpm": 2}))
    expected = Expected()
    client = gw.client(api_key=TEAM_KEY)
    await use(client, expected, "chat")
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="fast", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="chat", messages=[])
    await use(client, expected, "chat")
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    await settled(gw)
    status, report = await get_usage(gw, TEAM_KEY)
    assert status == 200
    assert_report(report, "team-a", expected)


async def test_usage_date_range(upstream, make_gateway) -> None:
    gw = await make_gateway(usage_config(upstream.url))
    expected = Expected()
    await use(gw.client(api_key=TEAM_KEY), expected, "chat")
    await settled(gw)
    today = dt.datetime.now(dt.UTC).date()
    status, report = await get_usage(gw, TEAM_KEY, f"?start={today}&end={today}")
    assert status == 200
    assert (report["start"], report["end"]) == (today.isoformat(), today.isoformat())
    assert_report(report, "team-a", expected)
    earlier = today - dt.timedelta(days=30)
    status, report = await get_usage(gw, TEAM_KEY, f"?start={earlier}&end={earlier + dt.timedelta(days=5)}")
    assert status == 200
    assert report["data"] == []
    assert report["total"]["requests"] == 0
    for query in (
        "?start=yesterday",
        "?end=2026-13-01",
        f"?start={today}&end={earlier}",
        "?start=2000-01-01",
    ):
        status, body = await get_usage(gw, TEAM_KEY, query)
        assert status == 400, query
        assert body["error"]["type"] == "invalid_request_error"


async def test_usage_with_jwts(upstream, make_gateway) -> None:
    cfg = usage_config(upstream.url)
    cfg["auth"] = {"jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET, "audience": "gw", "issuer": "idp"}}
    gw = await make_gateway(cfg)

    def token(**claims: Any) -> str:
        now = int(time.time())
        return jwt.encode(
            {"aud": "gw", "iss": "idp", "exp": now + 60, **claims}, JWT_SECRET, algorithm="HS256"
        )

    b = Expected()
    await use(gw.client(api_key=token(team="team-b")), b, "fast")
    await settled(gw)
    status, report = await get_usage(gw, token(team="team-b"))
    assert status == 200
    assert_report(report, "team-b", b)
    status, _ = await get_usage(gw, token(team="team-a"), "?team=team-b")
    assert status == 403
    status, report = await get_usage(gw, token(role="admin"), "?team=team-b")
    assert status == 200
    assert_report(report, "team-b", b)
    status, _ = await get_usage(gw, token(role="admin"))
    assert status == 400


@pytest.mark.parametrize(
    "query",
    ["end=0001-01-01", "start=0001-01-01&end=0001-01-03", "start=9999-12-31&end=9999-12-31"],
)
async def test_dates_at_the_calendars_ends_are_a_400(upstream, make_gateway, query: str) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=False))
    status, body = await gw.http("GET", f"/api/v1/usage?{query}", TEAM_KEY)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


class TurnCounter(RedisProxy):
    """A TCP proxy in front of Redis that counts round trips on the wire, per connection: a turn is
    the client sending after it last heard from Redis (or for the first time). Commands pipelined in
    one go are one turn whatever their number; commands each waiting for the previous reply are one
    turn each. It counts what the gateway does, not how (redis-py, the hot path's pipe, a script)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.turns = 0

    def to_redis(self, state: dict[str, Any], data: bytes) -> bytes:
        if not state.get("waiting"):  # the client has not sent since Redis last answered
            self.turns += 1
            state["waiting"] = True
        return data

    def to_client(self, state: dict[str, Any], data: bytes) -> bytes:
        state["waiting"] = False
        return data


async def test_a_years_report_is_one_round_trip(upstream, make_gateway) -> None:
    """A 366-day report costs Redis a bounded few round trips, not one per day.

    Measured on the wire: every connection of the gateway to Redis goes through ``TurnCounter``,
    which counts turns (the client writing after Redis last answered). This measures round trips
    whatever carries them, where ``INFO commandstats`` would only count commands (366 HGETALLs are
    366 calls whether sent one by one, pipelined or run by a script). One day at a time — the old
    loop — is 366 turns; reading every day at once is one, and the usage API's rate limit one more
    (an admission script). Bytes sent in one go but split across two reads, with a reply in between,
    would count twice: hence at most 3. That every day was read shows in the first and last day's rows."""
    url = urlsplit(REDIS_URL)
    proxy = TurnCounter(url.hostname or "127.0.0.1", url.port or 6379)
    await proxy.start()
    try:
        cfg = usage_config(upstream.url)
        prefix = cfg["redis"]["prefix"]
        cfg["redis"]["url"] = proxy.url
        gw = await make_gateway(cfg)
        end = dt.datetime.now(dt.UTC).date()
        start = end - dt.timedelta(days=365)
        ops = [
            Op("usage", usage_key(prefix, "team-a", d.strftime("%Y%m%d")), ("chat", 10, 5, 0.25, 3600))
            for d in (start, end)
        ]
        await gw.gateway.store.settle(ops)
        query = f"?start={start}&end={end}"
        status, warm = await get_usage(gw, TEAM_KEY, query)  # connections opened, scripts loaded
        assert status == 200, warm
        before = proxy.turns
        status, report = await get_usage(gw, TEAM_KEY, query)
        turns = proxy.turns - before
        assert status == 200, report
        assert report == warm
        assert [row["date"] for row in report["data"]] == [start.isoformat(), end.isoformat()]
        assert report["total"]["requests"] == 2
        assert 1 <= turns <= 3, turns
    finally:
        await proxy.stop()


@BACKENDS
async def test_a_range_over_366_days_is_a_400(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(usage_config(upstream.url, redis=redis))
    end = dt.date(2028, 12, 31)
    status, report = await get_usage(gw, TEAM_KEY, f"?start=2028-01-01&end={end}")  # a leap year: 366
    assert status == 200, report
    for start in (end - dt.timedelta(days=366), dt.date(2000, 1, 1)):
        status, body = await get_usage(gw, TEAM_KEY, f"?start={start}&end={end}")
        assert status == 400, start
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["param"] == "start"
        assert "366 days" in body["error"]["message"]


async def burst(gw: RunningGateway, key: str, queries: list[str]) -> tuple[list[int], list[Any], float]:
    """One usage call per query, all at once: their statuses and refusals (headers, body), and how
    long it took."""
    headers = {"Authorization": f"Bearer {key}"}
    refused: list[Any] = []

    async def one(session: aiohttp.ClientSession, query: str) -> int:
        async with session.get(f"{gw.root}/api/v1/usage{query}", headers=headers) as resp:
            body = orjson.loads(await resp.read())
            if resp.status == 429:
                refused.append((resp.headers, body))
            return resp.status

    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(one(session, q) for q in queries))
    return list(statuses), refused, time.monotonic() - began


@BACKENDS
async def test_the_usage_api_is_rate_limited(upstream, make_gateway, redis) -> None:
    """60 a minute per team, whatever its completion rpm (and without taking from it); 120 a minute
    per instance for admin callers, whichever teams they read. A refusal is OpenAI's 429 with
    Retry-After. The buckets refill (2 and 1 a second) while a burst runs: hence the allowance for
    its duration. No 503 either: a burst of reports waits for the store's pooled connections."""
    gw = await make_gateway(usage_config(upstream.url, redis=redis, limits={"rpm": 2}))
    statuses, refused, took = await burst(gw, MASTER_KEY, ["?team=team-a", "?team=team-b"] * 70)
    ok = statuses.count(200)
    assert 120 <= ok <= 120 + 2 * int(took) + 2, (ok, took)
    assert set(statuses) == {200, 429}
    assert refused and int(refused[0][0]["Retry-After"]) >= 1

    # The team's own bucket is whole: the admin's calls reading it took none of its tokens.
    statuses, refused, took = await burst(gw, TEAM_KEY, [""] * 75)
    ok = statuses.count(200)
    assert 60 <= ok <= 60 + int(took) + 1, (ok, took)
    assert set(statuses) == {200, 429}
    headers, body = refused[0]
    assert int(headers["Retry-After"]) >= 1
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "usage API" in body["error"]["message"]

    # The team's completions are untouched (rpm 2: both still pass), and so is another team.
    client = gw.client(api_key=TEAM_KEY)
    for _ in range(2):
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert (await get_usage(gw, TEAM_B_KEY))[0] == 200


@BACKENDS
async def test_a_weeks_report_is_unchanged(upstream, make_gateway, redis) -> None:
    """The report reads all days at once now; its JSON is exactly what the day-by-day loop made."""
    cfg = usage_config(upstream.url, redis=redis)
    prefix = cfg["redis"]["prefix"] if redis else "llmgw"
    gw = await make_gateway(cfg)

    def book(day: str, model: str, prompt: int, completion: int, cost: float, team: str = "team-a") -> Op:
        return Op("usage", usage_key(prefix, team, day), (model, prompt, completion, cost, 3600))

    await gw.gateway.store.settle(
        [
            book("20260301", "chat", 100, 20, 0.0006),  # the day before the range: not reported
            book("20260302", "fast", 7, 3, 0.00000725),
            book("20260302", "chat", 12, 4, 0.000096),
            book("20260302", "chat", 30, 0, 0.00009),
            book("20260305", "chat", 0, 0, 0),  # a cache hit: a request, no tokens
            book("20260308", "fast", 1, 1, 0.00000175),
            book("20260309", "chat", 5, 5, 0.00009),  # the day after
            book("20260304", "chat", 50, 50, 1.0, team="team-b"),  # another team
        ]
    )
    status, report = await get_usage(gw, TEAM_KEY, "?start=2026-03-02&end=2026-03-08")
    assert status == 200, report
    assert report == {
        "object": "usage",
        "team": "team-a",
        "start": "2026-03-02",
        "end": "2026-03-08",
        "data": [
            {
                "date": "2026-03-02",
                "model": "chat",
                "requests": 2,
                "prompt_tokens": 42,
                "completion_tokens": 4,
                "cost_usd": 0.000186,
            },
            {
                "date": "2026-03-02",
                "model": "fast",
                "requests": 1,
                "prompt_tokens": 7,
                "completion_tokens": 3,
                "cost_usd": 0.00000725,
            },
            {
                "date": "2026-03-05",
                "model": "chat",
                "requests": 1,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost_usd": 0,
            },
            {
                "date": "2026-03-08",
                "model": "fast",
                "requests": 1,
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "cost_usd": 0.00000175,
            },
        ],
        "total": {"requests": 5, "prompt_tokens": 50, "completion_tokens": 8, "cost_usd": 0.000195},
    }
