"""``/graphql`` on the aiohttp app: queries and mutations over HTTP POST, subscriptions over WebSocket.

- Keys: the same headers as REST over HTTP; on a socket, ``connection_init``'s payload
  (``{"authorization": "Bearer KEY"}``) or the upgrade request's headers. A bad or missing key closes
  the socket with 4403 before any operation runs; no ``connection_init`` in time closes it with 4408.
- ``graphql-transport-ws`` only, unless ``graphql.legacy_protocol`` (whose ``connection_init`` is
  authenticated the same way, and whose operations are refused on an unauthenticated socket anyway).
- Guards: document size, depth and aliases (``guards``), introspection on/off, subscriptions per
  socket and per team, server pings. Unexpected exceptions are masked: ``extensions.code`` UNKNOWN and
  a request id, never a trace. Each operation is counted by type.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import structlog
from aiohttp import web
from graphql import (
    ExecutionResult,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    parse,
)
from multidict import CIMultiDict, CIMultiDictProxy
from strawberry.aiohttp.views import GraphQLView
from strawberry.exceptions import ConnectionRejectionError
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxTokensLimiter,
    ParserCache,
    SchemaExtension,
    ValidationCache,
)
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL

from gateway import metrics
from gateway.api.graphql import guards
from gateway.api.graphql.schema import build_schema, graphql_error
from gateway.api.graphql.streams import Streams
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.runtime import GATEWAY, REQUEST_ID, Gateway
from gateway.state.base import StoreUnavailable

log = structlog.get_logger("gateway.graphql")
STREAMS = web.AppKey("graphql_streams", Streams)


class _Mask(MaskErrors):
    """GraphQL errors the gateway raised (they carry ``extensions.code``) and validation errors go out
    as they are; anything else is logged and masked."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=_unexpected, error_message="internal error")

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        context = self.execution_context.context
        request_id = context.get("request_id") if isinstance(context, dict) else None
        log.error("graphql_unhandled_error", request_id=request_id, exc_info=error.original_error)
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "UNKNOWN", "requestId": request_id}
        return masked


def _unexpected(error: GraphQLError) -> bool:
    original = error.original_error
    return original is not None and not isinstance(original, GraphQLError)


class _CountOperations(SchemaExtension):
    def on_operation(self) -> Iterator[None]:
        yield
        try:
            kind = self.execution_context.operation_type.value
        except (RuntimeError, AttributeError):  # the document did not parse: no operation type
            kind = "invalid"
        metrics.GRAPHQL_OPERATIONS.labels(kind).inc()


class GatewayGraphQLView(GraphQLView[dict[str, Any], None]):
    def __init__(self, gw: Gateway, streams: Streams) -> None:
        settings = gw.config.graphql
        rules = guards.validation_rules(
            max_depth=settings.max_depth,
            max_aliases=settings.max_aliases,
            introspection=settings.introspection,
        )
        extensions: list[Callable[[], SchemaExtension]] = [
            lambda: MaxTokensLimiter(max_token_count=settings.max_tokens),
            lambda: AddValidationRules(rules),
            # Clients send the same few documents again and again: parse and validate each once
            # (measured: ~60 % of a subscription's CPU). Bounded LRUs; the key is the whole text.
            lambda: ParserCache(maxsize=256),
            lambda: ValidationCache(maxsize=256),
            _Mask,
            _CountOperations,
        ]
        protocols = [GRAPHQL_TRANSPORT_WS_PROTOCOL] + (
            [GRAPHQL_WS_PROTOCOL] if settings.legacy_protocol else []
        )
        super().__init__(
            schema=build_schema(extensions, settings.max_query_bytes),
            graphql_ide="graphiql" if settings.graphiql else None,
            allow_queries_via_get=False,
            keep_alive=True,  # (legacy graphql-ws "ka" messages)
            keep_alive_interval=settings.keepalive_seconds,
            subscription_protocols=protocols,
            connection_init_wait_timeout=dt.timedelta(seconds=settings.connection_init_timeout_seconds),
            max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
        )
        self.gw, self.streams = gw, streams

    async def execute_operation(
        self,
        request: web.Request,
        request_adapter: Any,
        request_data: Any,
        context: dict[str, Any],
        root_value: Any,
        sub_response: Any,
    ) -> Any:
        if self.gw.authenticates:
            # SECURITY: with auth on, nothing is parsed or validated for a caller without a valid key
            # (validation costs CPU that no per-operation limit covers).
            try:
                context["identity"], context["principal"] = await self.gw.auth.principal(request.headers)
            except (GatewayError, StoreUnavailable) as exc:
                refusal = (
                    exc
                    if isinstance(exc, GatewayError)
                    else ServiceUnavailable("the key store is unavailable", code="state_store_unavailable")
                )
                return ExecutionResult(data=None, errors=[graphql_error(refusal, context["request_id"])])
        # strawberry would run a subscription sent over HTTP as if it were a query: refuse it clearly.
        if not isinstance(request_data, list) and _is_subscription(
            request_data.query, request_data.operation_name
        ):
            error = GraphQLError(
                "subscriptions run over a WebSocket (graphql-transport-ws), not HTTP POST",
                extensions={"code": "INVALID_REQUEST", "requestId": context["request_id"]},
            )
            return ExecutionResult(data=None, errors=[error])
        return await super().execute_operation(
            request, request_adapter, request_data, context, root_value, sub_response
        )

    async def create_websocket_response(
        self, request: web.Request, subprotocol: str | None
    ) -> web.WebSocketResponse:
        # Server pings are WebSocket ping frames (strawberry's graphql-transport-ws handler sends none):
        # a peer that stops answering them is closed. Messages are bounded like HTTP bodies.
        settings = self.gw.config.graphql
        ws = web.WebSocketResponse(
            protocols=[subprotocol] if subprotocol else [],
            heartbeat=settings.keepalive_seconds,
            max_msg_size=max(settings.max_query_bytes * 4, 1024 * 1024),
        )
        await ws.prepare(request)
        return ws

    def decode_json(self, data: str | bytes) -> object:
        # orjson, as everywhere else; invalid UTF-8 is a JSON error (400), not a crash (500).
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise json.JSONDecodeError("invalid JSON", "", 0) from exc

    async def get_context(self, request: web.Request, response: Any) -> dict[str, Any]:
        return {
            "request": request,
            "gw": self.gw,
            "streams": self.streams,
            "ws": request.headers.get("Upgrade", "").lower() == "websocket",
            "identity": None,
            "principal": None,  # who the key is, to check it again per socket operation (gateway.auth)
            "request_id": request[REQUEST_ID],
        }

    async def on_ws_connect(self, context: dict[str, Any]) -> None:
        """Authenticate the socket once, from connection_init's payload or the upgrade's headers."""
        if not self.gw.authenticates:
            return
        params = context.get("connection_params")
        headers = CIMultiDict(context["request"].headers)
        if isinstance(params, dict):
            given = [params[k] for k in params if isinstance(k, str) and k.lower() == "authorization"]
            if len(given) > 1 or (given and not isinstance(given[0], str)):
                raise ConnectionRejectionError  # SECURITY: one credential, stated once
            if given and given[0]:
                token = given[0]
                # The payload's key is added beside the upgrade's headers, never over them: a
                # different key in both is ambiguous and refused like a doubled header (gateway.auth).
                headers.add("Authorization", token if " " in token else f"Bearer {token}")
                if len(set(headers.getall("Authorization"))) == 1:
                    del headers["Authorization"]
                    headers["Authorization"] = token if " " in token else f"Bearer {token}"
        try:
            context["identity"], context["principal"] = await self.gw.auth.principal(
                CIMultiDictProxy(headers)
            )
        except (GatewayError, StoreUnavailable):
            raise ConnectionRejectionError from None


def _is_subscription(query: Any, operation_name: str | None) -> bool:
    if not isinstance(query, str) or "subscription" not in query:
        return False  # the usual case: no parse here (strawberry parses it once, next)
    try:
        document = parse(query)
    except GraphQLError:
        return False  # strawberry reports the syntax error
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode) and (
            operation_name is None or (definition.name and definition.name.value == operation_name)
        ):
            return definition.operation == OperationType.SUBSCRIPTION
    return False


async def _streams(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[STREAMS].close()


def add_routes(app: web.Application) -> None:
    gw = app[GATEWAY]
    if not gw.config.graphql.enabled:
        return
    streams = app[STREAMS] = Streams(gw)
    app.cleanup_ctx.append(_streams)
    view = GatewayGraphQLView(gw, streams)
    app.router.add_route("GET", "/graphql", view)
    app.router.add_route("POST", "/graphql", view)
