"""Requests per minute, tokens per minute and parallel requests — per team, per key, per team+model.

Token limits reserve at admission (an estimate of the prompt plus ``max_tokens``, or
``rate_limiting.default_max_tokens`` capped at half the tightest tpm) and are reconciled with the real
usage when the request ends, whatever the outcome: the difference is taken or refunded, so
reservations never leak.
"""

from __future__ import annotations

import itertools
import os
from typing import ClassVar

from aiohttp import web

from gateway.accounting import reserve_tokens
from gateway.config import Limits
from gateway.context import RequestContext
from gateway.pipeline import Services
from gateway.state.base import Check, Op


class RateLimitPlugin:
    name: ClassVar[str] = "rate_limit"
    declares_checks_only: ClassVar[bool] = True

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

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        identity = ctx.identity
        if identity is None or identity.team is None:
            return None
        team = identity.team
        base = f"{self.prefix}:{{{team.id}}}"
        scopes: list[tuple[str, Limits]] = [(base, team.limits)]
        model_limits = team.model_limits.get(ctx.model.name)
        if model_limits is not None:
            scopes.append((f"{base}:m:{ctx.model.name}", model_limits))
        if identity.key is not None:
            scopes.append((f"{base}:k:{identity.key.id}", identity.key.limits))
        tpm = min((limits.tpm for _, limits in scopes if limits.tpm), default=0)
        if tpm and not ctx.reserved_tokens:
            ctx.reserved_tokens = reserve_tokens(ctx, tpm, self.default_max_tokens)
        for key, limits in scopes:
            if limits.rpm:
                ctx.checks.append(
                    Check("bucket", f"{key}:rpm", limits.rpm, "rpm", rate=limits.rpm / 60, cost=1)
                )
            if limits.tpm:
                ctx.checks.append(
                    Check(
                        "bucket",
                        f"{key}:tpm",
                        limits.tpm,
                        "tpm",
                        rate=limits.tpm / 60,
                        cost=ctx.reserved_tokens,
                    )
                )
            if limits.max_parallel:
                ctx.checks.append(
                    Check(
                        "parallel",
                        f"{key}:par",
                        limits.max_parallel,
                        "parallel",
                        member=self._member(),
                        stale_ms=self.stale_ms,
                    )
                )
        return None

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
