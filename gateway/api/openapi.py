"""``GET /openapi.json`` (OpenAPI 3.1, every route of the gateway) and ``GET /docs``, a browsable
reference served from the bundled ``static/`` assets, so it works offline.

The document is built once, at import, from the component schemas in ``openapi_schemas``;
``tests/api/test_openapi.py`` fails when a route is registered without being documented here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.api.openapi_schemas import SCHEMAS, STRING, Schema, ref
from gateway.errors import NotFound

_STATIC = Path(__file__).with_name("static")
_ASSETS = {"docs.js": "text/javascript", "docs.css": "text/css"}

Security = list[dict[str, list[str]]]
KEYED: Security = [{"bearer": []}, {"apiKey": []}]
PUBLIC: Security = []
COMPLETION_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)
ADMIN_NOTE = "Master key or an admin JWT only; a team key gets 403."

ERRORS = {
    400: "Invalid request: a bad body or parameter; `context_length_exceeded` when the prompt and "
    "`max_tokens` do not fit the model's window; `content_filter` when a guardrail blocks it.",
    401: "No key, not a valid one, or two (`missing_api_key`, `invalid_api_key`, `ambiguous_credentials`).",
    403: "The key may not do this (`model_not_allowed`, `admin_required`, `admin_key_not_allowed`).",
    404: "No such model or resource (`model_not_found`).",
    409: "Conflict: the team exists already, or is defined in the config file (read-only here).",
    413: "The request body is over `server.max_body_bytes` (`request_too_large`), or has more text than "
    "the guardrails check (`content_too_large`).",
    429: "A rate limit (`rate_limit_exceeded`) or budget (`insufficient_quota`) refused the request; "
    "`Retry-After` says when to try again.",
    502: "Every upstream attempt failed.",
    503: "No upstream available (open circuits), or the state store is unreachable.",
    504: "The upstream timed out.",
}

HEADERS: dict[str, dict[str, Any]] = {
    "x-request-id": {
        "description": "The request's id: the client's own `x-request-id` (1-128 characters of "
        "`A-Za-z0-9._:-`) when it sent one, else one the gateway made. Logs carry it too.",
        "required": True,
        "schema": STRING,
    },
    "x-gateway-provider": {"description": "The provider that answered.", "schema": STRING},
    "x-gateway-upstream-model": {"description": "The upstream model that answered.", "schema": STRING},
    "x-gateway-attempts": {
        "description": "Upstream attempts made (retries and fallbacks included).",
        "schema": {"type": "integer", "minimum": 0},
    },
    "x-gateway-cache": {
        "description": "Whether the answer came from the cache (with the cache plugin on).",
        "schema": {"enum": ["hit", "miss", "bypass"]},
    },
    **{
        f"x-ratelimit-{kind}-{unit}": {
            "description": f"OpenAI's rate-limit header: the team's {unit} per minute ({kind}).",
            "schema": STRING if kind == "reset" else {"type": "integer", "minimum": 0},
        }
        for unit in ("requests", "tokens")
        for kind in ("limit", "remaining", "reset")
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
}
COMPLETION_HEADERS = tuple(h for h in HEADERS if h not in ("x-request-id", "Retry-After"))
RATE_LIMIT_HEADERS = tuple(h for h in HEADERS if h.startswith("x-ratelimit-"))
STREAM_EVENTS = (
    "Each event is `data: <JSON>`: deltas [NativeStreamDelta](#/components/schemas/NativeStreamDelta), "
    "then exactly one [NativeStreamDone](#/components/schemas/NativeStreamDone) with the finish reason, "
    "usage and cost. A failure after the first byte is `event: error` with `data:` "
    "[NativeError](#/components/schemas/NativeError), and no done event."
)
TAGS = {
    "OpenAI-compatible": "OpenAI's wire format; errors in OpenAI's shape.",
    "Native API": "The platform's own JSON API (camelCase); errors in the native shape.",
    "Admin": ADMIN_NOTE,
    "Usage": "Requests, tokens and spend per team.",
    "Health": "Liveness, readiness, detailed health, Prometheus.",
    "Docs": "This document and its browsable reference.",
    "GraphQL": "Queries and mutations over HTTP POST; subscriptions over WebSocket (docs/graphql.md).",
    "Anthropic Messages API": "Anthropic's wire format, for Claude Code and the anthropic SDKs; errors in "
    "Anthropic's shape (docs/anthropic.md).",
}


def _tag(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "Anthropic Messages API"
    if path.startswith("/v1/"):
        return "OpenAI-compatible"
    if path.startswith("/admin/"):
        return "Admin"
    if path == "/api/v1/usage":
        return "Usage"
    if path.startswith(("/health/", "/metrics")) or path.endswith("/health"):
        return "Health"
    if path == "/graphql":
        return "GraphQL"
    return "Docs" if path.startswith(("/docs", "/openapi")) else "Native API"


def _headers(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in ("x-request-id", *names)}


def _content(media: str, schema: Schema, example: Any = None) -> dict[str, Any]:
    return {media: {"schema": schema} if example is None else {"schema": schema, "example": example}}


def ok(
    description: str, schema: Schema, *media: str, status: int = 200, headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A success response: ``schema`` under each media type (default JSON), with ``headers``."""
    content: dict[str, Any] = {}
    for name in media or ("application/json",):
        content.update(_content(name, schema))
    return {str(status): {"description": description, "headers": _headers(*headers), "content": content}}


def empty(description: str) -> dict[str, Any]:
    return {"204": {"description": description, "headers": _headers()}}


def body(schema: str, example: Any) -> dict[str, Any]:
    return {"required": True, "content": _content("application/json", ref(schema), example)}


def param(where: str, name: str, description: str, schema: Schema = STRING, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": where, "description": description, "schema": schema, **extra}


def _paths() -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}

    def add(
        method: str,
        path: str,
        op_id: str,
        summary: str,
        success: dict[str, Any],
        *statuses: int,
        security: Security | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Document one operation; ``statuses`` are its error answers (native shape under the native
        API). Health and docs routes are public unless ``security`` says otherwise."""
        tag = _tag(path)
        prefix = {"Native API": "Native", "Anthropic Messages API": "Anthropic"}.get(tag, "")
        errors = {str(s): {"$ref": f"#/components/responses/{prefix}Error{s}"} for s in statuses}
        if security is None:
            security = PUBLIC if tag in ("Health", "Docs") else KEYED
        operation = {"operationId": op_id, "tags": [tag], "summary": summary, **extra}
        operation |= {"responses": {**success, **errors}, "security": security}
        paths.setdefault(path, {})[method] = operation
        return operation

    # One call per route, kept in a hand-aligned table: what it is, what it answers, what it takes.
    # fmt: off
    # The OpenAI-compatible routes.
    completion = ok(
        "The completion (JSON), or with `stream: true` a stream of chunks ending in `data: [DONE]`.",
        ref("ChatCompletion"),
        headers=COMPLETION_HEADERS,
    )
    completion["200"]["content"].update(_content("text/event-stream", ref("ChatCompletionStreamEvent")))
    cache_control = param("header", "Cache-Control", "`no-cache`: skip the cache; `no-store`: do not fill it")
    chat = {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}]}
    add("post", "/v1/chat/completions", "createChatCompletion", "Chat completion", completion,
        *COMPLETION_ERRORS, parameters=[cache_control], requestBody=body("ChatCompletionRequest", chat),
        description="Routed to the model's targets in order (retries, fallbacks, circuit breakers). A "
        'failure after the stream started is one `data: {"error": ...}` event and no `[DONE]`.')
    add("post", "/v1/embeddings", "createEmbedding", "Embeddings",
        ok("The embeddings.", ref("EmbeddingResponse"), headers=COMPLETION_HEADERS), *COMPLETION_ERRORS,
        requestBody=body("EmbeddingRequest", {"model": "chat", "input": "hello"}))
    message = {"model": "chat", "max_tokens": 256, "messages": [{"role": "user", "content": "Say hello."}]}
    messages = ok("The Message (JSON), or with `stream: true` Anthropic's event stream.", ref("Message"),
                  headers=COMPLETION_HEADERS)
    messages["200"]["content"].update(_content("text/event-stream", ref("MessageStreamEvent")))
    add("post", "/v1/messages", "createMessage", "Message (Anthropic's Messages API)", messages,
        *COMPLETION_ERRORS, requestBody=body("MessagesRequest", message),
        description="Keys in `x-api-key` or `Authorization: Bearer`. To an `anthropic` target the body and "
        "the answer pass through (the client's `anthropic-version` and `anthropic-beta` forwarded); to an "
        "OpenAI-compatible target both are translated. A failure after the stream started is an "
        "`event: error`.")
    add("post", "/v1/messages/count_tokens", "countMessageTokens", "Count a message's input tokens",
        ok("The count; `x-gateway-token-count` says `exact` (an Anthropic target counted) or `estimate`.",
           ref("TokenCount")), 400, 401, 403, 404, 413, 503,
        requestBody=body("CountTokensRequest", {"model": "chat", "messages": message["messages"]}))
    add("get", "/v1/models", "listModels", "Models this key may use", ok("The models.", ref("ModelList")),
        401, 503)

    # The native API.
    native = {"messages": [{"role": "user", "content": "Say hello."}], "options": {"model": "chat"}}
    answer = ok("The completion.", ref("LLMResponse"), headers=COMPLETION_HEADERS)
    events = ok("The events.", ref("NativeStreamEvent"), "text/event-stream", headers=COMPLETION_HEADERS)
    for prefix, alias in (("/api/v1/llm", ""), ("/api/v1", " (alias)")):
        suffix = "Alias" if alias else ""
        add("post", f"{prefix}/complete", f"complete{suffix}", f"Completion{alias}", answer,
            *COMPLETION_ERRORS, requestBody=body("LLMRequest", native),
            description="The same pipeline as `/v1/chat/completions`. `options.model` absent or `auto`: "
            "the cheapest allowed model that meets `options.requirements`.")
        add("post", f"{prefix}/complete/stream", f"completeStream{suffix}", f"Completion as a stream{alias}",
            events, *COMPLETION_ERRORS, requestBody=body("LLMRequest", native),
            description=STREAM_EVENTS)
    ticket = ok("A ticket for `GET /api/v1/llm/complete/stream`.", ref("StreamTicket"), status=201)
    ticket["201"]["links"] = {
        "openStream": {"operationId": "streamWithTicket", "parameters": {"ticket": "$response.body#/ticket"}}
    }
    add("post", "/api/v1/llm/complete/stream/ticket", "createStreamTicket", "Ticket for EventSource",
        ticket, 400, 401, 403, 404, 413, 429, 503, requestBody=body("LLMRequest", native),
        description="Checks the request and the key and holds them for 30 s under a single-use ticket, "
        "so a browser's `EventSource` (which cannot send headers) can open the stream.")
    add("get", "/api/v1/llm/complete/stream", "streamWithTicket", "Completion stream for EventSource",
        events, 401, 429, 502, 503, 504, security=PUBLIC,
        parameters=[param("query", "ticket", "A stream ticket (single use, 30 s).", required=True)],
        description="No key header: the ticket stands for the request and its key. An unknown, used or "
        f"expired ticket gets 401 `invalid_stream_ticket`. {STREAM_EVENTS}")
    add("get", "/api/v1/llm/providers", "listProviders", "Providers and their status",
        ok("The providers.", ref("ProviderList")), 401, 403, 503)
    add("get", "/api/v1/llm/providers/{provider}/models", "listProviderModels", "A provider's models",
        ok("The models.", ref("ProviderModels")), 401, 403, 404, 503,
        parameters=[param("path", "provider", "A provider's name.", required=True)])
    add("get", "/api/v1/models", "listNativeModels", "Models this key may use: capabilities, performance",
        ok("The models.", ref("NativeModelList")), 401, 403, 503)

    # Admin and usage.
    admin = (401, 403, 503)
    team = [param("path", "team", "The team's id.", required=True)]
    new_team = {"id": "team-x", "models": ["chat"], "limits": {"rpm": 600}, "budgets": {"daily_usd": 5.0}}
    add("post", "/admin/teams", "createTeam", "Create a team", ok("The team.", ref("Team"), status=201),
        *admin, 400, 409, requestBody=body("TeamInput", new_team))
    add("get", "/admin/teams", "listTeams", "Teams (config and API)", ok("The teams.", ref("TeamList")),
        *admin)
    add("get", "/admin/teams/{team}", "getTeam", "A team", ok("The team.", ref("Team")), *admin, 404,
        parameters=team)
    add("patch", "/admin/teams/{team}", "updateTeam", "Change a team (JSON Merge Patch)",
        ok("The team.", ref("Team")), *admin, 400, 404, 409, parameters=team,
        requestBody=body("TeamPatch", {"limits": {"rpm": 100}}))
    add("delete", "/admin/teams/{team}", "deleteTeam", "Delete a team and its keys", empty("Deleted."),
        *admin, 404, 409, parameters=team)
    add("post", "/admin/keys", "createKey", "Create a key",
        ok("The key; `key` is shown this once only.", ref("CreatedKey"), status=201), *admin, 400, 404,
        requestBody=body("KeyInput", {"team": "team-a", "name": "ci"}))
    add("get", "/admin/keys", "listKeys", "Keys (never the keys themselves)", ok("The keys.", ref("KeyList")),
        *admin, parameters=[param("query", "team", "Only this team's keys.")])
    add("delete", "/admin/keys/{key}", "deleteKey", "Revoke a key",
        empty("Revoked: every instance refuses it within a second."), *admin, 404,
        parameters=[param("path", "key", "The key's id (`key_...`).", required=True)])
    add("delete", "/admin/cache", "clearCache", "Drop cached answers", empty("Dropped."), *admin,
        parameters=[param("query", name, f"Only this {name}'s entries.") for name in ("team", "model")])
    date = {"type": "string", "format": "date"}
    add("get", "/api/v1/usage", "getUsage", "Requests, tokens and cost by UTC day and model",
        ok("The usage report.", ref("Usage")), 400, 401, 403, 429, 503,
        description="A team key reads its own team; the master key or an admin JWT names one with `team`. "
        "At most 366 days; 60 calls a minute per team, 120 per instance for admin callers (429).",
        parameters=[param("query", "team", "The team (admin callers must name one)."),
                    param("query", "start", "First day (default: 6 days before `end`).", date),
                    param("query", "end", "Last day, inclusive (default: today, UTC).", date)])

    # Health and docs.
    status = ref("Status")
    add("get", "/health/live", "live", "Liveness", ok("Alive.", status))
    add("get", "/health/ready", "ready", "Readiness",
        {**ok("Ready.", status), **ok("Starting, draining, or degraded.", status, status=503)})
    detailed = {**ok("Healthy.", ref("DetailedHealth")), **ok("Degraded.", ref("DetailedHealth"), status=503)}
    for path, op_id in (("/api/v1/monitoring/health", "health"), ("/api/v1/health", "healthAlias"),
                        ("/api/v1/llm/health", "llmHealth")):
        add("get", path, op_id, "Detailed health: the state store and each provider", detailed)
    add("get", "/metrics", "metrics", "Prometheus metrics", ok("The text format.", STRING, "text/plain"), 401,
        security=[{}, {"bearer": []}],
        description="Needs `Authorization: Bearer TOKEN` when `metrics.bearer_token` is set.")
    graphql_result = {
        "type": "object",
        "properties": {
            "data": {"type": ["object", "null"]},
            "errors": {"type": "array", "items": {"type": "object", "required": ["message"]}},
        },
    }
    graphql_request = {
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": STRING,
            "variables": {"type": ["object", "null"]},
            "operationName": {"type": ["string", "null"]},
        },
    }
    add("post", "/graphql", "graphql", "GraphQL queries and mutations",
        {**ok("The result; GraphQL errors (extensions.code: the native LLMErrorType) are in `errors`.",
              graphql_result),
         **ok("Not a GraphQL request (strawberry's plain-text reason).", STRING, "text/plain", status=400)},
        requestBody={"required": True, "content": _content(
            "application/json", graphql_request, {"query": "{ models { name } }"})},
        description="Keys as on the REST routes. Subscriptions are refused here: they run over the "
        "WebSocket at GET /graphql.")
    add("get", "/graphql", "graphqlSocket", "GraphQL subscriptions (WebSocket upgrade, graphql-transport-ws)",
        {"101": {"description": "Switching to the WebSocket; the key goes in connection_init's payload."},
         **ok("No WebSocket upgrade was asked for (and GraphiQL is off).", STRING, "text/plain", status=404),
         **ok("GraphiQL, when `graphql.graphiql` is on.", STRING, "text/html")},
        security=PUBLIC)
    add("get", "/openapi.json", "openapi", "This document", ok("OpenAPI 3.1.", {"type": "object"}))
    add("get", "/docs", "docs", "API reference (HTML)", ok("The page.", STRING, "text/html"))
    add("get", "/docs/{asset}", "docsAsset", "The reference page's script and style sheet",
        ok("The asset.", STRING, "text/javascript", "text/css"), 404,
        parameters=[param("path", "asset", "The asset.", {"enum": list(_ASSETS)}, required=True)])
    # fmt: on
    return paths


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, description in ERRORS.items():
        headers = _headers("Retry-After", *RATE_LIMIT_HEADERS) if status == 429 else _headers()
        for prefix, schema in (
            ("", "OpenAIError"),
            ("Native", "NativeError"),
            ("Anthropic", "AnthropicError"),
        ):
            content = _content("application/json", ref(schema))
            responses[f"{prefix}Error{status}"] = {
                "description": description,
                "headers": headers,
                "content": content,
            }
    return responses


def build() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-gateway",
            "version": __version__,
            "summary": "An OpenAI-compatible LLM gateway: auth, limits, budgets, caching, fallback routing.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "responses": _error_responses(),
            "headers": HEADERS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer KEY`: a team key or team JWT; on admin routes the "
                    "master key or an admin JWT.",
                },
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The same keys.",
                },
            },
        },
    }


# --- serving ---------------------------------------------------------------------------------------

_STATIC = Path(__file__).with_name("static")
_ASSETS = {"docs.js": "text/javascript", "docs.css": "text/css"}
_FILES = {name: (_STATIC / name).read_bytes() for name in (*_ASSETS, "docs.html")}
# SECURITY: the page runs only its own script and style sheet: no inline code, no other origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


DOCUMENT = build()
_DOCUMENT_BYTES = orjson.dumps(DOCUMENT)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_DOCUMENT_BYTES, content_type="application/json")


async def docs(request: web.Request) -> web.Response:
    return web.Response(
        body=_FILES["docs.html"], content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS
    )


async def docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    if name not in _ASSETS:
        raise NotFound("unknown endpoint", code="unknown_endpoint")
    return web.Response(body=_FILES[name], content_type=_ASSETS[name], charset="utf-8", headers=_PAGE_HEADERS)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/{asset}", docs_asset)
