"""Budgets (USD and tokens, daily and monthly, UTC calendar windows) and the usage books.

Admission refuses a team (or key) whose budget for the current window is spent (429
``insufficient_quota``). When a request ends, its tokens and cost are added to the window counters
and to the per-day usage report that ``GET /api/v1/usage`` reads — the same numbers the metrics count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aiohttp import web

from gateway.accounting import window_ends_ms, windows
from gateway.config import IdentityNeed, ModelConfig, TeamConfig
from gateway.context import RequestContext
from gateway.limits import keys
from gateway.pipeline import Services
from gateway.state.base import Check, KeyRecord, Op

DAY_TTL = 3 * 86400
MONTH_TTL = 40 * 86400
USAGE_TTL = 400 * 86400


_MAX_PLANS = 10_000


@dataclass(frozen=True, slots=True)
class _Plan:
    team: TeamConfig
    key: KeyRecord | None
    day: str
    budgets: tuple[tuple[str, str, float, bool], ...]  # (counter key, "d"/"m", limit, counts USD)
    checks: tuple[Check, ...]  # the admission checks of those budgets: the same for a whole day
    usage_key: str


class QuotaPlugin:
    name: ClassVar[str] = "quota"
    declares_checks_only: ClassVar[bool] = True
    needs_identity: ClassVar[IdentityNeed] = "required"

    def __init__(self, services: Services) -> None:
        self.prefix = services.prefix
        # (team id, key id) -> plan: a team re-read from the store (every second) replaces its plan
        # rather than adding one, so this holds one entry per team and key.
        self._plans: dict[tuple[str, str | None], _Plan] = {}

    @property
    def plan_count(self) -> int:
        """How many budget plans are held (one per team and key: bounded by them, not by time)."""
        return len(self._plans)

    def _plan(self, ctx: RequestContext) -> _Plan | None:
        """The budget keys of the caller's team (and key) for the current windows, built once per
        (team, key, day) — the day changes the key names, a replaced team or key gets a new plan."""
        identity = ctx.identity
        if identity is None or identity.team is None:
            return None
        team, key = identity.team, identity.key
        day, month, _, _ = windows()
        cache_key = (team.id, key.id if key is not None else None)
        plan = self._plans.get(cache_key)
        if plan is not None and plan.team is team and plan.key is key and plan.day == day:
            return plan
        if len(self._plans) >= 10_000:  # teams re-read every second make new objects: stay bounded
            self._plans.clear()
        base = keys.team(self.prefix, team.id)
        scopes = [(base, team.budgets)]
        if key is not None:
            scopes.append((keys.api_key(base, key.id), key.budgets))
        budgets: list[tuple[str, str, float, bool]] = []  # (key, window kind, limit, counts usd)
        for scope, b in scopes:
            for limit, window, usd in (
                (b.daily_usd, "usd:d:" + day, True),
                (b.monthly_usd, "usd:m:" + month, True),
                (b.daily_tokens, "tok:d:" + day, False),
                (b.monthly_tokens, "tok:m:" + month, False),
            ):
                if limit is not None:
                    budgets.append((f"{scope}:{window}", window[4], float(limit), usd))
        ends = dict(zip("dm", window_ends_ms(), strict=True))
        checks = tuple(Check("budget", k, limit, "budget", ends_ms=ends[w]) for k, w, limit, _ in budgets)
        plan = _Plan(team, key, day, tuple(budgets), checks, keys.usage(self.prefix, team.id, day))
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        plan = self._plan(ctx)
        if plan is not None:
            ctx.limits.checks.extend(plan.checks)
        return None

    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        return None  # nothing of this plugin depends on the model

    def finish(self, ctx: RequestContext) -> None:
        if not ctx.attempts and ctx.cache != "hit":
            return  # refused before reaching a model (a limit, a budget, a bad request): nothing to book
        plan = self._plan(ctx)
        if plan is None:
            return
        tokens = ctx.charged_tokens()
        cost = ctx.cost_usd or 0.0
        # Counters exist only for the windows a budget is set on (the usage report has the rest).
        for key, window, _, usd in plan.budgets:
            amount = cost if usd else tokens
            if amount:
                ctx.limits.ops.append(Op("incr", key, (amount, DAY_TTL if window == "d" else MONTH_TTL)))
        usage = ctx.usage if ctx.cache != "hit" else None
        ctx.limits.ops.append(
            Op(
                "usage",
                plan.usage_key,
                (
                    ctx.model.name,
                    usage.prompt_tokens if usage else 0,
                    usage.completion_tokens if usage else 0,
                    cost,
                    USAGE_TTL,
                ),
            )
        )
