"""Requests per minute, tokens per minute and parallel requests — per team, per key, per team+model.

Token limits reserve at admission (an estimate of the prompt plus ``max_tokens``, or
``rate_limiting.default_max_tokens`` capped at half the tightest tpm) and are reconciled with the real
usage when the request ends, whatever the outcome: the difference is taken or refunded, so
reservations never leak. This plugin only declares the limits; ``gateway.limits`` takes and settles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aiohttp import web

from gateway.config import IdentityNeed, Limits, ModelConfig, TeamConfig
from gateway.context import RequestContext
from gateway.limits import keys
from gateway.limits.plans import ScopePlan, Slots, stale_ms
from gateway.limits.tokens import give_back, reserve_tokens
from gateway.pipeline import Services
from gateway.state.base import KeyRecord

_MAX_PLANS = 10_000


@dataclass(frozen=True, slots=True)
class _Plan:
    # The objects the plan was built from: a team or key replaced at runtime gets a new plan (the
    # identity check also guards against a recycled id()).
    team: TeamConfig
    key: KeyRecord | None
    limits: ScopePlan


class RateLimitPlugin:
    name: ClassVar[str] = "rate_limit"
    declares_checks_only: ClassVar[bool] = True
    needs_identity: ClassVar[IdentityNeed] = "required"

    def __init__(self, services: Services) -> None:
        self.prefix = services.prefix
        self.slots = Slots(stale_ms(services.config))
        self.default_max_tokens = services.config.rate_limiting.default_max_tokens
        self._plans: dict[tuple[int, int, str], _Plan] = {}

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        identity = ctx.identity
        if identity is None or identity.team is None:
            return None
        plan = self._plan(identity.team, identity.key, ctx.model.name)
        state = ctx.limits
        if plan.tpm and not state.reserved_tokens:
            state.reserved_tokens = reserve_tokens(ctx, plan.tightest_tpm, self.default_max_tokens)
        plan.declare(state.checks, state.reserved_tokens, self.slots)
        return None

    def _plan(self, team: TeamConfig, key: KeyRecord | None, model: str) -> ScopePlan:
        """The limits of (team, key, model), resolved once: keys, rates and the rpm checks."""
        cache_key = (id(team), id(key), model)
        cached = self._plans.get(cache_key)
        if cached is not None and cached.team is team and cached.key is key:
            return cached.limits
        base = keys.team(self.prefix, team.id)
        scopes: list[tuple[str, Limits]] = [(base, team.limits)]
        model_limits = team.model_limits.get(model)
        if model_limits is not None:
            scopes.append((keys.model(base, model), model_limits))
        if key is not None:
            scopes.append((keys.api_key(base, key.id), key.limits))
        plan = ScopePlan.of(scopes)
        if len(self._plans) >= _MAX_PLANS:  # runtime teams and keys come and go: stay bounded
            self._plans.clear()
        self._plans[cache_key] = _Plan(team, key, plan)
        return plan

    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        identity = ctx.identity
        if identity is None or identity.team is None:
            return
        base = keys.team(self.prefix, identity.team.id)
        state = ctx.limits
        # Nothing was served on the old model: its own limits are given back whole.
        give_back(state.admitted, keys.model(base, old.name) + ":", state.ops)
        plan = self._plan(identity.team, identity.key, ctx.model.name)
        plan.declare(
            state.checks, state.reserved_tokens, self.slots, within=keys.model(base, ctx.model.name) + ":"
        )

    def finish(self, ctx: RequestContext) -> None:
        return None  # the limiter reconciles what was taken
