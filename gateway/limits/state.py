"""What one request holds of the limits, from declaration to settlement (``RequestContext.limits``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.state.base import Check, Op


@dataclass(slots=True)
class Held:
    """The gateway-wide upstream limits one attempt took, to reconcile or give back."""

    checks: list[Check]
    local: bool  # taken by the local fallback limiter (the store was unreachable)


@dataclass(slots=True)
class LimitState:
    checks: list[Check] = field(default_factory=list)  # declared by plugins, taken in one store call
    admitted: list[Check] = field(default_factory=list)  # taken: reconciled when the request ends
    ops: list[Op] = field(default_factory=list)  # settlement steps (budgets, usage, give-backs)
    reserved_tokens: int = 0  # the request's tpm reservation (the same for every scope)
    local: bool = False  # taken by the local fallback limiter (the store was unreachable)
    upstream: Held | None = None  # the serving attempt's upstream limits
