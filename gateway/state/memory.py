"""In-memory state for a single gateway instance: the same semantics as the Redis store.

Also serves as the per-instance fallback limiter while Redis is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.state.base import Check, Decision, KeyRecord, Op


class MemoryStore:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._parallel: dict[str, dict[str, float]] = {}  # key -> member -> started
        self._counters: dict[str, tuple[float, float]] = {}  # key -> (value, expires)
        self._hashes: dict[str, dict[str, float]] = {}
        self._keys: dict[str, KeyRecord] = {}  # by hash
        self._teams: dict[str, dict[str, Any]] = {}

    def _bucket(self, check_key: str, limit: float, rate: float, now: float) -> float:
        tokens, at = self._buckets.get(check_key, (limit, now))
        return min(limit, tokens + max(0.0, now - at) * rate)

    async def admit(self, checks: Sequence[Check]) -> Decision:
        now = time.monotonic()
        wall = time.time()
        failed: Check | None = None
        retry = 0.0
        remaining: list[tuple[float, float]] = []
        levels: list[float] = []
        for c in checks:
            if c.kind == "bucket":
                tokens = self._bucket(c.key, c.limit, c.rate, now)
                levels.append(tokens)
                if tokens < c.cost and failed is None:
                    failed = c
                    retry = -1.0 if c.cost > c.limit else (c.cost - tokens) / c.rate
                left = tokens - c.cost if tokens >= c.cost else tokens
                remaining.append((float(int(left)), (c.limit - left) / c.rate))
            elif c.kind == "parallel":
                members = self._parallel.setdefault(c.key, {})
                for m, started in list(members.items()):
                    if wall - started > c.stale_ms / 1000:
                        del members[m]
                levels.append(0.0)
                if len(members) >= c.limit and failed is None:
                    failed, retry = c, 1.0
                remaining.append((max(0.0, c.limit - len(members) - 1), 0.0))
            else:
                used = self._counter(c.key, wall)
                levels.append(used)
                if used >= c.limit and failed is None:
                    failed, retry = c, max(0.0, c.ends_ms / 1000 - wall)
                remaining.append((max(0.0, c.limit - used), 0.0))
        if failed is None:
            for c, level in zip(checks, levels, strict=True):
                if c.kind == "bucket":
                    self._buckets[c.key] = (level - c.cost, now)
                elif c.kind == "parallel":
                    self._parallel[c.key][c.member] = wall
        return Decision(failed, retry, remaining)

    def _counter(self, key: str, wall: float) -> float:
        value, expires = self._counters.get(key, (0.0, 0.0))
        return value if wall < expires else 0.0

    async def settle(self, ops: Sequence[Op], settle_id: str | None = None) -> None:
        self.settle_now(ops)  # in-process: a settlement always runs once, no id needed

    def settle_soon(
        self, ops: Sequence[Op], failed: Callable[[Sequence[Op]], None], settle_id: str | None = None
    ) -> bool:
        self.settle_now(ops)
        return True

    async def settled(self) -> None:
        return None

    def settle_now(self, ops: Sequence[Op]) -> None:
        now, wall = time.monotonic(), time.time()
        for op in ops:
            v = op.values
            if op.kind == "bucket":
                limit, rate = float(v[0]), float(v[1])
                tokens = self._bucket(op.key, limit, rate, now)
                self._buckets[op.key] = (min(limit, tokens - float(v[2])), now)
            elif op.kind == "release":
                self._parallel.get(op.key, {}).pop(str(v[0]), None)
            elif op.kind == "incr":
                self._counters[op.key] = (self._counter(op.key, wall) + float(v[0]), wall + float(v[1]))
            else:
                fields = self._hashes.setdefault(op.key, {})
                model = str(v[0])
                for name, amount in (
                    ("requests", 1),
                    ("prompt_tokens", v[1]),
                    ("completion_tokens", v[2]),
                    ("cost_usd", v[3]),
                ):
                    if float(amount):
                        field = f"{model}|{name}"
                        fields[field] = fields.get(field, 0.0) + float(amount)

    async def counter(self, key: str) -> float:
        return self._counter(key, time.time())

    async def usage_many(self, keys: Sequence[str]) -> list[dict[str, float]]:
        return [dict(self._hashes.get(key, {})) for key in keys]

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        return self._keys.get(key_hash)

    async def get_key_by_id(self, key_id: str) -> KeyRecord | None:
        return next((r for r in self._keys.values() if r.id == key_id), None)

    async def put_key(self, record: KeyRecord) -> None:
        self._keys[record.key_hash] = record

    async def delete_key(self, record: KeyRecord) -> None:
        self._keys.pop(record.key_hash, None)

    async def list_keys(self, team: str | None) -> list[KeyRecord]:
        return [r for r in self._keys.values() if team is None or r.team == team]

    async def get_team(self, team_id: str) -> dict[str, Any] | None:
        return self._teams.get(team_id)

    async def put_team(self, team_id: str, data: dict[str, Any]) -> None:
        self._teams[team_id] = data

    async def delete_team(self, team_id: str) -> None:
        self._teams.pop(team_id, None)

    async def list_teams(self) -> list[dict[str, Any]]:
        return list(self._teams.values())

    async def ping(self) -> float:
        return 0.0

    async def close(self) -> None:
        return None
