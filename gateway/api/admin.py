"""The admin API: teams and keys. Master key or an admin JWT only; a team key never gets in.

Teams defined in the config file are read-only here (the config wins on conflict: a runtime team
can never shadow one). Bodies accept only the documented fields, so nothing else can be assigned.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import orjson
from aiohttp import web

from gateway.auth import Identity
from gateway.config import Budgets, ConfigError, Limits, hash_key
from gateway.config_parser import parse_team
from gateway.errors import InvalidRequest, NotFound, PermissionDenied
from gateway.runtime import GATEWAY, Gateway
from gateway.state.base import KeyRecord
from gateway.state.cache import glob_escape

KEY_FIELDS = ("team", "name", "expires_at", "models", "limits", "budgets")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def require_admin(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY]
    if gw.config.master_key_hash is None and gw.config.jwt is None:
        raise PermissionDenied("the admin API is disabled: set admin.master_key", code="admin_disabled")
    identity: Identity = await gw.auth.identify(request.headers)
    if not identity.admin:
        raise PermissionDenied("admin rights required", code="admin_required")
    return gw


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def _invalid(exc: ConfigError) -> InvalidRequest:
    first = exc.problems[0]
    return InvalidRequest("; ".join(exc.problems), param=first.split(":", 1)[0] or None, code="invalid_field")


def _models(gw: Gateway) -> set[str]:
    return {m.name for m in gw.config.models}


def _rules(gw: Gateway) -> set[str]:
    return {rule.name for rule in gw.config.guardrails.rules}


async def create_team(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    body = await _body(request)
    try:
        team = parse_team(body, _models(gw), rule_names=_rules(gw))
    except ConfigError as exc:
        raise _invalid(exc) from None
    if team.id in gw.auth.config_teams or await gw.store.get_team(team.id) is not None:
        raise InvalidRequest(f"team {team.id!r} already exists", status=409, code="conflict")
    data = team.public()
    await gw.store.put_team(team.id, data)
    gw.auth.forget(team_id=team.id)
    return _json({**data, "source": "api"}, 201)


async def list_teams(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    teams = [{**t.public(), "source": "config"} for t in gw.auth.config_teams.values()]
    teams += [
        {**t, "source": "api"} for t in await gw.store.list_teams() if t["id"] not in gw.auth.config_teams
    ]
    return _json({"object": "list", "data": teams})


async def _runtime_team(gw: Gateway, team_id: str, *, write: bool) -> dict[str, Any]:
    if team_id in gw.auth.config_teams:
        if write:
            raise InvalidRequest(
                f"team {team_id!r} is defined in the config file; change it there",
                status=409,
                code="config_team",
            )
        return {**gw.auth.config_teams[team_id].public(), "source": "config"}
    data = await gw.store.get_team(team_id)
    if data is None:
        raise NotFound(f"no team {team_id!r}", code="team_not_found")
    return {**data, "source": "api"}


async def get_team(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    return _json(await _runtime_team(gw, request.match_info["team"], write=False))


async def patch_team(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    team_id = request.match_info["team"]
    current = await _runtime_team(gw, team_id, write=True)
    body = await _body(request)
    if "id" in body and body["id"] != team_id:
        raise InvalidRequest("a team's id cannot change", param="id", code="invalid_field")
    merged = _merge_patch({k: v for k, v in current.items() if k != "source"}, body)
    try:
        team = parse_team(merged, _models(gw), rule_names=_rules(gw))
    except ConfigError as exc:
        raise _invalid(exc) from None
    await gw.store.put_team(team_id, team.public())
    gw.auth.forget(team_id=team_id)
    return _json({**team.public(), "source": "api"})


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON Merge Patch (RFC 7396): nested objects merge, ``null`` removes a field. So
    ``{"limits": {"rpm": 5}}`` changes rpm and keeps the team's other limits."""
    merged = dict(target)
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        elif isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge_patch(merged[name], value)
        else:
            merged[name] = value
    return merged


async def delete_team(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    team_id = request.match_info["team"]
    await _runtime_team(gw, team_id, write=True)
    for record in await gw.store.list_keys(team_id):
        await gw.store.delete_key(record)
        gw.auth.forget(key_hash=record.key_hash)
    await gw.store.delete_team(team_id)
    gw.auth.forget(team_id=team_id)
    return web.Response(status=204)


def _parse_expiry(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("expires_at must be an ISO-8601 string", param="expires_at", code="invalid_type")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("expires_at must be an ISO-8601 date-time", param="expires_at") from None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


async def create_key(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    body = await _body(request)
    unknown = sorted(set(body) - set(KEY_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s): {', '.join(unknown)}", param=unknown[0], code="unknown_field"
        )
    team_id = body.get("team")
    if not isinstance(team_id, str) or not team_id:
        raise InvalidRequest("team is required", param="team", code="missing_required_parameter")
    if await gw.auth.team(team_id) is None:
        raise NotFound(f"no team {team_id!r}", param="team", code="team_not_found")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise InvalidRequest("name must be a string of at most 200 characters", param="name")
    models = body.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise InvalidRequest("models must be a list of model names", param="models", code="invalid_type")
        unknown_models = sorted(set(models) - _models(gw))
        if unknown_models:
            raise InvalidRequest(f"unknown model(s): {', '.join(unknown_models)}", param="models")
    # Key-level limits and budgets reuse the team validation (and its field allowlist).
    try:
        shape = parse_team(
            {"id": team_id, "limits": body.get("limits"), "budgets": body.get("budgets")}, _models(gw)
        )
    except ConfigError as exc:
        raise _invalid(exc) from None
    key = "sk-gw-" + secrets.token_urlsafe(32)
    record = KeyRecord(
        id="key_" + secrets.token_hex(8),
        team=team_id,
        key_hash=hash_key(key),
        prefix=key[:12],
        name=name,
        created_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        expires_at=_parse_expiry(body.get("expires_at")),
        models=tuple(models) if models is not None else None,
        limits=shape.limits if isinstance(shape.limits, Limits) else Limits(),
        budgets=shape.budgets if isinstance(shape.budgets, Budgets) else Budgets(),
    )
    await gw.store.put_key(record)
    return _json({**record.public(), "key": key}, 201)


async def list_keys(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    team = request.query.get("team") or None
    return _json({"object": "list", "data": [r.public() for r in await gw.store.list_keys(team)]})


async def delete_key(request: web.Request) -> web.Response:
    gw = await require_admin(request)
    record = await gw.store.get_key_by_id(request.match_info["key"])
    if record is None:
        raise NotFound("no such key", code="key_not_found")
    await gw.store.delete_key(record)
    gw.auth.forget(key_hash=record.key_hash)
    return web.Response(status=204)


async def clear_cache(request: web.Request) -> web.Response:
    """Drop cached answers: all, or one team's (``?team=``), or one model's (``?model=``), or both."""
    gw = await require_admin(request)
    prefix = gw.prefix
    team = request.query.get("team")
    model = request.query.get("model")
    pattern = f"{prefix}:cache:{glob_escape(team) if team else '*'}:{glob_escape(model) if model else '*'}:*"
    await gw.cache.clear(pattern)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/teams", create_team)
    app.router.add_get("/admin/teams", list_teams)
    app.router.add_get("/admin/teams/{team}", get_team)
    app.router.add_patch("/admin/teams/{team}", patch_team)
    app.router.add_delete("/admin/teams/{team}", delete_team)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_delete("/admin/keys/{key}", delete_key)
    app.router.add_delete("/admin/cache", clear_cache)
