"""The running gateway's state, reachable from handlers through typed ``web.AppKey``s."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth import Authenticator
from gateway.capabilities import Catalog
from gateway.config import Config
from gateway.context import RequestContext
from gateway.guardrails.engine import Guard
from gateway.metrics import RequestMetrics
from gateway.performance import Performance
from gateway.pipeline import Pipeline
from gateway.probes import Prober
from gateway.providers import Provider
from gateway.routing import Router
from gateway.state.base import Store
from gateway.state.cache import CacheStore


@dataclass(slots=True)
class Gateway:
    config: Config
    providers: dict[str, Provider]
    router: Router
    store: Store
    auth: Authenticator
    pipeline: Pipeline
    prober: Prober
    cache: CacheStore
    catalog: Catalog
    guard: Guard | None = None  # output guardrails (the plugin applies the input ones)
    performance: Performance = field(default_factory=Performance)
    request_metrics: RequestMetrics = field(default_factory=RequestMetrics)
    models_body: bytes = b""
    ready: bool = False  # providers started
    draining: bool = False  # SIGTERM received: finishing in-flight work
    mock_url: str | None = field(default=None)

    @property
    def prefix(self) -> str:
        """The namespace of every state-store key (``redis.prefix``)."""
        return self.config.redis.prefix if self.config.redis else "llmgw"

    @property
    def authenticates(self) -> bool:
        return "auth" in self.config.plugins


GATEWAY = web.AppKey("gateway", Gateway)
REQUEST_ID = web.RequestKey("llmgw_request_id", str)
CONTEXT = web.RequestKey("llmgw_context", RequestContext)
