"""Global limits on what the gateway sends upstream, across every team: they protect the provider account.

``providers[].limits`` caps everything sent to one provider; ``models[].targets[].limits`` caps one
upstream model of it (shared by every gateway model that routes to that provider and model). Both are
``rpm`` / ``tpm`` / ``max_parallel`` and exact across instances, like the team limits: they are taken
per attempt, right before the upstream is called, in one store call (one Lua script on Redis; the keys
share the provider's own hash tag, so this is a call of its own, never batched with a team's).

A target whose limit is reached is skipped the way one answering 429 would be: the router falls back to
the next target, and only when every target was refused by these limits does the client get a 429.
An attempt that fails gives its token reservation and its parallel slot back at once (its request still
counts: the upstream saw it); the attempt that served is reconciled with the real usage when the
request ends, together with the team's limits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.accounting import reserve_tokens
from gateway.config import Config, Limits
from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.state.base import Check, Op

if TYPE_CHECKING:
    from gateway.pipeline import Limiter

# A parallel slot left behind by a crashed instance is forgotten after the longest possible request.
_STALE_MARGIN_S = 60


class UpstreamLimited(Exception):
    """This target's own limit is reached; try the next one."""

    def __init__(self, label: str, limit: float, retry_after: float, never: bool = False) -> None:
        super().__init__(label)
        self.label, self.limit, self.retry_after, self.never = label, limit, retry_after, never


@dataclass(slots=True)
class Held:
    """The limits one attempt took, to reconcile or give back."""

    checks: list[Check]
    local: bool  # taken by the local fallback limiter (the store was unreachable)


@dataclass(frozen=True, slots=True)
class Plan:
    """The limit scopes of one target, resolved once at start-up."""

    scopes: tuple[tuple[str, Limits], ...]
    tightest_tpm: int


class UpstreamLimits:
    def __init__(self, config: Config, limiter: Limiter, prefix: str) -> None:
        self.limiter = limiter
        self.prefix = prefix
        self.default_max_tokens = config.rate_limiting.default_max_tokens
        # SECURITY: slots are keyed by ids the gateway makes (as the team limits' are), never by a
        # client's; random per instance, so two gateways never share one.
        self._member_prefix = "u" + os.urandom(6).hex()
        self._slots = 0
        self._target_limits: dict[tuple[str, str], Limits] = {}
        for model in config.models:
            for t in model.targets:
                if t.limits is not None:
                    self._target_limits.setdefault((t.provider, t.model), t.limits)
        self._provider_limits = {p.name: p.limits for p in config.providers if p.limits is not None}
        longest = max((p.timeouts.total for p in config.providers), default=600.0)
        self.stale_ms = int((longest + _STALE_MARGIN_S) * 1000)

    @property
    def configured(self) -> bool:
        return bool(self._target_limits or self._provider_limits)

    def plan(self, provider: str, model: str) -> Plan | None:
        """The scopes that apply to (provider, upstream model); None when no limit is set."""
        tag = f"{self.prefix}:{{p:{provider}}}"
        scopes: list[tuple[str, Limits]] = []
        if provider in self._provider_limits:
            scopes.append((tag, self._provider_limits[provider]))
        if (provider, model) in self._target_limits:
            scopes.append((f"{tag}:m:{model}", self._target_limits[(provider, model)]))
        if not scopes:
            return None
        tpm = min((limits.tpm for _, limits in scopes if limits.tpm), default=0)
        return Plan(tuple(scopes), tpm)

    async def take(self, ctx: RequestContext, plan: Plan) -> Held:
        """Take every limit of the plan for one attempt, or raise ``UpstreamLimited``."""
        # Its own estimate: the team's reservation was capped against the team's tpm, not this one.
        tokens = reserve_tokens(ctx, plan.tightest_tpm, self.default_max_tokens) if plan.tightest_tpm else 0
        checks = list(self._checks(plan, tokens))
        decision, local = await self.limiter.take(checks)
        failed = decision.failed
        if failed is not None:
            never = decision.retry_after < 0  # more tokens than the whole limit: waiting cannot help
            raise UpstreamLimited(failed.label, failed.limit, 60.0 if never else decision.retry_after, never)
        return Held(checks, local)

    def _checks(self, plan: Plan, tokens: int) -> Iterable[Check]:
        for key, limits in plan.scopes:
            if limits.rpm:
                yield Check("bucket", f"{key}:rpm", limits.rpm, "rpm", rate=limits.rpm / 60, cost=1)
            if limits.tpm:
                yield Check("bucket", f"{key}:tpm", limits.tpm, "tpm", rate=limits.tpm / 60, cost=tokens)
            if limits.max_parallel:
                self._slots += 1
                yield Check(
                    "parallel",
                    f"{key}:par",
                    limits.max_parallel,
                    "parallel",
                    member=f"{self._member_prefix}{self._slots:x}",
                    stale_ms=self.stale_ms,
                )

    def give_back(self, held: Held, used_tokens: int) -> None:
        """Reconcile an attempt's tokens with ``used_tokens`` and free its slot (in the background)."""
        ops = reconcile(held.checks, used_tokens)
        if ops:
            self.limiter.settle(ops, local=held.local)


def reconcile(checks: Sequence[Check], used_tokens: int) -> list[Op]:
    """The steps that settle an attempt: its tokens against `used_tokens`, its parallel slots freed."""
    ops: list[Op] = []
    for check in checks:
        if check.label == "tpm":
            delta = used_tokens - check.cost
            if delta:
                ops.append(Op("bucket", check.key, (check.limit, check.rate, delta)))
        elif check.kind == "parallel":
            ops.append(Op("release", check.key, (check.member,)))
    return ops


def refused(limited: UpstreamLimited, model: str) -> RateLimited:
    if limited.never:
        return RateLimited(
            f"this request needs more tokens than the gateway-wide limit of {int(limited.limit)} per "
            f"minute on the upstreams of model {model!r}; lower max_tokens or the prompt size",
            retry_after=60,
        )
    what = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}
    return RateLimited(
        f"every upstream of model {model!r} is at its gateway-wide limit "
        f"({what.get(limited.label, limited.label)}: {int(limited.limit)}); try again shortly",
        retry_after=limited.retry_after,
    )
