"""The typed request context that flows from the handler through plugins, routing and the relay."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config import ModelConfig
from gateway.limits.state import LimitState

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from gateway.auth import Identity


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = None  # as reported by the upstream (OpenRouter's usage.cost)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_json(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if cached is None:  # DeepSeek reports prompt cache hits under its own name
            cached = usage.get("prompt_cache_hit_tokens")
        cost = usage.get("cost")
        if not (isinstance(cost, int | float) and not isinstance(cost, bool) and 0 <= cost < math.inf):
            cost = None  # a negative or non-finite figure is no figure: the price table applies
        return cls(
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            cached_tokens=_int(cached),
            cost_usd=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        )


def _int(v: Any) -> int:
    # Bounded: no upstream answer is a trillion tokens, and a huge figure must not lock a budget.
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**12 else 0


@dataclass(slots=True)
class CachePlan:
    """What the cache plugin decided for a request it may store (see plugins/cache.py)."""

    key: str
    ttl: int
    write: bool
    leader: bool = False  # this request answers identical in-flight ones when it ends


@dataclass(slots=True)
class RequestContext:
    request_id: str
    endpoint: str  # "chat" | "embeddings"
    body: dict[str, Any]
    model: ModelConfig  # UNKNOWN_MODEL until the name is found (auth still runs first)
    headers: CIMultiDictProxy[str]
    body_size: int = 0
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    # Set by a surface that identified the caller another way (a browser's stream ticket); auth uses it.
    presented: Identity | None = None
    # Filled by the plugins (auth, limits) ...
    identity: Identity | None = None
    team: str | None = None
    key_id: str | None = None
    limits: LimitState = field(default_factory=LimitState)  # declared, taken, to settle (gateway.limits)
    # ... and by the router / relay.
    provider: str | None = None
    upstream_model: str | None = None
    attempts: int = 0
    status: int = 0
    ttft: float | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    cache: str | None = None
    added_include_usage: bool = False
    # The answer as relayed, for the cache: a stream's chunks (when recording) or a JSON body.
    record: list[bytes] | None = None
    response_body: bytes | None = None
    complete: bool = False  # the answer ended cleanly (a stream's [DONE], a 200 body)
    cache_plan: CachePlan | None = None
    error: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)

    def charged_tokens(self) -> int:
        """Tokens counted against limits and budgets (a cache hit is free: see the cache docs)."""
        if self.usage is None or self.cache == "hit":
            return 0
        return self.usage.total_tokens

    @property
    def model_name(self) -> str:
        name = self.body.get("model")
        return name if isinstance(name, str) else ""


UNKNOWN_MODEL = ModelConfig(name="unknown", targets=())
