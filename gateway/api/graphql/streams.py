"""Completions streamed to GraphQL subscribers.

A ``CompletionStream`` runs one admitted request's upstream stream in a task of its own (``relay.pump``,
the same loop as the REST streams) and keeps its events in order, so a subscriber that arrives after
the upstream started still gets the whole completion from the first delta. Each upstream event is
decoded once (``formats.native.chunk_events``); a subscriber reads by index, never re-reading.

``Streams`` holds the streams started by ``startStream`` / ``startStreamCompletion`` under (team, id):
only the same team finds one, the first subscriber takes it, and one nobody takes within
``stream_subscribe_timeout_seconds`` is cancelled upstream. It also counts each team's live streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from gateway import completion as core
from gateway import outcome
from gateway.context import RequestContext, Usage
from gateway.errors import GatewayError, InvalidRequest, RateLimited, ServiceUnavailable, UpstreamError
from gateway.formats.native import UPSTREAM_STREAM_ERROR, chunk_events, response_cost
from gateway.metrics import IN_FLIGHT_REQUESTS
from gateway.relay import pump
from gateway.runtime import Gateway
from gateway.state.base import StoreUnavailable

log = structlog.get_logger("gateway.graphql")
PATH = "/graphql"  # the path in access lines


@dataclass(frozen=True, slots=True)
class Delta:
    content: str


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: str | None
    usage: Usage
    cost_usd: float | None


Event = Delta | Done | GatewayError


class CompletionStream:
    def __init__(self, gw: Gateway, ctx: RequestContext) -> None:
        self.gw, self.ctx = gw, ctx
        self.events: list[Event] = []
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._finish_reason: str | None = None
        self._failed = False

    def _push(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def start(self) -> None:
        IN_FLIGHT_REQUESTS.enter()  # left in _end
        self.task = asyncio.get_running_loop().create_task(self._run())

    def replay(self, cached: bytes) -> None:
        """A cache hit: the stored stream's events, already complete."""
        self._write_now(cached)
        self.ctx.complete = True
        self._end(200)

    async def _run(self) -> None:
        ctx, status = self.ctx, 200
        try:
            up = await core.stream(self.gw, ctx)
            await pump(ctx, up, self._write, self._fail)
        except GatewayError as exc:
            status = exc.status
            self._fail_now(exc)
        except StoreUnavailable:
            status = 503
            self._fail_now(
                ServiceUnavailable("the state store is unavailable", code="state_store_unavailable")
            )
        except asyncio.CancelledError:
            status = 499  # the subscriber went away: the upstream request was closed by pump
            raise
        except Exception:
            log.exception("graphql_stream_failed", request_id=ctx.request_id)
            status = 500
            self._fail_now(GatewayError("internal error", code="internal_error"))
        finally:
            IN_FLIGHT_REQUESTS.leave()
            self._end(status)

    def _end(self, status: int) -> None:
        ctx = self.ctx
        if ctx.complete and not self._failed:
            usage = ctx.usage or Usage()
            self._push(Done(self._finish_reason, usage, response_cost(ctx)))
        self.finished = True
        self._changed.set()
        outcome.finish(self.gw, ctx, status, time.perf_counter() - ctx.started, PATH)

    async def _write(self, data: bytes) -> None:
        self._write_now(data)

    def _write_now(self, data: bytes) -> None:
        if self._failed:
            return
        for kind, value in chunk_events(data):
            if kind == "content":
                self._push(Delta(value))
            elif kind == "finish":
                self._finish_reason = value
            elif kind == "error":
                self._fail_now(UpstreamError(UPSTREAM_STREAM_ERROR, code="upstream_stream_error"))
                return

    async def _fail(self, status: int, message: str, code: str) -> None:
        self._fail_now(UpstreamError(message, status=status, code=code))

    def _fail_now(self, error: GatewayError) -> None:
        if not self._failed:
            self._failed = True
            self._push(error)

    async def follow(self) -> AsyncIterator[Event]:
        """Every event from the first, then each new one as it arrives, until the stream ends."""
        i = 0
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.finished:
                return
            self._changed.clear()
            await self._changed.wait()

    def cancel(self) -> None:
        """Stop the upstream request (a subscriber left, or nobody came)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


class Streams:
    def __init__(self, gw: Gateway) -> None:
        self.settings = gw.config.graphql
        self._started: dict[tuple[str, str], CompletionStream | None] = {}  # None: being opened
        self._live: dict[str, int] = {}  # team -> subscriptions and started streams on this instance

    def enter(self, team: str) -> None:
        limit = self.settings.max_subscriptions_per_team
        if self._live.get(team, 0) >= limit:
            raise RateLimited(
                f"too many concurrent streams for this team (at most {limit} per instance)",
                retry_after=1,
                code="too_many_subscriptions",
            )
        self._live[team] = self._live.get(team, 0) + 1

    def leave(self, team: str) -> None:
        left = self._live.get(team, 0) - 1
        if left > 0:
            self._live[team] = left
        else:
            self._live.pop(team, None)

    def reserve(self, team: str, stream_id: str) -> None:
        """Claim the id before anything is awaited, so two concurrent starts cannot both take it."""
        if not 1 <= len(stream_id) <= 64:
            raise InvalidRequest(
                "streamId must be 1 to 64 characters", param="streamId", code="invalid_stream_id"
            )
        if (team, stream_id) in self._started:
            raise InvalidRequest(
                f"streamId {stream_id!r} is already in use", param="streamId", code="stream_id_in_use"
            )
        self._started[(team, stream_id)] = None

    def release(self, team: str, stream_id: str) -> None:
        """A reserved id whose stream never opened (refused): free it."""
        if (team, stream_id) in self._started and self._started[(team, stream_id)] is None:
            del self._started[(team, stream_id)]

    def keep(self, team: str, stream_id: str, stream: CompletionStream) -> None:
        """Hold a started stream for its subscriber; cancel it if none comes in time."""
        key = (team, stream_id)
        self._started[key] = stream
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.stream_subscribe_timeout_seconds, self._expire, key, stream)

    def _expire(self, key: tuple[str, str], stream: CompletionStream) -> None:
        if self._started.get(key) is stream:
            del self._started[key]
            stream.cancel()
            self.leave(key[0])

    def take(self, team: str, stream_id: str) -> CompletionStream | None:
        """The team's started stream, for its one subscriber (another team never finds it)."""
        if self._started.get((team, stream_id)) is None:
            return None  # unknown, or still being opened
        return self._started.pop((team, stream_id))

    async def close(self) -> None:
        for stream in list(self._started.values()):
            if stream is None:
                continue
            stream.cancel()
            if stream.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.task
        self._started.clear()
