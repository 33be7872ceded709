"""GraphQL at /graphql against real servers: HTTP POST for queries and mutations, and a
graphql-transport-ws client over a real WebSocket for subscriptions; Redis, auth and limits on."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from tests.conftest import MASTER_KEY, TEAM_B_KEY, TEAM_KEY, RunningGateway, Upstream, tenancy_config
from tests.helpers import eventually

MESSAGES = [{"role": "user", "content": "one two three four five"}]
COMPLETE = """
query ($messages: [ChatMessageInput!]!, $options: CompletionOptionsInput) {
  complete(messages: $messages, options: $options) {
    id content model provider finishReason cached costUsd usage { promptTokens completionTokens totalTokens }
  }
}"""
COMPLETION_STREAM = """
subscription ($input: CompletionInput!) {
  completionStream(input: $input) { content finishReason usage { totalTokens completionTokens } model }
}"""
STREAM_COMPLETION = """
subscription ($id: String!) {
  streamCompletion(streamId: $id) { content done finishReason usage { totalTokens } }
}"""
START_STREAM = """
mutation ($messages: [ChatMessageInput!]!) { startStream(messages: $messages) }"""


async def gql(
    gw: RunningGateway, query: str, variables: Any = None, key: str | None = TEAM_KEY
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.root + "/graphql", json={"query": query, "variables": variables}, headers=headers
        ) as r,
    ):
        assert r.status in (200, 400), await r.text()
        data: dict[str, Any] = await r.json()
        return data


class Socket:
    """A graphql-transport-ws client on a real WebSocket."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws

    @classmethod
    async def connect(
        cls,
        gw: RunningGateway,
        payload: Any = None,
        protocol: str = "graphql-transport-ws",
        init: bool = True,
    ) -> Socket:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(gw.root.replace("http", "ws") + "/graphql", protocols=[protocol])
        socket = cls(session, ws)
        if init:
            await ws.send_json({"type": "connection_init", "payload": payload or {}})
        return socket

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                data: dict[str, Any] = orjson.loads(msg.data)
                if data["type"] in ("ping", "pong"):
                    if data["type"] == "ping":
                        await self.ws.send_json({"type": "pong"})
                    continue
                return data
            return {"type": "closed", "code": self.ws.close_code}

    async def subscribe(self, op_id: str, query: str, variables: Any) -> None:
        await self.ws.send_json(
            {"id": op_id, "type": "subscribe", "payload": {"query": query, "variables": variables}}
        )

    async def collect(self, op_id: str) -> tuple[list[dict[str, Any]], list[Any]]:
        """Every ``next`` payload of one operation until it completes or errors."""
        payloads, errors = [], []
        while True:
            msg = await self.receive()
            assert msg.get("id") in (op_id, None), msg
            if msg["type"] == "next":
                payloads.append(msg["payload"])
                if msg["payload"].get("errors"):
                    errors.extend(msg["payload"]["errors"])
            elif msg["type"] == "error":
                errors.extend(msg["payload"])
                return payloads, errors
            elif msg["type"] in ("complete", "closed"):
                return payloads, errors

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


@pytest.fixture
async def gw(upstream: Upstream, make_gateway: Any) -> RunningGateway:
    cfg = tenancy_config(upstream.url, limits={"rpm": 50})
    cfg["models"][0]["pricing"] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    return await make_gateway(cfg)


async def test_complete_query_and_mutation_run_the_pipeline(gw: RunningGateway) -> None:
    data = await gql(gw, COMPLETE, {"messages": MESSAGES, "options": {"model": "chat", "maxTokens": 50}})
    answer = data["data"]["complete"]
    assert answer["content"] == "Mock answer: one two three four five"
    assert answer["model"] == "chat" and answer["provider"] == "primary" and answer["finishReason"] == "stop"
    assert answer["cached"] is False and answer["costUsd"] > 0 and answer["usage"]["totalTokens"] > 0
    mutation = "mutation ($i: CompletionInput!) { complete(input: $i) { content model } }"
    data = await gql(gw, mutation, {"i": {"messages": MESSAGES}})
    assert data["data"]["complete"]["content"].startswith("Mock answer")
    # Each completion is booked like a REST request: the access line and the usage report.
    lines = [x for x in gw.log_lines() if x.get("event") == "request" and x.get("path") == "/graphql"]
    assert len(lines) == 2 and all(x["team"] == "team-a" and x["status"] == 200 for x in lines)
    status, usage = await gw.http("GET", "/api/v1/usage", TEAM_KEY)
    assert status == 200 and sum(r["requests"] for r in usage["data"]) == 2


async def test_listing_queries_and_health(gw: RunningGateway) -> None:
    query = """{
      listProviders
      listModels(provider: "primary")
      models { name providers capabilities { contextWindow pricing { input output } multimodal } }
      health { status redis { status } providers { name status } }
    }"""
    data = (await gql(gw, query))["data"]
    assert data["listProviders"] == ["primary"] and data["listModels"] == ["chat"]
    assert (
        data["models"][0]["name"] == "chat" and data["models"][0]["capabilities"]["pricing"]["output"] == 2.0
    )
    assert data["health"]["status"] == "ok" and data["health"]["providers"][0]["name"] == "primary"
    bad = await gql(gw, '{ listModels(provider: "nope") }')
    assert bad["errors"][0]["extensions"]["code"] == "MODEL_NOT_FOUND"


async def test_errors_carry_the_native_type_and_a_request_id(gw: RunningGateway) -> None:
    data = await gql(gw, COMPLETE, {"messages": MESSAGES}, key=None)
    error = data["errors"][0]
    assert error["extensions"]["code"] == "INVALID_REQUEST" and error["extensions"]["requestId"]
    data = await gql(gw, COMPLETE, {"messages": MESSAGES, "options": {"model": "nope"}})
    assert data["errors"][0]["extensions"]["code"] == "MODEL_NOT_FOUND"
    assert "Traceback" not in orjson.dumps(data).decode()


async def test_rate_limits_apply_to_each_operation(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"rpm": 2}))
    codes = []
    for _ in range(3):
        data = await gql(gw, COMPLETE, {"messages": MESSAGES})
        codes.append(data["errors"][0]["extensions"] if "errors" in data else "ok")
    assert codes[:2] == ["ok", "ok"]
    assert codes[2]["code"] == "RATE_LIMIT" and codes[2]["retryAfter"] >= 1


async def test_completion_stream_equals_the_v1_stream(gw: RunningGateway) -> None:
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe("1", COMPLETION_STREAM, {"input": {"messages": MESSAGES}})
    payloads, errors = await socket.collect("1")
    await socket.close()
    assert not errors
    events = [p["data"]["completionStream"] for p in payloads]
    assert len(events) > 3 and all(e["finishReason"] is None for e in events[:-1])
    assert events[-1]["finishReason"] == "stop" and events[-1]["usage"]["completionTokens"] > 0
    client = gw.client(api_key=TEAM_KEY)
    chunks = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert "".join(e["content"] for e in events) == text


async def test_a_bad_key_closes_the_socket_with_4403(gw: RunningGateway) -> None:
    for payload in ({"authorization": "Bearer wrong-key-0123456789"}, {}):
        socket = await Socket.connect(gw, payload)
        msg = await socket.receive()
        assert msg == {"type": "closed", "code": 4403}
        await socket.close()


async def test_an_unanswered_socket_times_out(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["graphql"] = {"connection_init_timeout_seconds": 0.3}
    gw = await make_gateway(cfg)
    socket = await Socket.connect(gw, init=False)
    msg = await socket.receive(timeout=3)
    assert msg == {"type": "closed", "code": 4408}
    await socket.close()


async def test_legacy_protocol_is_off_by_default_and_never_skips_auth(
    upstream: Upstream, make_gateway: Any
) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(gw.root.replace("http", "ws") + "/graphql", protocols=["graphql-ws"])
        assert ws.protocol is None  # not negotiated
        await ws.close()
    cfg = tenancy_config(upstream.url)
    cfg["graphql"] = {"legacy_protocol": True}
    gw2 = await make_gateway(cfg)
    socket = await Socket.connect(gw2, protocol="graphql-ws", init=False)
    # Straight to "start" without connection_init: the operation must not run.
    await socket.ws.send_json(
        {
            "id": "1",
            "type": "start",
            "payload": {"query": COMPLETION_STREAM, "variables": {"input": {"messages": MESSAGES}}},
        }
    )
    msg = await socket.receive(timeout=3)
    assert msg["type"] != "data" or msg["payload"].get("errors"), msg
    await socket.close()
    assert len(upstream.state.requests) == 0


async def test_started_stream_is_whole_for_a_late_subscriber_and_private_to_the_team(
    gw: RunningGateway, upstream: Upstream
) -> None:
    data = await gql(gw, START_STREAM, {"messages": MESSAGES})
    stream_id = data["data"]["startStream"]
    await eventually(lambda: upstream.state.requests and upstream.state.requests[-1].ended is not None)
    other = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_B_KEY}"})
    assert (await other.receive())["type"] == "connection_ack"
    await other.subscribe("x", STREAM_COMPLETION, {"id": stream_id})
    _, errors = await other.collect("x")
    await other.close()
    assert errors and errors[0]["extensions"]["code"] == "MODEL_NOT_FOUND"
    # team-a still gets the whole completion, though the upstream finished before it subscribed.
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe("1", STREAM_COMPLETION, {"id": stream_id})
    payloads, errors = await socket.collect("1")
    await socket.close()
    assert not errors
    events = [p["data"]["streamCompletion"] for p in payloads]
    assert "".join(e["content"] for e in events) == "Mock answer: one two three four five"
    assert events[-1]["done"] is True and events[-1]["finishReason"] == "stop"


async def test_client_chosen_stream_ids(gw: RunningGateway) -> None:
    mutation = """mutation ($m: [ChatMessageInput!]!, $id: String) {
      startStreamCompletion(messages: $m, streamId: $id)
    }"""
    assert (await gql(gw, mutation, {"m": MESSAGES, "id": "mine"}))["data"]["startStreamCompletion"] is True
    again = await gql(gw, mutation, {"m": MESSAGES, "id": "mine"})
    assert again["errors"][0]["extensions"]["errorCode"] == "stream_id_in_use"
    too_long = await gql(gw, mutation, {"m": MESSAGES, "id": "x" * 65})
    assert too_long["errors"][0]["extensions"]["code"] == "INVALID_REQUEST"
    # Another team may use the same id: ids are per team.
    assert (await gql(gw, mutation, {"m": MESSAGES, "id": "mine"}, key=TEAM_B_KEY))["data"]


async def test_complete_message_cancels_the_upstream(gw: RunningGateway, upstream: Upstream) -> None:
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.3}
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    long = [{"role": "user", "content": " ".join(["w"] * 40)}]
    await socket.subscribe("1", COMPLETION_STREAM, {"input": {"messages": long}})
    first = await socket.receive()
    assert first["type"] == "next"
    await socket.ws.send_json({"id": "1", "type": "complete"})
    record = upstream.state.requests[-1]
    await eventually(lambda: record.disconnected, within=1.0)
    await socket.close()
    # Usage up to that point is booked, as a 499 in the access log.
    lines = await eventually(
        lambda: [x for x in gw.log_lines() if x.get("path") == "/graphql" and x.get("status") == 499]
    )
    assert lines[0]["completion_tokens"] >= 1


async def test_dropped_socket_cancels_the_upstream(gw: RunningGateway, upstream: Upstream) -> None:
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.3}
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe(
        "1", COMPLETION_STREAM, {"input": {"messages": [{"role": "user", "content": "a " * 40}]}}
    )
    assert (await socket.receive())["type"] == "next"
    await socket.close()
    record = upstream.state.requests[-1]
    await eventually(lambda: record.disconnected, within=1.0)


async def test_depth_alias_and_size_guards(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["graphql"] = {"max_depth": 2, "max_aliases": 2, "max_query_bytes": 400}
    gw = await make_gateway(cfg)
    deep = "{ __schema { types { fields { type { ofType { name } } } } } }"
    assert "depth" in (await gql(gw, deep))["errors"][0]["message"]
    aliases = "fragment F on Query { a: listProviders b: listProviders } { ...F ...F }"
    assert "aliases" in (await gql(gw, aliases))["errors"][0]["message"]
    big = "{ listProviders " + " " * 500 + "}"
    assert "bytes" in (await gql(gw, big))["errors"][0]["message"]
    # Subscriptions are checked too, before anything runs.
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe(
        "1", "subscription { completionStream(input: {messages: []}) { usage { totalTokens } } }", None
    )
    _, errors = await socket.collect("1")
    await socket.close()
    assert errors and "depth" in errors[0]["message"]
    assert len(upstream.state.requests) == 0


async def test_operations_are_counted_by_type(gw: RunningGateway) -> None:
    def count(kind: str) -> float:
        return REGISTRY.get_sample_value("llm_gateway_graphql_operations_total", {"type": kind}) or 0.0

    before = count("query"), count("mutation")
    await gql(gw, "{ listProviders }")
    await gql(
        gw,
        "mutation ($i: CompletionInput!) { complete(input: $i) { content } }",
        {"i": {"messages": MESSAGES}},
    )
    assert (count("query"), count("mutation")) == (before[0] + 1, before[1] + 1)


async def test_master_key_gets_no_completions(gw: RunningGateway) -> None:
    data = await gql(gw, COMPLETE, {"messages": MESSAGES}, key=MASTER_KEY)
    assert data["errors"][0]["extensions"]["code"] == "INVALID_REQUEST"
    assert data["errors"][0]["extensions"]["errorCode"] == "admin_key_not_allowed"


async def test_per_team_stream_limit(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["graphql"] = {"max_subscriptions_per_team": 2}
    gw = await make_gateway(cfg)
    results = [await gql(gw, START_STREAM, {"messages": MESSAGES}) for _ in range(3)]
    assert [("errors" in r) for r in results] == [False, False, True]
    assert results[2]["errors"][0]["extensions"]["code"] == "RATE_LIMIT"
    await asyncio.sleep(0)


async def test_a_started_stream_nobody_takes_is_cancelled_upstream(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["graphql"] = {"stream_subscribe_timeout_seconds": 0.3}
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.2}
    long = [{"role": "user", "content": " ".join(["w"] * 40)}]
    stream_id = (await gql(gw, START_STREAM, {"messages": long}))["data"]["startStream"]
    await eventually(lambda: upstream.state.requests)
    record = upstream.state.requests[-1]
    await eventually(lambda: record.disconnected, within=2.0)
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe("1", STREAM_COMPLETION, {"id": stream_id})
    _, errors = await socket.collect("1")
    await socket.close()
    assert errors[0]["extensions"]["errorCode"] == "stream_not_found"


async def test_subscriptions_per_connection_are_bounded_and_the_server_pings(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["graphql"] = {"max_subscriptions_per_connection": 1, "keepalive_seconds": 0.2}
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.3}
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    long = {"input": {"messages": [{"role": "user", "content": " ".join(["w"] * 20)}]}}
    await socket.subscribe("1", COMPLETION_STREAM, long)
    await socket.subscribe("2", COMPLETION_STREAM, long)
    seen = []
    while not any(m.get("id") == "2" for m in seen) and len(seen) < 50:
        seen.append(await socket.receive())
    refused = next(m for m in seen if m.get("id") == "2")
    assert refused["type"] == "error"
    await socket.close()
    # The server pings an idle socket (WebSocket ping frames, which browsers and clients answer).
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            gw.root.replace("http", "ws") + "/graphql", protocols=["graphql-transport-ws"], autoping=False
        )
        await ws.send_json({"type": "connection_init", "payload": {"authorization": f"Bearer {TEAM_KEY}"}})
        assert (await ws.receive(timeout=2)).json()["type"] == "connection_ack"
        assert (await ws.receive(timeout=2)).type == aiohttp.WSMsgType.PING
        await ws.close()


async def test_an_oversized_document_is_refused_before_it_is_parsed(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["graphql"] = {"max_query_bytes": 1000}
    gw = await make_gateway(cfg)
    # Megabytes of fields would take seconds to parse; the answer comes at once.
    huge = "{ " + "listProviders " * 50_000 + "}"
    data = await gql(gw, huge)
    assert "over the limit of 1000 bytes" in data["errors"][0]["message"]
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe(
        "1", "subscription { " + " " * 2000 + "completionStream(input: {messages: []}) { content } }", None
    )
    _, errors = await socket.collect("1")
    await socket.close()
    assert "over the limit" in errors[0]["message"]


async def test_concurrent_starts_cannot_share_a_stream_id(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url, limits={"rpm": 100})
    cfg["graphql"] = {"max_subscriptions_per_team": 3}
    gw = await make_gateway(cfg)
    mutation = """mutation ($m: [ChatMessageInput!]!, $id: String) {
      startStreamCompletion(messages: $m, streamId: $id)
    }"""
    results = await asyncio.gather(*(gql(gw, mutation, {"m": MESSAGES, "id": "same"}) for _ in range(3)))
    assert sum(1 for r in results if r.get("data") and r["data"]["startStreamCompletion"]) == 1
    # The refused ones hold no slot: the team can still start its other two streams.
    for stream_id in ("a", "b"):
        assert (await gql(gw, mutation, {"m": MESSAGES, "id": stream_id}))["data"]["startStreamCompletion"]


async def test_deltas_arrive_while_the_upstream_is_still_writing(
    gw: RunningGateway, upstream: Upstream
) -> None:
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.3}
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe("1", COMPLETION_STREAM, {"input": {"messages": MESSAGES}})
    first = await socket.receive()
    assert first["type"] == "next" and first["payload"]["data"]["completionStream"]["content"]
    assert upstream.state.requests[-1].ended is None  # not buffered to the end
    payloads, errors = await socket.collect("1")
    await socket.close()
    assert not errors and payloads[-1]["data"]["completionStream"]["finishReason"] == "stop"


async def test_a_key_revoked_while_its_socket_is_open_is_refused(gw: RunningGateway) -> None:
    status, made = await gw.http("POST", "/admin/keys", MASTER_KEY, {"team": "team-a"})
    assert status == 201
    socket = await Socket.connect(gw, {"authorization": f"Bearer {made['key']}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe("1", COMPLETION_STREAM, {"input": {"messages": MESSAGES}})
    _, errors = await socket.collect("1")
    assert not errors
    assert (await gw.http("DELETE", f"/admin/keys/{made['id']}", MASTER_KEY))[0] == 204
    await asyncio.sleep(1.1)  # past the runtime-key cache (auth.CACHE_TTL)
    await socket.subscribe("2", COMPLETION_STREAM, {"input": {"messages": MESSAGES}})
    _, errors = await socket.collect("2")
    await socket.close()
    assert errors and errors[0]["extensions"]["errorCode"] == "invalid_api_key"


async def test_nothing_is_parsed_without_a_key_and_documents_are_token_bounded(gw: RunningGateway) -> None:
    many = "{ " + "health { status } " * 300 + "}"  # quadratic to validate: refused before that
    data = await gql(gw, many, key=None)
    assert data["errors"][0]["extensions"]["errorCode"] == "missing_api_key"
    data = await gql(gw, many)
    assert "token" in data["errors"][0]["message"].lower()
    assert (await gql(gw, "{ health { status } }"))["data"]["health"]["status"] == "ok"


async def test_leaving_during_admission_releases_the_parallel_slot(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = tenancy_config(upstream.url, limits={"max_parallel": 2})
    cfg["plugins"] = ["auth", "rate_limit", "quota", "cache"]
    cfg["cache"] = {"enabled": True}
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.2}
    same = {
        "input": {"messages": [{"role": "user", "content": "a b c d e f"}], "options": {"temperature": 0}}
    }
    socket = await Socket.connect(gw, {"authorization": f"Bearer {TEAM_KEY}"})
    assert (await socket.receive())["type"] == "connection_ack"
    await socket.subscribe("leader", COMPLETION_STREAM, same)
    assert (await socket.receive())["type"] == "next"
    await socket.subscribe("follower", COMPLETION_STREAM, same)  # waits for the leader's answer
    await asyncio.sleep(0.1)
    await socket.ws.send_json({"id": "follower", "type": "complete"})
    while (await socket.receive()).get("type") != "complete":
        pass
    await socket.close()
    await asyncio.sleep(0.3)
    upstream.state.faults.clear()
    # Both slots are free again: two concurrent completions run.
    results = await asyncio.gather(
        *(gql(gw, COMPLETE, {"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(2))
    )
    assert all("errors" not in r for r in results), results


async def test_a_socket_naming_two_callers_is_refused(gw: RunningGateway) -> None:
    url = gw.root.replace("http", "ws") + "/graphql"
    async with aiohttp.ClientSession() as session:
        for header_key, payload in (
            (TEAM_B_KEY, {"authorization": f"Bearer {TEAM_KEY}"}),  # upgrade says B, payload says A
            (None, {"authorization": f"Bearer {TEAM_KEY}", "Authorization": f"Bearer {TEAM_B_KEY}"}),
        ):
            headers = {"Authorization": f"Bearer {header_key}"} if header_key else {}
            ws = await session.ws_connect(url, protocols=["graphql-transport-ws"], headers=headers)
            await ws.send_json({"type": "connection_init", "payload": payload})
            msg = await ws.receive(timeout=3)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 4403
            await ws.close()
        # The same key in both places is one caller.
        ws = await session.ws_connect(
            url, protocols=["graphql-transport-ws"], headers={"Authorization": f"Bearer {TEAM_KEY}"}
        )
        await ws.send_json({"type": "connection_init", "payload": {"authorization": f"Bearer {TEAM_KEY}"}})
        assert (await ws.receive(timeout=3)).json()["type"] == "connection_ack"
        await ws.close()
