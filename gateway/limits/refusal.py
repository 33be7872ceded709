"""A store's decision as the client sees it: OpenAI's ``x-ratelimit-*`` headers, and the 429s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gateway.errors import GatewayError, QuotaExceeded, RateLimited, UpstreamLimited
from gateway.state.base import Check, Decision

_WHAT = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}


def headers(into: dict[str, str], checks: Sequence[Check], decision: Decision) -> None:
    """OpenAI's x-ratelimit-* headers from the most restrictive request and token limits (a 429
    describes the limit that refused it)."""
    rpm: tuple[Check, float, float] | None = None
    tpm: tuple[Check, float, float] | None = None
    failed = decision.failed
    for check, (remaining, reset) in zip(checks, decision.remaining, strict=False):
        label = check.label
        if label == "rpm":
            if rpm is None or (remaining < rpm[1] and rpm[0] is not failed) or check is failed:
                rpm = (check, remaining, reset)
        elif label == "tpm" and (
            tpm is None or (remaining < tpm[1] and tpm[0] is not failed) or check is failed
        ):
            tpm = (check, remaining, reset)
    if rpm is not None:
        into["x-ratelimit-limit-requests"] = str(int(rpm[0].limit))
        into["x-ratelimit-remaining-requests"] = str(int(rpm[1])) if rpm[1] > 0 else "0"
        into["x-ratelimit-reset-requests"] = duration(rpm[2])
    if tpm is not None:
        into["x-ratelimit-limit-tokens"] = str(int(tpm[0].limit))
        into["x-ratelimit-remaining-tokens"] = str(int(tpm[1])) if tpm[1] > 0 else "0"
        into["x-ratelimit-reset-tokens"] = duration(tpm[2])


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s".replace(".0s", "s")
    minutes, secs = divmod(round(seconds), 60)  # rounded first: 119.97 s is 2m0s, not 1m60s
    return f"{minutes}m{secs}s"


def team_refusal(failed: Check, decision: Decision, response_headers: Mapping[str, str]) -> GatewayError:
    """The 429 for a refused admission of the caller's own limits or budgets."""
    headers = dict(response_headers)
    if failed.kind == "budget":
        return QuotaExceeded(
            "budget exhausted for this period; it resets at the start of the next UTC day/month",
            retry_after=decision.retry_after,
            headers=headers,
        )
    if decision.retry_after < 0:
        return RateLimited(
            f"this request needs {int(failed.cost)} tokens, more than the limit of "
            f"{int(failed.limit)} per minute; lower max_tokens or the prompt size",
            retry_after=60,
            headers=headers,
        )
    return RateLimited(
        f"rate limit reached: {_WHAT.get(failed.label, failed.label)} ({int(failed.limit)})",
        retry_after=decision.retry_after,
        headers=headers,
    )


def upstream_refusal(limited: UpstreamLimited, model: str) -> RateLimited:
    """The 429 when every target of ``model`` was at its gateway-wide limit."""
    if limited.never:
        return RateLimited(
            f"this request needs more tokens than the gateway-wide limit of {int(limited.limit)} per "
            f"minute on the upstreams of model {model!r}; lower max_tokens or the prompt size",
            retry_after=60,
        )
    return RateLimited(
        f"every upstream of model {model!r} is at its gateway-wide limit "
        f"({_WHAT.get(limited.label, limited.label)}: {int(limited.limit)}); try again shortly",
        retry_after=limited.retry_after,
    )
