"""Response cache and request coalescing.

Key: SHA-256 of the canonical request (model name as the client sent it, messages, tools and every
other parameter — except ``stream``, ``stream_options``, ``user`` and ``metadata``, which cannot change
the answer), namespaced per team (``cache.shared`` opts into one namespace for everyone).

``/v1/messages`` requests (Anthropic's format) have entries of their own, stored as a Message and
replayed as JSON or as its event stream.

Only successful, complete answers are stored (a stream only if it ended with ``[DONE]``), within
``max_entry_bytes``. A hit is replayed as JSON or SSE, whichever the client asked for, with the cached
usage; its tokens are not charged to the team's token limits or budgets (it still counts as a request
against ``rpm``). Client control: ``Cache-Control: no-cache`` skips the read, ``no-store`` the write,
``max-age=N`` sets the entry's TTL (capped at ``cache.max_ttl_seconds``).

Coalescing: the first cacheable request for a key leads; identical requests arriving while it runs
(on this instance, or on another one through a short Redis lock) wait for its stored answer and get a
replay. If the leader fails or takes longer than ``coalesce_timeout_seconds``, they call the upstream
themselves. Any cache-store failure means "no cache", never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable
from typing import Any, ClassVar

import orjson
import structlog
from aiohttp import web

from gateway import metrics
from gateway.config import CacheConfig, IdentityNeed, ModelConfig
from gateway.context import CachePlan, RequestContext, Usage
from gateway.formats import anthropic
from gateway.pipeline import Services
from gateway.relay import SSE_HEADERS
from gateway.replay import json_to_sse, sse_for_client, sse_to_json
from gateway.state.base import StoreUnavailable
from gateway.state.cache import CacheStore

log = structlog.get_logger("gateway.cache")
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata"})
POLL_SECONDS = 0.05


class CachePlugin:
    name: ClassVar[str] = "cache"
    declares_checks_only: ClassVar[bool] = False
    needs_identity: ClassVar[IdentityNeed] = "after_auth"

    def __init__(self, services: Services) -> None:
        self.settings: CacheConfig = services.config.cache
        self.store: CacheStore = services.cache
        self.prefix = services.prefix
        self.inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self.guard = services.guard  # output guardrails: an answer is cached per output rule set
        self.results = {r: metrics.CACHE_REQUESTS.labels(r) for r in ("hit", "miss", "bypass")}

    # -- admission ---------------------------------------------------------------------------
    def _policy(self, ctx: RequestContext) -> tuple[bool, bool, int] | None:
        """(read, write, ttl) for this request, or None when the cache is bypassed."""
        model = ctx.model.cache
        s = self.settings
        enabled = s.enabled if model.enabled is None else model.enabled
        if not enabled or ctx.endpoint not in ("chat", "messages") or not ctx.model.targets:
            return None
        deterministic_only = (
            s.deterministic_only if model.deterministic_only is None else model.deterministic_only
        )
        if deterministic_only and not _deterministic(ctx.body):
            return None
        ttl = s.ttl_seconds if model.ttl_seconds is None else model.ttl_seconds
        read = write = True
        for directive in ctx.headers.get("Cache-Control", "").lower().split(","):
            name, _, value = directive.strip().partition("=")
            if name == "no-cache":
                read = False
            elif name == "no-store":
                write = False
            elif name == "max-age" and value.strip().isascii() and value.strip().isdigit():
                # (isascii: "²" is a digit to str.isdigit but not to int())
                ttl = min(int(value), s.max_ttl_seconds)
        if ttl <= 0:
            write = False
        return (read, write, ttl) if read or write else None

    def key(self, ctx: RequestContext) -> str:
        canonical = {k: v for k, v in ctx.body.items() if k not in IGNORED_FIELDS}
        digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
        namespace = "_shared" if self.settings.shared else (ctx.team or "_anonymous")
        if self.guard is not None:  # stored as filtered by the caller's output rules: only theirs may read it
            rules = self.guard.output_rules(ctx.identity)
            if rules:
                names = ",".join(sorted(r.name for r in rules))
                digest = hashlib.sha256(f"{names}|{digest}".encode()).hexdigest()
        if ctx.endpoint == "messages":  # Anthropic's format: entries of their own, per version and betas
            api = "|".join(ctx.headers.get(n, "") for n in ("anthropic-version", "anthropic-beta"))
            digest = "msg-" + hashlib.sha256(f"{api}|{digest}".encode()).hexdigest()
        return f"{self.prefix}:cache:{namespace}:{ctx.model.name}:{digest}"

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        policy = self._policy(ctx)
        if policy is None:
            return self._mark(ctx, "bypass")
        read, write, ttl = policy
        plan = ctx.cache_plan = CachePlan(self.key(ctx), ttl, write)
        if read:
            entry = await self._get(plan.key)
            if entry is None and write and self.settings.coalesce:
                entry = await self._coalesce(plan)
            if entry is not None:
                return self._hit(ctx, entry)
        if write and ctx.stream:
            ctx.record = []
        return self._mark(ctx, "miss")

    def _mark(self, ctx: RequestContext, result: str) -> web.StreamResponse | None:
        """Record the cache result; the request goes on to the upstream (hence no response)."""
        ctx.cache = result
        ctx.response_headers["x-gateway-cache"] = result
        self.results[result].inc()
        return None

    async def _get(self, key: str) -> bytes | None:
        try:
            return await self.store.get(key)
        except StoreUnavailable:
            return None

    async def _coalesce(self, plan: CachePlan) -> bytes | None:
        """Wait for an identical in-flight request's answer, or become the one others wait for."""
        timeout = self.settings.coalesce_timeout_seconds
        running = self.inflight.get(plan.key)
        if running is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(running), timeout)
            except TimeoutError:
                return None
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.inflight[plan.key] = future
        plan.leader = True
        try:
            if await self.store.lock(_lock(plan.key), int(timeout * 1000)):
                return None  # the leader across instances: call the upstream
            # Another instance leads: wait for its entry, or for its lock to go (it failed).
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                await asyncio.sleep(POLL_SECONDS)
                entry = await self.store.get(plan.key)
                if entry is not None:
                    self._release(plan, entry)
                    return entry
                if not await self.store.locked(_lock(plan.key)):
                    break
        except StoreUnavailable:
            pass
        return None

    def _hit(self, ctx: RequestContext, raw: bytes) -> web.Response:
        entry = orjson.loads(raw)
        usage = entry.get("usage")
        body = entry["body"].encode()
        options = ctx.body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        ctx.usage = Usage.from_json(usage)
        ctx.provider, ctx.upstream_model = "cache", entry.get("upstream_model")
        ctx.cache = "hit"
        self.results["hit"].inc()
        headers = ctx.response_headers
        headers["x-gateway-cache"] = "hit"
        headers["Age"] = str(max(0, int(time.time() - entry.get("created", time.time()))))
        if ctx.endpoint == "messages":  # stored as a Message (JSON), replayed as one or as its events
            if ctx.stream:
                return web.Response(body=anthropic.message_events(orjson.loads(body)), headers=SSE_HEADERS)
            return web.Response(body=body, content_type="application/json")
        if ctx.stream:
            data = (
                json_to_sse(body, include_usage)
                if entry["kind"] == "json"
                else sse_for_client(body, usage, include_usage)
            )
            return web.Response(body=data, headers=SSE_HEADERS)
        data = body if entry["kind"] == "json" else sse_to_json(body, usage)
        return web.Response(body=data, content_type="application/json")

    # -- after the response --------------------------------------------------------------------
    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        return None  # nothing of this plugin depends on the model

    def finish(self, ctx: RequestContext) -> Awaitable[None] | None:
        plan = ctx.cache_plan
        if plan is None or ctx.cache != "miss":
            return None
        entry = self._entry(ctx) if plan.write and ctx.complete and ctx.status == 200 else None
        if entry is None:
            if plan.leader:
                return self._unlock(plan, None)
            return None
        return self._store(plan, entry)

    def _entry(self, ctx: RequestContext) -> bytes | None:
        if ctx.endpoint == "messages":
            message = _message(ctx)
            if message is None:
                return None
            kind, body = "json", message
        elif ctx.record is not None:
            kind, body = "sse", b"".join(ctx.record)
        elif ctx.response_body is not None:
            kind, body = "json", ctx.response_body
        else:
            return None
        if len(body) > self.settings.max_entry_bytes:
            return None
        usage = ctx.usage
        return orjson.dumps(
            {
                "kind": kind,
                "created": time.time(),
                "upstream_model": ctx.upstream_model,
                "usage": _usage_json(usage) if usage is not None else None,
                "body": body.decode("utf-8", "replace"),
            }
        )

    async def _store(self, plan: CachePlan, entry: bytes) -> None:
        with contextlib.suppress(StoreUnavailable):  # not stored: local followers still get it below
            await self.store.set(plan.key, entry, plan.ttl)
        if plan.leader:
            await self._unlock(plan, entry)

    async def _unlock(self, plan: CachePlan, entry: bytes | None) -> None:
        self._release(plan, entry)
        with contextlib.suppress(StoreUnavailable):
            await self.store.unlock(_lock(plan.key))

    def _release(self, plan: CachePlan, entry: bytes | None) -> None:
        future = self.inflight.pop(plan.key, None)
        if future is not None and not future.done():
            future.set_result(entry)


def _message(ctx: RequestContext) -> bytes | None:
    """What a /v1/messages request got, as a Message: its JSON answer, or its stream assembled — an
    Anthropic target's own events, or the OpenAI chunks an OpenAI-compatible target sent."""
    if ctx.record is None:
        return ctx.response_body
    stream = b"".join(ctx.record)
    if stream.startswith(b"event:"):
        message = anthropic.events_message(stream)
    else:
        usage = _usage_json(ctx.usage) if ctx.usage is not None else None
        message = anthropic.chat_to_message(orjson.loads(sse_to_json(stream, usage)), ctx.model_name)
    return orjson.dumps(message) if message is not None else None


def _lock(key: str) -> str:
    return key + ":lock"


def _deterministic(body: dict[str, Any]) -> bool:
    temperature = body.get("temperature")
    seed = body.get("seed")
    return temperature == 0 or (isinstance(seed, int) and not isinstance(seed, bool))


def _usage_json(usage: Usage) -> dict[str, Any]:
    data: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        data["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return data
