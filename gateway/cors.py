"""CORS for browser front-ends on configured origins (``server.cors_origins``).

Off unless origins are configured, and then only for those exact origins: a browser page elsewhere
cannot read the gateway's answers with a key it holds. No cookies are involved (keys travel in
``Authorization`` / ``x-api-key``, and ``EventSource`` uses a ticket in the URL), so credentials mode
is never allowed. Preflights are answered at the edge; the headers are added to every answer before it
is sent, streams included (``on_response_prepare``).
"""

from __future__ import annotations

from aiohttp import web

ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, x-api-key, x-request-id, Cache-Control"
EXPOSE_HEADERS = ", ".join(
    (
        "x-request-id",
        "x-gateway-provider",
        "x-gateway-upstream-model",
        "x-gateway-attempts",
        "x-gateway-cache",
        "x-gateway-model",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "Retry-After",
    )
)
MAX_AGE = "600"


def preflight(request: web.Request, origins: frozenset[str]) -> web.Response | None:
    """The answer to a CORS preflight from an allowed origin; None for anything else."""
    origin = request.headers.get("Origin")
    if origin not in origins or "Access-Control-Request-Method" not in request.headers:
        return None
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
            "Vary": "Origin",
        },
    )


def add_signal(app: web.Application, origins: frozenset[str]) -> None:
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")

    app.on_response_prepare.append(on_prepare)
