"""Whether a request fits a context window, its cost after it, and the calendar windows budgets use (UTC).

What a request reserves against token limits is ``gateway.limits.tokens``."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from gateway.config import Pricing
from gateway.context import Usage


def requested_output(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def fits_window(body: dict[str, Any], window: int) -> bool:
    """Whether a chat request can fit a context window: its prompt estimate plus the requested output.

    The estimate is a floor, never above the truth, so a request that fits is never refused: it counts
    whitespace-separated words of the messages' text, and every tokenizer the gateway fronts (byte-level
    BPE with a word-splitting pre-tokenizer: GPT, DeepSeek, Llama, Claude) spends at least one token per
    word. English prose runs ~1.3 tokens a word, code and other scripts more, so the floor is ~25 % low
    or lower; a request in that gap goes upstream and the upstream's own context-length error triggers
    the same fallback. A word needs at least two characters with its separator, so the words are
    counted only when half the text's length could matter.
    """
    output = requested_output(body)
    texts = _texts(body.get("messages"))
    if sum((len(t) + 1) // 2 for t in texts) + output <= window:
        return True
    return sum(len(t.split()) for t in texts) + output <= window


def _texts(messages: Any) -> list[str]:
    texts: list[str] = []
    if not isinstance(messages, list):
        return texts
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return texts


def cost_usd(pricing: Pricing | None, usage: Usage) -> float:
    """The upstream's own figure when it reports one (OpenRouter ``usage.cost``), else the price table
    (a model with no price known anywhere costs nothing)."""
    if usage.cost_usd is not None:
        return usage.cost_usd
    if pricing is None:
        return 0.0
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_price = (
        pricing.input_per_mtok if pricing.cached_input_per_mtok is None else pricing.cached_input_per_mtok
    )
    return (
        (usage.prompt_tokens - cached) * pricing.input_per_mtok
        + cached * cached_price
        + usage.completion_tokens * pricing.output_per_mtok
    ) / 1_000_000


_current: tuple[float, str, str, float, float] = (0.0, "", "", 0.0, 0.0)


def windows(now: dt.datetime | None = None) -> tuple[str, str, float, float]:
    """(day id, month id, seconds to the day's end, seconds to the month's end), in UTC.

    On the hot path (no ``now``) the calendar is worked out once per UTC day, not per request."""
    global _current
    if now is None:
        t = time.time()
        if t >= _current[0]:
            day, month, day_left, month_left = _windows(dt.datetime.fromtimestamp(t, dt.UTC))
            _current = (t + day_left, day, month, t + day_left, t + month_left)
        _, day, month, day_end, month_end = _current
        return day, month, day_end - t, month_end - t
    return _windows(now)


def window_ends_ms() -> tuple[int, int]:
    """When the current UTC day and month end, in Unix time (ms)."""
    windows()  # brings the cached calendar up to date
    return round(_current[3] * 1000), round(_current[4] * 1000)


def _windows(now: dt.datetime) -> tuple[str, str, float, float]:
    day_end = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    month_end = dt.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=dt.UTC)
    return (
        now.strftime("%Y%m%d"),
        now.strftime("%Y%m"),
        (day_end - now).total_seconds(),
        (month_end - now).total_seconds(),
    )
