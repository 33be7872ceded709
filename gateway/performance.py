"""Runtime performance per model over a rolling window, from live traffic.

Each finished request that reached an upstream adds one sample (a tuple appended to a bounded deque:
constant work on the request path). Medians are computed only when ``GET /api/v1/models`` asks, over
the samples of the last ``WINDOW_SECONDS`` (at most ``MAX_SAMPLES`` per model). Cache hits and requests
refused before routing are not samples: they say nothing about the model.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any, NamedTuple

WINDOW_SECONDS = 900.0
MAX_SAMPLES = 1000


class Sample(NamedTuple):
    at: float
    latency: float  # seconds, whole request
    ttft: float | None  # seconds to the first token (streams)
    output_tps: float | None  # completion tokens per second of generation
    error: bool  # the gateway answered 5xx (an upstream failure or timeout)


class Performance:
    def __init__(self) -> None:
        self._samples: dict[str, deque[Sample]] = {}

    def observe(
        self, model: str, latency: float, ttft: float | None, completion_tokens: int | None, error: bool
    ) -> None:
        samples = self._samples.get(model)
        if samples is None:
            samples = self._samples[model] = deque(maxlen=MAX_SAMPLES)
        tps = None
        if completion_tokens and not error:
            generating = latency - (ttft or 0.0)
            if generating > 0:
                tps = completion_tokens / generating
        samples.append(Sample(time.monotonic(), latency, ttft, tps, error))

    def report(self, model: str) -> dict[str, Any]:
        cutoff = time.monotonic() - WINDOW_SECONDS
        recent = [s for s in self._samples.get(model, ()) if s.at >= cutoff]
        ok = [s for s in recent if not s.error]
        ttfts = [s.ttft for s in ok if s.ttft is not None]
        rates = [s.output_tps for s in ok if s.output_tps is not None]
        return {
            "p50LatencyMs": round(statistics.median(s.latency for s in ok) * 1000, 2) if ok else None,
            "p50TtftMs": round(statistics.median(ttfts) * 1000, 2) if ttfts else None,
            "outputTokensPerSecond": round(statistics.median(rates), 2) if rates else None,
            "errorRate": round(sum(s.error for s in recent) / len(recent), 4) if recent else None,
            "sampleSize": len(recent),
        }
