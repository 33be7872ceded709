"""The one end of every request that reached a model: cost, settlement, metrics, the performance
sample and the access line — written once per request, whichever surface (REST, GraphQL) served it.

Request ids live here too: a random per-process prefix and a counter (unique, and far cheaper than
uuid4 on the hot path); a client's own id could be key-shaped, so only the gateway's own ids skip the
redactor in the access line.
"""

from __future__ import annotations

import asyncio
import itertools
import os

from gateway.accounting import cost_usd
from gateway.context import RequestContext
from gateway.logging import ACCESS, REDACTOR
from gateway.runtime import Gateway

_PREFIX = os.urandom(4).hex()
_counter = itertools.count(1)
_GENERATED = f"req_{_PREFIX}"


def new_request_id() -> str:
    return f"req_{_PREFIX}{next(_counter):08x}"


def clean_id(rid: str) -> str:
    return rid if rid.startswith(_GENERATED) else REDACTOR.clean(rid)


def finish(
    gw: Gateway, ctx: RequestContext, status: int, elapsed: float, path: str
) -> asyncio.Task[None] | None:
    """Settle the request with the plugins, then the metrics and the one access line. Returned: the
    settlement's task when it must be awaited (see ``Pipeline.finish``)."""
    if ctx.error is not None and status == 200:
        status = 502  # a stream that failed after it started: count it as the failure it was
    ctx.status = status
    usage = ctx.usage
    if usage is not None and ctx.cost_usd is None and ctx.cache != "hit":
        ctx.cost_usd = cost_usd(ctx.model.pricing, usage)
    settling = gw.pipeline.finish(ctx)
    # A sample of the model's performance: an answer, or the upstreams' failure (a client's 4xx says
    # nothing about the model).
    if ctx.provider is not None and ctx.cache != "hit" and ctx.endpoint == "chat" and not 400 <= status < 500:
        gw.performance.observe(
            ctx.model.name, elapsed, ctx.ttft, usage.completion_tokens if usage else None, status >= 500
        )
    gw.request_metrics.observe(
        ctx.model.name, ctx.provider or "none", status, ctx.team or "none", elapsed, ctx.ttft
    )
    if usage is not None and ctx.cache != "hit":
        gw.request_metrics.spend(
            ctx.team or "none",
            ctx.model.name,
            usage.prompt_tokens,
            usage.completion_tokens,
            ctx.cost_usd or 0.0,
        )
    ACCESS.write(
        {
            "event": "request",
            "level": "info",
            "request_id": clean_id(ctx.request_id),
            "path": path,  # a routed path (or "/graphql"): fixed text
            "team": ctx.team,
            "model": ctx.model.name,
            "provider": ctx.provider,
            "upstream_model": ctx.upstream_model,
            "status": status,
            "stream": ctx.stream,
            "attempts": ctx.attempts,
            "latency_ms": round(elapsed * 1000, 2),
            "ttft_ms": None if ctx.ttft is None else round(ctx.ttft * 1000, 2),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cost_usd": ctx.cost_usd,
            "cache": ctx.cache,
            "error": ctx.error,
        }
    )
    return settling
