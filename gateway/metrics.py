"""Prometheus metrics (names and labels are part of the public contract: CONTRACT.md).

Label values are bounded: configured model/provider/team names, status codes and a fixed set of
outcomes — never keys, request ids or free text. Hot paths bind label children once and reuse them,
and the per-request ones are added up in a ``Tally`` and folded into prometheus_client once a second
and before every read of the registry (a scrape, or a test's ``get_sample_value``).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

__all__ = ["Counter", "Gauge", "Histogram"]


class Tally:
    """Per-request counter increments and histogram observations, added up in plain dicts and folded
    into their prometheus_client children in one pass: each ``inc`` / ``observe`` of prometheus_client
    is four Python calls and a lock; here it is a dict update. Folded once a second (a timer armed by
    the first update), before every read of the default registry (``_FoldTallies`` below) and by
    ``/metrics`` in multi-process mode — where another worker's last second may not be in a scrape
    yet: it arrives in the next one."""

    FOLD_SECONDS = 1.0

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        self._hists: dict[Any, list[float]] = {}  # child -> [sum, count in bucket 0, bucket 1, ...]
        self._timer: asyncio.TimerHandle | None = None
        _TALLIES.add(self)

    def inc(self, child: Any, amount: float = 1.0) -> None:
        counts = self._counts
        counts[child] = counts.get(child, 0.0) + amount
        if self._timer is None:
            self._arm()

    def observe(self, child: Any, value: float) -> None:
        acc = self._hists.get(child)
        bounds = child._upper_bounds  # prometheus_client's own: the bucket bounds, +Inf last
        if acc is None:
            acc = self._hists[child] = [0.0] * (len(bounds) + 1)
        acc[0] += value
        acc[bisect_left(bounds, value) + 1] += 1  # its bucket: the first bound >= value
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(self.FOLD_SECONDS, self.fold)
        except RuntimeError:  # no event loop (a synchronous caller): fold now
            self.fold()

    def fold(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, acc in self._hists.items():
            if any(acc[1:]):
                child._sum.inc(acc[0])
                for i, n in enumerate(acc[1:]):
                    if n:
                        child._buckets[i].inc(n)
                acc[:] = [0.0] * len(acc)


_TALLIES: weakref.WeakSet[Tally] = weakref.WeakSet()


def fold_all() -> None:
    """Fold every tally into prometheus_client now."""
    for tally in list(_TALLIES):
        tally.fold()


class _FoldTallies:
    """Registered first, so collected first: any read of the default registry sees exact figures."""

    def collect(self) -> Iterable[Any]:
        fold_all()
        return ()


REGISTRY.register(_FoldTallies())

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
GUARDRAIL_ACTIONS = Counter(
    "llm_gateway_guardrail_actions",
    "Content guardrail actions: a rule that matched a request (input) or an answer (output).",
    ["rule", "action", "direction"],
)
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
    """Request counters and histograms with label children bound once per label set (one per app:
    ``Gateway.request_metrics``), added up in a ``Tally``."""

    def __init__(self) -> None:
        self.tally = Tally()
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
        tally = self.tally
        tally.inc(counter)
        pair = (model, provider)
        hist = self._durations.get(pair)
        if hist is None:
            hist = self._durations[pair] = REQUEST_DURATION.labels(model, provider)
        tally.observe(hist, elapsed)
        if ttft is not None:
            t = self._ttft.get(pair)
            if t is None:
                t = self._ttft[pair] = TTFT.labels(model, provider)
            tally.observe(t, ttft)

    def spend(self, team: str, model: str, prompt: int, completion: int, cost: float) -> None:
        key = (team, model)
        children = self._spend.get(key)
        if children is None:
            children = self._spend[key] = (
                TOKENS.labels(team, model, "prompt"),
                TOKENS.labels(team, model, "completion"),
                COST.labels(team, model),
            )
        tally = self.tally
        if prompt:
            tally.inc(children[0], prompt)
        if completion:
            tally.inc(children[1], completion)
        if cost:
            tally.inc(children[2], cost)
