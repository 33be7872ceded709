"""What a request reserves against token limits before its usage is known, and the reconciliation
afterwards: the difference is taken or refunded whatever the outcome, so reservations never leak."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.context import RequestContext
from gateway.state.base import Check, Op


def estimate_prompt_tokens(body_bytes: int) -> int:
    # ~4 bytes per token of JSON body: an over-estimate (keys, quoting), which is the safe side
    # for a reservation that is reconciled with the real usage afterwards.
    return max(1, body_bytes // 4)


def reserve_tokens(ctx: RequestContext, tpm: int, default_max_tokens: int) -> int:
    """Tokens a request reserves against a tokens-per-minute limit until its real usage is known:
    the prompt estimate plus ``max_tokens`` — or, when absent, the default capped at half of what the
    tightest ``tpm`` leaves after the prompt (a client that asked for nothing must not be refused as
    too large, nor have each request hold the whole bucket)."""
    body = ctx.body
    prompt = estimate_prompt_tokens(ctx.body_size)
    completion = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(completion, int) or isinstance(completion, bool):
        default = 0 if ctx.endpoint == "embeddings" else default_max_tokens
        completion = max(0, min(default, (tpm - prompt) // 2))
    return prompt + completion


def reconcile(checks: Sequence[Check], used_tokens: int, into: list[Op]) -> None:
    """The steps that settle taken ``checks``: tokens against ``used_tokens``, parallel slots freed."""
    for check in checks:
        if check.label == "tpm":
            delta = used_tokens - check.cost
            if delta:
                into.append(Op("bucket", check.key, (check.limit, check.rate, delta)))
        elif check.kind == "parallel":
            into.append(Op("release", check.key, (check.member,)))


def give_back(checks: list[Check], scope: str, into: list[Op]) -> None:
    """Nothing was served under ``scope`` (a key prefix): its taken checks are refunded whole (requests
    and tokens alike), its slots freed, and they are removed from ``checks``."""
    kept = []
    for check in checks:
        if check.kind == "parallel" and check.key.startswith(scope):
            into.append(Op("release", check.key, (check.member,)))
        elif check.kind == "bucket" and check.key.startswith(scope):
            into.append(Op("bucket", check.key, (check.limit, check.rate, -check.cost)))
        else:
            kept.append(check)
    checks[:] = kept
