"""The HTTP connection: deadlines for slow and idle clients, a cap on open connections, and terse
answers to malformed requests. ``GatewayRunner`` serves an app with it (``cli.serve`` and the tests).

aiohttp bounds only idle keep-alive (``keepalive_timeout``); nothing bounds a client that sends its
request head or body a byte at a time, so a few hundred such sockets would hold the process. Here:

    new connection     its first request head must arrive within ``head_timeout_seconds``; one that
                       sends nothing is closed then too
    between requests   idle up to ``keepalive_timeout_seconds`` (aiohttp's own timer); the first byte of
                       the next request starts its own head deadline
    request body       must arrive whole within ``body_timeout_seconds`` of its head: the body's reader
                       gets ``RequestBodyTimeout`` (the edge answers 408), and the connection closes
    over the cap       ``max_connections`` open: the next connection's request is answered 503
                       ``too_many_connections`` with ``Connection: close``, never reaching the app

A head deadline expiring closes the connection without an answer (nginx and Go's ``ReadHeaderTimeout``
do the same): the client has not said what it wants yet, and may never. A malformed request (a bare CR,
an over-long header line, garbage) is answered 400 ``malformed_request`` in OpenAI's shape with
``Connection: close``, never echoing the request's bytes (aiohttp's own answer quotes the offending line,
which may be an ``Authorization`` header), and logged as one warning line without a traceback, at most
one per ``Throttled.interval`` per process with a count of those held back — any client can send them.

The hook: aiohttp builds every connection's protocol in ``web.Server.__call__`` and gives no option to
choose its class, so ``GatewayServer`` (a ``web.Server``) overrides that call, and ``GatewayRunner`` (a
``web.AppRunner``) returns a ``GatewayServer`` from ``_make_server`` — the method ``BaseRunner`` declares
abstract for its subclasses to say which server they serve. It takes the app's handler and request
factory from the server aiohttp builds (public attributes), so the app's start-up and routing are
aiohttp's own. ``GatewayProtocol`` reads a few of ``RequestHandler``'s private fields (noted where they
are); the tests of this module run real sockets against it, so an aiohttp change that moves them fails
there.

Why 10,000 connections by default: an idle keep-alive connection costs the process about 8 KiB (its
RSS grew by 15.4 MiB over 2,000 of them, uvloop), so the cap bounds that to ~80 MiB — and to 10,000 file
descriptors, well inside a container's usual limit (``cli`` raises the soft limit to fit) — while a
healthy gateway behind a load balancer's connection pool uses a few hundred.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.config import ServerConfig
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable

log = structlog.get_logger("gateway")


# A body must move on by this much per body_timeout_seconds (1 KiB per 30 s by default).
BODY_MIN_PROGRESS = 1024


class RequestBodyTimeout(TimeoutError):
    """Raised by a request body's reader when the body did not arrive in time (the edge: 408).

    A ``TimeoutError`` so that aiohttp's own read of an unread body after the answer ("lingering")
    stops quietly on it."""


class Throttled:
    """A warning any client can cause: at most one line per ``interval``; the next says how many
    were held back (``suppressed``)."""

    interval = 10.0

    def __init__(self, event: str) -> None:
        self.event = event
        self.suppressed = 0
        self._next = 0.0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self.interval
        log.warning(self.event, suppressed=self.suppressed, **fields)
        self.suppressed = 0


class GatewayServer(web.Server):
    """aiohttp's low-level server with ``GatewayProtocol`` connections, and their count."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
        *,
        request_factory: Callable[..., BaseRequest],
        settings: ServerConfig,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, handler_cancellation=True)
        self.settings = settings
        self.open = 0  # connections made and not yet lost, shed ones included
        self.malformed = Throttled("malformed_request")
        self.shedding = Throttled("connections_shed")
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self.open += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        super().connection_lost(handler, exc)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving ``app`` through ``GatewayServer`` (see the module docstring)."""

    __slots__ = ("settings",)

    def __init__(self, app: web.Application, settings: ServerConfig) -> None:
        super().__init__(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=settings.shutdown_grace_seconds
        )
        self.settings = settings

    async def _make_server(self) -> web.Server:
        built = await super()._make_server()  # runs the app's start-up (cleanup_ctx) and freezes it
        return GatewayServer(
            built.request_handler, request_factory=built.request_factory, settings=self.settings
        )


class GatewayProtocol(RequestHandler):
    """One client connection: ``RequestHandler`` plus the head and body deadlines, shedding and the
    malformed-request answer. Private ``RequestHandler`` fields read: ``_request_count`` (messages parsed,
    malformed ones included), ``_messages`` (parsed, not yet handled), ``_upgraded`` and
    ``_payload_parser`` (a WebSocket now owns the bytes), ``_request_handler`` (replaced when shedding)."""

    __slots__ = ("_body_timer", "_gateway", "_head_timer", "_last_payload")

    def __init__(self, server: GatewayServer) -> None:
        super().__init__(
            server,
            loop=server.loop,
            keepalive_timeout=server.settings.keepalive_timeout_seconds,
            access_log=None,  # type: ignore[arg-type]  # off (aiohttp takes None): the edge writes it
        )
        self._gateway = server
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_payload: StreamReader | None = None  # the body of the newest parsed request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._gateway
        if server.open >= server.settings.max_connections:
            server.shedding(open=server.open, max_connections=server.settings.max_connections)
            self._request_handler = _shed
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(server.settings.head_timeout_seconds, self._head_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._awaiting_head() and data.strip(b"\r\n"):
            # The first byte of the next request (a bare CRLF between requests does not count).
            self._head_timer = self._loop.call_later(
                self._gateway.settings.head_timeout_seconds, self._head_expired
            )
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._head_parsed()

    def _awaiting_head(self) -> bool:
        if self._upgraded or self._payload_parser is not None:
            return False
        return self._last_payload is None or self._last_payload.is_eof()

    def _head_parsed(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if not self._messages:
            return
        # Several requests may have been parsed from one chunk: only the newest can be mid-body.
        payload = self._messages[-1][1]
        self._last_payload = payload
        if not payload.is_eof():
            self._body_timer = self._loop.call_later(
                self._gateway.settings.body_timeout_seconds, self._body_expired, payload, 0
            )
            payload.on_eof(self._body_arrived)

    def _head_expired(self) -> None:
        self._head_timer = None
        self.force_close()

    def _body_arrived(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_expired(self, payload: StreamReader, seen: int) -> None:
        """Each ``body_timeout_seconds`` the body must have moved on by ``BODY_MIN_PROGRESS`` bytes: a
        slow but real upload (a large image over a poor uplink) continues; a trickle of a byte a
        second does not (nginx's client_body_timeout, with a minimum rate)."""
        self._body_timer = None
        if payload.is_eof() or payload.exception() is not None:
            return
        seconds = self._gateway.settings.body_timeout_seconds
        received = payload.total_bytes
        if received - seen >= BODY_MIN_PROGRESS:
            self._body_timer = self._loop.call_later(seconds, self._body_expired, payload, received)
            return
        payload.set_exception(RequestBodyTimeout(f"the request body stalled for {seconds:g} s"))

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or a failure outside the app's middleware).

        ``message`` is never used: for a malformed request it quotes the request's bytes."""
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, the connection is broken
            raise ConnectionError("a response was already started")
        error: GatewayError
        if isinstance(exc, HttpProcessingError):
            # SECURITY: no traceback, no request bytes, one line per interval: any client can send these.
            self._gateway.malformed(peer=request.remote, error=type(exc).__name__)
            error = InvalidRequest("malformed HTTP request", code="malformed_request")
        else:  # the app's middleware answers every failure of its own: this is a bug, keep the traceback
            self.log_exception("error outside the edge middleware", exc_info=exc)
            error = GatewayError("internal error", code="internal_error", status=status)
        response = error.to_response()
        response.force_close()
        response.headers["Connection"] = "close"  # said even to HTTP/1.0 (the version is not known)
        return response


async def _shed(request: BaseRequest) -> web.StreamResponse:
    """The answer on a connection opened past ``server.max_connections``: 503, then the connection closes."""
    error = ServiceUnavailable(
        "the gateway has too many open connections; retry shortly",
        code="too_many_connections",
        headers={"Retry-After": "1"},
    )
    response = error.to_response()
    response.force_close()
    return response
