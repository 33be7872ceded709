"""The contract's GraphQL schema, code-first. Resolvers call the same core as the REST routes.

A completion builds the native ``LLMRequest`` from its arguments and goes through ``api.native.prepare``
and the pipeline (auth, limits, budgets, cache, routing, accounting); each one is finished with
``outcome.finish`` like a REST request (metrics, access line, settlement). Failures become GraphQL
errors whose ``extensions.code`` is the native ``LLMErrorType``, with ``requestId``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import strawberry
from graphql import GraphQLError
from multidict import CIMultiDictProxy
from strawberry.types import ExecutionResult, Info
from strawberry.types.execution import PreExecutionError

from gateway import completion as core
from gateway import outcome
from gateway.api import native as native_api
from gateway.api.graphql.guards import check_size
from gateway.api.graphql.streams import PATH, CompletionStream, Delta, Done, Streams
from gateway.api.health import provider_status
from gateway.auth import Identity, tenant
from gateway.context import RequestContext
from gateway.context import Usage as UsageCounts
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    NotFound,
    ServiceUnavailable,
    native_type,
)
from gateway.logging import REDACTOR
from gateway.metrics import IN_FLIGHT_REQUESTS
from gateway.runtime import Gateway
from gateway.state.base import StoreUnavailable


# -- types --------------------------------------------------------------------------------------
@strawberry.input
class ChatMessageInput:
    role: str
    content: str


@strawberry.input
class CompletionOptionsInput:
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: list[str] | None = None


@strawberry.input
class CompletionInput:
    messages: list[ChatMessageInput]
    options: CompletionOptionsInput | None = None


@strawberry.type
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: UsageCounts) -> Usage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


@strawberry.type
class CompletionResponse:
    id: str
    content: str
    model: str
    provider: str | None
    finish_reason: str | None
    usage: Usage | None
    cost_usd: float | None
    cached: bool


@strawberry.type
class StreamCompletionResponse:
    content: str
    done: bool
    finish_reason: str | None
    usage: Usage | None


@strawberry.type
class Pricing:
    input: float
    output: float
    images: float | None


@strawberry.type
class ModelCapabilities:
    context_window: int | None
    max_output_tokens: int | None
    pricing: Pricing
    strengths: list[str]
    use_cases: list[str]
    multimodal: bool


@strawberry.type
class Model:
    name: str
    providers: list[str]
    capabilities: ModelCapabilities


@strawberry.type
class ComponentHealth:
    status: str
    latency_ms: float | None


@strawberry.type
class ProviderHealth:
    name: str
    status: str
    latency_ms: float | None


@strawberry.type
class HealthStatus:
    status: str
    redis: ComponentHealth
    providers: list[ProviderHealth]


# -- the request context --------------------------------------------------------------------------
def _gw(info: Info) -> Gateway:
    gw: Gateway = info.context["gw"]
    return gw


def _streams(info: Info) -> Streams:
    streams: Streams = info.context["streams"]
    return streams


def _headers(info: Info) -> CIMultiDictProxy[str]:
    headers: CIMultiDictProxy[str] = info.context["request"].headers
    return headers


def graphql_error(exc: GatewayError, request_id: str, provider: str | None = None) -> GraphQLError:
    extensions: dict[str, Any] = {
        "code": native_type(exc.status, exc.code),
        "errorCode": exc.code,
        "status": exc.status,
        "requestId": request_id,
        "provider": provider,
    }
    if "Retry-After" in exc.headers:
        extensions["retryAfter"] = int(exc.headers["Retry-After"])
    return GraphQLError(REDACTOR.clean(exc.message), extensions=extensions)


async def _identity(info: Info) -> Identity | None:
    """The caller: this HTTP request's key (checked by the view), or the socket's, checked again now."""
    gw, context = _gw(info), info.context
    if not gw.authenticates:
        return None
    principal = context.get("principal")
    if principal is None:
        # SECURITY: an operation runs only for a caller authenticated by the view (HTTP) or by the
        # socket's connection_init, whatever the subprotocol, even if a handler skipped the handshake.
        unauthenticated = AuthenticationFailed("the connection is not authenticated")
        raise graphql_error(unauthenticated, context["request_id"])
    if not context["ws"]:
        identity: Identity = context["identity"]
        return identity
    try:
        # A socket lives long: its key is checked again for every operation (a key revoked, disabled
        # or expired since connection_init is refused; runtime keys are re-read within a second).
        return await gw.auth.from_principal(principal)
    except (GatewayError, StoreUnavailable) as exc:
        error = exc if isinstance(exc, GatewayError) else _store_down()
        raise graphql_error(error, context["request_id"]) from None


def _native_body(messages: list[ChatMessageInput], options: CompletionOptionsInput | None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
    if options is not None:
        given = {
            "model": options.model,
            "temperature": options.temperature,
            "maxTokens": options.max_tokens,
            "topP": options.top_p,
            "stop": options.stop,
        }
        body["options"] = {k: v for k, v in given.items() if v is not None}
    return body


async def _prepare(
    info: Info, messages: list[ChatMessageInput], options: CompletionOptionsInput | None
) -> RequestContext:
    gw = _gw(info)
    identity = await _identity(info)
    body = _native_body(messages, options)
    request_id = outcome.new_request_id()
    try:
        return await native_api.prepare(
            gw, request_id, _headers(info), body, len(orjson.dumps(body)), identity
        )
    except GatewayError as exc:
        raise graphql_error(exc, request_id) from None


def _store_down() -> GatewayError:
    return ServiceUnavailable(
        "the state store is unavailable; try again shortly", code="state_store_unavailable"
    )


def _response(answer: dict[str, Any]) -> CompletionResponse:
    usage = answer["usage"]
    return CompletionResponse(
        id=answer["id"],
        content=answer["content"],
        model=answer["model"],
        provider=answer["provider"],
        finish_reason=answer["finishReason"],
        usage=Usage(
            prompt_tokens=usage["promptTokens"],
            completion_tokens=usage["completionTokens"],
            total_tokens=usage["totalTokens"],
        ),
        cost_usd=answer["costUsd"],
        cached=answer["cached"],
    )


async def _finish(gw: Gateway, ctx: RequestContext, status: int) -> None:
    """The request's one end (metrics, access line, settlement); like the REST edge, wait for the
    settlement only when it must release a parallel slot over a fresh connection."""
    settling = outcome.finish(gw, ctx, status, time.perf_counter() - ctx.started, PATH)
    if settling is not None:
        await asyncio.shield(settling)


async def _complete(
    info: Info, messages: list[ChatMessageInput], options: CompletionOptionsInput | None
) -> CompletionResponse:
    gw = _gw(info)
    ctx = await _prepare(info, messages, options)
    status = 500
    IN_FLIGHT_REQUESTS.enter()
    try:
        _, answer = await native_api.run(gw, ctx)
        if answer is None:  # a plugin answered with a response of its own: nothing GraphQL can show
            raise GatewayError("the request was answered outside GraphQL", code="internal_error")
        status = 200
        return _response(answer)
    except (GatewayError, StoreUnavailable) as exc:
        error = exc if isinstance(exc, GatewayError) else _store_down()
        status = error.status
        raise graphql_error(error, ctx.request_id, ctx.provider) from None
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        IN_FLIGHT_REQUESTS.leave()
        await _finish(gw, ctx, status)


async def _open(
    info: Info, messages: list[ChatMessageInput], options: CompletionOptionsInput | None
) -> tuple[CompletionStream, str]:
    """Admit a streamed completion and start it; (the stream, the team it counts against). Whatever
    ends it before the stream owns it (a refusal, the client leaving mid-admission) finishes it here,
    so its slot and reservation are released."""
    gw, streams = _gw(info), _streams(info)
    ctx = await _prepare(info, messages, options)
    ctx.body["stream"] = ctx.stream = True
    ctx.added_include_usage = True
    team = tenant(ctx.presented)
    try:
        streams.enter(team)  # before admission: a refusal here takes no rpm token
    except GatewayError as exc:
        await _finish(gw, ctx, exc.status)
        raise graphql_error(exc, ctx.request_id) from None
    status = 500
    try:
        reply = await core.admit(gw, ctx)
        if reply is not None and ctx.cache != "hit":
            raise GatewayError("the request was answered outside GraphQL", code="internal_error")
    except (GatewayError, StoreUnavailable) as exc:
        error = exc if isinstance(exc, GatewayError) else _store_down()
        status = error.status
        streams.leave(team)
        await _finish(gw, ctx, status)
        raise graphql_error(error, ctx.request_id, ctx.provider) from None
    except BaseException:
        streams.leave(team)
        await _finish(gw, ctx, 499)
        raise
    stream = CompletionStream(gw, ctx)
    if reply is not None:
        stream.replay(getattr(reply, "body", b"") or b"")
    else:
        stream.start()
    return stream, team


async def _events(info: Info, stream: CompletionStream, team: str) -> AsyncGenerator[Delta | Done, None]:
    """The stream's events for one subscriber; leaving (complete, a dropped socket) cancels it."""
    try:
        async for event in stream.follow():
            if isinstance(event, GatewayError):
                raise graphql_error(event, stream.ctx.request_id, stream.ctx.provider)
            yield event
    finally:
        stream.cancel()
        _streams(info).leave(team)


# -- operations ---------------------------------------------------------------------------------
def _capabilities(gw: Gateway, name: str) -> ModelCapabilities:
    caps = gw.catalog.get(name)
    p = caps.pricing
    return ModelCapabilities(
        context_window=caps.context_window,
        max_output_tokens=caps.max_output_tokens,
        pricing=Pricing(input=p.input_per_mtok, output=p.output_per_mtok, images=p.image_per_mtok),
        strengths=list(caps.strengths),
        use_cases=list(caps.use_cases),
        multimodal=caps.multimodal,
    )


async def _served(info: Info) -> dict[str, list[str]]:
    gw = _gw(info)
    return core.served(gw, core.allowed_models(gw, await _identity(info)))


@strawberry.type
class Query:
    @strawberry.field
    async def complete(
        self, info: Info, messages: list[ChatMessageInput], options: CompletionOptionsInput | None = None
    ) -> CompletionResponse:
        return await _complete(info, messages, options)

    @strawberry.field
    async def list_providers(self, info: Info) -> list[str]:
        return list(await _served(info))

    @strawberry.field
    async def list_models(self, info: Info, provider: str) -> list[str]:
        served = await _served(info)
        if provider not in served:
            error = NotFound(f"unknown provider {provider!r}", code="provider_not_found")
            raise graphql_error(error, info.context["request_id"])
        return served[provider]

    @strawberry.field
    async def models(self, info: Info) -> list[Model]:
        gw = _gw(info)
        return [
            Model(
                name=name,
                providers=core.model_providers(gw, name),
                capabilities=_capabilities(gw, name),
            )
            for name in core.allowed_models(gw, await _identity(info))
        ]

    @strawberry.field
    def health(self, info: Info) -> HealthStatus:
        gw = _gw(info)
        store = gw.prober.store_health
        providers = [
            ProviderHealth(name=name, status=provider_status(gw, name), latency_ms=h.latency_ms)
            for name, h in gw.prober.provider_health.items()
        ]
        ok = store.status != "down" and all(p.status != "down" for p in providers)
        backend = store.status if gw.config.redis is not None else "not_configured"
        return HealthStatus(
            status="ok" if ok else "error",
            redis=ComponentHealth(status=backend, latency_ms=store.latency_ms),
            providers=providers,
        )


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def complete(self, info: Info, input: CompletionInput) -> CompletionResponse:
        return await _complete(info, input.messages, input.options)

    @strawberry.mutation
    async def start_stream_completion(
        self,
        info: Info,
        messages: list[ChatMessageInput],
        options: CompletionOptionsInput | None = None,
        stream_id: str | None = None,
    ) -> bool:
        await _start(info, messages, options, stream_id)
        return True

    @strawberry.mutation
    async def start_stream(
        self, info: Info, messages: list[ChatMessageInput], options: CompletionOptionsInput | None = None
    ) -> str:
        return await _start(info, messages, options, None)


async def _start(
    info: Info,
    messages: list[ChatMessageInput],
    options: CompletionOptionsInput | None,
    stream_id: str | None,
) -> str:
    streams = _streams(info)
    identity = await _identity(info)
    owner = tenant(identity)
    chosen = stream_id if stream_id is not None else outcome.new_request_id().replace("req_", "stream_")
    try:
        streams.reserve(owner, chosen)
    except GatewayError as exc:
        raise graphql_error(exc, info.context["request_id"]) from None
    try:
        stream, team = await _open(info, messages, options)
    except BaseException:
        streams.release(owner, chosen)
        raise
    streams.keep(team, chosen, stream)
    return chosen


async def _completion_events(info: Info, input: CompletionInput) -> AsyncGenerator[CompletionResponse, None]:
    stream, team = await _open(info, input.messages, input.options)
    ctx = stream.ctx
    async for event in _events(info, stream, team):
        last = event if isinstance(event, Done) else None
        yield CompletionResponse(
            id=ctx.request_id,
            content=event.content if isinstance(event, Delta) else "",
            model=ctx.model.name,
            provider=ctx.provider,
            finish_reason=last.finish_reason if last else None,
            usage=Usage.of(last.usage) if last else None,
            cost_usd=last.cost_usd if last else None,
            cached=ctx.cache == "hit",
        )


async def _started_events(info: Info, stream_id: str) -> AsyncGenerator[StreamCompletionResponse, None]:
    identity = await _identity(info)
    team = tenant(identity)
    stream = _streams(info).take(team, stream_id)
    if stream is None:
        error = NotFound(f"no stream {stream_id!r} is waiting for this team", code="stream_not_found")
        raise graphql_error(error, info.context["request_id"])
    async for event in _events(info, stream, team):
        if isinstance(event, Delta):
            yield StreamCompletionResponse(content=event.content, done=False, finish_reason=None, usage=None)
        else:
            yield StreamCompletionResponse(
                content="", done=True, finish_reason=event.finish_reason, usage=Usage.of(event.usage)
            )


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def completion_stream(
        self, info: Info, input: CompletionInput
    ) -> AsyncGenerator[CompletionResponse, None]:
        return _completion_events(info, input)

    @strawberry.subscription
    async def stream_completion(
        self, info: Info, stream_id: str
    ) -> AsyncGenerator[StreamCompletionResponse, None]:
        return _started_events(info, stream_id)


class _Schema(strawberry.Schema):
    max_query_bytes: int | None = None

    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        """Client errors are answers, not server events: strawberry would log each one with a trace
        (any client could flood the logs). Unexpected ones are logged where they are masked."""

    def _oversized(self, query: str | None) -> PreExecutionError | None:
        """SECURITY: the size limit applies before the document is parsed (parsing megabytes of
        GraphQL would hold the event loop for seconds), on HTTP and on sockets alike."""
        if self.max_query_bytes is None or not isinstance(query, str):
            return None
        try:
            check_size(query, self.max_query_bytes)
        except ValueError as exc:
            return PreExecutionError(
                data=None, errors=[GraphQLError(str(exc), extensions={"code": "INVALID_REQUEST"})]
            )
        return None

    async def execute(self, query: str | None, *args: Any, **kwargs: Any) -> ExecutionResult:
        return self._oversized(query) or await super().execute(query, *args, **kwargs)

    async def stream(self, query: str | None, *args: Any, **kwargs: Any) -> Any:
        refused = self._oversized(query)
        if refused is None:
            return await super().stream(query, *args, **kwargs)

        async def one() -> AsyncGenerator[PreExecutionError, None]:
            yield refused

        return one()


def build_schema(extensions: list[Any], max_query_bytes: int | None = None) -> strawberry.Schema:
    schema = _Schema(query=Query, mutation=Mutation, subscription=Subscription, extensions=extensions)
    schema.max_query_bytes = max_query_bytes
    return schema
