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
    MAX_RETRIES = 3  # redirections and TRYAGAIN pauses per call
    REFRESH_INTERVAL = 0.2  # at most this often while the map is out of date and reading it fails

    def __init__(self, url: str, *, timeout: float) -> None:
        self.seed = RespPipe(url, timeout=timeout)
        self.nodes: dict[str, RespPipe] = {}  # "host:port" -> its pipe
        self.slots: list[RespPipe | None] = [None] * SLOTS
        self._stale = True
        self._refreshing: asyncio.Task[None] | None = None
        self._next_refresh = 0.0
        self._deferred: asyncio.TimerHandle | None = None
        self._last_good: RespPipe | None = None  # the node that answered CLUSTER SLOTS last

    def _node(self, address: str) -> RespPipe:
        pipe = self.nodes.get(address)
        if pipe is None:
            host, _, port = address.rpartition(":")
            pipe = self.nodes[address] = self.seed.at(host, int(port))
        return pipe

    async def call(self, *args: Any, key: str | None = None) -> Any:
        """Send one command to the master of ``key``'s slot; its reply. Redirections and TRYAGAIN
        are followed up to ``MAX_RETRIES`` times; a reply still redirecting after that is returned."""
        if key is None:
            raise ValueError("a command on Redis Cluster needs the key that picks its node")
        slot = key_slot(key)
        pipe = self.slots[slot]
        if pipe is None:
            await self.refresh()  # nothing known about this slot yet: wait for the map
            pipe = self.slots[slot]
            if pipe is None:
                raise StoreUnavailable(f"no Redis Cluster master serves slot {slot}")
        elif self._stale:
            self.refresh_soon()  # meanwhile the map at hand serves: healthy masters never wait
        asking: RespPipe | None = None
        retries = 0
        while True:
            try:
                reply = await (self._ask(asking, args) if asking is not None else pipe.call(*args))
            except StoreUnavailable:
                self._stale = True  # a failover may have promoted another master: read the map again
                self.refresh_soon()
                raise
            asking = None
            redirect = _redirect(reply)
            if redirect is None and not (isinstance(reply, ReplyError) and str(reply).startswith("TRYAGAIN")):
                return reply
            if retries == self.MAX_RETRIES:
                return reply
            retries += 1
            if redirect is None:
                # TRYAGAIN: the keys of a slot being migrated are split between two masters for now.
                await asyncio.sleep(0.01 * 3**retries)
                continue
            kind, moved_slot, address = redirect
            target = self._node(address)
            if kind == "MOVED":  # moved for good; others have likely moved with it: re-read the map
                self.slots[moved_slot] = pipe = target
                self._stale = True
                self.refresh_soon()
            else:
                asking = target  # mid-migration: this one command goes to the importing node

    async def _ask(self, target: RespPipe, args: tuple[Any, ...]) -> Any:
        # ASKING must reach the importing node right before the command, so both are queued in one
        # go: nothing of another request can come in between on the shared connection.
        if not target.ready:
            await target.call("PING")  # connects first
        asking, future = target.send_now("ASKING"), target.send_now(*args)
        if asking is None or future is None:
            raise StoreUnavailable("lost the connection to the importing node")
        await asyncio.gather(asking, return_exceptions=True)
        return await future

    def send_now(self, *args: Any, key: str | None = None) -> asyncio.Future[Any] | None:
        """Queue without waiting, like ``RespPipe.send_now``; None when the slot's node is not known
        or not connected (the caller falls back to ``call``). A redirection comes back as the reply."""
        if key is None:
            return None
        pipe = self.slots[key_slot(key)]
        return pipe.send_now(*args) if pipe is not None else None

    async def broadcast(self, *args: Any) -> None:
        """Send a command to every known node (``SCRIPT LOAD``: a script must be on whichever node
        runs it, including one importing a slot). Nodes that fail are skipped."""
        if not self.nodes:
            await self.refresh()
        await asyncio.gather(
            *(pipe.call(*args) for pipe in list(self.nodes.values())), return_exceptions=True
        )

    def refresh_soon(self) -> None:
        """Start reading the map in the background (or, right after the last read, as soon as the
        interval allows: a map out of date is always read again)."""
        if self._refreshing is not None or self._deferred is not None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_refresh:
            self._deferred = loop.call_at(self._next_refresh, self._deferred_refresh)
            return
        self._next_refresh = loop.time() + self.REFRESH_INTERVAL
        task = self._refreshing = loop.create_task(self._refresh())
        task.add_done_callback(self._refreshed)

    def _deferred_refresh(self) -> None:
        self._deferred = None
        if self._stale:
            self.refresh_soon()

    async def refresh(self) -> None:
        """Read the slot map and wait for it (one refresh at a time)."""
        self.refresh_soon()
        if self._refreshing is None:  # read moments ago and failed: fail fast until the next try
            raise StoreUnavailable("the Redis Cluster slot map cannot be read right now")
        await asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved here when nobody waits for it (a background refresh)

    async def _refresh(self) -> None:
        """Ask the node that answered last, then the others, then the seed; the first usable map
        wins. None usable: the map at hand stays (its slots keep being served)."""
        candidates = [p for p in (self._last_good, *self.nodes.values()) if p is not None] + [self.seed]
        for pipe in dict.fromkeys(candidates):
            try:
                reply = await pipe.call("CLUSTER", "SLOTS")
            except StoreUnavailable:
                continue
            if isinstance(reply, ReplyError) or not reply:
                continue  # restarting, not (yet) part of the cluster, or knows no slots
            slots: list[RespPipe | None] = [None] * SLOTS
            listed = set()
            for start, end, master, *_ in reply:
                host = master[0].decode() if master[0] not in (b"", b"?") else pipe.host
                address = f"{host}:{master[1]}"
                listed.add(address)
                slots[start : end + 1] = [self._node(address)] * (end + 1 - start)
            for address in [a for a in self.nodes if a not in listed]:
                self.nodes.pop(address).close()  # no longer a master (or gone)
            self.slots, self._stale = slots, False
            self._last_good = pipe if pipe is self.seed or pipe in self.nodes.values() else None
            return
        raise StoreUnavailable("no Redis Cluster node answers CLUSTER SLOTS")

    def reset(self, reason: str) -> None:
        """A node answered as a replica (READONLY after a failover): the map is out of date."""
        self._stale = True
        self.refresh_soon()

    def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
        for pipe in self.nodes.values():
            pipe.close()
        self.seed.close()
