"""What each model can do and costs: config first, then OpenRouter's live list, then shipped defaults.

Per target, OpenRouter's live figures (context length, pricing, max output, image input) replace the
shipped defaults of ``gateway/data/models.json``; per model, the first target with any figures gives
them; per field, ``models[]`` config always wins. The effective context window and pricing are written
back into each ``Route.model``, so accounting and the window check read them from the request context
like any other model setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import aiohttp
import orjson
import structlog

from gateway.accounting import fits_window
from gateway.config import Config, ModelConfig, Pricing
from gateway.errors import CONTEXT_LENGTH_EXCEEDED, InvalidRequest
from gateway.providers import Provider
from gateway.relay import read_body
from gateway.routing import Route

log = structlog.get_logger("gateway.capabilities")
REFRESH_SECONDS = 3600.0  # OpenRouter's list, re-read hourly
MAX_LIST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Known:
    """Figures for one upstream model (shipped or live); None where the source says nothing."""

    context_window: int | None = None
    max_output_tokens: int | None = None
    pricing: Pricing | None = None
    strengths: tuple[str, ...] = ()
    use_cases: tuple[str, ...] = ()
    multimodal: bool | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    context_window: int | None
    max_output_tokens: int | None
    pricing: Pricing
    strengths: tuple[str, ...]
    use_cases: tuple[str, ...]
    multimodal: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "contextWindow": self.context_window,
            "maxOutputTokens": self.max_output_tokens,
            "pricing": {
                "input": self.pricing.input_per_mtok,
                "output": self.pricing.output_per_mtok,
                "images": self.pricing.image_per_mtok,
            },
            "strengths": list(self.strengths),
            "useCases": list(self.use_cases),
            "multimodal": self.multimodal,
        }


@functools.cache
def shipped() -> dict[str, Known]:
    """The defaults file, by upstream model id."""
    data = json.loads(resources.files("gateway").joinpath("data/models.json").read_text("utf-8"))
    known: dict[str, Known] = {}
    for entry in data["models"]:
        p = entry["pricing"]
        info = Known(
            entry["context_window"],
            entry["max_output_tokens"],
            Pricing(p["input"], p["output"], p.get("cached_input"), p.get("image")),
            tuple(entry["strengths"]),
            tuple(entry["use_cases"]),
            entry["multimodal"],
        )
        for model_id in entry["ids"]:
            known[model_id] = info
    return known


def _merge(live: Known | None, default: Known | None) -> Known | None:
    """Live figures where the live list has them, the shipped ones elsewhere."""
    if live is None or default is None:
        return live or default
    return Known(
        context_window=live.context_window or default.context_window,
        max_output_tokens=live.max_output_tokens or default.max_output_tokens,
        pricing=live.pricing or default.pricing,
        strengths=live.strengths or default.strengths,
        use_cases=live.use_cases or default.use_cases,
        multimodal=default.multimodal if live.multimodal is None else live.multimodal,
    )


def _effective(model: ModelConfig, known: Known | None) -> Capabilities:
    k = known or Known()
    c = model.capabilities
    return Capabilities(
        context_window=model.context_window or k.context_window,
        max_output_tokens=c.max_output_tokens or k.max_output_tokens,
        pricing=model.pricing or k.pricing or Pricing(),
        strengths=c.strengths if c.strengths is not None else k.strengths,
        use_cases=c.use_cases if c.use_cases is not None else k.use_cases,
        multimodal=c.multimodal if c.multimodal is not None else bool(k.multimodal),
    )


class Catalog:
    """Every model's effective capabilities, kept in step with ``Router.routes``."""

    def __init__(self, config: Config, routes: Mapping[str, Route]) -> None:
        self.config = config
        self.routes = routes
        self.live: dict[tuple[str, str], Known] = {}  # (provider, upstream model) -> OpenRouter's figures
        self.models: dict[str, Capabilities] = {}
        self.json: dict[str, dict[str, Any]] = {}  # ModelCapabilities as the APIs show it
        self._rebuild()

    def _rebuild(self) -> None:
        defaults = shipped()
        for model in self.config.models:
            known = None
            for t in model.targets:
                known = _merge(self.live.get((t.provider, t.model)), defaults.get(t.model))
                if known is not None:
                    break
            caps = self.models[model.name] = _effective(model, known)
            self.json[model.name] = caps.to_json()
            route = self.routes.get(model.name)
            if route is not None:
                route.model = dataclasses.replace(
                    route.model,
                    pricing=caps.pricing,
                    context_window=caps.context_window,
                    capabilities=dataclasses.replace(
                        route.model.capabilities, max_output_tokens=caps.max_output_tokens
                    ),
                )

    def get(self, name: str) -> Capabilities:
        return self.models[name]

    # -- selection ------------------------------------------------------------------------------
    def select(self, requirements: Mapping[str, Any], allowed: Iterable[str], chat: dict[str, Any]) -> str:
        """The cheapest allowed model (output price, then input price, then name) meeting every
        requirement and able to take the request ``chat``; InvalidRequest saying which requirement
        ruled out what when none does."""
        candidates = [n for n in allowed if n in self.models]
        fitting = [
            n for n in candidates if (w := self.models[n].context_window) is None or fits_window(chat, w)
        ]
        if candidates and not fitting:
            raise InvalidRequest(
                "the request does not fit the context window of any model available to this key",
                param="messages",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        candidates = fitting
        if not candidates:
            raise InvalidRequest(
                "no model is available to this key for automatic selection",
                param="options.model",
                code="no_model_available",
            )
        ruled_out: list[str] = []
        for name, value in requirements.items():
            kept = [m for m in candidates if _meets(self.models[m], name, value)]
            if not kept:
                ruled_out.append(_why(name, value, [self.models[m] for m in candidates]))
            else:
                candidates = kept
        if ruled_out:
            raise InvalidRequest(
                "no allowed model meets the requirements: " + "; ".join(ruled_out),
                param="options.requirements",
                code="no_model_meets_requirements",
            )
        return min(
            candidates,
            key=lambda m: (
                self.models[m].pricing.output_per_mtok,
                self.models[m].pricing.input_per_mtok,
                m,
            ),
        )

    # -- OpenRouter's live list -----------------------------------------------------------------
    async def refresh(self, providers: Mapping[str, Provider]) -> None:
        """Read OpenRouter's model list from every configured OpenRouter provider a target uses
        (each read bounded by ``health.timeout_seconds``, as the start-up probes are)."""
        wanted = {t.provider for m in self.config.models for t in m.targets}
        for name in sorted(wanted):
            provider = providers.get(name)
            if provider is None or provider.config.type != "openrouter" or not provider.config.configured:
                continue
            try:
                entries = await _fetch(provider, self.config.health.timeout_seconds)
            except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, OSError) as exc:
                log.warning("capabilities_refresh_failed", provider=name, error=type(exc).__name__)
                continue
            for model_id, known in entries.items():
                self.live[(name, model_id)] = known
            log.info("capabilities_refreshed", provider=name, models=len(entries))
        self._rebuild()

    async def run(self, providers: Mapping[str, Provider]) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh(providers)
            except Exception:  # the last good figures stay; the next hour tries again
                log.exception("capabilities_refresh_crashed")


async def _fetch(provider: Provider, seconds: float) -> dict[str, Known]:
    async with asyncio.timeout(seconds):
        resp = await provider.get("/models")
        try:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = await read_body(resp, MAX_LIST_BYTES)
        finally:
            resp.release()
    if len(body) > MAX_LIST_BYTES:
        raise ValueError("model list too large")
    data = orjson.loads(body)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("no data list")
    found: dict[str, Known] = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            # One odd entry is skipped; it never costs the others (or the start-up).
            with contextlib.suppress(Exception):
                found[entry["id"]] = _openrouter_entry(entry)
    return found


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _openrouter_entry(entry: dict[str, Any]) -> Known:
    """OpenRouter prices are USD per token, as strings; the gateway's are USD per million tokens."""
    pricing = _dict(entry.get("pricing"))
    top = _dict(entry.get("top_provider"))
    modalities = _dict(entry.get("architecture")).get("input_modalities")
    modalities = modalities if isinstance(modalities, list) else []

    def per_mtok(key: str) -> float | None:
        """Negative ("-1": a router's variable price) or non-finite prices are unknown, never a credit."""
        value = float(pricing[key]) if pricing.get(key) not in (None, "") else None
        if value is None or not 0 <= value < math.inf:
            return None
        return round(value * 1_000_000, 6)

    prompt, completion = per_mtok("prompt"), per_mtok("completion")
    window = entry.get("context_length")
    out = top.get("max_completion_tokens")
    return Known(
        context_window=int(window) if isinstance(window, int) and window > 0 else None,
        max_output_tokens=int(out) if isinstance(out, int) and out > 0 else None,
        pricing=Pricing(prompt, completion, per_mtok("input_cache_read"), per_mtok("image"))
        if prompt is not None and completion is not None
        else None,
        multimodal="image" in modalities if modalities else None,
    )


def _meets(caps: Capabilities, name: str, value: Any) -> bool:
    if name == "minContextWindow":
        return caps.context_window is not None and caps.context_window >= value
    if name == "multimodal":
        return caps.multimodal or not value
    if name == "strengths":
        have = {s.lower() for s in caps.strengths}
        return all(s.lower() in have for s in value)
    if name == "useCases":
        have = {s.lower() for s in caps.use_cases}
        return all(s.lower() in have for s in value)
    if name == "maxInputPrice":
        return bool(caps.pricing.input_per_mtok <= value)
    if name == "maxOutputPrice":
        return bool(caps.pricing.output_per_mtok <= value)
    return True


def _why(name: str, value: Any, left: list[Capabilities]) -> str:
    if name == "minContextWindow":
        largest = max((c.context_window or 0 for c in left), default=0)
        return f"minContextWindow={value} (the largest window left is {largest})"
    if name == "maxInputPrice":
        best = min(c.pricing.input_per_mtok for c in left)
        return f"maxInputPrice={value} (the lowest input price left is {best})"
    if name == "maxOutputPrice":
        best = min(c.pricing.output_per_mtok for c in left)
        return f"maxOutputPrice={value} (the lowest output price left is {best})"
    if name == "multimodal":
        return "multimodal=true (no multimodal model left)"
    return f"{name}={list(value)} (no model left has all of them)"
