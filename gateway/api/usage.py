"""``GET /api/v1/usage``: requests, tokens and cost by day and model, for the caller's team only.

A team key (or team JWT) reads its own team; asking for another team is refused. The master key
or an admin JWT reads any team with ``?team=``. Days are UTC; ``start``/``end`` are inclusive
``YYYY-MM-DD`` dates (default: the last 7 days), covering at most ``MAX_DAYS`` (366) days.

A report costs the store one round trip whatever its range (one script reads every day's hash), plus
one for the rate limit below: a long range cannot hold a connection for hundreds of sequential reads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import orjson
from aiohttp import web

from gateway import metrics
from gateway.errors import InvalidRequest, PermissionDenied, RateLimited
from gateway.limits import keys
from gateway.runtime import GATEWAY
from gateway.state.base import Check

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd")
MAX_DAYS = 366  # a leap year, both ends included: one report reads at most this many hashes

# The usage API's own rate limits, not the team's completion rpm. Its cost has nothing to do with a
# completion's (up to MAX_DAYS hash reads, no model call), so the completion rpm would bound it badly
# either way: a team with no rpm (or a large one) could still poll it without end, and a dashboard
# polling it would take requests from the team's completions and be refused whenever they are at
# their limit. So: a bucket per team (shared by every instance, in the store under the team's hash
# tag, taken through the Limiter like any limit), and one per instance for admin callers (the master
# key, admin JWTs) reading any team, kept in memory (no store call). A refusal is a 429 with Retry-After.
TEAM_RPM = 60
ADMIN_RPM = 120
# Reports reading the store at once, per instance (the rest wait their turn): a burst of them cannot
# take every pooled connection of the off-hot-path client, which runtime keys are looked up through.
CONCURRENT_READS = 4
_READS = web.AppKey("usage_reads", asyncio.Semaphore)


def _date(value: str | None, default: dt.date, name: str) -> dt.date:
    if value is None:
        return default
    try:
        date = dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date like 2026-01-31", param=name) from None
    # Far from the calendar's ends, so the default range and the day loop cannot overflow.
    if not 2000 <= date.year <= 2999:
        raise InvalidRequest(f"{name} must be between 2000-01-01 and 2999-12-31", param=name)
    return date


async def usage(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify(request.headers)
    asked = request.query.get("team")
    if identity.admin and identity.team is None:
        if not asked:
            raise InvalidRequest("admin callers must name a team with ?team=", param="team")
        team = asked
    else:
        assert identity.team is not None
        team = identity.team.id
        if asked and asked != team and not identity.admin:
            raise PermissionDenied("a team can only read its own usage", param="team", code="forbidden_team")
        team = asked or team
    today = dt.datetime.now(dt.UTC).date()
    end = _date(request.query.get("end"), today, "end")
    start = _date(request.query.get("start"), end - dt.timedelta(days=6), "start")
    if start > end or (end - start).days >= MAX_DAYS:
        raise InvalidRequest(
            f"start must not be after end, and the range at most {MAX_DAYS} days", param="start"
        )
    prefix = gw.prefix
    await _take(request, prefix, team, admin=identity.admin)
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    async with request.app[_READS]:
        hashes = await gw.store.usage_many([keys.usage(prefix, team, d.strftime("%Y%m%d")) for d in days])
    rows: list[dict[str, Any]] = []
    total = dict.fromkeys(FIELDS, 0.0)
    for day, fields in zip(days, hashes, strict=True):
        by_model: dict[str, dict[str, float]] = {}
        for field_name, value in fields.items():
            model, _, kind = field_name.rpartition("|")
            by_model.setdefault(model, dict.fromkeys(FIELDS, 0.0))[kind] = value
        for model in sorted(by_model):
            row = by_model[model]
            for k in FIELDS:
                total[k] += row.get(k, 0.0)
            rows.append({"date": day.isoformat(), "model": model, **_typed(row)})
    body = {
        "object": "usage",
        "team": team,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "data": rows,
        "total": _typed(total),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _take(request: web.Request, prefix: str, team: str, *, admin: bool) -> None:
    """One token of the caller's usage API bucket, or a 429 with Retry-After."""
    limiter = request.app[GATEWAY].pipeline.limiter
    if admin:
        rpm, label = ADMIN_RPM, "none"  # (the team label of callers with no team)
        check = Check("bucket", keys.usage_api(prefix, None), rpm, "usage_api", rate=rpm / 60, cost=1)
        decision = await limiter.local.admit([check])  # per instance: no store call
    else:
        rpm, label = TEAM_RPM, team
        # The team's hash tag: on Redis Cluster, the same master as the team's usage books.
        check = Check("bucket", keys.usage_api(prefix, team), rpm, "usage_api", rate=rpm / 60, cost=1)
        decision, _ = await limiter.take([check])  # the store's fail-open/closed policy applies
    if decision.failed is not None:
        metrics.RATE_LIMITED.labels(label, "usage_api").inc()
        raise RateLimited(
            f"rate limit reached: usage API requests per minute ({rpm})", retry_after=decision.retry_after
        )


def _typed(row: dict[str, float]) -> dict[str, Any]:
    return {k: (round(row.get(k, 0.0), 10) if k == "cost_usd" else int(row.get(k, 0.0))) for k in FIELDS}


def add_routes(app: web.Application) -> None:
    app[_READS] = asyncio.Semaphore(CONCURRENT_READS)
    app.router.add_get("/api/v1/usage", usage)
