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
        self.timeout = timeout
        self.nodes: dict[str, RespPipe] = {}  # "host:port" -> its pipe
        self.slots: list[RespPipe | None] = [None] * SLOTS
        self._stale = True
        self._changes = 0  # counts what made the map stale: a read started before a change keeps it stale
        self._refreshing: asyncio.Task[None] | None = None
        self._next_refresh = 0.0
        self._deferred: asyncio.TimerHandle | None = None
        self._last_good: RespPipe | None = None  # the node that answered CLUSTER SLOTS last
        self._retired: set[RespPipe] = set()  # masters no longer listed, closed after a grace time
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    def _node(self, address: str) -> RespPipe:
        pipe = self.nodes.get(address)
        if pipe is None:
            host, _, port = address.rpartition(":")
            pipe = self.nodes[address] = self.seed.at(host, int(port))
        return pipe

    def _outdated(self) -> None:
        self._stale = True
        self._changes += 1
        self.refresh_soon()

    async def call(self, *args: Any, key: str | None = None) -> Any:
        """Send one command to the master of ``key``'s slot; its reply. Redirections and TRYAGAIN
        are followed up to ``MAX_RETRIES`` times within ``timeout``; a reply still redirecting after
        that is returned as it is."""
        if key is None:
            raise ValueError("a command on Redis Cluster needs the key that picks its node")
        if self._closed:
            raise StoreUnavailable("closed")
        slot = key_slot(key)
        pipe = self.slots[slot]
        if pipe is None:
            await self.refresh()  # nothing known about this slot yet: wait for the map
            pipe = self.slots[slot]
            if pipe is None:
                raise StoreUnavailable(f"no Redis Cluster master serves slot {slot}")
        elif self._stale:
            self.refresh_soon()  # meanwhile the map at hand serves: healthy masters never wait
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        asking: RespPipe | None = None
        retries = 0
        while True:
            try:
                reply = await (self._ask(asking, args) if asking is not None else pipe.call(*args))
            except StoreUnavailable:
                if not self._closed:
                    self._outdated()  # a failover may have promoted another master
                raise
            asking = None
            redirect = _redirect(reply)
            if redirect is None and not (isinstance(reply, ReplyError) and str(reply).startswith("TRYAGAIN")):
                return reply
            if retries == self.MAX_RETRIES or loop.time() >= deadline:
                return reply
            retries += 1
            if redirect is None:
                # TRYAGAIN: the keys of a slot being migrated are split between two masters for now.
                await asyncio.sleep(min(0.01 * 3**retries, max(0.0, deadline - loop.time())))
                continue
            kind, moved_slot, address = redirect
            target = self._node(address)
            if kind == "MOVED":  # moved for good; others have likely moved with it: re-read the map
                self.slots[moved_slot] = pipe = target
                self._outdated()
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
        runs it, including one importing a slot), waiting at most ``timeout``: a node that is slow
        or down does not hold the caller (its call finishes, or fails, in the background)."""
        if not self.nodes:
            await self.refresh()
        tasks = [asyncio.ensure_future(pipe.call(*args)) for pipe in list(self.nodes.values())]
        for task in tasks:
            self._background.add(task)
            task.add_done_callback(self._finished)
        await asyncio.wait(tasks, timeout=self.timeout)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a node that failed is the map refresh's business

    def refresh_soon(self) -> None:
        """Start reading the map in the background (or, right after the last read, as soon as the
        interval allows: a map out of date is always read again)."""
        if self._closed or self._refreshing is not None or self._deferred is not None:
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
        try:
            await asyncio.shield(self._refreshing)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise StoreUnavailable("closed") from None  # the refresh stopped with the store
            raise

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved here when nobody waits for it (a background refresh)

    async def _refresh(self) -> None:
        """Ask the node that answered last, then the others, then the seed; the first usable map
        wins. None usable: the map at hand stays (its slots keep being served)."""
        changes = self._changes
        candidates = [p for p in (self._last_good, *self.nodes.values()) if p is not None] + [self.seed]
        for pipe in dict.fromkeys(candidates):
            try:
                reply = await pipe.call("CLUSTER", "SLOTS")
            except StoreUnavailable:
                if pipe is self._last_good:
                    self._last_good = None  # down or hung: not asked first next time
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
                self._retire(self.nodes.pop(address))
            self.slots = slots
            self._stale = self._changes != changes  # something changed while this map was read
            self._last_good = pipe if pipe is self.seed or pipe in self.nodes.values() else None
            return
        raise StoreUnavailable("no Redis Cluster node answers CLUSTER SLOTS")

    def _retire(self, pipe: RespPipe) -> None:
        """A master no longer listed: calls already waiting on it get their replies (or MOVED);
        its connection closes after a grace time, not under them."""
        self._retired.add(pipe)

        def close() -> None:
            self._retired.discard(pipe)
            pipe.close()

        asyncio.get_running_loop().call_later(2 * self.timeout + 1, close)

    def reset(self, reason: str) -> None:
        """A node answered as a replica (READONLY after a failover): the map is out of date."""
        self._outdated()

    def close(self) -> None:
        self._closed = True
        if self._deferred is not None:
            self._deferred.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        for pipe in (*self.nodes.values(), *self._retired, self.seed):
            pipe.close()
