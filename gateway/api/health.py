"""Liveness, readiness, the detailed health report and the Prometheus endpoint.

Nothing here probes anything: provider and store health come from ``gateway.probes.Prober``'s
background loop and from live traffic.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from gateway import metrics
from gateway.errors import AuthenticationFailed
from gateway.runtime import GATEWAY, Gateway

_OK = b'{"status":"ok"}'


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def live(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


def not_ready_reason(gw: Gateway) -> str | None:
    if gw.draining:
        return "draining"
    if not gw.ready:
        return "starting"
    if gw.config.redis is not None and gw.prober.store_health.status == "down":
        return "state store unreachable"
    for name, route in gw.router.routes.items():
        if not route.targets or all(t.breaker.is_open for t in route.targets):
            return f"model {name!r} has no target with a closed circuit"
    return None


async def ready(request: web.Request) -> web.Response:
    reason = not_ready_reason(request.app[GATEWAY])
    if reason is not None:
        return _json({"status": "error", "reason": reason}, 503)
    return web.Response(body=_OK, content_type="application/json")


def provider_status(gw: Gateway, name: str) -> str:
    targets = [t for route in gw.router.routes.values() for t in route.targets if t.provider.name == name]
    if targets and all(t.breaker.is_open for t in targets):
        return "down"
    return gw.prober.provider_health[name].status


async def detailed(request: web.Request) -> web.Response:
    """The seed's detailed shape: redis and each provider with status and latency (ms)."""
    gw = request.app[GATEWAY]
    store = gw.prober.store_health
    redis_up = store.status != "down"
    # Without Redis there is no Redis to be up: the state lives in this process's memory.
    redis_status = ("up" if redis_up else "down") if gw.config.redis is not None else "not_configured"
    providers = {
        name: {"status": provider_status(gw, name), "latency": health.latency_ms}
        for name, health in gw.prober.provider_health.items()
    }
    providers_ok = all(p["status"] != "down" for p in providers.values())
    body = {
        "status": "ok" if redis_up and providers_ok and not_ready_reason(gw) is None else "error",
        "info": {
            "redis": {
                "status": redis_status,
                "details": {
                    "connection": redis_up if gw.config.redis is not None else False,
                    "latency": store.latency_ms,
                    "backend": "redis" if gw.config.redis is not None else "memory",
                },
            },
            "providers": {"status": "up" if providers_ok else "down", "details": providers},
        },
    }
    return _json(body, 200 if body["status"] == "ok" else 503)


async def prometheus(request: web.Request) -> web.Response:
    token = request.app[GATEWAY].config.metrics.bearer_token
    if token is not None:
        presented = request.headers.getall("Authorization", ())
        # SECURITY: exactly one Authorization header, the right one (a doubled header is ambiguous).
        if len(presented) != 1 or not hmac.compare_digest(presented[0].encode(), f"Bearer {token}".encode()):
            raise AuthenticationFailed("a valid bearer token is required for /metrics")
    registry = REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several workers: merge their files
        metrics.fold_all()  # this worker's figures are in its file before it is read
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/api/v1/monitoring/health", detailed)
    app.router.add_get("/api/v1/health", detailed)
    app.router.add_get("/metrics", prometheus)
