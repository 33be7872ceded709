"""Prometheus metrics (names and labels are part of the public contract: CONTRACT.md).

Label values are bounded: configured model/provider/team names, status codes and a fixed set of
outcomes — never keys, request ids or free text. Hot paths bind label children once and reuse them.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["Counter", "Gauge", "Histogram"]

# 10 ms … 120 s: LLM calls range from cached hits to long generations.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 3, 5, 10, 20, 30, 60, 120)

REQUESTS = Counter(
    "llm_gateway_requests",
    "Requests answered, by final status.",
    ["model", "provider", "status_code", "team"],
)
REQUEST_DURATION = Histogram(
    "llm_gateway_request_duration_seconds",
    "Request latency, end to end.",
    ["model", "provider"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "llm_gateway_time_to_first_token_seconds",
    "Time to the first streamed data event.",
    ["model", "provider"],
    buckets=TTFT_BUCKETS,
)
UPSTREAM_REQUESTS = Counter(
    "llm_gateway_upstream_requests",
    "Upstream attempts by outcome.",
    ["provider", "upstream_model", "outcome"],
)
FALLBACKS = Counter(
    "llm_gateway_fallbacks",
    "Moves from one target to the next.",
    ["model", "from_provider", "to_provider"],
)
TOKENS = Counter("llm_gateway_tokens", "Tokens used.", ["team", "model", "kind"])
COST = Counter("llm_gateway_cost_usd", "Spend in USD.", ["team", "model"])
CACHE_REQUESTS = Counter("llm_gateway_cache_requests", "Cache lookups by result.", ["result"])
RATE_LIMITED = Counter("llm_gateway_rate_limited", "Requests refused by a limit.", ["team", "limit"])
IN_FLIGHT = Gauge("llm_gateway_in_flight_requests", "Requests being served.", multiprocess_mode="livesum")


class InFlight:
    """Requests being served. Single process: a plain integer read at scrape time (no lock per
    request). Several workers: the multi-process gauge, which every worker writes to its file."""

    def __init__(self) -> None:
        self.count = 0
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if not self.multiprocess:
            IN_FLIGHT.set_function(lambda: self.count)

    def enter(self) -> None:
        self.count += 1
        if self.multiprocess:
            IN_FLIGHT.inc()

    def leave(self) -> None:
        self.count -= 1
        if self.multiprocess:
            IN_FLIGHT.dec()


IN_FLIGHT_REQUESTS = InFlight()
CIRCUIT_OPEN = Gauge(
    "llm_gateway_circuit_open",
    "1 while a target's circuit is open.",
    ["provider", "upstream_model"],
    multiprocess_mode="max",
)
REDIS_ERRORS = Counter("llm_gateway_redis_errors", "Failed state-store operations.", ["operation"])
SETTLEMENT_BACKLOG = Gauge(
    "llm_gateway_settlement_backlog",
    "Settlements (spend, usage, limit reconciliations) kept in memory until the state store books them.",
    multiprocess_mode="livesum",
)
GRAPHQL_OPERATIONS = Counter(
    "llm_gateway_graphql_operations",
    "GraphQL operations by type (query, mutation, subscription; invalid: not parsed).",
    ["type"],
)


class RequestMetrics:
    """Request counters and histograms with label children bound once per label set."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, int, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}
        self._ttft: dict[tuple[str, str], Any] = {}
        self._spend: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def observe(
        self, model: str, provider: str, status: int, team: str, elapsed: float, ttft: float | None
    ) -> None:
        key = (model, provider, status, team)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(model, provider, str(status), team)
        counter.inc()
        pair = (model, provider)
        hist = self._durations.get(pair)
        if hist is None:
            hist = self._durations[pair] = REQUEST_DURATION.labels(model, provider)
        hist.observe(elapsed)
        if ttft is not None:
            t = self._ttft.get(pair)
            if t is None:
                t = self._ttft[pair] = TTFT.labels(model, provider)
            t.observe(ttft)

    def spend(self, team: str, model: str, prompt: int, completion: int, cost: float) -> None:
        key = (team, model)
        children = self._spend.get(key)
        if children is None:
            children = self._spend[key] = (
                TOKENS.labels(team, model, "prompt"),
                TOKENS.labels(team, model, "completion"),
                COST.labels(team, model),
            )
        children[0].inc(prompt)
        children[1].inc(completion)
        if cost:
            children[2].inc(cost)
