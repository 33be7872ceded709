"""The OpenAI wire format: ``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway import completion as core
from gateway.context import RequestContext
from gateway.errors import InvalidRequest, RequestTooLarge
from gateway.relay import relay_stream, unary_attempt
from gateway.runtime import GATEWAY

JSON = "application/json"


async def read_json(request: web.Request, limit: int) -> tuple[dict[str, Any], int]:
    """Read and parse the body once. Oversized bodies are refused before they are read."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"request body is {request.content_length} bytes; the limit is {limit}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes") from None
    except RequestPayloadError:  # e.g. Content-Encoding: gzip over a body that is not gzip
        raise InvalidRequest("the request body could not be decoded", code="invalid_body") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body, len(raw)


def _validate_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest(
            "you must provide a messages parameter",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages", code="invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] must be an object with a string role",
                param=f"messages[{i}]",
                code="invalid_type",
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options", code="invalid_type")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidRequest(f"{name} must be a positive integer", param=name, code="invalid_type")


def gateway_headers(ctx: RequestContext) -> dict[str, str]:
    headers = ctx.response_headers
    if ctx.provider is not None:
        headers["x-gateway-provider"] = ctx.provider
        headers["x-gateway-upstream-model"] = ctx.upstream_model or ""
    headers["x-gateway-attempts"] = str(ctx.attempts)
    headers["x-request-id"] = ctx.request_id
    return headers


async def begin(
    request: web.Request, endpoint: str, validate: Callable[[dict[str, Any]], None]
) -> tuple[RequestContext, web.StreamResponse | None]:
    """Read, check and admit a completion request (``endpoint``: "chat" or "messages"): its context,
    and the answer when a plugin gave one (a cache hit)."""
    gw = request.app[GATEWAY]
    body, size = await read_json(request, gw.config.server.max_body_bytes)
    ctx = core.new_context(request, gw, body, size, endpoint)
    validate(body)
    ctx.stream = body.get("stream") is True
    return ctx, await core.admit(gw, ctx)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx, answer = await begin(request, "chat", _validate_chat)
    if answer is not None:
        return answer
    gw, body = request.app[GATEWAY], ctx.body
    if ctx.stream:
        options = body.get("stream_options")
        ctx.added_include_usage = not (isinstance(options, dict) and options.get("include_usage") is True)
        upstream = await core.stream(gw, ctx)
        gateway_headers(ctx)
        return await relay_stream(request, ctx, upstream)
    result = await core.unary(gw, ctx)
    ctx.response_body, ctx.complete = result.body, True
    return web.Response(body=result.body, content_type=JSON)


async def embeddings(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    body, size = await read_json(request, gw.config.server.max_body_bytes)
    ctx = core.new_context(request, gw, body, size, "embeddings")
    value = body.get("input")
    if value is None or value == "" or value == []:
        raise InvalidRequest(
            "you must provide an input parameter", param="input", code="missing_required_parameter"
        )
    if not isinstance(value, str | list):
        raise InvalidRequest("input must be a string or an array", param="input", code="invalid_type")
    answer = await core.admit(gw, ctx)
    if answer is not None:
        return answer
    result = await gw.router.run(ctx, lambda target: unary_attempt(ctx, target, "/embeddings"))
    return web.Response(body=result.body, content_type=JSON)


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if not gw.authenticates:
        return web.Response(body=gw.models_body, content_type=JSON)
    identity = await gw.auth.identify(request.headers)
    allowed = [m.name for m in gw.config.models if identity.allows(m.name)]
    return web.Response(body=models_body(allowed), content_type=JSON)


def models_body(names: list[str]) -> bytes:
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "llm-gateway"} for n in names]
    return orjson.dumps({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
