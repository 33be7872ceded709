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

from gateway.config import Config, Limits
from gateway.context import RequestContext
from gateway.errors import UpstreamLimited
from gateway.limits import keys
from gateway.limits.limiter import Limiter
from gateway.limits.plans import ScopePlan, Slots, stale_ms
from gateway.limits.state import Held
from gateway.limits.tokens import reserve_tokens
from gateway.state.base import Check


class UpstreamLimits:
    def __init__(self, config: Config, limiter: Limiter, prefix: str) -> None:
        self.limiter = limiter
        self.prefix = prefix
        self.default_max_tokens = config.rate_limiting.default_max_tokens
        self.slots = Slots(stale_ms(config), tag="u")
        self._target_limits: dict[tuple[str, str], Limits] = {}
        for model in config.models:
            for t in model.targets:
                if t.limits is not None:
                    self._target_limits.setdefault((t.provider, t.model), t.limits)
        self._provider_limits = {p.name: p.limits for p in config.providers if p.limits is not None}

    @property
    def configured(self) -> bool:
        return bool(self._target_limits or self._provider_limits)

    def plan(self, provider: str, model: str) -> ScopePlan | None:
        """The scopes that apply to (provider, upstream model); None when no limit is set."""
        tag = keys.provider(self.prefix, provider)
        scopes: list[tuple[str, Limits]] = []
        if provider in self._provider_limits:
            scopes.append((tag, self._provider_limits[provider]))
        if (provider, model) in self._target_limits:
            scopes.append((keys.model(tag, model), self._target_limits[(provider, model)]))
        return ScopePlan.of(scopes) if scopes else None

    async def take(self, ctx: RequestContext, plan: ScopePlan) -> Held:
        """Take every limit of the plan for one attempt, or raise ``UpstreamLimited``."""
        # Its own estimate: the team's reservation was capped against the team's tpm, not this one.
        tokens = reserve_tokens(ctx, plan.tightest_tpm, self.default_max_tokens) if plan.tightest_tpm else 0
        checks: list[Check] = []
        plan.declare(checks, tokens, self.slots)
        decision, local = await self.limiter.take(checks)
        failed = decision.failed
        if failed is not None:
            never = decision.retry_after < 0  # more tokens than the whole limit: waiting cannot help
            raise UpstreamLimited(failed.label, failed.limit, 60.0 if never else decision.retry_after, never)
        return Held(checks, local)
