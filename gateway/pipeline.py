"""The plugin pipeline: one ``Plugin`` protocol, built once from ``config.plugins``.

``admit`` runs the plugins in order; one may answer the request itself (return a response) and
stop the chain, or raise a ``GatewayError``. Limit plugins only *declare* ``Check``s on the context
(``ctx.limits``); the limiter (``gateway.limits``) takes all declared checks in one store call (one
Lua script on Redis) right before the first plugin that is not a pure limit plugin, or at the end.
``finish`` runs exactly once per admitted request — after success, an upstream error or a client
disconnect — and the limiter settles what it holds, with every plugin's ``Op``s, in one more call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import structlog
from aiohttp import web

from gateway.auth import Authenticator
from gateway.config import Config, IdentityNeed, ModelConfig
from gateway.context import RequestContext
from gateway.guardrails.engine import Guard
from gateway.limits.limiter import Limiter
from gateway.state.base import Store
from gateway.state.cache import CacheStore

log = structlog.get_logger("gateway.pipeline")


@dataclass(frozen=True, slots=True)
class Services:
    """What plugins are built with (once, at start-up)."""

    config: Config
    store: Store
    auth: Authenticator
    prefix: str  # namespace of every state-store key
    cache: CacheStore
    guard: Guard | None = None  # the guardrail rules (with the guardrails plugin and rules set)


class Plugin(Protocol):
    name: ClassVar[str]
    # True for plugins whose admit only appends ctx.checks: their checks are batched with the next.
    declares_checks_only: ClassVar[bool]
    # What it needs of the caller's identity, which ``auth`` sets: config validation refuses an order
    # that breaks it (mirrored in ``gateway.config.PLUGIN_NEEDS_IDENTITY``, which the parser reads).
    needs_identity: ClassVar[IdentityNeed]

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None: ...

    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        """The admitted request moves to ``ctx.model`` (a context-window fallback): give back what was
        taken for ``old`` alone and declare ``ctx.model``'s own checks (the pipeline takes them)."""

    def finish(self, ctx: RequestContext) -> Awaitable[None] | None:
        """Append settlement ``Op``s to ``ctx.limits.ops`` (the limiter does that I/O once, for all
        plugins, with the reconciliation of the limits the request took).

        A plugin with I/O of its own (the cache's write) returns an awaitable instead; it runs in a
        background task."""


class Pipeline:
    def __init__(self, plugins: Sequence[Plugin], limiter: Limiter) -> None:
        self.plugins = tuple(plugins)
        self.limiter = limiter
        self.tasks: set[asyncio.Task[None]] = set()  # plugins' own background I/O (the cache write)

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        for plugin in self.plugins:
            if ctx.limits.checks and not plugin.declares_checks_only:
                await self.limiter.enforce(ctx)
            response = await plugin.admit(ctx)
            if response is not None:
                return response
        if ctx.limits.checks:
            await self.limiter.enforce(ctx)
        return None

    async def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        """After admission, the request moves from ``old`` to ``ctx.model``: per-model limits follow it
        (one more store call, all or nothing; a refusal is the new model's 429)."""
        for plugin in self.plugins:
            plugin.switch_model(ctx, old)
        if ctx.limits.checks:
            await self.limiter.enforce(ctx)

    def finish(self, ctx: RequestContext) -> asyncio.Task[None] | None:
        """Called exactly once per request that entered ``admit``, before its answer is sent. The
        store settlement is queued without waiting for its reply (``Limiter.finish``), and a
        disconnected handler never waits. A plugin's own I/O (the cache write) runs in a background
        task."""
        pending: list[Awaitable[None]] = []
        for plugin in self.plugins:
            try:
                work = plugin.finish(ctx)
            except Exception:
                log.exception("plugin_finish_failed", plugin=plugin.name, request_id=ctx.request_id)
                continue
            if work is not None:
                pending.append(work)
        if pending:
            task = asyncio.get_running_loop().create_task(self._run(ctx, pending))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return self.limiter.finish(ctx)

    async def _run(self, ctx: RequestContext, pending: list[Awaitable[None]]) -> None:
        for work in pending:
            try:
                await work
            except Exception:
                log.exception("settle_failed", request_id=ctx.request_id)

    async def drain(self) -> None:
        """Wait for the plugins' background work and the limiter's settlements (shutdown, and tests
        that read the books right after)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await self.limiter.drain()
