"""Redis Cluster: a real 3-master cluster of private redis-servers; the gateway with ``redis.cluster``.

Each team's keys share a ``{team}`` hash tag, so its limit scripts run on one master; different teams
live on different masters. Covered: the slot function against Redis' own, exact limits and the usage
books per team through the SDK, runtime keys (directory) and revocation, a slot moved to another
master while the gateway runs (``MOVED``), and a slot caught mid-migration (``ASK``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis as sync_redis

from gateway.limits.limiter import Limiter
from gateway.state.base import Check, Op, StoreUnavailable, new_settle_id
from gateway.state.cluster import ClusterPipe, key_slot
from gateway.state.redis import RedisStore
from tests.conftest import MASTER_KEY, TEAM_B_KEY, TEAM_KEY, RunningGateway, Upstream, tenancy_config

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server / redis-cli are not installed",
)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports whose cluster-bus ports (+10000) are free too, all below Linux's
    ephemeral range (32768+), so no outgoing connection takes one before redis-server binds it."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 22700)
        if {port, port + 10000} & {q for p in ports for q in (p, p + 10000)}:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
    return ports


class Cluster:
    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.ports = _free_ports(masters)
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._start(workdir)
        except BaseException:
            self.stop()
            raise

    def _start(self, workdir: Path) -> None:
        for port in self.ports:
            node_dir = workdir / str(port)
            node_dir.mkdir()
            self.procs.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--cluster-enabled", "yes", "--dir", str(node_dir),
                     "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no",
                     "--logfile", str(node_dir / "redis.log")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in self.ports:
            self._wait(lambda c: c.ping(), port)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for port in self.ports:
            self._wait(lambda c: b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO"), port)

    def _wait(self, ready: Callable[[sync_redis.Redis], Any], port: int) -> None:
        client = self.node(port)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if ready(client):
                        return
                except sync_redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis cluster node {port} not ready")
                time.sleep(0.05)
        finally:
            client.close()

    def node(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, socket_connect_timeout=0.5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def owner(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        with self.node(self.ports[0]) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise LookupError(slot)

    def node_id(self, port: int) -> str:
        with self.node(port) as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def begin_move(self, slot: int, to: int) -> int:
        """Start migrating ``slot`` to the master at port ``to`` and copy its keys; returns the
        source's port. The slot stays MIGRATING/IMPORTING until ``end_move``."""
        source = self.owner(slot)
        with self.node(to) as dst, self.node(source) as src:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to))
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", to, "", 0, 5000, "KEYS", *keys)
        return source

    def end_move(self, slot: int, to: int) -> None:
        target = self.node_id(to)
        for port in self.ports:
            with self.node(port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)

    def kill(self, port: int) -> None:
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def cluster_config(upstream: Upstream, cluster: Cluster, **team_a: Any) -> dict[str, Any]:
    cfg = tenancy_config(upstream.url, **team_a)
    cfg["redis"] |= {"url": cluster.url, "cluster": True}
    return cfg


def test_key_slot_matches_redis(cluster: Cluster) -> None:
    keys = ["team-a", "llmgw:{team-a}:rpm", "{p:openrouter}:settled:1", "a{}b", "{}x", "x{y", "ümlaut{é}", ""]
    with cluster.node(cluster.ports[0]) as client:
        for key in keys:
            assert key_slot(key) == client.execute_command("CLUSTER", "KEYSLOT", key), key


def test_the_two_teams_live_on_different_masters(cluster: Cluster) -> None:
    # What the other tests rely on: one gateway request touches one master, another team another one.
    assert cluster.owner(key_slot("{team-a}")) != cluster.owner(key_slot("{team-b}"))


async def _chat(client: openai.AsyncOpenAI) -> Any:
    return await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )


async def test_limits_usage_and_runtime_keys_on_a_cluster(
    upstream: Upstream, cluster: Cluster, make_gateway: Callable[..., Awaitable[RunningGateway]]
) -> None:
    gw = await make_gateway(cluster_config(upstream, cluster, limits={"rpm": 5}))
    team_a, team_b = gw.client(api_key=TEAM_KEY), gw.client(api_key=TEAM_B_KEY)

    # Exact rpm under concurrency: 12 at once, exactly 5 admitted; team B (another master) unaffected.
    results = await asyncio.gather(*(_chat(team_a) for _ in range(12)), return_exceptions=True)
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 5
    assert all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException))
    for _ in range(3):
        assert (await _chat(team_b)).http_response.status_code == 200

    # The usage books, per team, from the masters their tags live on.
    await gw.gateway.pipeline.drain()
    status, usage = await gw.http("GET", "/api/v1/usage", TEAM_B_KEY)
    assert status == 200 and usage["total"]["requests"] == 3
    status, usage = await gw.http("GET", "/api/v1/usage", TEAM_KEY)
    assert status == 200 and usage["total"]["requests"] == 5
    # A year's report: its days in one script call on the team's master (the script is loaded there).
    today = dt.datetime.now(dt.UTC).date()
    status, year = await gw.http("GET", f"/api/v1/usage?start={today - dt.timedelta(days=365)}", TEAM_KEY)
    assert status == 200 and year["data"] == usage["data"] and year["total"] == usage["total"]

    # Runtime keys (the directory, through redis-py's cluster client): created, used, revoked.
    status, created = await gw.http("POST", "/admin/keys", MASTER_KEY, {"team": "team-b", "name": "ci"})
    assert status == 201, created
    runtime = gw.client(api_key=created["key"])
    assert (await _chat(runtime)).http_response.status_code == 200
    status, listed = await gw.http("GET", "/admin/keys?team=team-b", MASTER_KEY)
    assert status == 200 and created["id"] in str(listed)
    status, _ = await gw.http("DELETE", f"/admin/keys/{created['id']}", MASTER_KEY)
    assert status in (200, 204)
    with pytest.raises(openai.AuthenticationError):
        await _chat(runtime)


async def test_the_cache_answers_from_a_cluster(
    upstream: Upstream, cluster: Cluster, make_gateway: Callable[..., Awaitable[RunningGateway]]
) -> None:
    cfg = cluster_config(upstream, cluster)
    cfg["plugins"] = ["auth", "rate_limit", "quota", "cache"]
    cfg["cache"] = {"enabled": True, "ttl_seconds": 60}
    gw = await make_gateway(cfg)
    client = gw.client(api_key=TEAM_KEY)
    first = await _chat(client)
    await gw.gateway.pipeline.drain()  # the cache write runs after the answer
    second = await _chat(client)
    assert first.http_response.headers["x-gateway-cache"] == "miss"
    assert second.http_response.headers["x-gateway-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(upstream.state.requests) == 1


async def test_a_slot_moved_to_another_master_is_followed_and_its_limits_kept(
    upstream: Upstream, cluster: Cluster, make_gateway: Callable[..., Awaitable[RunningGateway]]
) -> None:
    cfg = cluster_config(upstream, cluster, limits={"rpm": 6})
    cfg["teams"][0]["id"] = "team-moving"
    gw = await make_gateway(cfg)
    client = gw.client(api_key=TEAM_KEY)
    for _ in range(3):
        assert (await _chat(client)).http_response.status_code == 200

    slot = key_slot("{team-moving}")
    to = next(p for p in cluster.ports if p != cluster.owner(slot))
    cluster.begin_move(slot, to)
    cluster.end_move(slot, to)
    assert cluster.owner(slot) == to

    # The gateway's map still names the old master: MOVED, then the new one; the bucket moved with
    # its keys, so exactly 3 more requests fit in the minute.
    statuses = []
    for _ in range(5):
        try:
            statuses.append((await _chat(client)).http_response.status_code)
        except openai.RateLimitError:
            statuses.append(429)
    assert statuses == [200, 200, 200, 429, 429]
    assert "state_store_unavailable" not in gw.logs.getvalue().decode()


async def test_a_command_for_a_slot_mid_migration_follows_ask(cluster: Cluster) -> None:
    key = "{ask-test}:value"
    slot = key_slot(key)
    source = cluster.owner(slot)
    to = next(p for p in cluster.ports if p != source)
    with cluster.node(source) as client:
        client.set(key, b"moved-with-its-slot")
    pipe = ClusterPipe(cluster.url, timeout=2.0)
    try:
        assert await pipe.call("GET", key, key=key) == b"moved-with-its-slot"  # maps the cluster
        cluster.begin_move(slot, to)  # the key is on the importing node; the source answers ASK
        assert await pipe.call("GET", key, key=key) == b"moved-with-its-slot"
        assert pipe.slots[slot] is pipe.nodes[f"127.0.0.1:{source}"]  # ASK is one-off: map unchanged
        cluster.end_move(slot, to)
        assert await pipe.call("GET", key, key=key) == b"moved-with-its-slot"  # MOVED from here on
        assert await pipe.call("GET", key, key=key) == b"moved-with-its-slot"
        assert pipe.slots[slot] is pipe.nodes[f"127.0.0.1:{to}"]
    finally:
        pipe.close()
        with cluster.node(to) as client:
            client.delete(key)


def _tag_on(cluster: Cluster, port: int, prefix: str) -> str:
    """A hash tag whose slot the master at ``port`` serves."""
    return next(f"{{{prefix}{i}}}" for i in range(10_000) if cluster.owner(key_slot(f"{prefix}{i}")) == port)


async def test_a_settlement_sent_to_a_slot_that_moved_is_redirected_not_dropped(cluster: Cluster) -> None:
    store = RedisStore(cluster.url, "t-settle", timeout=2.0, cluster=True)
    key = "t-settle:{settle-move}:usd"
    slot = key_slot(key)
    try:
        await store.admit([Check("budget", key, 100.0, "budget", ends_ms=2_000_000_000_000)])  # maps
        to = next(p for p in cluster.ports if p != cluster.owner(slot))
        cluster.begin_move(slot, to)
        cluster.end_move(slot, to)
        # The map still names the old master, so the settlement goes there and comes back MOVED.
        assert store.settle_soon([Op("incr", key, (2.5, 60))], lambda ops: pytest.fail("dropped"))
        await store.settled()
        with cluster.node(to) as client:
            assert float(client.get(key) or 0) == 2.5
    finally:
        await store.close()


async def test_a_script_on_a_slot_mid_migration_reaches_the_importing_node_even_without_the_script(
    cluster: Cluster,
) -> None:
    store = RedisStore(cluster.url, "t-ask", timeout=2.0, cluster=True)
    key = "t-ask:{ask-script}:rpm"
    slot = key_slot(key)
    rpm = Check("bucket", key, 10, "rpm", rate=10 / 60, cost=1)
    to = next(p for p in cluster.ports if p != cluster.owner(slot))
    try:
        first = await store.admit([rpm])
        assert first.failed is None and first.remaining[0][0] == 9
        cluster.begin_move(slot, to)  # the bucket is on the importing node now
        with cluster.node(to) as client:
            client.script_flush()  # ... which has never run the script
        second = await store.admit([rpm])  # ASK -> NOSCRIPT -> loaded everywhere -> ASK again
        assert second.failed is None and second.remaining[0][0] == 8  # the same bucket, one less
    finally:
        cluster.end_move(slot, to)
        await store.close()


async def test_with_the_seed_node_dead_the_other_masters_keep_answering_without_waiting(
    tmp_path: Path,
) -> None:
    own = Cluster(tmp_path)
    pipe = ClusterPipe(own.url, timeout=0.5)
    try:
        seed, other = own.ports[0], own.ports[1]
        alive, dead = _tag_on(own, other, "alive") + "k", _tag_on(own, seed, "dead") + "k"
        assert await pipe.call("SET", alive, "1", key=alive) == b"OK"  # maps the cluster
        assert await pipe.call("SET", dead, "1", key=dead) == b"OK"
        own.kill(seed)
        with pytest.raises(StoreUnavailable):
            await pipe.call("GET", dead, key=dead)  # its master is gone: fails, the map goes stale
        for _ in range(5):
            started = time.monotonic()
            assert await pipe.call("GET", alive, key=alive) == b"1"
            assert time.monotonic() - started < 0.2  # never waits behind the map refresh
        await asyncio.sleep(0.3)
        assert pipe._last_good is not None and pipe._last_good.port != seed  # mapped by a live node
    finally:
        pipe.close()
        own.stop()


async def test_a_settlement_stuck_on_a_migrating_slot_does_not_hold_up_other_teams_replay(
    cluster: Cluster,
) -> None:
    store = RedisStore(cluster.url, "t-replay", timeout=1.0, cluster=True)
    limiter = Limiter(store)
    stuck_key, ok_key = "t-replay:{replay-stuck}:usd", "t-replay:{replay-ok}:usd"
    slot = key_slot(stuck_key)
    to = next(p for p in cluster.ports if p != cluster.owner(slot))
    try:
        await store.admit([Check("budget", ok_key, 100.0, "budget", ends_ms=2_000_000_000_000)])  # maps
        # While the slot is half-migrated, a settlement touching keys on neither side gets TRYAGAIN.
        cluster.begin_move(slot, to)
        limiter.backlog.extend(
            [
                (new_settle_id(), [Op("incr", stuck_key, (1.0, 60))]),
                (new_settle_id(), [Op("incr", ok_key, (2.0, 60))]),
            ]
        )
        await limiter._replay()
        with cluster.node(cluster.owner(key_slot(ok_key))) as client:
            assert float(client.get(ok_key) or 0) == 2.0  # booked although queued behind the stuck one
        assert [ops[0].key for _, ops in limiter.backlog] == [stuck_key]  # kept, not dropped
        cluster.end_move(slot, to)
        await limiter._replay()
        assert not limiter.backlog
        with cluster.node(to) as client:
            assert float(client.get(stuck_key) or 0) == 1.0
    finally:
        if cluster.owner(slot) != to:
            cluster.end_move(slot, to)
        await store.close()


async def test_a_closed_cluster_pipe_never_connects_again(cluster: Cluster) -> None:
    pipe = ClusterPipe(cluster.url, timeout=1.0)
    key = "{closing}:k"
    assert await pipe.call("SET", key, "1", key=key) == b"OK"
    call = asyncio.ensure_future(pipe.call("GET", key, key=key))
    pipe._outdated()  # a map refresh is on its way ...
    pipe.close()  # ... when the store closes
    with pytest.raises(StoreUnavailable):
        await call
    await asyncio.sleep(0.3)  # a refresh or retry that outlived close() would reconnect by now
    assert not any(p.ready for p in (pipe.seed, *pipe.nodes.values()))
    with pytest.raises(StoreUnavailable):
        await pipe.call("GET", key, key=key)
    with cluster.node(cluster.owner(key_slot(key))) as client:
        client.delete(key)


async def test_loading_a_script_does_not_wait_for_a_hung_node(tmp_path: Path) -> None:
    own = Cluster(tmp_path)
    store = RedisStore(own.url, "t-hung", timeout=0.3, cluster=True)
    healthy, hung = own.ports[0], own.ports[1]
    key = "t-hung:" + _tag_on(own, healthy, "h") + ":rpm"
    rpm = Check("bucket", key, 100, "rpm", rate=100 / 60, cost=1)
    try:
        await store.admit([rpm])
        await store.pipe.call("PING", key=_tag_on(own, hung, "x"))  # connected to the soon-hung node too
        own.procs[own.ports.index(hung)].send_signal(signal.SIGSTOP)
        with own.node(healthy) as client:
            client.script_flush()
        started = time.monotonic()
        decision = await store.admit([rpm])  # NOSCRIPT -> SCRIPT LOAD on every node -> again
        assert decision.failed is None
        assert time.monotonic() - started < 0.5  # the hung node's SCRIPT LOAD is not waited for
    finally:
        own.procs[own.ports.index(hung)].send_signal(signal.SIGCONT)
        await store.close()
        own.stop()
