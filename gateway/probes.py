"""Background health of providers and the state store, so health endpoints never probe per request.

Each provider is probed every ``health.interval_seconds`` (``GET base_url + probe_path``), and live
traffic reports into the same record: a provider is *down* when its last probe failed or every one
of its targets has an open circuit; *up* when the last probe or request succeeded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import structlog

from gateway.providers import Provider
from gateway.state.base import Store, StoreUnavailable

log = structlog.get_logger("gateway.health")


@dataclass(slots=True)
class Health:
    status: str = "unknown"  # up | down | unknown
    latency_ms: float | None = None
    checked_at: float | None = None


class Prober:
    def __init__(self, store: Store | None, *, interval: float, timeout: float) -> None:
        self.store = store
        self.interval, self.timeout = interval, timeout
        self.providers: dict[str, Provider] = {}
        self.provider_health: dict[str, Health] = {}
        self.store_health = Health(status="up" if store is None else "unknown")

    def watch(self, providers: dict[str, Provider]) -> None:
        self.providers = providers
        self.provider_health = {name: Health() for name in providers}

    def observe(self, provider: str, ok: bool, latency: float | None = None) -> None:
        """Live traffic: a finished upstream attempt (success, or a failure of the provider's own)."""
        self._set(provider, "up" if ok else "down", latency)

    def _set(self, provider: str, status: str, latency: float | None) -> None:
        health = self.provider_health.get(provider)
        if health is None:
            return
        if health.status != status and not (health.status == "unknown" and status == "up"):
            log.warning("provider_state_changed", provider=provider, before=health.status, after=status)
        health.status = status
        health.checked_at = time.time()
        if latency is not None:
            health.latency_ms = round(latency * 1000, 2)

    async def probe_provider(self, name: str) -> None:
        provider = self.providers[name]
        path = provider.config.probe_path
        if path is None:
            return
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                resp = await provider.get(path)
                resp.release()
            ok = 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        self._set(name, "up" if ok else "down", time.perf_counter() - start)

    async def probe_store(self) -> None:
        if self.store is None:
            return
        try:
            async with asyncio.timeout(self.timeout):
                latency = await self.store.ping()
        except (StoreUnavailable, TimeoutError):
            self.store_health.status = "down"
            self.store_health.latency_ms = None
        else:
            self.store_health.status = "up"
            self.store_health.latency_ms = round(latency, 2)
        self.store_health.checked_at = time.time()

    async def probe_all(self) -> None:
        await asyncio.gather(self.probe_store(), *(self.probe_provider(n) for n in self.providers))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe_all()
