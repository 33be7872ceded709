"""The admit/settle semantics every limit relies on, on both state backends.

Each test runs against ``MemoryStore`` (one instance) and ``RedisStore`` (a real Redis, a key
namespace of its own): both must behave the same, since the gateway swaps one for the other.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from gateway.state.base import Check, Op, Store
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from tests.conftest import REDIS_URL


@dataclass
class Backend:
    store: Store
    prefix: str

    def key(self, name: str) -> str:
        return f"{self.prefix}:{{team}}:{name}"


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    prefix = f"s{uuid.uuid4().hex[:12]}"
    if request.param == "memory":
        yield Backend(MemoryStore(), prefix)
        return
    store = RedisStore(REDIS_URL, prefix)
    yield Backend(store, prefix)
    await store.close()
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def bucket(key: str, limit: float, rate: float, cost: float = 1, label: str = "rpm") -> Check:
    return Check("bucket", key, limit, label, rate=rate, cost=cost)


def slot(key: str, limit: int, member: str, stale_ms: int = 60_000) -> Check:
    return Check("parallel", key, limit, "parallel", member=member, stale_ms=stale_ms)


def budget(key: str, limit: float, window_ms: int = 5_000) -> Check:
    return Check("budget", key, limit, "budget", ends_ms=int(time.time() * 1000) + window_ms)


async def test_bucket_takes_until_empty_then_refills_over_time(backend: Backend) -> None:
    store, key = backend.store, backend.key("rpm")
    check = bucket(key, limit=3, rate=5)  # 3 tokens, one more every 200 ms
    remaining = []
    for _ in range(3):
        decision = await store.admit([check])
        assert decision.failed is None
        remaining.append(decision.remaining[0][0])
    assert remaining == [2, 1, 0]
    refused = await store.admit([check])
    assert refused.failed == check
    assert 0 < refused.retry_after <= 0.21  # at most one token's refill time
    await asyncio.sleep(refused.retry_after + 0.03)
    assert (await store.admit([check])).failed is None
    assert (await store.admit([check])).failed == check  # one token came back, not the whole bucket


async def test_reset_reports_the_time_until_the_bucket_is_full_again(backend: Backend) -> None:
    decision = await backend.store.admit([bucket(backend.key("tpm"), limit=100, rate=10, cost=40)])
    remaining, reset = decision.remaining[0]
    assert remaining == 60
    assert 3.9 <= reset <= 4.01  # 40 tokens at 10 per second


async def test_a_cost_above_the_capacity_is_refused_for_good(backend: Backend) -> None:
    store = backend.store
    decision = await store.admit([bucket(backend.key("tpm"), limit=100, rate=100, cost=101)])
    assert decision.failed is not None
    assert decision.retry_after < 0  # waiting would never help
    # Nothing was taken: the whole capacity is still there.
    assert (await store.admit([bucket(backend.key("tpm"), 100, 100, cost=100)])).failed is None


async def test_admission_is_all_or_nothing(backend: Backend) -> None:
    store = backend.store
    rpm, par, usd = backend.key("rpm"), backend.key("par"), backend.key("usd")
    await store.settle([Op("incr", usd, (1.0, 60))])  # the budget is spent
    checks = [bucket(rpm, 5, 0.001), slot(par, 1, "req-1"), budget(usd, 1.0, window_ms=7_000)]
    decision = await store.admit(checks)
    assert decision.failed == checks[2]
    assert decision.retry_after == pytest.approx(7.0, abs=0.5)  # the time left in the budget's window
    # Neither the bucket nor the parallel slot was taken by the refused request.
    again = await store.admit([bucket(rpm, 5, 0.001)])
    assert again.remaining[0][0] == 4
    assert (await store.admit([slot(par, 1, "req-2")])).failed is None

    # A failing check in the middle: the ones before and after it are untouched too.
    tpm = backend.key("tpm")
    checks = [bucket(rpm, 5, 0.001), bucket(tpm, 10, 0.001, cost=11), slot(par, 2, "req-3")]
    decision = await store.admit(checks)
    assert decision.failed == checks[1]
    assert (await store.admit([bucket(rpm, 5, 0.001)])).remaining[0][0] == 3  # 5 - 1 - 1
    assert (await store.admit([slot(par, 2, "req-4")])).failed is None  # req-2 + req-4, not req-3


async def test_first_failing_check_decides_the_answer(backend: Backend) -> None:
    store = backend.store
    rpm, tpm = backend.key("rpm"), backend.key("tpm")
    await store.admit([bucket(rpm, 1, 0.001)])
    await store.admit([bucket(tpm, 5, 0.001, cost=5)])
    checks = [bucket(rpm, 1, 0.001), bucket(tpm, 5, 0.001, cost=5)]
    decision = await store.admit(checks)
    assert decision.failed == checks[0]
    assert len(decision.remaining) == 2  # every check still reports its level (for the headers)


async def test_parallel_slots_are_added_released_and_reported(backend: Backend) -> None:
    store, par = backend.store, backend.key("par")
    first = await store.admit([slot(par, 2, "a")])
    second = await store.admit([slot(par, 2, "b")])
    assert first.failed is None and second.failed is None
    assert [first.remaining[0][0], second.remaining[0][0]] == [1, 0]
    third = await store.admit([slot(par, 2, "c")])
    assert third.failed is not None
    assert third.retry_after == pytest.approx(1.0)
    await store.settle([Op("release", par, ("a",))])
    assert (await store.admit([slot(par, 2, "c")])).failed is None
    await store.settle([Op("release", par, ("never-admitted",))])  # harmless
    assert (await store.admit([slot(par, 2, "d")])).failed is not None


async def test_a_slot_left_behind_expires_after_its_stale_time(backend: Backend) -> None:
    store, par = backend.store, backend.key("par")
    assert (await store.admit([slot(par, 1, "crashed", stale_ms=300)])).failed is None
    assert (await store.admit([slot(par, 1, "next", stale_ms=300)])).failed is not None
    await asyncio.sleep(0.4)  # the instance holding "crashed" never released it
    assert (await store.admit([slot(par, 1, "next", stale_ms=300)])).failed is None


async def test_budget_counters_add_up_and_refuse_once_reached(backend: Backend) -> None:
    store, usd = backend.store, backend.key("usd")
    assert await store.counter(usd) == 0
    await store.settle([Op("incr", usd, (0.4, 60))])
    await store.settle([Op("incr", usd, (0.35, 60))])
    assert await store.counter(usd) == pytest.approx(0.75)
    allowed = await store.admit([budget(usd, 1.0)])
    assert allowed.failed is None
    await store.settle([Op("incr", usd, (0.25, 60))])
    refused = await store.admit([budget(usd, 1.0, window_ms=3_600_000)])
    assert refused.failed is not None and refused.failed.label == "budget"
    assert refused.retry_after == pytest.approx(3600, abs=0.5)
    assert await store.counter(usd) == pytest.approx(1.0)  # a refusal adds nothing


async def test_refund_is_capped_at_capacity(backend: Backend) -> None:
    store, tpm = backend.store, backend.key("tpm")
    assert (await store.admit([bucket(tpm, 10, 0.001, cost=4)])).remaining[0][0] == 6
    await store.settle([Op("bucket", tpm, (10, 0.001, -100))])  # a refund far larger than what was taken
    decision = await store.admit([bucket(tpm, 10, 0.001, cost=1)])
    assert decision.remaining[0][0] == 9
    # A refund never lets more than the capacity through at once.
    assert (await store.admit([bucket(tpm, 10, 0.001, cost=10)])).failed is not None


async def test_usage_above_the_reservation_is_taken_as_debt(backend: Backend) -> None:
    store, tpm = backend.store, backend.key("tpm")
    assert (await store.admit([bucket(tpm, 10, 1, cost=2)])).failed is None
    await store.settle([Op("bucket", tpm, (10, 1, 13))])  # used 15 where 2 were reserved
    refused = await store.admit([bucket(tpm, 10, 1, cost=1)])
    assert refused.failed is not None
    assert 5.5 <= refused.retry_after <= 6.01  # from -5 back to 1 token at 1 per second


async def test_usage_report_fields_accumulate(backend: Backend) -> None:
    store, report = backend.store, backend.key("usage:20260101")
    await store.settle([Op("usage", report, ("chat", 10, 5, 0.5, 60))])
    await store.settle([Op("usage", report, ("chat", 3, 0, 0.25, 60))])
    await store.settle([Op("usage", backend.key("usage:20260103"), ("fast", 1, 2, 0.125, 60))])
    # Any number of days in one call, in the order asked; a day with nothing booked is empty.
    assert await store.usage_many([report, backend.key("usage:20260102"), backend.key("usage:20260103")]) == [
        {
            "chat|requests": 2.0,
            "chat|prompt_tokens": 13.0,
            "chat|completion_tokens": 5.0,
            "chat|cost_usd": 0.75,
        },
        {},
        {
            "fast|requests": 1.0,
            "fast|prompt_tokens": 1.0,
            "fast|completion_tokens": 2.0,
            "fast|cost_usd": 0.125,
        },
    ]
    assert await store.usage_many([]) == []


async def test_one_settlement_applies_every_step(backend: Backend) -> None:
    store = backend.store
    tpm, par, usd = backend.key("tpm"), backend.key("par"), backend.key("usd")
    admitted = await store.admit([bucket(tpm, 100, 0.001, cost=50), slot(par, 1, "r1")])
    assert admitted.failed is None
    await store.settle(
        [Op("bucket", tpm, (100, 0.001, -30)), Op("release", par, ("r1",)), Op("incr", usd, (0.01, 60))]
    )
    after = await store.admit([bucket(tpm, 100, 0.001, cost=1), slot(par, 1, "r2")])
    assert after.failed is None
    assert after.remaining[0][0] == 79  # 100 - 20 used - 1
    assert await store.counter(usd) == pytest.approx(0.01)


async def test_settle_soon_is_applied_before_a_later_admission(backend: Backend) -> None:
    # The gateway sends a request's settlement without waiting for it: the next admission of the same
    # instance must still find the slot free and the tokens refunded (one ordered connection).
    store = backend.store
    tpm, par = backend.key("tpm"), backend.key("par")
    await store.admit([bucket(tpm, 100, 0.001, cost=90), slot(par, 1, "r1")])
    failures: list[object] = []
    assert store.settle_soon(
        [Op("bucket", tpm, (100, 0.001, -80)), Op("release", par, ("r1",))], failures.append
    )
    after = await store.admit([bucket(tpm, 100, 0.001, cost=50), slot(par, 1, "r2")])
    assert after.failed is None
    await store.settled()
    assert failures == []


async def test_settle_soon_survives_a_flushed_script_cache() -> None:
    prefix = f"s{uuid.uuid4().hex[:12]}"
    store = RedisStore(REDIS_URL, prefix)
    usd = f"{prefix}:{{team}}:usd"
    try:
        await store.admit([budget(usd, 10)])  # connects the pipe and loads the scripts
        client = aioredis.Redis.from_url(REDIS_URL)
        await client.script_flush()  # what a Redis restart does to the script cache
        await client.aclose()
        failures: list[object] = []
        assert store.settle_soon([Op("incr", usd, (2.5, 60))], failures.append)
        await store.settled()
        assert failures == []
        assert await store.counter(usd) == pytest.approx(2.5)
    finally:
        await store.close()


async def test_settle_soon_hands_back_what_an_unreachable_store_did_not_book(private_redis) -> None:
    store = RedisStore(private_redis.url, "t", timeout=0.3)
    usd = "t:{team}:usd"
    try:
        await store.admit([budget(usd, 10)])
        private_redis.kill()
        failures: list[object] = []
        ops = [Op("incr", usd, (1.0, 60))]
        sent = store.settle_soon(ops, failures.append)
        await store.settled()
        await asyncio.sleep(0.05)
        # Either the pipe already knew (not sent: the caller takes the waiting path) or the reply
        # failed and the ops came back for replay; never silently dropped.
        assert (not sent) or failures == [ops]
    finally:
        await store.close()


async def test_a_replayed_settlement_is_booked_once() -> None:
    # A settlement whose reply was lost (the connection dropped after Redis ran it) is replayed with
    # the same id: the store recognises it, so spend, usage and token refunds are never counted twice.
    prefix = f"s{uuid.uuid4().hex[:12]}"
    store = RedisStore(REDIS_URL, prefix)
    usd, usage = f"{prefix}:{{team}}:usd", f"{prefix}:{{team}}:usage:20260102"
    ops = [Op("incr", usd, (0.5, 60)), Op("usage", usage, ("chat", 10, 5, 0.5, 60))]
    try:
        await store.settle(ops, "id-1")
        await store.settle(ops, "id-1")  # the replay
        failures: list[object] = []
        assert store.settle_soon(ops, failures.append, "id-1")
        await store.settled()
        assert await store.counter(usd) == pytest.approx(0.5)
        assert (await store.usage_many([usage]))[0]["chat|requests"] == 1.0
        await store.settle(ops, "id-2")  # another request is booked as usual
        assert await store.counter(usd) == pytest.approx(1.0)
    finally:
        await store.close()
