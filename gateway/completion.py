"""The one core every completion surface runs: context → admit → fit the window → route.

A surface (``api/openai.py``, ``api/native.py``) parses its request into an OpenAI chat body and a
``RequestContext``, calls these, and shapes the answer. Auth, limits, budgets, cache, routing,
fallback, accounting, metrics and the access line are the same for all of them.

Context windows: before the upstream call, ``fits_window`` (a floor estimate of the prompt plus the
requested output) is checked against the model's window. A request that does not fit moves to the
model's ``context_window_fallback`` (if the caller may use it), else gets 400
``context_length_exceeded``. An upstream's own context-length error moves it the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway import jsonx
from gateway.accounting import fits_window
from gateway.auth import Identity
from gateway.context import UNKNOWN_MODEL, RequestContext
from gateway.errors import CONTEXT_LENGTH_EXCEEDED, InvalidRequest, NotFound, PassThroughError
from gateway.guardrails.engine import INLINE_BYTES, MessagesStreamGuard, StreamGuard
from gateway.relay import OpenStream, Unary, stream_attempt, unary_attempt
from gateway.routing import Target
from gateway.runtime import CONTEXT, REQUEST_ID, Gateway

T = TypeVar("T")


def new_context(
    request: web.Request, gw: Gateway, body: dict[str, Any], size: int, endpoint: str
) -> RequestContext:
    """The context of an HTTP request (the edge middleware finishes it)."""
    ctx = make_context(gw, request[REQUEST_ID], request.headers, body, size, endpoint)
    request[CONTEXT] = ctx
    return ctx


def make_context(
    gw: Gateway,
    request_id: str,
    headers: CIMultiDictProxy[str],
    body: dict[str, Any],
    size: int,
    endpoint: str,
) -> RequestContext:
    """A context for ``body`` (an OpenAI chat or embeddings body); its caller finishes it
    (``outcome.finish``) — the edge for HTTP requests, the GraphQL layer per operation."""
    model = body.get("model")
    if model is None or model == "":
        raise InvalidRequest(
            "you must provide a model parameter", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string", param="model", code="invalid_type")
    route = gw.router.routes.get(model)
    return RequestContext(request_id, endpoint, body, route.model if route else UNKNOWN_MODEL, headers, size)


async def admit(gw: Gateway, ctx: RequestContext) -> web.StreamResponse | None:
    """Run the plugins (auth first, so an unknown model is only revealed to a caller with a key)."""
    answer = await gw.pipeline.admit(ctx)
    if answer is None and not ctx.model.targets:
        raise NotFound(f"the model {ctx.model_name!r} does not exist", param="model", code="model_not_found")
    return answer


async def fit_window(gw: Gateway, ctx: RequestContext) -> None:
    """Move the request along ``context_window_fallback`` until it fits, or refuse it (400)."""
    window = ctx.model.context_window
    while window is not None and not fits_window(ctx.body, window):
        if not await _fall_back(gw, ctx):
            raise InvalidRequest(
                f"the request does not fit model {ctx.model.name!r}'s context window of {window} tokens "
                "(prompt plus max_tokens)",
                param="messages",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        window = ctx.model.context_window


async def _fall_back(gw: Gateway, ctx: RequestContext) -> bool:
    """Switch to the model's larger-window fallback, if it has one the caller may use; its own
    per-model limits are taken and the old model's given back (``Pipeline.switch_model``)."""
    name = ctx.model.context_window_fallback
    route = gw.router.routes.get(name) if name else None
    if route is None or not route.targets:
        return False
    if ctx.identity is not None and not ctx.identity.allows(route.model.name):
        return False
    old, ctx.model = ctx.model, route.model
    ctx.response_headers["x-gateway-model"] = route.model.name
    await gw.pipeline.switch_model(ctx, old)
    return True


async def _route(gw: Gateway, ctx: RequestContext, attempt: Callable[[Target], Awaitable[T]]) -> T:
    await fit_window(gw, ctx)
    while True:
        try:
            return await gw.router.run(ctx, attempt)
        except PassThroughError as exc:
            # The upstream counted more tokens than the floor estimate: same fallback as above.
            if not exc.context_length or not await _fall_back(gw, ctx):
                raise


async def unary(gw: Gateway, ctx: RequestContext, path: str = "/chat/completions") -> Unary:
    result = await _route(gw, ctx, lambda target: unary_attempt(ctx, target, path))
    guard = gw.guard
    rules = guard.output_rules(ctx.identity) if guard is not None else ()
    if guard is not None and rules:  # output guardrails on the whole answer: redacted, or cut
        anthropic = passes_through(gw, ctx)
        check = guard.check_answer
        if len(result.body) <= INLINE_BYTES:
            changed = check(result.parsed, anthropic, rules, ctx.request_id)
        else:  # a long answer takes milliseconds: never on the event loop
            changed = await asyncio.to_thread(check, result.parsed, anthropic, rules, ctx.request_id)
        if changed:
            result.body = jsonx.dumps(result.parsed)  # (a lone surrogate the upstream sent stays valid JSON)
    return result


async def stream(gw: Gateway, ctx: RequestContext) -> OpenStream:
    up = await _route(gw, ctx, lambda target: stream_attempt(ctx, target))
    guard = gw.guard
    rules = guard.output_rules(ctx.identity) if guard is not None else ()
    if guard is not None and rules:  # output guardrails on the relayed text, as it goes
        if passes_through(gw, ctx):  # an Anthropic target's own events
            up.guard = MessagesStreamGuard(guard, rules, ctx.request_id)
        else:
            up.guard = StreamGuard(guard, rules, ctx.request_id)
    return up


def passes_through(gw: Gateway, ctx: RequestContext) -> bool:
    """Whether a /v1/messages request was served by an Anthropic target, whose own answer (JSON or
    events) is relayed as it is, rather than translated from an OpenAI-compatible one."""
    provider = gw.providers.get(ctx.provider) if ctx.provider is not None else None
    return ctx.endpoint == "messages" and provider is not None and provider.wire == "anthropic"


def allowed_models(gw: Gateway, identity: Identity | None) -> list[str]:
    """Models with a route the caller may use: every one without auth (``identity`` None) or for an
    admin without a team; else those its team and key allow."""
    allows = identity.allows if identity is not None and identity.team is not None else None
    return [
        name for name, route in gw.router.routes.items() if route.targets and (allows is None or allows(name))
    ]


def served(gw: Gateway, models: list[str]) -> dict[str, list[str]]:
    """Provider name -> the models (of ``models``) routed to it, in config order."""
    by_provider: dict[str, list[str]] = {}
    for name in models:
        for target in gw.router.routes[name].targets:
            names = by_provider.setdefault(target.provider.name, [])
            if name not in names:
                names.append(name)
    return by_provider


def model_providers(gw: Gateway, name: str) -> list[str]:
    """The providers a model routes to, in target order, each once."""
    return list(dict.fromkeys(t.provider.name for t in gw.router.routes[name].targets))
