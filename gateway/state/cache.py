"""Response cache storage: Redis (zlib-compressed values, shared by instances) or an in-memory LRU
bounded in bytes. Keys look like ``{prefix}:cache:{namespace}:{model}:{hash}`` so an admin can drop
all entries, one team's or one model's. Any Redis failure surfaces as ``StoreUnavailable`` and the
cache plugin then simply does without the cache.
"""

from __future__ import annotations

import fnmatch
import time
import zlib
from collections import OrderedDict
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.state.base import StoreUnavailable


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl: int) -> None: ...
    async def lock(self, key: str, ttl_ms: int) -> bool: ...
    async def unlock(self, key: str) -> None: ...
    async def locked(self, key: str) -> bool: ...
    async def clear(self, pattern: str) -> int: ...
    async def take(self, key: str) -> bytes | None:
        """Get and delete in one step: of several concurrent takers, one gets the value."""


def glob_escape(value: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in value)


class MemoryCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._locks: dict[str, float] = {}

    async def get(self, key: str) -> bytes | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.size -= len(value)

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + ttl, value)
        self.size += len(value)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def take(self, key: str) -> bytes | None:
        value = await self.get(key)
        if value is not None:
            self._drop(key)
        return value

    async def lock(self, key: str, ttl_ms: int) -> bool:
        now = time.monotonic()
        if self._locks.get(key, 0.0) > now:
            return False
        self._locks[key] = now + ttl_ms / 1000
        return True

    async def unlock(self, key: str) -> None:
        self._locks.pop(key, None)

    async def locked(self, key: str) -> bool:
        return self._locks.get(key, 0.0) > time.monotonic()

    async def clear(self, pattern: str) -> int:
        doomed = [k for k in self._entries if fnmatch.fnmatchcase(k, pattern)]
        for key in doomed:
            self._drop(key)
        return len(doomed)


class RedisCache:
    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self.client = client

    async def get(self, key: str) -> bytes | None:
        try:
            raw = await self.client.get(key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if not raw:
            return None
        return zlib.decompress(raw.encode() if isinstance(raw, str) else raw)

    async def take(self, key: str) -> bytes | None:
        try:
            raw = await self.client.getdel(key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if not raw:
            return None
        return zlib.decompress(raw.encode() if isinstance(raw, str) else raw)

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        try:
            await self.client.set(key, zlib.compress(value, 1), ex=ttl)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def lock(self, key: str, ttl_ms: int) -> bool:
        try:
            return bool(await self.client.set(key, b"1", nx=True, px=ttl_ms))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def unlock(self, key: str) -> None:
        try:
            await self.client.delete(key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def locked(self, key: str) -> bool:
        try:
            return bool(await self.client.exists(key))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def clear(self, pattern: str) -> int:
        count = 0
        try:
            async for key in self.client.scan_iter(match=pattern, count=500):
                count += await self.client.delete(key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return count
