"""The state store interface: limits, spend, usage and the runtime directory of teams and keys.

Two backends share these semantics: ``MemoryStore`` (one instance) and ``RedisStore`` (any number
of instances). Limit checks are declarative (``Check``) so a backend can take them all in one atomic
step — one Lua script on Redis — and settle a finished request in one more (``Op``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway.config import Budgets, Limits

_SETTLE_PREFIX = os.urandom(4).hex()
_settle_ids = itertools.count(1)


def new_settle_id() -> str:
    """A settlement's unique id, ending in the minute it was made: a replay of a settlement whose
    reply was lost carries the same one, so the store books it at most once."""
    return f"{_SETTLE_PREFIX}{next(_settle_ids):x}.{int(time.time()) // 60}"


class StoreError(Exception):
    """Something went wrong with the state store (one of the two below)."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached; callers apply their fail-open/closed policy."""


class StoreScriptError(StoreError):
    """The store answered with an error for this call (a bad argument, a script bug): retrying
    the same call cannot help, so settlement logs and drops it instead of queueing it for replay.
    Not a kind of ``StoreUnavailable``: a refused admission script is the gateway's bug, answered
    500, never the fail-open path that would admit requests without their limits."""


@dataclass(slots=True)
class Check:
    """One limit to check and take at admission.

    kind "bucket": token bucket of ``limit`` tokens refilled at ``rate`` per second; takes ``cost``.
    kind "parallel": at most ``limit`` concurrent members; adds ``member`` (forgotten after ``stale_ms``).
    kind "budget": denied once the counter at ``key`` has reached ``limit``; ``ends_ms`` is when the
    window ends (Unix time in ms): a refusal's Retry-After is the time left until then. A fixed
    instant, not a duration, so a plan's budget checks are built once per window, not per request.
    """

    kind: str
    key: str
    limit: float
    label: str  # rpm | tpm | parallel | budget — also the metric label
    rate: float = 0.0
    cost: float = 0.0
    member: str = ""
    stale_ms: int = 0
    ends_ms: int = 0


@dataclass(slots=True)
class Decision:
    failed: Check | None
    retry_after: float  # seconds; < 0 means "never, as asked" (e.g. more tokens than the limit)
    remaining: list[tuple[float, float]]  # per check: (remaining, seconds until full)


@dataclass(slots=True)
class Op:
    """One settlement step, by kind:

    "bucket" (capacity, rate, delta): take (delta > 0) or refund tokens, capped at capacity.
    "release" (member,): free a parallel slot.
    "incr" (amount, ttl_s): add to a budget counter.
    "usage" (model, prompt_tokens, completion_tokens, cost_usd, ttl_s): book one request in the
    per-day usage report (a hash with ``model|requests``, ``model|prompt_tokens``, ... fields).
    """

    kind: str
    key: str
    values: tuple[float | str, ...]


@dataclass(slots=True)
class KeyRecord:
    id: str
    team: str
    key_hash: str = field(repr=False)
    prefix: str
    name: str | None = None
    created_at: str = ""
    expires_at: str | None = None  # ISO-8601, UTC
    models: tuple[str, ...] | None = None
    disabled: bool = False
    limits: Limits = field(default_factory=Limits)
    budgets: Budgets = field(default_factory=Budgets)

    def public(self) -> dict[str, Any]:
        """What the admin API shows: never the key or its hash."""
        return {
            "id": self.id,
            "team": self.team,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "models": list(self.models) if self.models is not None else None,
            "disabled": self.disabled,
            "limits": _dict(self.limits),
            "budgets": _dict(self.budgets),
        }


def _dict(obj: Limits | Budgets) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__ if getattr(obj, k) is not None}


class LimitStore(Protocol):
    """Limits and books: what the limiter needs (``gateway.limits``)."""

    async def admit(self, checks: Sequence[Check]) -> Decision: ...
    async def settle(self, ops: Sequence[Op], settle_id: str | None = None) -> None: ...
    def settle_soon(
        self, ops: Sequence[Op], failed: Callable[[Sequence[Op]], None], settle_id: str | None = None
    ) -> bool:
        """Settle without waiting for the answer: the ops are on their way (ahead of any later
        admission of this instance) when this returns True; ``failed(ops)`` is called if the store
        then turns out unreachable. False: not connected right now, use ``settle``."""

    async def settled(self) -> None:
        """Wait until the answers of every ``settle_soon`` so far are in."""


class UsageReads(Protocol):
    """What the usage report and the admin API read back."""

    async def counter(self, key: str) -> float: ...
    async def usage_many(self, keys: Sequence[str]) -> list[dict[str, float]]:
        """The usage hashes at ``keys`` (``{}`` for a missing one), in order, read in one round trip:
        a report's days, which share their team's hash tag (one node on Redis Cluster)."""


class Directory(Protocol):
    """The runtime directory: teams and keys created through the admin API."""

    async def get_key(self, key_hash: str) -> KeyRecord | None: ...
    async def get_key_by_id(self, key_id: str) -> KeyRecord | None: ...
    async def put_key(self, record: KeyRecord) -> None: ...
    async def delete_key(self, record: KeyRecord) -> None: ...
    async def list_keys(self, team: str | None) -> list[KeyRecord]: ...
    async def get_team(self, team_id: str) -> dict[str, Any] | None: ...
    async def put_team(self, team_id: str, data: dict[str, Any]) -> None: ...
    async def delete_team(self, team_id: str) -> None: ...
    async def list_teams(self) -> list[dict[str, Any]]: ...


class Store(LimitStore, UsageReads, Directory, Protocol):
    """A whole backend (``MemoryStore``, ``RedisStore``); each part of the gateway takes the narrow
    protocol it needs."""

    async def ping(self) -> float: ...
    async def close(self) -> None: ...


def key_to_json(record: KeyRecord) -> bytes:
    data = record.public()
    data["key_hash"] = record.key_hash
    return orjson.dumps(data)


def key_from_json(raw: bytes | str) -> KeyRecord:
    d = orjson.loads(raw)
    return KeyRecord(
        id=d["id"],
        team=d["team"],
        key_hash=d["key_hash"],
        prefix=d["prefix"],
        name=d.get("name"),
        created_at=d.get("created_at", ""),
        expires_at=d.get("expires_at"),
        models=tuple(d["models"]) if d.get("models") is not None else None,
        disabled=bool(d.get("disabled")),
        limits=Limits(**(d.get("limits") or {})),
        budgets=Budgets(**(d.get("budgets") or {})),
    )
