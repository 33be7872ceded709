"""``build_app(config)``: routes, the one edge middleware, and the resources opened at start-up (one
cleanup context each).

The edge middleware is the single place where a request gets its id, where every error becomes
OpenAI's JSON shape, and where the access line and request metrics are written (once per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

import plugins
from gateway import cors, metrics, outcome
from gateway.api import admin, anthropic, health, native, openai, openapi, usage
from gateway.api.graphql import view as graphql
from gateway.api.openai import gateway_headers
from gateway.auth import Authenticator
from gateway.capabilities import Catalog
from gateway.config import Config
from gateway.context import RequestContext
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
    ServiceUnavailable,
)
from gateway.formats import anthropic as anthropic_format
from gateway.guardrails.engine import Guard
from gateway.limits.limiter import Limiter
from gateway.limits.upstream import UpstreamLimits
from gateway.logging import ACCESS, REDACTOR
from gateway.outcome import clean_id, new_request_id
from gateway.pipeline import Pipeline, Services
from gateway.probes import Prober
from gateway.protocol import RequestBodyTimeout
from gateway.providers import Provider, create
from gateway.providers import mock as mock_upstream
from gateway.routing import Router
from gateway.runtime import CONTEXT, GATEWAY, REQUEST_ID, Gateway
from gateway.state.base import Store, StoreUnavailable
from gateway.state.cache import CacheStore, MemoryCache, RedisCache
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore

log = structlog.get_logger("gateway")

CORS_ORIGINS = web.AppKey("cors_origins", frozenset)
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_LOGGED = ("/v1/", "/admin/", "/api/")
# Model requests: counted in llm_gateway_requests_total even when refused before routing.
_COMPLETIONS = ("/v1/chat/completions", "/v1/embeddings", "/api/v1/llm/complete", "/api/v1/complete")
in_flight = metrics.IN_FLIGHT_REQUESTS


def _http_error(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge("request body too large")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("unknown endpoint", code="unknown_endpoint")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return InvalidRequest(f"method {exc.method} not allowed here", status=405, code="method_not_allowed")
    return GatewayError(exc.reason, status=exc.status)


def _error_response(request: web.Request, rid: str, exc: GatewayError) -> web.Response:
    """The one translation of a failure to the client's API: native JSON under ``/api/v1``'s
    completion and model routes, Anthropic's under ``/v1/messages``, OpenAI's shape everywhere else."""
    if request.path.startswith(native.PREFIXES):
        ctx = request.get(CONTEXT)
        return exc.to_native_response(rid, ctx.provider if ctx is not None else None)
    if request.path.startswith(anthropic.PREFIX):
        body = anthropic_format.error_body(exc.status, exc.message)
        return web.Response(
            status=exc.status, body=body, content_type="application/json", headers=exc.headers
        )
    return exc.to_response()


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS":
        origins = request.app[CORS_ORIGINS]
        if origins and (answer := cors.preflight(request, origins)) is not None:
            return answer
    rid = request.headers.get("x-request-id")
    if rid is None or not _REQUEST_ID_OK.fullmatch(rid):
        rid = new_request_id()
    request[REQUEST_ID] = rid
    started = time.perf_counter()
    status = 500
    # A WebSocket is a connection, not a request: its completions count themselves (api/graphql).
    counted = request.headers.get("Upgrade", "").lower() != "websocket"
    if counted:
        in_flight.enter()
    try:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code): not a server failure
            raise
        except GatewayError as exc:
            response = _error_response(request, rid, exc)
        except RequestBodyTimeout as exc:
            response = _error_response(
                request, rid, InvalidRequest(str(exc), status=408, code="request_timeout")
            )
            response.force_close()  # the rest of the body may still be on its way
        except StoreUnavailable:
            response = _error_response(
                request,
                rid,
                ServiceUnavailable(
                    "the state store is unavailable; try again shortly", code="state_store_unavailable"
                ),
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_response(request, rid, _http_error(exc))
        except Exception:
            # Never a stack trace to the client; the log line carries the request id to find it.
            log.exception("unhandled_error", request_id=rid, path=request.path)
            response = _error_response(request, rid, GatewayError("internal error", code="internal_error"))
        status = response.status
        if not response.prepared:
            ctx = request.get(CONTEXT)
            if ctx is not None:
                response.headers.update(gateway_headers(ctx))
            else:
                response.headers["x-request-id"] = rid
    finally:
        if counted:
            in_flight.leave()
        settling = (
            _finish(request, rid, status, time.perf_counter() - started)
            if request.path.startswith(_LOGGED)
            else None
        )
    if settling is not None:
        # Only when the store was not connected: the slot release had to wait for a connection.
        await asyncio.shield(settling)
    return response


def _finish(request: web.Request, rid: str, status: int, elapsed: float) -> asyncio.Task[None] | None:
    """Settle the request with the plugins, then the one access line and the request metrics."""
    ctx: RequestContext | None = request.get(CONTEXT)
    if ctx is None:
        if request.path.startswith(_COMPLETIONS):
            # Refused before it named a model the gateway knows (bad JSON, 413, ...): still a request.
            request.app[GATEWAY].request_metrics.observe("unknown", "none", status, "none", elapsed, None)
        ACCESS.write(
            {
                "event": "request",
                "level": "info",
                "request_id": clean_id(rid),
                "method": request.method,
                "path": REDACTOR.clean(request.path),
                "status": status,
                "latency_ms": round(elapsed * 1000, 2),
            }
        )
        return None
    return outcome.finish(request.app[GATEWAY], ctx, status, elapsed, request.path)


# Start-up and shutdown: one cleanup context per resource, in this order (``build_app`` appends them).
# aiohttp closes them in reverse, and when one fails to open, closes those opened before it.


async def _store(app: web.Application) -> AsyncIterator[None]:
    """The state store: it connects on first use, and is closed last (the others settle into it)."""
    yield
    await app[GATEWAY].store.close()


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    """Settlements still queued are written before the store closes."""
    yield
    gw = app[GATEWAY]
    await gw.pipeline.drain()
    gw.pipeline.limiter.close()


async def _authenticator(app: web.Application) -> AsyncIterator[None]:
    """JWT keys from a JWKS URL, if configured (a failed fetch is logged, not fatal), and their refresher."""
    gw = app[GATEWAY]
    await gw.auth.start()
    yield
    await gw.auth.close()


async def _builtin_mock(app: web.Application) -> AsyncIterator[None]:
    """The built-in mock upstream, for mock providers without a base_url."""
    gw = app[GATEWAY]
    builtin = [p for p in gw.providers.values() if p.config.type == "mock" and not p.config.base_url]
    if not builtin:
        yield
        return
    runner, gw.mock_url = await mock_upstream.start()
    for p in builtin:
        p.base_url = gw.mock_url
    log.info("mock_upstream_started", url=gw.mock_url)
    yield
    await runner.cleanup()


async def _provider_sessions(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession per provider."""
    async with contextlib.AsyncExitStack() as sessions:
        for provider in app[GATEWAY].providers.values():
            await provider.start()
            sessions.push_async_callback(provider.close)
        yield


async def _probes(app: web.Application) -> AsyncIterator[None]:
    """A first round of probes (bounded by health.timeout_seconds, run concurrently), then the loop."""
    gw = app[GATEWAY]
    await gw.prober.probe_all()
    probes = asyncio.get_running_loop().create_task(gw.prober.run())
    gw.ready = True
    yield
    gw.ready = False
    probes.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probes


async def _capabilities(app: web.Application) -> AsyncIterator[None]:
    """OpenRouter's live model list: read once the provider sessions are open, then hourly."""
    gw = app[GATEWAY]
    await gw.catalog.refresh(gw.providers)
    refresher = asyncio.get_running_loop().create_task(gw.catalog.run(gw.providers))
    yield
    refresher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await refresher


def build_store(config: Config) -> Store:
    if config.redis is None:
        return MemoryStore()
    redis = config.redis
    return RedisStore(redis.url, redis.prefix, timeout=redis.timeout_seconds, cluster=redis.cluster)


def build_app(config: Config, store: Store | None = None) -> web.Application:
    # An embedded app (no CLI) masks its own secrets too: in logs, error messages and access lines.
    REDACTOR.add_secrets(config.secrets())
    providers: dict[str, Provider] = {p.name: create(p) for p in config.providers}
    store = store if store is not None else build_store(config)
    prober = Prober(
        store if config.redis is not None else None,
        interval=config.health.interval_seconds,
        timeout=config.health.timeout_seconds,
    )
    limiter = Limiter(
        store,
        fail_open_limits=config.redis.fail_open_limits if config.redis else True,
        fail_open_budgets=config.redis.fail_open_budgets if config.redis else False,
    )
    prefix = config.redis.prefix if config.redis else "llmgw"
    upstream = UpstreamLimits(config, limiter, prefix)
    router = Router(config, providers, prober.observe, upstream if upstream.configured else None)
    catalog = Catalog(config, router.routes)  # effective windows and prices, written into the routes
    # Only providers some model routes to are probed and reported (an unconfigured one is never called).
    prober.watch({t.provider.name: t.provider for r in router.routes.values() for t in r.targets})
    auth = Authenticator(config, store)
    cache: CacheStore = (
        RedisCache(store.client)
        if isinstance(store, RedisStore)
        else MemoryCache(config.cache.max_memory_bytes)
    )
    guard = Guard(config, providers) if "guardrails" in config.plugins and config.guardrails.rules else None
    services = Services(config=config, store=store, auth=auth, prefix=prefix, cache=cache, guard=guard)
    pipeline = Pipeline(plugins.build(config.plugins, services), limiter)
    gw = Gateway(
        config=config,
        providers=providers,
        router=router,
        store=store,
        auth=auth,
        pipeline=pipeline,
        guard=guard,
        prober=prober,
        cache=cache,
        catalog=catalog,
        models_body=openai.models_body([m.name for m in config.models]),
    )
    # The body limit is enforced by read_json with a clear 413; aiohttp's own cap sits just above it.
    app = web.Application(client_max_size=config.server.max_body_bytes + 1, middlewares=[edge])
    app[CORS_ORIGINS] = frozenset(config.server.cors_origins)
    if config.server.cors_origins:
        cors.add_signal(app, app[CORS_ORIGINS])
    app[GATEWAY] = gw
    app.cleanup_ctx.extend(
        (_store, _pipeline, _authenticator, _builtin_mock, _provider_sessions, _probes, _capabilities)
    )
    openai.add_routes(app)
    anthropic.add_routes(app)
    native.add_routes(app)
    graphql.add_routes(app)
    admin.add_routes(app)
    usage.add_routes(app)
    health.add_routes(app)
    openapi.add_routes(app)
    return app
