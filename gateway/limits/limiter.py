"""Admission and settlement of declared limits in the state store, with the fail-open/closed policy.

Admission takes every declared ``Check`` in one store call (one Lua script on Redis). Settlement is
queued without waiting for its reply; when the store turns out unreachable, the settlement is kept in
a bounded backlog and replayed, with its id, once the store answers again — so nothing is lost and
nothing is booked twice.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog

from gateway import metrics
from gateway.context import RequestContext
from gateway.errors import ServiceUnavailable
from gateway.limits import refusal
from gateway.limits.state import Held
from gateway.limits.tokens import reconcile
from gateway.state.base import (
    Check,
    Decision,
    LimitStore,
    Op,
    StoreScriptError,
    StoreUnavailable,
    new_settle_id,
)
from gateway.state.memory import MemoryStore

log = structlog.get_logger("gateway.limits")

BACKLOG_MAX = 100_000  # settlements kept while the store is unreachable (the oldest go first)


class Limiter:
    def __init__(
        self, store: LimitStore, *, fail_open_limits: bool = True, fail_open_budgets: bool = False
    ) -> None:
        self.store = store
        self.local = store if isinstance(store, MemoryStore) else MemoryStore()
        self.fail_open_limits, self.fail_open_budgets = fail_open_limits, fail_open_budgets
        # Settlements to replay after an outage, each with its id (the store books it at most once).
        self.backlog: deque[tuple[str, Sequence[Op]]] = deque(maxlen=BACKLOG_MAX)
        self.replay_task: asyncio.Task[None] | None = None
        self._replay_after = 0.0  # after a pass that booked nothing, the next waits a little
        self._replay_timer: asyncio.TimerHandle | None = None
        self.closed = False  # the store is closing: no more replay passes
        self._limited: dict[tuple[str, str], metrics.Counter] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # background settlements

    # -- admission ---------------------------------------------------------------------------------

    async def enforce(self, ctx: RequestContext) -> None:
        """Take the request's declared checks, or raise its 429 (or 503 when the store is down and
        the policy is closed). The x-ratelimit-* headers go on the context's response headers."""
        state = ctx.limits
        checks, state.checks = state.checks, []
        decision, local = await self.take(checks)
        state.local = state.local or local
        refusal.headers(ctx.response_headers, checks, decision)
        failed = decision.failed
        if failed is not None:
            self._count(ctx.team or "none", failed.label)
            raise refusal.team_refusal(failed, decision, ctx.response_headers)
        state.admitted.extend(checks if not state.local else [c for c in checks if c.kind != "budget"])

    def _count(self, team: str, label: str) -> None:
        key = (team, label)
        counter = self._limited.get(key)
        if counter is None:
            counter = self._limited[key] = metrics.RATE_LIMITED.labels(*key)
        counter.inc()

    async def take(self, checks: list[Check]) -> tuple[Decision, bool]:
        """Check and take ``checks`` in the store; True with the decision when the local fallback
        limiter took them instead (the store is unreachable and the policy allows it)."""
        try:
            decision = await self.store.admit(checks)
        except StoreUnavailable:
            return await self._degraded(checks), True
        except BaseException:
            # Cancelled (the client left) while the admission was on its way: it may have run, so its
            # parallel slots are released (harmless if it did not) instead of being held until stale.
            releases = [Op("release", c.key, (c.member,)) for c in checks if c.kind == "parallel"]
            if releases:
                self.settle(releases, local=False)
            raise
        self._replay_soon()  # the store answers again: book what the outage left behind
        return decision, False

    async def _degraded(self, checks: list[Check]) -> Decision:
        if not self.fail_open_budgets and any(c.kind == "budget" for c in checks):
            raise ServiceUnavailable(
                "budgets cannot be checked right now (state store unavailable)",
                code="state_store_unavailable",
            )
        if not self.fail_open_limits:
            raise ServiceUnavailable(
                "rate limits cannot be checked right now (state store unavailable)",
                code="state_store_unavailable",
            )
        return await self.local.admit([c for c in checks if c.kind != "budget"])

    # -- settlement --------------------------------------------------------------------------------

    def finish(self, ctx: RequestContext) -> asyncio.Task[None] | None:
        """Settle everything the request holds: its taken limits reconciled with its real usage, its
        slots freed, the plugins' ops (budgets, usage), and the serving attempt's upstream limits.
        Returned: the settlement's task in the rare case it had to wait for a connection while it
        frees a parallel slot — the caller waits for it before answering, so the client's next
        request finds the slot free."""
        state = ctx.limits
        used = ctx.charged_tokens()
        held, state.upstream = state.upstream, None
        if held is not None:
            self.give_back(held, used)  # another hash tag: a store call of its own
        ops, state.ops = state.ops, []
        if state.admitted:
            reconcile(state.admitted, used, ops)
            state.admitted = []
        if not ops:
            return None
        task = self.settle(ops, local=state.local, request_id=ctx.request_id)
        # (After a local admission the slot is already free here; the Redis release is a precaution.)
        if task is not None and not state.local and any(o.kind == "release" for o in ops):
            return task
        return None

    def give_back(self, held: Held, used_tokens: int) -> None:
        """Reconcile an upstream attempt's tokens with ``used_tokens`` and free its slot."""
        ops: list[Op] = []
        reconcile(held.checks, used_tokens, ops)
        if ops:
            self.settle(ops, local=held.local)

    def settle(
        self, ops: list[Op], *, local: bool, request_id: str | None = None
    ) -> asyncio.Task[None] | None:
        """Settle without waiting: the ops are queued now, ahead of this instance's later admissions;
        if the store turns out unreachable they are kept and replayed when it is back. Only when the
        store is not connected does this need a task (it connects first), which is returned."""
        if not ops:
            return None
        if local:
            self.local.settle_now([o for o in ops if o.kind in ("bucket", "release")])
            # Releases also go to Redis: an admission that timed out may still have taken its slot
            # there, and releasing a slot that was never taken is harmless (ZREM of a non-member).
            ops = [o for o in ops if o.kind != "bucket"]
            if not ops:
                return None
        sid = new_settle_id()  # a replay carries the same id: booked at most once
        if self.store.settle_soon(ops, functools.partial(self._unsettled, sid), sid):
            return None
        return self.spawn(self._settle_waiting(ops, sid, request_id))  # connects first

    def _unsettled(self, settle_id: str, ops: Sequence[Op]) -> None:
        self.backlog.append((settle_id, ops))  # replayed once the store answers again: nothing is lost
        metrics.SETTLEMENT_BACKLOG.set(len(self.backlog))

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _settle_waiting(self, ops: list[Op], settle_id: str, request_id: str | None = None) -> None:
        """The waiting form of ``settle`` (the store is not connected right now)."""
        try:
            await self.store.settle(ops, settle_id)
        except StoreScriptError:
            log.error("settle_rejected", request_id=request_id)  # replaying it would fail again
            return
        except StoreUnavailable:
            self._unsettled(settle_id, ops)
            return
        self._replay_soon()

    # -- the replay backlog ------------------------------------------------------------------------

    def _replay_soon(self) -> None:
        if self.backlog and (self.replay_task is None or self.replay_task.done()):
            loop = asyncio.get_running_loop()
            if loop.time() >= self._replay_after and not self.closed:
                self.replay_task = loop.create_task(self._replay())

    async def drain(self) -> None:
        """Wait for background settlements (shutdown, and tests that read the books right after),
        including one more try at booking what an outage left behind."""
        await self.store.settled()
        self._replay_after = 0.0  # one more try now, whatever the last pass booked
        self._replay_soon()
        while self.tasks or (self.replay_task and not self.replay_task.done()):
            replay = [self.replay_task] if self.replay_task else []
            await asyncio.gather(*list(self.tasks), *replay, return_exceptions=True)
            await self.store.settled()

    def close(self) -> None:
        """After the last drain: no more replay passes (the store is about to close)."""
        self.closed = True
        if self._replay_timer is not None:
            self._replay_timer.cancel()

    async def _replay(self) -> None:
        """One task at a time replays the backlog. Each entry keeps its settlement id, so one that did
        run before its reply was lost is recognised by the store and not booked twice. Settlements add
        up in any order, so one that cannot be booked yet (its Redis Cluster slot stuck mid-migration,
        its master down) is set aside with the rest of its hash tag and does not hold up the others;
        when nothing at all can be booked, the store is down and the replay waits for it."""
        set_aside: deque[tuple[str, Sequence[Op]]] = deque()
        failing: set[str] = set()
        booked = False
        inflight: tuple[str, Sequence[Op]] | None = None  # being booked when the pass was cancelled
        try:
            scanned = 0
            while self.backlog:
                entry = self.backlog.popleft()
                tag = entry[1][0].key.split("}", 1)[0]
                if tag in failing:
                    set_aside.append(entry)
                    scanned += 1
                    if scanned % 1000 == 0:
                        await asyncio.sleep(0)  # a long backlog never holds the event loop
                    continue
                inflight = entry
                try:
                    await self.store.settle(entry[1], entry[0])
                    booked = True
                except StoreScriptError:
                    log.error("replay_rejected")  # an entry Redis refuses must not block the rest
                except StoreUnavailable:
                    failing.add(tag)
                    set_aside.append(entry)
                    if not booked and len(failing) >= 3:
                        inflight = None
                        break  # three hash tags failing and nothing booked: the store is down
                except Exception:
                    log.exception("replay_failed")
                inflight = None  # (a cancellation skips this: the entry is kept below)
        finally:
            if inflight is not None:  # cancelled while booking it: kept (its id prevents double booking)
                set_aside.append(inflight)
            if not booked:  # nothing could be booked: the next pass waits a second, then runs anyway
                loop = asyncio.get_running_loop()
                self._replay_after = loop.time() + 1.0
                if not self.closed:
                    self._replay_timer = loop.call_later(1.0, self._replay_soon)
            # What was set aside goes first next time, in its order. Over the cap, the oldest go
            # (as when the backlog overflows while Redis is down), and it is logged.
            merged = deque(set_aside, maxlen=self.backlog.maxlen)
            before = len(set_aside) + len(self.backlog)
            merged.extend(self.backlog)
            if len(merged) < before:
                log.error("settlement_backlog_full", dropped=before - len(merged))
            self.backlog = merged
            metrics.SETTLEMENT_BACKLOG.set(len(merged))
