"""``GET /api/v1/usage``: requests, tokens and cost by day and model, for the caller's team only.

A team key (or team JWT) reads its own team; asking for another team is refused. The master key
or an admin JWT reads any team with ``?team=``. Days are UTC; ``start``/``end`` are inclusive
``YYYY-MM-DD`` dates (default: the last 7 days), at most 366 days apart.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import InvalidRequest, PermissionDenied
from gateway.runtime import GATEWAY
from plugins.quota import usage_key

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd")


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
    if start > end or (end - start).days > 366:
        raise InvalidRequest("start must not be after end, and the range at most 366 days", param="start")
    prefix = gw.config.redis.prefix if gw.config.redis else "llmgw"
    rows: list[dict[str, Any]] = []
    total = dict.fromkeys(FIELDS, 0.0)
    day = start
    while day <= end:
        by_model: dict[str, dict[str, float]] = {}
        for field_name, value in (
            await gw.store.usage(usage_key(prefix, team, day.strftime("%Y%m%d")))
        ).items():
            model, _, kind = field_name.rpartition("|")
            by_model.setdefault(model, dict.fromkeys(FIELDS, 0.0))[kind] = value
        for model in sorted(by_model):
            row = by_model[model]
            for k in FIELDS:
                total[k] += row.get(k, 0.0)
            rows.append({"date": day.isoformat(), "model": model, **_typed(row)})
        day += dt.timedelta(days=1)
    body = {
        "object": "usage",
        "team": team,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "data": rows,
        "total": _typed(total),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _typed(row: dict[str, float]) -> dict[str, Any]:
    return {k: (round(row.get(k, 0.0), 10) if k == "cost_usd" else int(row.get(k, 0.0))) for k in FIELDS}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/usage", usage)
