"""Targets, circuit breakers, retries with backoff, and fallback along a model's target list.

A request walks its model's targets in order, skipping those whose circuit is open. Each target gets
``1 + routing.retries`` attempts with exponential backoff and jitter (honouring ``Retry-After`` up to
a cap). An attempt either returns, raises ``AttemptFailed`` (try again / fall back), or raises a
``GatewayError`` meant for the client (an upstream 4xx such as a bad parameter), which ends the walk.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from gateway import metrics
from gateway.config import CircuitBreakerConfig, Config, ModelConfig, RoutingConfig
from gateway.context import RequestContext
from gateway.errors import (
    AttemptFailed,
    GatewayError,
    Outcome,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamLimited,
    UpstreamThrottled,
    UpstreamTimeout,
)
from gateway.limits.plans import ScopePlan
from gateway.limits.refusal import upstream_refusal
from gateway.limits.state import Held
from gateway.limits.upstream import UpstreamLimits
from gateway.providers import Provider
from gateway.steering import STEERING_FIELDS, to_strip, watched

log = structlog.get_logger("gateway.routing")
T = TypeVar("T")


class CircuitBreaker:
    """Closed → (``failures`` consecutive failures) → open for ``cooldown`` → one trial → closed/open."""

    __slots__ = (
        "_run_throttled",
        "cooldown",
        "failures",
        "gauge",
        "on_change",
        "open_until",
        "threshold",
        "throttled",
        "trial",
    )

    def __init__(self, threshold: int, cooldown: float, gauge: metrics.Gauge | None = None) -> None:
        self.threshold, self.cooldown = threshold, cooldown
        self.failures = 0
        self.open_until = 0.0
        self.trial = False
        self.throttled = False  # opened by the upstream's 429s alone (rate-limited, not broken)
        self._run_throttled = True  # every failure of the current run was a 429
        self.gauge = gauge

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold and (self.trial or time.monotonic() < self.open_until)

    def allow(self) -> bool:
        if self.failures < self.threshold:
            return True
        if self.trial or time.monotonic() < self.open_until:
            return False
        self.trial = True  # half-open: this caller is the one trial
        return True

    def success(self) -> None:
        if self.failures >= self.threshold and self.gauge is not None:
            self.gauge.set(0)
        self.failures = 0
        self.trial = False

    def failure(self, throttled: bool = False) -> bool:
        """Record a failure (``throttled``: an upstream 429); return True if this opened (or
        re-opened) the circuit."""
        # A half-open trial starts a new run: its verdict alone says whether the circuit reopens
        # rate-limited or broken.
        fresh = self.failures == 0 or self.trial
        self.failures += 1
        self.trial = False
        self._run_throttled = throttled if fresh else self._run_throttled and throttled
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown
            self.throttled = self._run_throttled
            if self.gauge is not None:
                self.gauge.set(1)
            return True
        return False

    def release(self) -> None:
        """The trial ended without a verdict (the client left): let the next caller try."""
        self.trial = False

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets a trial through."""
        return max(0.0, self.open_until - time.monotonic())


@dataclass(slots=True)
class Target:
    provider: Provider
    model: str
    breaker: CircuitBreaker
    limits: ScopePlan | None = None  # gateway-wide limits on this upstream (gateway.limits.upstream)
    # Request fields removed before the body goes to this target (gateway.steering), and the top-level
    # keys that mean there is something to remove: computed once here, one isdisjoint per request.
    strip: frozenset[str] = STEERING_FIELDS
    watch: frozenset[str] = watched(STEERING_FIELDS)
    # Metric children bound once per label set, not resolved per request.
    outcomes: dict[str, metrics.Counter] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.provider.name}/{self.model}"


@dataclass(slots=True)
class Route:
    model: ModelConfig
    targets: tuple[Target, ...]


def _ignore(provider: str, ok: bool, latency: float | None = None) -> None:
    return None


class RetryBudget:
    """Envoy's retry budget: retries in flight stay under ``percent`` % of the requests in flight, or
    ``min_concurrency``, whichever is larger — so an upstream that fails everything gets at most
    that much more traffic, not (1 + retries) times it."""

    __slots__ = ("min_concurrency", "ratio", "requests", "retries")

    def __init__(self, percent: float, min_concurrency: int) -> None:
        self.ratio, self.min_concurrency = percent / 100, min_concurrency
        self.requests = 0  # in flight through the router
        self.retries = 0  # retries in flight (from their backoff to their answer)

    def allow(self) -> bool:
        return self.retries < max(self.min_concurrency, self.ratio * self.requests)


class Router:
    def __init__(
        self,
        config: Config,
        providers: Mapping[str, Provider],
        observe: Callable[[str, bool, float | None], None] = _ignore,
        upstream: UpstreamLimits | None = None,
    ) -> None:
        self.settings: RoutingConfig = config.routing
        budget = config.routing.retry_budget
        self.budget = RetryBudget(budget.percent, budget.min_concurrency)
        self.upstream = upstream
        self.observe = observe  # live traffic feeds provider health
        self.tally = metrics.Tally()  # the attempts' outcome counters, folded once a second
        cb = config.routing.circuit_breaker
        self.routes: dict[str, Route] = {}
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        for model in config.models:
            targets = [t for t in model.targets if config.provider(t.provider).configured]
            if not targets and config.routing.unconfigured_provider:
                fallback = config.routing.unconfigured_provider
                targets = [type(t)(fallback, t.model) for t in model.targets[:1]]
                log.warning(
                    "model_routes_to_mock",
                    model=model.name,
                    provider=fallback,
                    reason="no API key set for any of its providers",
                )
            self.routes[model.name] = Route(
                model,
                tuple(self._target(providers[t.provider], t.model, cb, model.allow_fields) for t in targets),
            )

    def _target(
        self, provider: Provider, model: str, cb: CircuitBreakerConfig, allow_fields: tuple[str, ...]
    ) -> Target:
        # One breaker per upstream (provider, model), shared by every model that routes to it: its
        # health does not depend on which gateway model name the client used.
        breaker = self._breakers.get((provider.name, model))
        if breaker is None:
            breaker = self._breakers[(provider.name, model)] = CircuitBreaker(
                cb.failures, cb.cooldown_seconds, metrics.CIRCUIT_OPEN.labels(provider.name, model)
            )
        plan = self.upstream.plan(provider.name, model) if self.upstream is not None else None
        strip = to_strip(provider.config.allow_fields, allow_fields)
        return Target(provider, model, breaker, plan, strip=strip, watch=watched(strip))

    def _outcome(self, target: Target, outcome: str) -> None:
        child = target.outcomes.get(outcome)
        if child is None:
            child = target.outcomes[outcome] = metrics.UPSTREAM_REQUESTS.labels(
                target.provider.name, target.model, outcome
            )
        self.tally.inc(child)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        if retry_after is not None:
            return min(max(retry_after, 0.0), s.retry_after_cap_seconds)
        base = min(s.backoff_seconds * float(2**attempt), s.max_backoff_seconds)
        return base * (0.5 + random.random() / 2)  # jitter: 50-100 % of the exponential step

    async def run(self, ctx: RequestContext, attempt: Callable[[Target], Awaitable[T]]) -> T:
        """Walk the model's targets until one answers; raise the error the walk ends on."""
        self.budget.requests += 1
        try:
            walk = Walk()
            for target in self.routes[ctx.model.name].targets:
                result = await self._try_target(ctx, target, walk, attempt)
                if not isinstance(result, _Next):
                    return result
            raise walk.error(ctx, bool(self.routes[ctx.model.name].targets))
        finally:
            self.budget.requests -= 1

    async def _try_target(
        self, ctx: RequestContext, target: Target, walk: Walk, attempt: Callable[[Target], Awaitable[T]]
    ) -> T | _Next:
        """One target: its circuit, then ``1 + routing.retries`` attempts within the retry budget."""
        if not target.breaker.allow():
            walk.skipped(target.breaker)
            return NEXT
        trial = target.breaker.trial  # this caller is the half-open circuit's one trial
        if walk.previous is not None:
            metrics.FALLBACKS.labels(ctx.model.name, walk.previous.provider.name, target.provider.name).inc()
        walk.previous = target
        ctx.provider, ctx.upstream_model = target.provider.name, target.model
        for n in range(self.settings.retries + 1):
            if n:
                if not self.budget.allow():
                    # Retries beyond the budget would multiply the load on a failing upstream:
                    # fall back to the next target instead.
                    self._outcome(target, Outcome.RETRY_BUDGET)
                    return NEXT
                self.budget.retries += 1
            try:
                result = await self._attempt(ctx, target, walk, attempt, n, trial)
            finally:
                if n:
                    self.budget.retries -= 1
            if result is not RETRY:
                return result
        return NEXT

    async def _attempt(
        self,
        ctx: RequestContext,
        target: Target,
        walk: Walk,
        attempt: Callable[[Target], Awaitable[T]],
        n: int,
        trial: bool,
    ) -> T | _Next:
        """One attempt: the backoff before a retry, the target's gateway-wide limits, the call, and
        the verdict for the circuit breaker, the metrics and provider health."""
        held: Held | None = None
        try:
            if n:
                await asyncio.sleep(self.backoff(n - 1, walk.last.retry_after if walk.last else None))
            if target.limits is not None and self.upstream is not None:
                held = await self.upstream.take(ctx, target.limits)
        except UpstreamLimited as refusal:
            # Like an upstream 429, without calling it: the next target is tried. A half-open
            # circuit's trial this caller held goes to the next caller (no verdict here).
            if trial:
                target.breaker.release()
            walk.limited_by(refusal)
            self._outcome(target, Outcome.GATEWAY_LIMITED)
            return NEXT
        except BaseException:
            if trial:  # cancelled, or the store refused: no verdict either
                target.breaker.release()
            raise
        if held is not None:
            ctx.limits.upstream = held
        ctx.attempts += 1
        try:
            result = await attempt(target)
        except AttemptFailed as failure:
            walk.failed(failure)
            if held is not None and self.upstream is not None:
                ctx.limits.upstream = None
                self.upstream.limiter.give_back(held, 0)  # nothing was served: tokens and slot back
            self._outcome(target, failure.outcome)
            self.observe(target.provider.name, False, None)
            log.info(
                "upstream_attempt_failed",
                provider=target.provider.name,
                upstream_model=target.model,
                outcome=failure.outcome,
                attempt=ctx.attempts,
            )
            if target.breaker.failure(throttled=isinstance(failure, UpstreamThrottled)):
                log.warning(
                    "circuit_open",
                    provider=target.provider.name,
                    upstream_model=target.model,
                    cooldown_seconds=target.breaker.cooldown,
                )
                return NEXT
            return RETRY
        except GatewayError:
            # The upstream answered, but the request itself is at fault: no retry, no penalty.
            target.breaker.success()
            self._outcome(target, Outcome.CLIENT_ERROR)
            self.observe(target.provider.name, True, None)
            raise
        except BaseException:
            if trial:
                target.breaker.release()
            raise
        self._outcome(target, Outcome.SUCCESS)
        self.observe(target.provider.name, True, None)
        if target.breaker.failures >= target.breaker.threshold:
            log.info("circuit_closed", provider=target.provider.name, upstream_model=target.model)
        target.breaker.success()
        return result


class _Next:
    """What an attempt returns when it did not serve: try the next target, or retry this one."""

    __slots__ = ()


NEXT, RETRY = _Next(), _Next()


@dataclass(slots=True)
class Walk:
    """What a walk over a model's targets has seen; it picks the error the walk ends on."""

    last: AttemptFailed | None = None
    limited: UpstreamLimited | None = None  # the soonest-clearing gateway-wide limit refusal
    # Whether every target so far was rate-limiting: answered 429, or skipped with a circuit its
    # 429s opened (then the client gets a 429 to back off from, not a 502 or 503).
    throttled: bool = True
    saw_throttle: bool = False
    waits: list[float] = field(default_factory=list)  # when each of them said it clears
    previous: Target | None = None  # the target tried before (for the fallback metric)

    def skipped(self, breaker: CircuitBreaker) -> None:
        if breaker.throttled:  # (one opened by failures is just skipped)
            self.saw_throttle = True
            self.waits.append(breaker.reopens_in())

    def limited_by(self, refusal: UpstreamLimited) -> None:
        if self.limited is None or refusal.retry_after < self.limited.retry_after:
            self.limited = refusal

    def failed(self, failure: AttemptFailed) -> None:
        self.last = failure
        if isinstance(failure, UpstreamThrottled):
            self.saw_throttle = True
            if failure.retry_after is not None:
                self.waits.append(failure.retry_after)
        else:
            self.throttled = False

    def error(self, ctx: RequestContext, has_targets: bool) -> GatewayError:
        model, last, limited = ctx.model.name, self.last, self.limited
        if self.saw_throttle and self.throttled:
            # Every upstream is rate-limiting (or at its gateway-wide limit): the client gets a 429 it
            # can back off from — with the soonest Retry-After any of them gave — not a 502 or 503.
            metrics.RATE_LIMITED.labels(ctx.team or "none", "upstream").inc()
            if limited is not None:
                self.waits.append(limited.retry_after)
            return RateLimited(
                f"every upstream of model {model!r} is rate-limiting requests; try again shortly",
                retry_after=min(self.waits, default=1.0),
                code="upstream_rate_limited",
            )
        if last is None and limited is not None:
            metrics.RATE_LIMITED.labels(ctx.team or "none", "upstream").inc()
            return upstream_refusal(limited, model)
        if last is None:
            why = (
                "every target's circuit is open"
                if has_targets
                else "none of its providers has an API key configured"
            )
            return ServiceUnavailable(
                f"no upstream available for model {model!r}: {why}", code="no_available_target"
            )
        if isinstance(last, UpstreamTimeout):
            return UpstreamError(f"upstream timed out ({last.message})", status=504, code="upstream_timeout")
        return UpstreamError(
            f"all upstream targets failed; last error: {last.message}", code="upstream_error"
        )
