"""Budgets (USD and tokens, daily and monthly, UTC calendar windows) and the usage books.

Admission refuses a team (or key) whose budget for the current window is spent (429
``insufficient_quota``). When a request ends, its tokens and cost are added to the window counters
and to the per-day usage report that ``GET /api/v1/usage`` reads — the same numbers the metrics count.
"""

from __future__ import annotations

from typing import ClassVar

from aiohttp import web

from gateway.accounting import windows
from gateway.config import Budgets
from gateway.context import RequestContext
from gateway.pipeline import Services
from gateway.state.base import Check, Op

DAY_TTL = 3 * 86400
MONTH_TTL = 40 * 86400
USAGE_TTL = 400 * 86400


def usage_key(prefix: str, team: str, day: str) -> str:
    return f"{prefix}:{{{team}}}:usage:{day}"


class QuotaPlugin:
    name: ClassVar[str] = "quota"
    declares_checks_only: ClassVar[bool] = True

    def __init__(self, services: Services) -> None:
        self.prefix = services.prefix

    def _scopes(self, ctx: RequestContext) -> list[tuple[str, Budgets]]:
        identity = ctx.identity
        if identity is None or identity.team is None:
            return []
        base = f"{self.prefix}:{{{identity.team.id}}}"
        scopes = [(base, identity.team.budgets)]
        if identity.key is not None:
            scopes.append((f"{base}:k:{identity.key.id}", identity.key.budgets))
        return scopes

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        day, month, day_left, month_left = windows()
        for base, b in self._scopes(ctx):
            for limit, window, left in (
                (b.daily_usd, "usd:d:" + day, day_left),
                (b.monthly_usd, "usd:m:" + month, month_left),
                (b.daily_tokens, "tok:d:" + day, day_left),
                (b.monthly_tokens, "tok:m:" + month, month_left),
            ):
                if limit is not None:
                    key = f"{base}:{window}"
                    ctx.checks.append(Check("budget", key, float(limit), "budget", stale_ms=int(left * 1000)))
        return None

    def finish(self, ctx: RequestContext) -> None:
        scopes = self._scopes(ctx)
        if not scopes or (not ctx.attempts and ctx.cache != "hit"):
            return  # refused before reaching a model (a limit, a budget, a bad request): nothing to book
        day, month, _, _ = windows()
        tokens = ctx.charged_tokens()
        cost = ctx.cost_usd or 0.0
        for base, budgets in scopes:
            # Counters exist only for the windows a budget is set on (the usage report has the rest).
            if cost and budgets.daily_usd is not None:
                ctx.ops.append(Op("incr", f"{base}:usd:d:{day}", (cost, DAY_TTL)))
            if cost and budgets.monthly_usd is not None:
                ctx.ops.append(Op("incr", f"{base}:usd:m:{month}", (cost, MONTH_TTL)))
            if tokens and budgets.daily_tokens is not None:
                ctx.ops.append(Op("incr", f"{base}:tok:d:{day}", (tokens, DAY_TTL)))
            if tokens and budgets.monthly_tokens is not None:
                ctx.ops.append(Op("incr", f"{base}:tok:m:{month}", (tokens, MONTH_TTL)))
        assert ctx.team is not None
        usage = ctx.usage if ctx.cache != "hit" else None
        ctx.ops.append(
            Op(
                "usage",
                usage_key(self.prefix, ctx.team, day),
                (
                    ctx.model.name,
                    usage.prompt_tokens if usage else 0,
                    usage.completion_tokens if usage else 0,
                    cost,
                    USAGE_TTL,
                ),
            )
        )
