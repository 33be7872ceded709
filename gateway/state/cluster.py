"""The hot path's Redis connection on Redis Cluster: each command goes to the master of its key's slot.

One ``RespPipe`` per master (auto-pipelined, as on a single Redis), picked by the key's hash slot
(CRC16 of its ``{hash tag}``, the same on every client). The slot map comes from ``CLUSTER SLOTS`` on
the first call and again whenever it may be out of date: after a ``MOVED`` reply (a slot moved for
good: the command is sent again to its new master) or a lost node (a failover promotes a replica).
``ASK`` (a slot being migrated) sends ``ASKING`` and the command to the importing node, once.

Every key of one request shares one hash tag (``{team}``, ``{p:provider}``), so each script call has
one slot and runs atomically on one master, as on a single Redis.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from gateway.state.base import StoreUnavailable
from gateway.state.resp import ReplyError, RespPipe

SLOTS = 16384


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


@functools.lru_cache(maxsize=65536)
def key_slot(key: str) -> int:
    """Redis Cluster's hash slot of ``key``: CRC16 (XMODEM) of its hash tag, or of the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key.encode():
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


def _redirect(reply: Any) -> tuple[str, int, str] | None:
    """(MOVED or ASK, slot, "host:port") for a redirection reply, else None."""
    if isinstance(reply, ReplyError):
        text = str(reply)
        if text.startswith(("MOVED ", "ASK ")):
            kind, slot, address = text.split(" ", 2)
            return kind, int(slot), address
    return None


class ClusterPipe:
    def __init__(self, url: str, *, timeout: float) -> None:
        self.seed = RespPipe(url, timeout=timeout)
        self.nodes: dict[str, RespPipe] = {}  # "host:port" -> its pipe
        self.slots: list[RespPipe | None] = [None] * SLOTS
        self._stale = True
        self._refreshing: asyncio.Task[None] | None = None

    def _node(self, address: str) -> RespPipe:
        pipe = self.nodes.get(address)
        if pipe is None:
            host, _, port = address.rpartition(":")
            pipe = self.nodes[address] = self.seed.at(host, int(port))
        return pipe

    async def call(self, *args: Any, key: str | None = None) -> Any:
        """Send one command to the master of ``key``'s slot; its reply (redirections followed once)."""
        if key is None:
            raise ValueError("a command on Redis Cluster needs the key that picks its node")
        slot = key_slot(key)
        pipe = self.slots[slot]
        if pipe is None or self._stale:
            await self.refresh()
            pipe = self.slots[slot]
            if pipe is None:
                raise StoreUnavailable(f"no Redis Cluster master serves slot {slot}")
        try:
            reply = await pipe.call(*args)
        except StoreUnavailable:
            self._stale = True  # a failover may have promoted another master: ask again next time
            raise
        redirect = _redirect(reply)
        if redirect is None:
            return reply
        kind, moved_slot, address = redirect
        target = self._node(address)
        if kind == "MOVED":
            self.slots[moved_slot] = target
            self._stale = True  # others have likely moved with it: the next call refreshes the map
            return await target.call(*args)
        # ASK (the slot is being migrated): ASKING must reach the importing node right before the
        # command, so both are queued in one go — nothing of another request can come in between.
        if not target.ready:
            await target.call("PING")  # connects first
        asking, future = target.send_now("ASKING"), target.send_now(*args)
        if asking is None or future is None:
            raise StoreUnavailable("lost the connection to the importing node")
        await asyncio.gather(asking, return_exceptions=True)
        return await future

    def send_now(self, *args: Any, key: str | None = None) -> asyncio.Future[Any] | None:
        """Queue without waiting, like ``RespPipe.send_now``; None when the map or the node is not
        ready (the caller falls back to ``call``). A redirection comes back as the reply."""
        if key is None or self._stale:
            return None
        pipe = self.slots[key_slot(key)]
        return pipe.send_now(*args) if pipe is not None else None

    async def refresh(self) -> None:
        """Read the slot map (one refresh at a time; callers wait for the one in progress)."""
        if self._refreshing is None:
            task = self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            task.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved here when every waiting caller has left

    async def _refresh(self) -> None:
        last: BaseException | None = None
        for pipe in [self.seed, *self.nodes.values()]:  # the seed may be the node that failed
            try:
                reply = await pipe.call("CLUSTER", "SLOTS")
            except StoreUnavailable as exc:
                last = exc
                continue
            if isinstance(reply, ReplyError):
                raise StoreUnavailable(f"CLUSTER SLOTS refused: {str(reply)[:80]}")
            slots: list[RespPipe | None] = [None] * SLOTS
            for start, end, master, *_ in reply:
                host = master[0].decode() if master[0] not in (b"", b"?") else pipe.host
                node = self._node(f"{host}:{master[1]}")
                slots[start : end + 1] = [node] * (end + 1 - start)
            self.slots = slots
            self._stale = False
            return
        raise StoreUnavailable(f"no Redis Cluster node answers ({type(last).__name__})")

    def reset(self, reason: str) -> None:
        for pipe in self.nodes.values():
            pipe.reset(reason)
        self.seed.reset(reason)
        self._stale = True

    def close(self) -> None:
        for pipe in self.nodes.values():
            pipe.close()
        self.seed.close()
