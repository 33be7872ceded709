"""Redis killed and restarted under a running gateway: limits fail open (with a per-instance local
limiter), budgets fail closed, nothing answers 500, logs stay quiet, and the spend of the outage is
replayed into Redis once it is back."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from gateway.limits.limiter import Limiter
from gateway.state.base import Op, new_settle_id
from gateway.state.redis import RedisStore
from tests.conftest import MASTER_KEY, TEAM_B_KEY, TEAM_KEY, RunningGateway, tenancy_config
from tests.helpers import PrivateRedis, RedisProxy, eventually, free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]  # $4 and 4 tokens at the mock with the prices below


def outage_config(upstream_url: str, server: PrivateRedis, **redis_options: Any) -> dict[str, Any]:
    """team-a: a parallel limit and a $3 daily budget; team-b: rate limits only (rpm 3)."""
    cfg = tenancy_config(upstream_url, limits={"max_parallel": 5}, budgets={"daily_usd": 3})
    cfg["teams"][1]["limits"] = {"rpm": 3}
    cfg["redis"].update(url=server.url, **redis_options)
    pricing = {"input_per_mtok": 1_000_000.0, "output_per_mtok": 1_000_000.0}
    cfg["models"][0]["pricing"] = pricing
    cfg["models"].append(
        {
            "name": "slow",
            "targets": [{"provider": "primary", "model": "mock-chat:chunks=4,chunk_delay=0.15"}],
            "pricing": pricing,
        }
    )
    return cfg


async def chat(
    gw: RunningGateway, key: str, model: str = "chat", content: str = "hi"
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": content}]},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)


async def usage(gw: RunningGateway, team: str) -> dict[str, Any]:
    await gw.gateway.pipeline.drain()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.root + "/api/v1/usage",
            params={"team": team},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        total: dict[str, Any] = (await r.json())["total"]
        return total


def redis_errors() -> float:
    return REGISTRY.get_sample_value("llm_gateway_redis_errors_total", {"operation": "script"}) or 0.0


def redis_log_events(gw: RunningGateway) -> list[str]:
    return [line["event"] for line in gw.log_lines() if "redis" in str(line.get("event", ""))]


async def test_redis_killed_and_restarted_mid_run(
    upstream, make_gateway, private_redis: PrivateRedis
) -> None:
    gw = await make_gateway(outage_config(upstream.url, private_redis))
    assert (await chat(gw, TEAM_B_KEY))[0] == 200
    # A team-a stream is admitted while Redis is up, and ends while it is down.
    stream = await gw.client(api_key=TEAM_KEY).chat.completions.create(
        model="slow", messages=MESSAGES, stream=True
    )
    await stream.__anext__()
    errors_before = redis_errors()
    private_redis.kill()
    async for _ in stream:
        pass

    # Rate limits fail open onto the instance's own limiter, which still enforces rpm=3.
    started = time.monotonic()
    outage = [await chat(gw, TEAM_B_KEY) for _ in range(4)]
    assert [status for status, _, _ in outage] == [200, 200, 200, 429]
    _, headers, body = outage[3]
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["Retry-After"]) >= 1
    # Budgets fail closed: a clear 503, never a 500, and the upstream is not called.
    calls = len(upstream.state.requests)
    for _ in range(3):
        status, _, body = await chat(gw, TEAM_KEY)
        assert status == 503
        assert body["error"]["code"] == "state_store_unavailable"
        assert "budget" in body["error"]["message"]
    assert len(upstream.state.requests) == calls
    assert time.monotonic() - started < 2  # failing over does not wait on Redis for each request
    assert redis_errors() >= errors_before + 7
    await gw.gateway.pipeline.drain()
    assert redis_log_events(gw) == ["redis_unavailable"]  # once per interval, not once per request

    private_redis.start()

    async def admitted() -> bool:  # the local rpm bucket is spent: 200 means Redis
        return (await chat(gw, TEAM_B_KEY))[0] == 200

    await eventually(admitted, within=3, interval=0.05, message="requests are not admitted from Redis again")
    # The outage's spend was replayed: the stream's $4 is in team-a's books and closes its $3 budget.
    team_a = await usage(gw, "team-a")
    assert (team_a["requests"], team_a["cost_usd"], team_a["completion_tokens"]) == (1, 4.0, 3)
    assert (await usage(gw, "team-b"))["requests"] == 4  # 3 served during the outage + 1 after
    status, _, body = await chat(gw, TEAM_KEY)
    assert (status, body["error"]["type"]) == (429, "insufficient_quota")
    assert redis_log_events(gw) == ["redis_unavailable", "redis_recovered"]


async def test_limits_fail_closed_when_configured(
    upstream, make_gateway, private_redis: PrivateRedis
) -> None:
    gw = await make_gateway(outage_config(upstream.url, private_redis, fail_open_limits=False))
    assert (await chat(gw, TEAM_B_KEY))[0] == 200
    private_redis.kill()
    for _ in range(2):
        status, _, body = await chat(gw, TEAM_B_KEY)
        assert status == 503
        assert (body["error"]["type"], body["error"]["code"]) == (
            "service_unavailable",
            "state_store_unavailable",
        )
        assert "rate limits" in body["error"]["message"]
    private_redis.start()

    async def served() -> bool:
        return (await chat(gw, TEAM_B_KEY))[0] == 200

    await eventually(served, within=3, interval=0.05)


async def test_budgets_may_fail_open_when_configured(
    upstream, make_gateway, private_redis: PrivateRedis
) -> None:
    gw = await make_gateway(outage_config(upstream.url, private_redis, fail_open_budgets=True))
    private_redis.kill()
    statuses = [(await chat(gw, TEAM_KEY))[0] for _ in range(2)]
    assert statuses == [200, 200]


async def test_outage_spend_is_replayed_exactly_once(
    upstream, make_gateway, private_redis: PrivateRedis
) -> None:
    cfg = outage_config(upstream.url, private_redis)
    cfg["teams"][1]["limits"] = {"rpm": 100}
    gw = await make_gateway(cfg)
    private_redis.kill()
    tokens = 0
    for text in ("a" * 4, "b" * 40, "c" * 120, "d" * 400):  # requests of different sizes
        status, _, body = await chat(gw, TEAM_B_KEY, content=text)
        assert status == 200
        tokens += body["usage"]["total_tokens"]
    private_redis.start()
    # Several requests finish at once right after the restart: each outage request is booked once.
    after = await asyncio.gather(*(chat(gw, TEAM_B_KEY) for _ in range(5)))
    assert [status for status, _, _ in after] == [200] * 5
    tokens += sum(body["usage"]["total_tokens"] for _, _, body in after)
    total = await usage(gw, "team-b")
    assert total["requests"] == 9
    assert total["prompt_tokens"] + total["completion_tokens"] == tokens


async def test_a_slot_released_during_the_outage_is_free_once_redis_is_back(
    upstream, make_gateway, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path, persistent=True)  # Redis comes back with its data
    server.start()
    try:
        cfg = outage_config(upstream.url, server)
        cfg["teams"][1]["limits"] = {"max_parallel": 1}
        gw = await make_gateway(cfg)
        stream = await gw.client(api_key=TEAM_B_KEY).chat.completions.create(
            model="slow", messages=MESSAGES, stream=True
        )
        await stream.__anext__()
        server.kill()
        async for _ in stream:  # ends while Redis is down: its slot is released in the backlog
            pass
        await gw.gateway.pipeline.drain()
        server.start()
        restarted = time.monotonic()
        while (status := (await chat(gw, TEAM_B_KEY))[0]) != 200:
            assert status == 429
            assert time.monotonic() - restarted < 3, "the slot of a finished request is still held"
            await asyncio.sleep(0.1)
    finally:
        server.kill()


async def test_a_quick_redis_restart_fails_no_request(
    upstream, make_gateway, private_redis: PrivateRedis
) -> None:
    cfg = outage_config(upstream.url, private_redis)
    cfg["teams"][0].update(limits={"rpm": 1000}, budgets={"daily_usd": 1000})
    gw = await make_gateway(cfg)
    # Concurrent traffic leaves several pooled connections to Redis...
    assert {s for s, _, _ in await asyncio.gather(*(chat(gw, TEAM_KEY) for _ in range(8)))} == {200}
    await gw.gateway.pipeline.drain()
    errors = redis_errors()
    private_redis.kill()  # ... which all die with it, and Redis is back before the next request.
    private_redis.start()
    for _ in range(2):
        statuses = [s for s, _, _ in await asyncio.gather(*(chat(gw, TEAM_KEY) for _ in range(8)))]
        assert statuses == [200] * 8  # a budget team is never told the store is unavailable
    assert redis_errors() == errors
    assert redis_log_events(gw) == []


class ReplyDropper(RedisProxy):
    """A TCP proxy in front of Redis that, when armed, cuts the connection carrying the next integer
    reply (what settle.lua answers) instead of delivering it: Redis ran the settlement, the gateway
    never hears so."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.armed = False
        self.dropped = 0

    def to_client(self, state: dict[str, Any], data: bytes) -> bytes | None:
        if self.armed and data.startswith(b":"):
            self.armed = False
            self.dropped += 1
            return None  # the reply is never delivered; both connections are cut
        return data


async def test_a_settlement_whose_reply_is_lost_is_booked_once(
    upstream, make_gateway, private_redis: PrivateRedis
) -> None:
    proxy = ReplyDropper(private_redis.port)
    await proxy.start()
    try:
        cfg = outage_config(upstream.url, private_redis)
        cfg["redis"]["url"] = proxy.url
        gw = await make_gateway(cfg)
        assert (await chat(gw, TEAM_B_KEY))[0] == 200
        await gw.gateway.pipeline.drain()
        proxy.armed = True  # the next settlement runs in Redis, but its reply never arrives
        assert (await chat(gw, TEAM_B_KEY))[0] == 200
        await gw.gateway.pipeline.drain()
        assert proxy.dropped == 1
        assert (await chat(gw, TEAM_B_KEY))[0] == 200  # reconnects; the lost one is replayed
        total = await usage(gw, "team-b")
        assert total["requests"] == 3  # not 4: the replay was recognised
    finally:
        await proxy.stop()


@pytest.mark.parametrize("error", ["LOADING Redis is loading the dataset in memory", "READONLY replica"])
async def test_a_redis_that_is_not_ready_counts_as_unavailable_and_loses_nothing(error: str) -> None:
    # A Redis restarting with persistence answers -LOADING for a while, a replica after a failover
    # -READONLY: nothing ran, so admissions take the fail-open/closed path and settlements wait for the
    # replay instead of being dropped. After READONLY the gateway reconnects (the name may now lead to
    # the new primary); after LOADING it keeps its connection.
    import hiredis

    from gateway.state.base import Check, Op, StoreScriptError, StoreUnavailable
    from gateway.state.redis import RedisStore

    open_writers: list[asyncio.StreamWriter] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def loading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        open_writers.append(writer)
        commands = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                commands.feed(data)
                while commands.gets() is not False:
                    writer.write(b"-" + error.encode() + b"\r\n")
        finally:
            writer.transport.abort()
            handlers.discard(task)

    server = await asyncio.start_server(loading, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", "t", timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await store.admit([Check("budget", "t:{team}:usd", 5.0, "budget")])
        assert not isinstance(raised.value, StoreScriptError)  # "unavailable", not "a bad call"
        failed: list[object] = []
        ops = [Op("incr", "t:{team}:usd", (1.0, 60))]
        sent = store.settle_soon(ops, failed.append, "id-1")
        await store.settled()
        if error.startswith("READONLY"):
            assert not sent  # the connection was dropped: the waiting path reconnects first
            with pytest.raises(StoreUnavailable):
                await store.admit([Check("budget", "t:{team}:usd", 5.0, "budget")])
            assert len(open_writers) == 2  # a new connection
        else:
            assert sent and failed == [ops]  # handed back for the replay, not dropped
            assert len(open_writers) == 1
    finally:
        await store.close()
        server.close()
        for writer in open_writers:
            writer.transport.abort()
        while handlers:
            await asyncio.sleep(0.01)


async def test_a_replay_pass_that_books_nothing_keeps_everything_and_waits_before_the_next() -> None:
    port = free_port()  # a port nobody listens on: Redis is down
    store = RedisStore(f"redis://127.0.0.1:{port}/0", "t-backoff", timeout=0.2)
    limiter = Limiter(store)
    entries = [(new_settle_id(), [Op("incr", "t-backoff:{team}:usd", (float(i), 60))]) for i in range(2500)]
    limiter.backlog.extend(entries)
    try:
        limiter._replay_soon()
        first = limiter.replay_task
        assert first is not None
        await first
        assert list(limiter.backlog) == entries  # nothing lost, nothing reordered
        assert REGISTRY.get_sample_value("llm_gateway_settlement_backlog") == 2500  # what operators see
        # Admissions served by the local limiter keep asking for a replay: no new pass for a second,
        # so a long backlog is not walked again on every request while Redis is down.
        limiter._replay_soon()
        assert limiter.replay_task is first
        await asyncio.sleep(1.2)  # ... but a pass does run again after it, with no trigger at all
        second = limiter.replay_task
        assert second is not first
        await second
        assert list(limiter.backlog) == entries
        limiter.close()  # shutting down: no more passes against a store about to close
        await asyncio.sleep(1.2)
        assert limiter.replay_task is second
    finally:
        await store.close()


async def test_a_replay_cancelled_while_booking_an_entry_keeps_it() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)  # takes the command, never answers
        await done.wait()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", "t-cancel", timeout=5.0)
    limiter = Limiter(store)
    entries = [(new_settle_id(), [Op("incr", "t-cancel:{team}:usd", (1.0, 60))]) for _ in range(3)]
    limiter.backlog.extend(entries)
    try:
        limiter._replay_soon()
        task = limiter.replay_task
        assert task is not None
        await asyncio.sleep(0.2)  # the first entry is on its way to the (silent) store
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert list(limiter.backlog) == entries  # the one being booked is kept, in its place
    finally:
        await store.close()
        done.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # the handler closes its side


async def test_a_runtime_key_is_served_from_memory_only_for_a_bounded_time_during_an_outage(
    upstream, make_gateway, private_redis: PrivateRedis
) -> None:
    """Issue #12: a key revoked just before an outage must not work for the whole outage."""
    cfg = tenancy_config(upstream.url)
    cfg["redis"].update(url=private_redis.url, timeout_seconds=0.2)
    cfg["auth"] = {"max_stale_seconds": 1.0}
    cfg["plugins"] = ["auth"]
    gw = await make_gateway(cfg)
    status, made = await gw.http("POST", "/admin/keys", MASTER_KEY, {"team": "team-a"})
    assert status == 201
    assert (await chat(gw, made["key"]))[0] == 200  # read from Redis, remembered
    private_redis.kill()
    assert (await chat(gw, made["key"]))[0] == 200  # the outage has just begun: the last answer serves
    await asyncio.sleep(1.2)
    status, _, body = await chat(gw, made["key"])
    assert status == 503 and body["error"]["code"] == "state_store_unavailable"
    assert (await chat(gw, TEAM_KEY))[0] == 200  # config keys need no lookup


async def test_a_refused_admission_script_is_an_error_not_the_fail_open_path() -> None:
    """A script Redis refuses (a bug, a bad argument) must not admit requests without their limits:
    only an unreachable store takes the fail-open path (issue #13: StoreScriptError was a kind of
    StoreUnavailable)."""
    import hiredis

    from gateway.limits.limiter import Limiter
    from gateway.state.base import Check, StoreScriptError
    from gateway.state.redis import RedisStore

    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        commands = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                commands.feed(data)
                while commands.gets() is not False:
                    writer.write(b"-ERR user_script:1: Script attempted to access nonexistent global\r\n")
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(refusing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", "t", timeout=0.5)
    limiter = Limiter(store, fail_open_limits=True)
    try:
        with pytest.raises(StoreScriptError):
            await limiter.take([Check("bucket", "t:{team}:rpm", 1, "rpm", rate=1 / 60, cost=1)])
    finally:
        limiter.close()
        await store.close()
        server.close()
        await server.wait_closed()
