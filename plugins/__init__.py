"""Request plugins, one per file. ``config.plugins`` lists which run, in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gateway.pipeline import Plugin, Services
from plugins.auth import AuthPlugin
from plugins.cache import CachePlugin
from plugins.guardrails import GuardrailsPlugin
from plugins.quota import QuotaPlugin
from plugins.rate_limit import RateLimitPlugin

REGISTRY: dict[str, Callable[[Services], Plugin]] = {
    "auth": AuthPlugin,
    "rate_limit": RateLimitPlugin,
    "quota": QuotaPlugin,
    "cache": CachePlugin,
    "guardrails": GuardrailsPlugin,
}


def build(names: Sequence[str], services: Services) -> list[Plugin]:
    return [REGISTRY[name](services) for name in names]
