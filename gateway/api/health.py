"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway.runtime import GATEWAY

_OK = b'{"status":"ok"}'


async def live(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not gw.ready:
        return web.json_response({"status": "starting"}, status=503)
    down = [
        name
        for name, route in gw.router.routes.items()
        if route.targets and all(t.breaker.is_open for t in route.targets)
    ]
    if down or any(not route.targets for route in gw.router.routes.values()):
        return web.json_response({"status": "error", "models_without_target": down}, status=503)
    return web.Response(body=_OK, content_type="application/json")


async def prometheus(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", prometheus)
