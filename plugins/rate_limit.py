"""Requests per minute, tokens per minute and parallel requests — per team, per key, per team+model.

Token limits reserve at admission (an estimate of the prompt plus ``max_tokens``, or
``rate_limiting.default_max_tokens`` capped at half the tightest tpm) and are reconciled with the real
usage when the request ends, whatever the outcome: the difference is taken or refunded, so
reservations never leak.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import ClassVar

from aiohttp import web

from gateway.accounting import reserve_tokens
from gateway.config import IdentityNeed, Limits, ModelConfig, TeamConfig
from gateway.context import RequestContext
from gateway.pipeline import Services
from gateway.state.base import Check, KeyRecord, Op

_MAX_PLANS = 10_000


@dataclass(frozen=True, slots=True)
class _Plan:
    # The objects the plan was built from: a team or key replaced at runtime gets a new plan (the
    # identity check also guards against a recycled id()).
    team: TeamConfig
    key: KeyRecord | None
    rpm: tuple[Check, ...]
    tpm: tuple[tuple[str, int, float], ...]  # (key, limit, refill per second)
    parallel: tuple[tuple[str, int], ...]  # (key, limit)
    tightest_tpm: int


class RateLimitPlugin:
    name: ClassVar[str] = "rate_limit"
    declares_checks_only: ClassVar[bool] = True
    needs_identity: ClassVar[IdentityNeed] = "required"

    def __init__(self, services: Services) -> None:
        self.prefix = services.prefix
        # SECURITY: a parallel slot is keyed by an id the gateway makes, never by the client's
        # x-request-id (requests sharing one would share a slot and bypass max_parallel).
        self._slot_prefix = os.urandom(6).hex()
        self._slots = itertools.count(1)
        self.default_max_tokens = services.config.rate_limiting.default_max_tokens
        # A parallel slot left behind by a crashed instance is forgotten after the longest request.
        longest = max((p.timeouts.total for p in services.config.providers), default=600.0)
        self.stale_ms = int((longest + 60) * 1000)
        self._plans: dict[tuple[int, int, str], _Plan] = {}

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        identity = ctx.identity
        if identity is None or identity.team is None:
            return None
        plan = self._plan(identity.team, identity.key, ctx.model.name)
        if plan.tpm and not ctx.reserved_tokens:
            ctx.reserved_tokens = reserve_tokens(ctx, plan.tightest_tpm, self.default_max_tokens)
        checks = ctx.checks
        checks.extend(plan.rpm)  # request-independent: built once, shared
        for key, limit, rate in plan.tpm:
            checks.append(Check("bucket", key, limit, "tpm", rate=rate, cost=ctx.reserved_tokens))
        if plan.parallel:
            member = self._member()
            for key, limit in plan.parallel:
                checks.append(
                    Check("parallel", key, limit, "parallel", member=member, stale_ms=self.stale_ms)
                )
        return None

    def _plan(self, team: TeamConfig, key: KeyRecord | None, model: str) -> _Plan:
        """The limits of (team, key, model), resolved once: keys, rates and the rpm checks."""
        cache_key = (id(team), id(key), model)
        cached = self._plans.get(cache_key)
        if cached is not None and cached.team is team and cached.key is key:
            return cached
        base = f"{self.prefix}:{{{team.id}}}"
        scopes: list[tuple[str, Limits]] = [(base, team.limits)]
        model_limits = team.model_limits.get(model)
        if model_limits is not None:
            scopes.append((f"{base}:m:{model}", model_limits))
        if key is not None:
            scopes.append((f"{base}:k:{key.id}", key.limits))
        plan = _Plan(
            team,
            key,
            rpm=tuple(
                Check("bucket", f"{k}:rpm", lim.rpm, "rpm", rate=lim.rpm / 60, cost=1)
                for k, lim in scopes
                if lim.rpm
            ),
            tpm=tuple((f"{k}:tpm", lim.tpm, lim.tpm / 60) for k, lim in scopes if lim.tpm),
            parallel=tuple((f"{k}:par", lim.max_parallel) for k, lim in scopes if lim.max_parallel),
            tightest_tpm=min((lim.tpm for _, lim in scopes if lim.tpm), default=0),
        )
        if len(self._plans) >= _MAX_PLANS:  # runtime teams and keys come and go: stay bounded
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan

    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        identity = ctx.identity
        if identity is None or identity.team is None:
            return
        base = f"{self.prefix}:{{{identity.team.id}}}"
        scope = f"{base}:m:{old.name}:"
        kept = []
        for check in ctx.admitted:
            if not check.key.startswith(scope):
                kept.append(check)
            elif check.kind == "parallel":
                ctx.ops.append(Op("release", check.key, (check.member,)))
            else:  # nothing was served on the old model: its tokens go back (rpm and tpm alike)
                ctx.ops.append(Op("bucket", check.key, (check.limit, check.rate, -check.cost)))
        ctx.admitted[:] = kept
        scope = f"{base}:m:{ctx.model.name}:"
        plan = self._plan(identity.team, identity.key, ctx.model.name)
        ctx.checks.extend(c for c in plan.rpm if c.key.startswith(scope))
        for key, limit, rate in plan.tpm:
            if key.startswith(scope):
                ctx.checks.append(Check("bucket", key, limit, "tpm", rate=rate, cost=ctx.reserved_tokens))
        for key, limit in plan.parallel:
            if key.startswith(scope):
                member = self._member()
                ctx.checks.append(
                    Check("parallel", key, limit, "parallel", member=member, stale_ms=self.stale_ms)
                )

    def _member(self) -> str:
        return f"{self._slot_prefix}{next(self._slots):x}"

    def finish(self, ctx: RequestContext) -> None:
        used = ctx.charged_tokens()
        for check in ctx.admitted:
            if check.label == "tpm":
                delta = used - check.cost
                if delta:
                    ctx.ops.append(Op("bucket", check.key, (check.limit, check.rate, delta)))
            elif check.kind == "parallel":
                ctx.ops.append(Op("release", check.key, (check.member,)))
