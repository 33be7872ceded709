"""The plugin pipeline: one ``Plugin`` protocol, built once from ``config.plugins``.

``admit`` runs the plugins in order; one may answer the request itself (return a response) and
stop the chain, or raise a ``GatewayError``. Limit plugins only *declare* ``Check``s on the context;
the pipeline takes all declared checks in one store call (one Lua script on Redis) right before the
first plugin that is not a pure limit plugin, or at the end. ``finish`` runs exactly once per admitted
request — after success, an upstream error or a client disconnect — and settles every plugin's
``Op``s in one more store call.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import structlog
from aiohttp import web

from gateway import metrics
from gateway.auth import Authenticator
from gateway.config import Config, IdentityNeed, ModelConfig
from gateway.context import RequestContext
from gateway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.state.base import (
    Check,
    Decision,
    Op,
    Store,
    StoreScriptError,
    StoreUnavailable,
    new_settle_id,
)
from gateway.state.cache import CacheStore
from gateway.state.memory import MemoryStore

if TYPE_CHECKING:
    from gateway.upstream_limits import UpstreamLimits

log = structlog.get_logger("gateway.pipeline")


@dataclass(frozen=True, slots=True)
class Services:
    """What plugins are built with (once, at start-up)."""

    config: Config
    store: Store
    auth: Authenticator
    prefix: str  # namespace of every state-store key
    cache: CacheStore


class Plugin(Protocol):
    name: ClassVar[str]
    # True for plugins whose admit only appends ctx.checks: their checks are batched with the next.
    declares_checks_only: ClassVar[bool]
    # What it needs of the caller's identity, which ``auth`` sets: config validation refuses an order
    # that breaks it (mirrored in ``gateway.config.PLUGIN_NEEDS_IDENTITY``, which the parser reads).
    needs_identity: ClassVar[IdentityNeed]

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None: ...

    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        """The admitted request moves to ``ctx.model`` (a context-window fallback): give back what was
        taken for ``old`` alone and declare ``ctx.model``'s own checks (the pipeline takes them)."""

    def finish(self, ctx: RequestContext) -> Awaitable[None] | None:
        """Append settlement ``Op``s to ``ctx.ops`` (the pipeline does that I/O once, for all plugins).

        A plugin with I/O of its own (the cache's write) returns an awaitable instead; it runs in a
        background task."""


class Limiter:
    """Takes declared checks in the store, with the fail-open/closed policy when it is unreachable."""

    def __init__(
        self, store: Store, *, fail_open_limits: bool = True, fail_open_budgets: bool = False
    ) -> None:
        self.store = store
        self.local = store if isinstance(store, MemoryStore) else MemoryStore()
        self.fail_open_limits, self.fail_open_budgets = fail_open_limits, fail_open_budgets
        # Settlements to replay after an outage, each with its id (the store books it at most once).
        self.backlog: deque[tuple[str, Sequence[Op]]] = deque(maxlen=100_000)
        self.replay_task: asyncio.Task[None] | None = None
        self._replay_after = 0.0  # after a pass that booked nothing, the next waits a little
        self._replay_timer: asyncio.TimerHandle | None = None
        self.closed = False  # the store is closing: no more replay passes
        self._limited: dict[tuple[str, str], metrics.Counter] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # background settlements

    async def enforce(self, ctx: RequestContext) -> None:
        checks, ctx.checks = ctx.checks, []
        decision, local = await self.take(checks)
        ctx.local_admission = ctx.local_admission or local
        _headers(ctx, checks, decision)
        if decision.failed is not None:
            self._refuse(ctx, decision)
        ctx.admitted.extend(checks if not ctx.local_admission else [c for c in checks if c.kind != "budget"])

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

    def _refuse(self, ctx: RequestContext, decision: Decision) -> None:
        failed = decision.failed
        assert failed is not None
        key = (ctx.team or "none", failed.label)
        counter = self._limited.get(key)
        if counter is None:
            counter = self._limited[key] = metrics.RATE_LIMITED.labels(*key)
        counter.inc()
        headers = dict(ctx.response_headers)
        if failed.kind == "budget":
            raise QuotaExceeded(
                "budget exhausted for this period; it resets at the start of the next UTC day/month",
                retry_after=decision.retry_after,
                headers=headers,
            )
        if decision.retry_after < 0:
            raise RateLimited(
                f"this request needs {int(failed.cost)} tokens, more than the limit of "
                f"{int(failed.limit)} per minute; lower max_tokens or the prompt size",
                retry_after=60,
                headers=headers,
            )
        what = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}
        raise RateLimited(
            f"rate limit reached: {what.get(failed.label, failed.label)} ({int(failed.limit)})",
            retry_after=decision.retry_after,
            headers=headers,
        )

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
        return self.spawn(self.settle_waiting(ops, sid, request_id))  # connects first

    def _unsettled(self, settle_id: str, ops: Sequence[Op]) -> None:
        self.backlog.append((settle_id, ops))  # replayed once the store answers again: nothing is lost
        metrics.SETTLEMENT_BACKLOG.set(len(self.backlog))

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def settle_waiting(self, ops: list[Op], settle_id: str, request_id: str | None = None) -> None:
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

    def _replay_soon(self) -> None:
        if self.backlog and (self.replay_task is None or self.replay_task.done()):
            loop = asyncio.get_running_loop()
            if loop.time() >= self._replay_after and not self.closed:
                self.replay_task = loop.create_task(self._replay())

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


def _headers(ctx: RequestContext, checks: Sequence[Check], decision: Decision) -> None:
    """OpenAI's x-ratelimit-* headers from the most restrictive request and token limits (a 429
    describes the limit that refused it)."""
    rpm: tuple[Check, float, float] | None = None
    tpm: tuple[Check, float, float] | None = None
    failed = decision.failed
    for check, (remaining, reset) in zip(checks, decision.remaining, strict=False):
        label = check.label
        if label == "rpm":
            if rpm is None or (remaining < rpm[1] and rpm[0] is not failed) or check is failed:
                rpm = (check, remaining, reset)
        elif label == "tpm" and (
            tpm is None or (remaining < tpm[1] and tpm[0] is not failed) or check is failed
        ):
            tpm = (check, remaining, reset)
    h = ctx.response_headers
    if rpm is not None:
        h["x-ratelimit-limit-requests"] = str(int(rpm[0].limit))
        h["x-ratelimit-remaining-requests"] = str(int(rpm[1])) if rpm[1] > 0 else "0"
        h["x-ratelimit-reset-requests"] = _duration(rpm[2])
    if tpm is not None:
        h["x-ratelimit-limit-tokens"] = str(int(tpm[0].limit))
        h["x-ratelimit-remaining-tokens"] = str(int(tpm[1])) if tpm[1] > 0 else "0"
        h["x-ratelimit-reset-tokens"] = _duration(tpm[2])


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s".replace(".0s", "s")
    minutes, secs = divmod(round(seconds), 60)  # rounded first: 119.97 s is 2m0s, not 1m60s
    return f"{minutes}m{secs}s"


class Pipeline:
    def __init__(self, plugins: Sequence[Plugin], limiter: Limiter) -> None:
        self.plugins = tuple(plugins)
        self.limiter = limiter
        self.upstream: UpstreamLimits | None = None  # set when a provider or target has limits

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        for plugin in self.plugins:
            if ctx.checks and not plugin.declares_checks_only:
                await self.limiter.enforce(ctx)
            response = await plugin.admit(ctx)
            if response is not None:
                return response
        if ctx.checks:
            await self.limiter.enforce(ctx)
        return None

    async def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        """After admission, the request moves from ``old`` to ``ctx.model``: per-model limits follow it
        (one more store call, all or nothing; a refusal is the new model's 429)."""
        for plugin in self.plugins:
            plugin.switch_model(ctx, old)
        if ctx.checks:
            await self.limiter.enforce(ctx)

    def finish(self, ctx: RequestContext) -> asyncio.Task[None] | None:
        """Called exactly once per request that entered ``admit``, before its answer is sent. The
        store settlement is queued without waiting for its reply (it leaves on the next loop turn, ahead
        of any later admission of this instance), and a disconnected handler never waits. A
        plugin's own I/O (the cache write) runs in a background task. Returned: the settlement's task
        in the rare case it had to wait for a connection while it releases a parallel slot — the
        caller waits for it before answering, so the client's next request finds the slot free."""
        pending: list[Awaitable[None]] = []
        for plugin in self.plugins:
            try:
                work = plugin.finish(ctx)
            except Exception:
                log.exception("plugin_finish_failed", plugin=plugin.name, request_id=ctx.request_id)
                continue
            if work is not None:
                pending.append(work)
        held, ctx.upstream_held = ctx.upstream_held, None
        if held is not None and self.upstream is not None:
            # The upstream limits live under another hash tag: a store call of their own.
            self.upstream.give_back(held, ctx.charged_tokens())
        waiting = None
        if ctx.ops:
            ops, ctx.ops = ctx.ops, []
            task = self.limiter.settle(ops, local=ctx.local_admission, request_id=ctx.request_id)
            # (After a local admission the slot is already free here; the Redis release is a precaution.)
            if task is not None and not ctx.local_admission and any(o.kind == "release" for o in ops):
                waiting = task
        if pending:
            self.limiter.spawn(self._run(ctx, pending))
        return waiting

    async def _run(self, ctx: RequestContext, pending: list[Awaitable[None]]) -> None:
        for work in pending:
            try:
                await work
            except Exception:
                log.exception("settle_failed", request_id=ctx.request_id)

    async def drain(self) -> None:
        """Wait for background settlements (shutdown, and tests that read the books right after),
        including one more try at booking what an outage left behind."""
        limiter = self.limiter
        await limiter.store.settled()
        limiter._replay_after = 0.0  # one more try now, whatever the last pass booked
        limiter._replay_soon()
        while limiter.tasks or (limiter.replay_task and not limiter.replay_task.done()):
            replay = [limiter.replay_task] if limiter.replay_task else []
            await asyncio.gather(*list(limiter.tasks), *replay, return_exceptions=True)
            await limiter.store.settled()
