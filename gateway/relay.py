"""One upstream attempt, and the relay of its answer to the client.

Non-stream: the upstream body is read whole and returned byte for byte. Stream: the attempt reads
until the first *data* event (comments such as ``: keep-alive`` are held back), so an error or a
timeout up to that point can still fall back; then the response starts and every upstream chunk is
written as it arrives while ``SSEScanner`` notes usage and errors on the side.

Timeouts use one ``Watchdog`` per attempt: a single loop timer whose deadline moves by a plain
attribute store when a data event arrives (no timer churn per chunk). When it fires it cancels the
request task and records why; comment lines never move it, so keep-alives cannot hold a dead stream.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from gateway import jsonx
from gateway.context import RequestContext, Usage
from gateway.errors import (
    AttemptFailed,
    BadAnswer,
    InvalidRequest,
    PassThroughError,
    UpstreamBadAnswer,
    UpstreamConnectError,
    UpstreamTimeout,
    normalize_upstream_error,
    sse_error_event,
    upstream_status,
)
from gateway.formats import anthropic
from gateway.guardrails.engine import OutputFilter
from gateway.limits.tokens import estimate_prompt_tokens
from gateway.routing import Target
from gateway.sse import SSEScanner, StreamScanner
from gateway.steering import SERVER_TOOL_TYPES, stripped

MAX_UPSTREAM_BODY = 32 * 1024 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer this response
}


class Watchdog:
    """An attempt's deadline. Setting it is a plain attribute store; one shared ticker per event
    loop checks every live watchdog each ``TICK`` seconds (so no timer is created or cancelled per
    request or per chunk), and cancels the request task of one whose deadline has passed."""

    __slots__ = ("_task", "deadline", "expired", "reason")
    TICK = 0.05

    def __init__(self, deadline: float, reason: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.deadline, self.reason = deadline, reason
        self.expired: str | None = None
        _ticker().active.add(self)

    def move(self, deadline: float, reason: str) -> None:
        self.deadline, self.reason = deadline, reason

    def expire(self) -> None:
        self.expired = self.reason
        _ticker().active.discard(self)
        self._task.cancel()

    def stop(self) -> None:
        _ticker().active.discard(self)

    def absorb(self) -> bool:
        """In an ``except CancelledError``: True (and the cancel is undone) if this watchdog fired."""
        if self.expired is None:
            return False
        self._task.uncancel()
        return True


class _Ticker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.active: set[Watchdog] = set()
        loop.call_later(Watchdog.TICK, self.tick)

    def tick(self) -> None:
        now = self.loop.time()
        for watchdog in [w for w in self.active if w.deadline <= now]:
            watchdog.expire()
        self.loop.call_later(Watchdog.TICK, self.tick)


_tickers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticker] = weakref.WeakKeyDictionary()
_last: tuple[asyncio.AbstractEventLoop | None, _Ticker | None] = (None, None)


def _ticker() -> _Ticker:
    global _last
    loop = asyncio.get_running_loop()
    if _last[0] is loop and _last[1] is not None:
        return _last[1]
    ticker = _tickers.get(loop)
    if ticker is None:
        ticker = _tickers[loop] = _Ticker(loop)
    _last = (loop, ticker)
    return ticker


def upstream_payload(ctx: RequestContext, target: Target) -> bytes:
    """The client's body with ``model`` replaced, the steering fields the target does not allow
    removed (``gateway.steering``) and, if the gateway needs usage, include_usage added."""
    body = dict(ctx.body)
    if not target.watch.isdisjoint(body):  # the common body: this one check, no further copy
        body = stripped(body, target.strip)
    body["model"] = target.model
    if ctx.added_include_usage:
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return orjson.dumps(body)


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first ``limit + 1`` bytes if it is longer (``read(n)`` alone returns
    only what has arrived so far, which cuts bodies that come in more than one TCP segment)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await resp.content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _retry_after(headers: Any) -> float | None:
    """Retry-After in seconds (the delay form); None when absent, not a number, negative or not
    finite; at most a day."""
    value = headers.get("Retry-After")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not 0 <= seconds < math.inf:  # also rejects nan
        return None
    return min(seconds, 86_400.0)


async def _fail_on_status(target: Target, resp: aiohttp.ClientResponse) -> None:
    """Raise the right failure for a non-200 upstream answer (its body already read or not)."""
    status = resp.status
    if status in target.provider.fallback_statuses or status >= 500 or 300 <= status < 400:
        if status in (401, 403):
            message = f"provider {target.provider.name} rejected the gateway's credentials (HTTP {status})"
        else:
            message = f"{target.provider.name} returned HTTP {status}"
        raise upstream_status(status, message, _retry_after(resp.headers))
    body = await read_body(resp, 64 * 1024)
    raise PassThroughError(normalize_upstream_error(status, body), status=status)


def _connection_failure(target: Target, exc: BaseException) -> AttemptFailed:
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"connect to {target.provider.name} timed out")
    return UpstreamConnectError(f"cannot reach {target.provider.name} ({type(exc).__name__})")


@dataclass(slots=True)
class Unary:
    status: int
    body: bytes
    parsed: dict[str, Any]


# What an Anthropic client may tell an Anthropic target about the API it speaks (nothing else).
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")
MAX_HEADER_CHARS = 1024


def _request(ctx: RequestContext, target: Target, path: str) -> tuple[str, bytes, dict[str, str] | None]:
    """Where and what to send, and any per-request headers: the client's body for a target that
    speaks the client's API (``model`` replaced), else a translation of it (chat only)."""
    provider = target.provider
    if ctx.endpoint == "messages":  # an Anthropic client
        if provider.wire == "anthropic":
            return provider.chat_path, _passthrough(ctx, target), _anthropic_headers(ctx, target)
        chat = anthropic.messages_to_chat(ctx.body, target.model)
        return "/chat/completions", orjson.dumps(chat), None
    if not provider.translates:
        return path, upstream_payload(ctx, target), None
    if path != "/chat/completions":
        raise InvalidRequest(
            f"model {ctx.model.name!r} is served by {provider.type} and answers chat completions only",
            code="unsupported_endpoint",
        )
    max_output = ctx.model.capabilities.max_output_tokens
    return provider.chat_path, provider.chat_body(ctx.body, target.model, max_output), None


def _passthrough(ctx: RequestContext, target: Target) -> bytes:
    """An Anthropic client's body for an Anthropic target: unchanged but for ``model`` — and
    SECURITY: without what would route or bill beyond the price table (``gateway.steering``: e.g.
    ``service_tier``, ``mcp_servers``), and no server tools unless the target allows them."""
    body = dict(ctx.body)
    if not target.watch.isdisjoint(body):
        body = stripped(body, target.strip)
    body["model"] = target.model
    if "server_tools" in target.strip:
        for tool in body.get("tools") or ():
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind.startswith(SERVER_TOOL_TYPES):
                raise InvalidRequest(
                    f"tools: {kind!r} is run and billed by Anthropic, and not enabled for this model",
                    param="tools",
                    code="server_tools_not_allowed",
                )
    return orjson.dumps(body)


def _anthropic_headers(ctx: RequestContext, target: Target) -> dict[str, str] | None:
    headers = anthropic_headers(ctx.headers)
    betas = headers.get("anthropic-beta") if headers else None
    if headers and betas and "context_1m" in target.strip:  # billed above the price table
        kept = [b.strip() for b in betas.split(",") if b.strip() and not b.strip().startswith("context-1m")]
        if kept:
            headers["anthropic-beta"] = ",".join(kept)
        else:
            del headers["anthropic-beta"]
    return headers or None


def anthropic_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The client's anthropic-version and anthropic-beta, when sane (else the provider's own version)."""
    forwarded = {
        name: value
        for name in ANTHROPIC_HEADERS
        if (value := headers.get(name)) and len(value) <= MAX_HEADER_CHARS and value.isprintable()
    }
    return forwarded or None


async def unary_attempt(ctx: RequestContext, target: Target, path: str) -> Unary:
    t = target.provider.timeouts
    start = asyncio.get_running_loop().time()
    total = start + t.total
    path, payload, headers = _request(ctx, target, path)
    wd = Watchdog(min(start + t.first_byte, total), "first_byte")
    resp: aiohttp.ClientResponse | None = None
    try:
        resp = await target.provider.post(path, payload, stream=False, headers=headers)
        wd.move(total, "total")
        if resp.status != 200:
            await _fail_on_status(target, resp)
        length = resp.content_length
        if length is not None and length <= MAX_UPSTREAM_BODY:
            body = await resp.read()  # the usual case: one call, no loop
        else:
            body = await read_body(resp, MAX_UPSTREAM_BODY)
    except asyncio.CancelledError:
        if wd.absorb():
            raise UpstreamTimeout(f"{target.provider.name}: no answer within {wd.expired} timeout") from None
        raise
    except aiohttp.ClientError as exc:
        raise _connection_failure(target, exc) from None
    finally:
        wd.stop()
        if resp is not None:
            resp.release()
    if len(body) > MAX_UPSTREAM_BODY:
        raise UpstreamBadAnswer(
            BadAnswer.TOO_LARGE, f"{target.provider.name} answer exceeds {MAX_UPSTREAM_BODY} bytes"
        )
    try:
        parsed = jsonx.loads(body)  # lenient: valid JSON that orjson refuses is still relayed as is
    except jsonx.DecodeError:
        raise UpstreamBadAnswer(
            BadAnswer.NOT_JSON, f"{target.provider.name} returned a non-JSON body"
        ) from None
    if not isinstance(parsed, dict):
        raise UpstreamBadAnswer(BadAnswer.NOT_JSON, f"{target.provider.name} returned a non-object body")
    if parsed.get("error") and "choices" not in parsed and "data" not in parsed:
        # OpenRouter can report an upstream failure inside a 200 body.
        raise UpstreamBadAnswer(
            BadAnswer.ERROR_IN_BODY, f"{target.provider.name} reported an error in a 200 body"
        )
    if ctx.endpoint == "messages":  # the surface shapes the answer; the usage is read here
        usage = parsed.get("usage")
        ctx.usage = Usage.from_json(
            anthropic.usage_to_chat(usage) if target.provider.wire == "anthropic" else usage
        )
        return Unary(resp.status, body, parsed)
    if target.provider.translates:
        parsed = target.provider.chat_answer(parsed)
        body = jsonx.dumps(parsed)  # (a lone surrogate the upstream sent stays valid JSON)
    ctx.usage = Usage.from_json(parsed.get("usage"))
    return Unary(resp.status, body, parsed)


@dataclass(slots=True)
class OpenStream:
    resp: aiohttp.ClientResponse
    scanner: StreamScanner
    head: bytes  # everything read up to and including the first data event
    watchdog: Watchdog
    total_deadline: float
    idle: float
    translate: Callable[[bytes], bytes] | None = None  # the provider's stream translator (chat_stream)
    guard: OutputFilter | None = None  # output guardrails on the relayed text (gateway.guardrails)


async def stream_attempt(ctx: RequestContext, target: Target) -> OpenStream:
    t = target.provider.timeouts
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = start + t.total
    path, payload, headers = _request(ctx, target, "/chat/completions")
    same_wire = ctx.endpoint == "messages" and target.provider.wire == "anthropic"
    translate = target.provider.chat_stream() if target.provider.translates and not same_wire else None
    wd = Watchdog(min(start + t.first_byte, total), "first_byte")
    resp: aiohttp.ClientResponse | None = None
    try:
        resp = await target.provider.post(path, payload, stream=True, headers=headers)
        if resp.status != 200:
            await _fail_on_status(target, resp)
        if not resp.content_type.startswith("text/event-stream"):
            body = await resp.content.read(64 * 1024)
            raise UpstreamBadAnswer(
                BadAnswer.NOT_JSON,
                f"{target.provider.name} answered a stream request with {resp.content_type}"
                + (" (an error)" if b'"error"' in body else ""),
            )
        scanner: StreamScanner = (
            anthropic.EventScanner() if same_wire else SSEScanner(strip_usage=ctx.added_include_usage)
        )
        head: list[bytes] = []
        while not scanner.data_events:
            chunk = await resp.content.readany()
            if not chunk:
                tail = scanner.finish()
                if scanner.done:  # an unterminated last event goes out only if it ends the stream
                    head.append(tail)
                break
            head.append(scanner.feed(translate(chunk) if translate is not None else chunk))
        if scanner.error is not None:
            raise UpstreamBadAnswer(
                BadAnswer.ERROR_EVENT,
                f"{target.provider.name} sent an error event: {str(scanner.error.get('message', ''))[:200]}",
            )
        if not scanner.data_events:
            raise UpstreamBadAnswer(
                BadAnswer.EMPTY_STREAM, f"{target.provider.name} closed the stream without data"
            )
    except asyncio.CancelledError:
        _close(resp)
        wd.stop()
        if wd.absorb():
            raise UpstreamTimeout(
                f"{target.provider.name}: no first token within the {wd.expired} timeout"
            ) from None
        raise
    except aiohttp.ClientError as exc:
        _close(resp)
        wd.stop()
        raise _connection_failure(target, exc) from None
    except BaseException:
        _close(resp)
        wd.stop()
        raise
    now = loop.time()
    ctx.ttft = time.perf_counter() - ctx.started
    wd.move(min(now + t.idle, total), "idle" if now + t.idle < total else "total")
    return OpenStream(resp, scanner, b"".join(head), wd, total, t.idle, translate)


def _close(resp: aiohttp.ClientResponse | None) -> None:
    if resp is not None:
        resp.close()  # drop the connection: an unread body must not go back to the pool


class StreamShape(Protocol):
    """How a surface other than OpenAI's shows a relayed stream (``formats.native.NativeStream``)."""

    def feed(self, data: bytes) -> bytes:
        """Whole upstream events in (OpenAI chunks), the client's events out."""

    def error(self, status: int, message: str, code: str | None) -> bytes:
        """The event for a failure after the first byte."""

    def end(self, ctx: RequestContext) -> bytes:
        """The last event of a stream that ended cleanly (usage and cost are known by then)."""


async def relay_stream(
    request: web.Request, ctx: RequestContext, up: OpenStream, shape: StreamShape | None = None
) -> web.StreamResponse:
    """Write the stream to the client as it arrives. Failures after this point become SSE errors.

    Without a ``shape`` the upstream's bytes go out untouched (``write`` is the response's own
    method: nothing in between); with one, each forwarded piece is translated."""
    response = web.StreamResponse(headers={**SSE_HEADERS, **ctx.response_headers})
    try:
        await response.prepare(request)
    except BaseException:  # the client left before the head went out: free the upstream too
        up.watchdog.stop()
        up.resp.close()
        raise
    write: Callable[[bytes], Awaitable[None]]
    if shape is None:
        write = response.write

        async def fail(status: int, message: str, code: str) -> None:
            await response.write(sse_error_event(message, code=code))

    else:
        translate = shape.feed

        async def write(data: bytes) -> None:
            out = translate(data)
            if out:
                await response.write(out)

        async def fail(status: int, message: str, code: str) -> None:
            await response.write(shape.error(status, message, code))

    await pump(ctx, up, write, fail)
    if shape is not None and ctx.complete:
        await response.write(shape.end(ctx))
    await response.write_eof()
    return response


async def pump(
    ctx: RequestContext,
    up: OpenStream,
    write: Callable[[bytes], Awaitable[None]],
    fail: Callable[[int, str, str], Awaitable[None]],
) -> None:
    """Move an opened stream to ``write`` as it arrives (whole events, the upstream's bytes), moving
    the idle deadline on data events; a failure after the first byte goes to ``fail``. At the end
    ``ctx`` holds the usage, the error (if any) and whether the stream completed. A cancellation that
    is not the watchdog's (the client left) propagates; the upstream connection is closed either way."""
    loop = asyncio.get_running_loop()
    scanner, wd, content, translate = up.scanner, up.watchdog, up.resp.content, up.translate
    guard = up.guard
    failure: str | None = None
    cut = False
    record = ctx.record  # the cache keeps the events as relayed, to replay them
    try:
        head = guard.feed(up.head) if guard is not None else up.head
        await write(head)
        if record is not None:
            record.append(head)
        while guard is None or not guard.stopped:
            chunk = await content.readany()
            if not chunk:
                # An unterminated last event: clients drop it anyway. [DONE] goes out as sent; anything
                # else may be half an event, so it is replaced by the error event below.
                tail = scanner.finish()
                if tail and scanner.done:
                    await write(guard.feed(tail) if guard is not None else tail)
                cut = bool(tail) and not scanner.done
                break
            seen = scanner.data_events
            out = scanner.feed(translate(chunk) if translate is not None else chunk)
            if scanner.data_events != seen:
                deadline = loop.time() + up.idle
                if deadline < up.total_deadline:
                    wd.deadline, wd.reason = deadline, "idle"
                else:
                    wd.move(up.total_deadline, "total")
            if guard is not None and out:
                out = guard.feed(out)  # output guardrails: held back, rewritten, or ended here
            if out:
                if record is not None:
                    record.append(out)
                await write(out)
        if guard is not None and guard.stopped:
            ctx.record = None  # a blocked answer ended cleanly for the client, but is never cached
        elif scanner.error is not None and not cut:
            failure = "upstream_stream_error"
        elif not scanner.done:
            failure = "upstream_incomplete"
            await fail(502, "the upstream stream ended before completion", "upstream_incomplete")
    except asyncio.CancelledError:
        if not wd.absorb():
            raise  # the client went away: the finally below frees the upstream connection
        failure = f"upstream_{wd.expired}_timeout"
        await fail(504, f"the upstream sent no data within the {wd.expired} timeout", "upstream_timeout")
    except ConnectionResetError:
        raise  # our write to a client that left
    except aiohttp.ClientError:
        failure = "upstream_connection_lost"
        await fail(502, "the upstream connection was lost mid-stream", "upstream_connection_lost")
    finally:
        wd.stop()
        up.resp.close()
        ctx.usage = Usage.from_json(scanner.usage) or _partial_usage(ctx, scanner)
    ctx.error = failure
    ctx.complete = failure is None and scanner.done and scanner.error is None
    if guard is not None and guard.stopped:
        # Ended cleanly for the client (content_filter, [DONE]); the upstream was cancelled, so its
        # usage is an estimate (_partial_usage), and the answer is not cached (no record).
        ctx.error, ctx.complete = None, True


def _partial_usage(ctx: RequestContext, scanner: StreamScanner) -> Usage:
    """No usage chunk arrived (cut, timeout or disconnect): charge what was relayed.

    The prompt is estimated from the body size; each relayed content event counts as one completion
    token (how OpenAI-compatible upstreams stream), minus the role-only first event.
    """
    return Usage(estimate_prompt_tokens(ctx.body_size), max(0, scanner.data_events - 1))
