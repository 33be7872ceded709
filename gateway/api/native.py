"""The platform's native REST API (``/api/v1``): completions, streams, providers, models.

Each completion is translated into an OpenAI chat body once (``formats.native``) and then runs the
same core as ``/v1/chat/completions`` (``gateway.completion``): auth, limits, budgets, cache,
routing and fallback, usage, metrics and the access line. Errors take the native shape at the edge
(``server._error_response``).

Browsers' ``EventSource`` can neither POST nor send headers, so ``GET /api/v1/llm/complete/stream``
takes a ticket instead of a key: ``POST .../stream/ticket`` (authenticated, same body) stores the
request and who made it (a key's SHA-256, never the key) for ``TICKET_TTL`` seconds under the
SHA-256 of a 256-bit random ticket. The GET takes it (get-and-delete: single use), identifies the
caller again from that record — so a key revoked in between is refused — and streams.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway import completion as core
from gateway import jsonx
from gateway.api.health import detailed, provider_status
from gateway.api.openai import gateway_headers, read_json
from gateway.auth import Identity, tenant
from gateway.context import RequestContext
from gateway.errors import AuthenticationFailed, NotFound, PermissionDenied, RateLimited
from gateway.formats import native
from gateway.limits import keys
from gateway.relay import SSE_HEADERS, relay_stream
from gateway.runtime import CONTEXT, GATEWAY, REQUEST_ID, Gateway
from gateway.state.base import Check

JSON = "application/json"
PREFIXES = ("/api/v1/llm/", "/api/v1/complete", "/api/v1/models")
TICKET_TTL = 30
MAX_TICKET_CHARS = 64
# SECURITY: tickets are stored before any limit is taken, so they are bounded on their own: a body
# of at most 1 MiB, and at most 60 a minute per team (so ≤ ~30 MiB outstanding per team).
TICKET_MAX_BYTES = 1024 * 1024
TICKETS_PER_MINUTE = 60


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=jsonx.dumps(data), status=status, content_type=JSON)


async def _caller(gw: Gateway, request: web.Request) -> Identity | None:
    """Who is asking (None when the gateway runs without auth)."""
    return await gw.auth.identify(request.headers) if gw.authenticates else None


async def prepare(
    gw: Gateway,
    request_id: str,
    headers: CIMultiDictProxy[str],
    body: dict[str, Any],
    size: int,
    identity: Identity | None,
) -> RequestContext:
    """An ``LLMRequest`` as a request context (the model chosen when it asks for "auto"); shared by
    the REST routes and GraphQL. ``identity``: the caller when already known (a ticket, a socket)."""
    chat, model, requirements = native.parse_request(body)
    if model is None:
        if identity is None and gw.authenticates:
            identity = await gw.auth.identify(headers)
        model = gw.catalog.select(requirements, core.allowed_models(gw, identity), chat)
    chat["model"] = model
    ctx = core.make_context(gw, request_id, headers, chat, size, "chat")
    if model != (body.get("options") or {}).get("model"):
        ctx.response_headers["x-gateway-model"] = model
    ctx.presented = identity
    return ctx


async def _context(
    request: web.Request, gw: Gateway, body: dict[str, Any], size: int, identity: Identity | None
) -> RequestContext:
    ctx = await prepare(gw, request[REQUEST_ID], request.headers, body, size, identity)
    request[CONTEXT] = ctx
    return ctx


def answer(gw: Gateway, ctx: RequestContext, parsed: dict[str, Any]) -> dict[str, Any]:
    """The ``LLMResponse`` of a finished chat.completion."""
    content, finish, upstream_id = native.completion_text(parsed)
    return {
        "id": upstream_id or ctx.request_id,
        "content": content,
        "model": ctx.model.name,
        "provider": ctx.provider,
        "upstreamModel": ctx.upstream_model,
        "finishReason": finish,
        "usage": native.usage_json(ctx.usage),
        "costUsd": native.response_cost(ctx),
        "cached": ctx.cache == "hit",
        "latencyMs": round((time.perf_counter() - ctx.started) * 1000, 2),
        "capabilities": gw.catalog.json[ctx.model.name],
    }


async def run(gw: Gateway, ctx: RequestContext) -> tuple[web.StreamResponse | None, dict[str, Any] | None]:
    """Admit and complete (non-stream): (a plugin's own answer, None) or (None, the LLMResponse)."""
    reply = await core.admit(gw, ctx)
    if reply is not None:
        if ctx.cache != "hit" or not isinstance(reply, web.Response):
            return reply, None
        assert isinstance(reply.body, bytes)
        return None, answer(gw, ctx, jsonx.loads(reply.body))  # the cached chat.completion
    result = await core.unary(gw, ctx)
    ctx.response_body, ctx.complete = result.body, True
    return None, answer(gw, ctx, result.parsed)


# -- completions --------------------------------------------------------------------------------
async def complete(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    body, size = await read_json(request, gw.config.server.max_body_bytes)
    ctx = await _context(request, gw, body, size, None)
    reply, response = await run(gw, ctx)
    return reply if reply is not None else _json(response)


async def complete_stream(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    body, size = await read_json(request, gw.config.server.max_body_bytes)
    return await _stream(request, gw, body, size, None)


async def _stream(
    request: web.Request, gw: Gateway, body: dict[str, Any], size: int, identity: Identity | None
) -> web.StreamResponse:
    ctx = await _context(request, gw, body, size, identity)
    ctx.body["stream"] = ctx.stream = True
    ctx.added_include_usage = True  # the last event carries usage; the client never sees the chunk
    answer = await core.admit(gw, ctx)
    if answer is not None:
        if ctx.cache != "hit" or not isinstance(answer, web.Response):
            return answer
        assert isinstance(answer.body, bytes)  # the cached stream, as OpenAI events
        shape = native.NativeStream(ctx.request_id, ctx.provider)
        replay = shape.feed(answer.body) + shape.end(ctx)
        return web.Response(body=replay, headers={**SSE_HEADERS, **gateway_headers(ctx)})
    upstream = await core.stream(gw, ctx)
    gateway_headers(ctx)
    return await relay_stream(request, ctx, upstream, native.NativeStream(ctx.request_id, ctx.provider))


# -- EventSource tickets ------------------------------------------------------------------------
def _ticket_key(gw: Gateway, ticket: str) -> str:
    return f"{gw.prefix}:ticket:{hashlib.sha256(ticket.encode()).hexdigest()}"


async def create_ticket(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body, _ = await read_json(request, min(gw.config.server.max_body_bytes, TICKET_MAX_BYTES))
    # A request that cannot run fails here, where the caller can read the error, not in the browser's
    # EventSource. Limits and budgets are taken when the stream starts: that is the request.
    _, model, _ = native.parse_request(dict(body))
    principal = None
    identity: Identity | None = None
    if gw.authenticates:
        identity, principal = await gw.auth.principal(request.headers)
        if identity.team is None:
            raise PermissionDenied(
                "the master key is for the admin API; use a team key for model calls",
                code="admin_key_not_allowed",
            )
    if model is not None:
        route = gw.router.routes.get(model)
        if route is None or not route.targets:
            raise NotFound(f"the model {model!r} does not exist", param="model", code="model_not_found")
        if identity is not None and not identity.allows(model):
            raise PermissionDenied(
                f"your team may not use the model {model!r}", param="model", code="model_not_allowed"
            )
    await _take_ticket_quota(gw, tenant(identity))
    ticket = secrets.token_urlsafe(32)
    record = orjson.dumps({"body": body, "principal": principal})
    await gw.cache.set(_ticket_key(gw, ticket), record, TICKET_TTL)
    return _json(
        {"ticket": ticket, "url": f"/api/v1/llm/complete/stream?ticket={ticket}", "expiresIn": TICKET_TTL},
        201,
    )


async def _take_ticket_quota(gw: Gateway, team: str) -> None:
    check = Check(
        "bucket",
        keys.tickets(gw.prefix, team),
        TICKETS_PER_MINUTE,
        "rpm",
        rate=TICKETS_PER_MINUTE / 60,
        cost=1,
    )
    decision, _ = await gw.pipeline.limiter.take([check])
    if decision.failed is not None:
        raise RateLimited(
            f"too many stream tickets: at most {TICKETS_PER_MINUTE} a minute per team",
            retry_after=decision.retry_after,
            code="rate_limit_exceeded",
        )


async def ticket_stream(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    ticket = request.query.get("ticket", "")
    raw = None
    if 0 < len(ticket) <= MAX_TICKET_CHARS:
        raw = await gw.cache.take(_ticket_key(gw, ticket))
    if raw is None:
        raise AuthenticationFailed(
            "unknown, used or expired stream ticket: create one with POST /api/v1/llm/complete/stream/ticket",
            code="invalid_stream_ticket",
        )
    record = orjson.loads(raw)
    principal = record["principal"]
    identity = await gw.auth.from_principal(principal) if principal is not None else None
    body = record["body"]
    return await _stream(request, gw, body, len(raw), identity)


# -- providers and models -----------------------------------------------------------------------
async def list_providers(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    served = core.served(gw, core.allowed_models(gw, await _caller(gw, request)))
    providers = [
        {
            "name": name,
            "type": gw.providers[name].config.type,
            "status": provider_status(gw, name),
            "models": models,
        }
        for name, models in served.items()
    ]
    return _json({"providers": providers})


async def provider_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    name = request.match_info["provider"]
    served = core.served(gw, core.allowed_models(gw, await _caller(gw, request)))
    if name not in served:
        raise NotFound(f"unknown provider {name!r}", param="provider", code="provider_not_found")
    models = [{"name": m, "capabilities": gw.catalog.json[m]} for m in served[name]]
    return _json({"provider": name, "models": models})


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    allowed = core.allowed_models(gw, await _caller(gw, request))
    models = [
        {
            "name": name,
            "providers": core.model_providers(gw, name),
            "capabilities": gw.catalog.json[name],
            "performance": gw.performance.report(name),
        }
        for name in allowed
    ]
    return _json({"models": models})


def add_routes(app: web.Application) -> None:
    for prefix in ("/api/v1/llm", "/api/v1"):
        app.router.add_post(f"{prefix}/complete", complete)
        app.router.add_post(f"{prefix}/complete/stream", complete_stream)
    app.router.add_post("/api/v1/llm/complete/stream/ticket", create_ticket)
    app.router.add_get("/api/v1/llm/complete/stream", ticket_stream)
    app.router.add_get("/api/v1/llm/providers", list_providers)
    app.router.add_get("/api/v1/llm/providers/{provider}/models", provider_models)
    app.router.add_get("/api/v1/models", list_models)
    app.router.add_get("/api/v1/llm/health", detailed)
