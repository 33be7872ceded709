"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, for Claude
Code and the ``anthropic`` SDKs, on the same pipeline as every other surface (auth, allowlists, limits,
budgets, usage and cost, metrics, fallback).

Keys come in ``x-api-key`` (as the SDK sends them) or ``Authorization: Bearer``. To an ``anthropic``
target the body goes up unchanged but for ``model`` and the answer (JSON or event stream) comes back
byte for byte, the client's ``anthropic-version`` / ``anthropic-beta`` forwarded; to an
OpenAI-compatible target both are translated (``gateway.formats.anthropic``). Errors take Anthropic's
shape (the edge, ``gateway.server``). The cache stores these answers as Messages (plugins/cache.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway import completion as core
from gateway import jsonx
from gateway.api.openai import JSON, begin, gateway_headers, read_json
from gateway.errors import InvalidRequest, NotFound, PermissionDenied
from gateway.formats import anthropic
from gateway.relay import anthropic_headers, read_body, relay_stream
from gateway.runtime import GATEWAY

PREFIX = "/v1/messages"


def _validate(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: a non-empty array is required", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: must be 'user' or 'assistant'", param="messages")
        if not isinstance(message.get("content"), str | list):
            raise InvalidRequest(f"messages.{i}.content: a string or an array of blocks", param="messages")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens: a positive integer is required", param="max_tokens")
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise InvalidRequest("stream: must be a boolean", param="stream")
    _check_system(body)


def _check_system(body: dict[str, Any]) -> None:
    system = body.get("system")
    if system is not None and not (
        isinstance(system, str) or (isinstance(system, list) and all(isinstance(b, dict) for b in system))
    ):
        raise InvalidRequest("system: a string or an array of text blocks", param="system")


async def messages(request: web.Request) -> web.StreamResponse:
    ctx, answer = await begin(request, "messages", _validate)
    if answer is not None:
        return answer
    gw = request.app[GATEWAY]
    if ctx.stream:
        upstream = await core.stream(gw, ctx)
        gateway_headers(ctx)
        native = core.passes_through(gw, ctx)
        shape = anthropic.PassThrough() if native else anthropic.MessagesStream(ctx.model_name)
        return await relay_stream(request, ctx, upstream, shape)
    result = await core.unary(gw, ctx)
    if core.passes_through(gw, ctx):
        data = result.body
    else:
        data = jsonx.dumps(anthropic.chat_to_message(result.parsed, ctx.model_name))
    ctx.response_body, ctx.complete = data, True
    return web.Response(body=data, content_type=JSON)


async def count_tokens(request: web.Request) -> web.Response:
    """The model's first ``anthropic`` target counts exactly; without one (or when it cannot answer)
    the gateway estimates (``x-gateway-token-count: estimate``). Not a completion: no limits are
    taken and nothing is booked."""
    gw = request.app[GATEWAY]
    body, _ = await read_json(request, gw.config.server.max_body_bytes)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model: a string is required", param="model")
    if not isinstance(body.get("messages"), list):
        raise InvalidRequest("messages: an array is required", param="messages")
    _check_system(body)
    identity = await gw.auth.identify(request.headers) if gw.authenticates else None
    route = gw.router.routes.get(name)
    if route is None or not route.targets:
        raise NotFound(f"model: {name!r} does not exist", param="model", code="model_not_found")
    if identity is not None and not identity.allows(name):
        raise PermissionDenied(f"this key may not use model {name!r}", code="model_not_allowed")
    for target in route.targets:
        # (not breaker.allow(): that would take a half-open circuit's one trial and never give it back)
        if target.provider.wire == "anthropic" and not target.breaker.is_open:
            exact = await _count_upstream(request, target.provider, {**body, "model": target.model})
            if exact is not None:
                return web.Response(body=exact, content_type=JSON, headers={"x-gateway-token-count": "exact"})
            break
    estimate = orjson.dumps({"input_tokens": anthropic.estimate_tokens(body)})
    return web.Response(body=estimate, content_type=JSON, headers={"x-gateway-token-count": "estimate"})


async def _count_upstream(request: web.Request, provider: Any, body: dict[str, Any]) -> bytes | None:
    headers = anthropic_headers(request.headers)
    try:
        async with asyncio.timeout(provider.timeouts.first_byte):
            resp = await provider.post(
                f"{provider.chat_path}/count_tokens", orjson.dumps(body), stream=False, headers=headers
            )
            try:
                data = await read_body(resp, 64 * 1024)
            finally:
                resp.release()
    except Exception:  # unreachable, failing or late: the estimate answers instead
        return None
    if resp.status != 200:
        return None
    try:
        count = orjson.loads(data).get("input_tokens")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return orjson.dumps({"input_tokens": count}) if isinstance(count, int) else None


def add_routes(app: web.Application) -> None:
    app.router.add_post(PREFIX, messages)
    app.router.add_post(f"{PREFIX}/count_tokens", count_tokens)
