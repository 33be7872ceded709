"""The admin API: who gets in, teams and keys, what it refuses to assign, and what it never shows."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import MASTER_KEY, REDIS_URL, TEAM_B_KEY, TEAM_KEY, RunningGateway, tenancy_config

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "chat", "messages": MESSAGES}
BACKENDS = pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}


async def call(
    gw: RunningGateway, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, Any, str]:
    """One HTTP call: status, parsed JSON body (None when empty) and the raw text."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.root + path, headers=headers or {}, json=body) as resp,
    ):
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None, raw.decode()


async def admin(gw: RunningGateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, data, _ = await call(gw, method, path, ADMIN, body)
    return status, data


async def chat(gw: RunningGateway, key: str) -> tuple[int, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        await r.read()
        return r.status, dict(r.headers)


def assert_error(body: Any, status: int, type_: str) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_, (status, err)
    return err


# --- who gets in -----------------------------------------------------------------------------------------

ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/admin/teams", {"id": "intruder"}),
    ("GET", "/admin/teams", None),
    ("GET", "/admin/teams/team-a", None),
    ("PATCH", "/admin/teams/team-a", {"limits": {"rpm": 100000}}),
    ("DELETE", "/admin/teams/team-a", None),
    ("POST", "/admin/keys", {"team": "team-a"}),
    ("GET", "/admin/keys", None),
    ("GET", "/admin/keys?team=team-a", None),
    ("DELETE", "/admin/keys/key_0000000000000000", None),
]


async def test_admin_routes_need_the_master_key(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    for method, path, body in ROUTES:
        for headers, status, type_ in (
            ({}, 401, "authentication_error"),
            ({"Authorization": "Bearer not-a-key-0123456789"}, 401, "authentication_error"),
            ({"Authorization": f"Bearer {TEAM_KEY}"}, 403, "permission_error"),
            ({"x-api-key": TEAM_B_KEY}, 403, "permission_error"),
        ):
            got, answer, _ = await call(gw, method, path, headers, body)
            assert got == status, (method, path, headers, answer)
            assert_error(answer, status, type_)
        got, answer, _ = await call(gw, method, path, ADMIN, body)
        assert got not in (401, 403), (method, path, answer)
    # x-api-key works for the master key too.
    got, _, _ = await call(gw, "GET", "/admin/teams", {"x-api-key": MASTER_KEY})
    assert got == 200


async def test_admin_api_is_off_without_a_master_key(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url)
    del cfg["admin"]
    gw = await make_gateway(cfg)
    status, body, _ = await call(gw, "GET", "/admin/teams", ADMIN)
    assert status in (401, 403)
    status, body, _ = await call(gw, "GET", "/admin/teams", {"Authorization": f"Bearer {TEAM_KEY}"})
    assert status == 403
    assert_error(body, 403, "permission_error")


@BACKENDS
async def test_a_team_key_can_never_raise_its_own_limits(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis, limits={"rpm": 2}))
    runtime = await create_key(gw, team="team-a")
    for key in (TEAM_KEY, runtime["key"]):
        headers = {"Authorization": f"Bearer {key}"}
        for method, path, body in (
            ("PATCH", "/admin/teams/team-a", {"limits": {"rpm": 100000}}),
            ("POST", "/admin/teams", {"id": "team-a2", "limits": {"rpm": 100000}}),
            ("POST", "/admin/keys", {"team": "team-a", "limits": {"rpm": 100000}}),
            ("DELETE", "/admin/teams/team-a", None),
        ):
            status, answer, _ = await call(gw, method, path, headers, body)
            assert status == 403, (method, path, answer)
    statuses = [(await chat(gw, TEAM_KEY))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, team = await admin(gw, "GET", "/admin/teams/team-a")
    assert team["limits"] == {"rpm": 2}
    status, keys = await admin(gw, "GET", "/admin/keys?team=team-a")
    assert [k["id"] for k in keys["data"]] == [runtime["id"]]


# --- teams -----------------------------------------------------------------------------------------------


async def create_key(gw: RunningGateway, **fields: Any) -> dict[str, Any]:
    status, body = await admin(gw, "POST", "/admin/keys", fields)
    assert status == 201, body
    return dict(body)


@BACKENDS
async def test_create_team_then_its_key_works(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    team = {"id": "research", "models": ["chat"], "limits": {"rpm": 50}, "budgets": {"daily_usd": 2.5}}
    status, body = await admin(gw, "POST", "/admin/teams", team)
    assert status == 201, body
    assert {k: body[k] for k in team} == team
    assert "api_keys" not in body
    status, body = await admin(gw, "GET", "/admin/teams/research")
    assert status == 200
    assert {k: body[k] for k in team} == team
    assert body["source"] == "api"
    key = (await create_key(gw, team="research", name="notebook"))["key"]
    reply = await gw.client(api_key=key).chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content == "Mock answer: hi"
    assert (await chat(gw, key))[1]["x-ratelimit-limit-requests"] == "50"


@BACKENDS
async def test_creating_an_existing_team_is_409(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    assert (await admin(gw, "POST", "/admin/teams", {"id": "ops"}))[0] == 201
    for team_id in ("ops", "team-a", "team-b"):
        status, body = await admin(gw, "POST", "/admin/teams", {"id": team_id, "limits": {"rpm": 1}})
        assert status == 409, body
        assert team_id in body["error"]["message"]
    # The config team was not shadowed: still no limit on it.
    assert "x-ratelimit-limit-requests" not in (await chat(gw, TEAM_KEY))[1]


@BACKENDS
async def test_list_teams_shows_config_and_runtime_teams(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis, limits={"rpm": 60}))
    assert (await admin(gw, "POST", "/admin/teams", {"id": "zeta", "limits": {"tpm": 1000}}))[0] == 201
    status, body = await admin(gw, "GET", "/admin/teams")
    assert status == 200
    assert body["object"] == "list"
    by_id = {t["id"]: t for t in body["data"]}
    assert set(by_id) == {"team-a", "team-b", "zeta"}
    assert by_id["team-a"]["source"] == "config"
    assert by_id["team-a"]["limits"] == {"rpm": 60}
    assert by_id["team-b"]["source"] == "config"
    assert by_id["zeta"]["source"] == "api"
    assert by_id["zeta"]["limits"] == {"tpm": 1000}
    text = orjson.dumps(body).decode()
    assert "api_keys" not in text
    assert TEAM_KEY not in text
    assert hashlib.sha256(TEAM_KEY.encode()).hexdigest() not in text
    status, body = await admin(gw, "GET", "/admin/teams/team-b")
    assert (status, body["source"]) == (200, "config")
    status, body = await admin(gw, "GET", "/admin/teams/nobody")
    assert status == 404
    assert_error(body, 404, "invalid_request_error")


@BACKENDS
async def test_patch_changes_limits_and_they_take_effect_within_a_second(
    upstream, make_gateway, redis
) -> None:
    cfg = tenancy_config(upstream.url, redis=redis)
    a = await make_gateway(cfg)
    b = await make_gateway(cfg) if redis else a  # with Redis the change is seen by another instance
    assert (await admin(a, "POST", "/admin/teams", {"id": "burst", "limits": {"rpm": 1000}}))[0] == 201
    key = (await create_key(a, team="burst"))["key"]
    status, headers = await chat(b, key)
    assert (status, headers["x-ratelimit-limit-requests"]) == (200, "1000")
    status, body = await admin(a, "PATCH", "/admin/teams/burst", {"limits": {"rpm": 2}})
    assert status == 200, body
    assert body["limits"] == {"rpm": 2}
    patched = time.monotonic()
    while True:
        status, headers = await chat(b, key)
        assert status == 200
        if headers["x-ratelimit-limit-requests"] == "2":
            break
        assert time.monotonic() - patched <= 1.2, "the new limit is not in effect after a second"
        await asyncio.sleep(0.05)
    # The bucket is capped at the new limit at once: one more request, then 429.
    assert [(await chat(b, key))[0] for _ in range(2)] == [200, 429]
    status, body = await admin(a, "GET", "/admin/teams/burst")
    assert body["limits"] == {"rpm": 2}


@BACKENDS
async def test_patch_merges_nested_fields(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    team = {"id": "merge", "limits": {"rpm": 100, "tpm": 50000}, "budgets": {"daily_usd": 3.0}}
    assert (await admin(gw, "POST", "/admin/teams", team))[0] == 201
    status, body = await admin(gw, "PATCH", "/admin/teams/merge", {"limits": {"rpm": 5}})
    assert status == 200, body
    # Lowering one limit never drops the others.
    assert body["limits"] == {"rpm": 5, "tpm": 50000}
    assert body["budgets"] == {"daily_usd": 3.0}
    status, body = await admin(
        gw, "PATCH", "/admin/teams/merge", {"limits": {"tpm": None}, "models": ["chat"]}
    )
    assert status == 200, body
    assert body["limits"] == {"rpm": 5}
    assert body["models"] == ["chat"]
    status, body = await admin(gw, "GET", "/admin/teams/merge")
    assert (body["limits"], body["budgets"], body["models"]) == ({"rpm": 5}, {"daily_usd": 3.0}, ["chat"])
    status, body = await admin(gw, "PATCH", "/admin/teams/merge", {"id": "renamed"})
    assert status == 400
    status, body = await admin(gw, "PATCH", "/admin/teams/merge", {"limits": {"rpm": 0}})
    assert status == 400
    assert "rpm" in body["error"]["message"]
    status, body = await admin(gw, "PATCH", "/admin/teams/nobody", {"limits": {"rpm": 1}})
    assert status == 404


async def test_config_teams_are_read_only(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, limits={"rpm": 60}))
    status, body = await admin(gw, "PATCH", "/admin/teams/team-a", {"limits": {"rpm": 1}})
    assert status == 409, body
    status, body = await admin(gw, "DELETE", "/admin/teams/team-a")
    assert status == 409, body
    status, body = await admin(gw, "GET", "/admin/teams/team-a")
    assert body["limits"] == {"rpm": 60}
    assert (await chat(gw, TEAM_KEY))[0] == 200


@BACKENDS
async def test_delete_team_removes_it_and_its_keys(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    assert (await admin(gw, "POST", "/admin/teams", {"id": "gone"}))[0] == 201
    keys = [(await create_key(gw, team="gone", name=f"k{i}"))["key"] for i in range(2)]
    other = await create_key(gw, team="team-b")
    for key in keys:
        assert (await chat(gw, key))[0] == 200
    status, body = await admin(gw, "DELETE", "/admin/teams/gone")
    assert (status, body) == (204, None)
    for key in keys:
        assert (await chat(gw, key))[0] == 401
    assert (await admin(gw, "GET", "/admin/teams/gone"))[0] == 404
    assert (await admin(gw, "GET", "/admin/keys?team=gone"))[1]["data"] == []
    assert "gone" not in {t["id"] for t in (await admin(gw, "GET", "/admin/teams"))[1]["data"]}
    assert (await admin(gw, "DELETE", "/admin/teams/gone"))[0] == 404
    # A team created again under the same id does not bring the old keys back.
    assert (await admin(gw, "POST", "/admin/teams", {"id": "gone"}))[0] == 201
    for key in keys:
        assert (await chat(gw, key))[0] == 401
    # Other teams' keys are untouched.
    assert (await chat(gw, other["key"]))[0] == 200


# --- what cannot be assigned -----------------------------------------------------------------------------

MASS_ASSIGNMENT: list[tuple[str, str, dict[str, Any], str]] = [
    ("POST", "/admin/teams", {"id": "new", "is_admin": True}, "is_admin"),
    ("POST", "/admin/teams", {"id": "new", "api_keys": ["chosen-key-0123456789"]}, "api_keys"),
    ("POST", "/admin/teams", {"id": "new", "source": "config"}, "source"),
    ("POST", "/admin/teams", {"id": "new", "limits": {"rpm": 1, "unlimited": True}}, "unlimited"),
    ("PATCH", "/admin/teams/existing", {"role": "admin"}, "role"),
    ("PATCH", "/admin/teams/existing", {"api_keys": ["chosen-key-0123456789"]}, "api_keys"),
    ("PATCH", "/admin/teams/existing", {"budgets": {"daily_usd": 1, "exempt": True}}, "exempt"),
    ("POST", "/admin/keys", {"team": "existing", "key": "sk-gw-chosen-0123456789"}, "key"),
    ("POST", "/admin/keys", {"team": "existing", "key_hash": "0" * 64}, "key_hash"),
    ("POST", "/admin/keys", {"team": "existing", "admin": True}, "admin"),
    ("POST", "/admin/keys", {"team": "existing", "id": "key_mine"}, "id"),
    ("POST", "/admin/keys", {"team": "existing", "limits": {"rpm": 1, "burst": 9}}, "burst"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    MASS_ASSIGNMENT,
    ids=[f"{m} {p} {f}" for m, p, _, f in MASS_ASSIGNMENT],
)
async def test_unknown_fields_are_refused(upstream, make_gateway, method, path, body, field) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    original = {"id": "existing", "limits": {"rpm": 10}}
    assert (await admin(gw, "POST", "/admin/teams", original))[0] == 201
    status, answer = await admin(gw, method, path, body)
    assert status == 400, answer
    err = assert_error(answer, 400, "invalid_request_error")
    assert field in err["message"]
    assert field in (err["param"] or "")
    # Nothing was written.
    assert (await admin(gw, "GET", "/admin/teams/new"))[0] == 404
    status, team = await admin(gw, "GET", "/admin/teams/existing")
    assert {k: team[k] for k in original} == original
    assert (await admin(gw, "GET", "/admin/keys?team=existing"))[1]["data"] == []
    status, _ = await chat(gw, "chosen-key-0123456789")
    assert status == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/admin/teams", b"{not json", 400),
        ("POST", "/admin/teams", b"[1, 2]", 400),
        ("POST", "/admin/teams", {"id": "bad id!"}, 400),
        ("POST", "/admin/teams", {}, 400),
        ("POST", "/admin/teams", {"id": "x", "models": ["no-such-model"]}, 400),
        ("POST", "/admin/teams", {"id": "x", "limits": {"rpm": "many"}}, 400),
        ("POST", "/admin/keys", {}, 400),
        ("POST", "/admin/keys", {"team": "no-such-team"}, 404),
        ("POST", "/admin/keys", {"team": "team-a", "expires_at": "next tuesday"}, 400),
        ("POST", "/admin/keys", {"team": "team-a", "models": ["no-such-model"]}, 400),
        ("POST", "/admin/keys", {"team": "team-a", "name": 42}, 400),
        ("DELETE", "/admin/keys/key_doesnotexist", None, 404),
    ],
    ids=[
        "team-invalid-json",
        "team-not-an-object",
        "team-bad-id",
        "team-no-id",
        "team-unknown-model",
        "team-limit-not-a-number",
        "key-no-team",
        "key-unknown-team",
        "key-bad-expiry",
        "key-unknown-model",
        "key-name-not-a-string",
        "delete-unknown-key",
    ],
)
async def test_invalid_admin_requests(upstream, make_gateway, method, path, body, status) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            gw.root + path,
            data=body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else None,
            headers={**ADMIN, "Content-Type": "application/json"},
        ) as resp,
    ):
        answer = await resp.json()
        assert resp.status == status, answer
    assert_error(answer, status, "invalid_request_error")
    assert (await admin(gw, "GET", "/admin/keys"))[1]["data"] == []
    assert {t["id"] for t in (await admin(gw, "GET", "/admin/teams"))[1]["data"]} == {"team-a", "team-b"}


# --- keys ------------------------------------------------------------------------------------------------


async def test_admin_key_lifecycle(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.root + "/admin/keys", json={"team": "team-a", "name": "ci"}, headers=ADMIN
        ) as r:
            assert r.status == 201, await r.text()
            created = await r.json()
        key = created["key"]
        client = gw.client(api_key=key)
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert reply.choices[0].message.content
        async with session.delete(gw.root + f"/admin/keys/{created['id']}", headers=ADMIN) as r:
            assert r.status == 204
        async with session.post(
            gw.url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 401


@BACKENDS
async def test_keys_are_shown_once_and_never_listed(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    first = await create_key(gw, team="team-a", name="laptop", models=["chat"])
    second = await create_key(gw, team="team-a")
    other = await create_key(gw, team="team-b", name="b")
    for created, team in ((first, "team-a"), (second, "team-a"), (other, "team-b")):
        assert created["key"].startswith("sk-gw-")
        assert len(created["key"]) >= 32
        assert created["team"] == team
        assert created["id"] and created["id"] not in created["key"]
    assert first["name"] == "laptop"
    assert len({first["key"], second["key"], other["key"]}) == 3

    status, listing, text = await call(gw, "GET", "/admin/keys?team=team-a", ADMIN)
    assert status == 200
    rows = {row["id"]: row for row in listing["data"]}
    assert set(rows) == {first["id"], second["id"]}
    assert rows[first["id"]]["name"] == "laptop"
    assert rows[first["id"]]["models"] == ["chat"]
    for created in (first, second):
        row = rows[created["id"]]
        assert "key" not in row and "key_hash" not in row
        assert created["key"].startswith(row["prefix"])
        assert 4 <= len(row["prefix"]) <= len(created["key"]) // 3
    status, everything, all_text = await call(gw, "GET", "/admin/keys", ADMIN)
    assert {row["id"] for row in everything["data"]} == {first["id"], second["id"], other["id"]}
    for created in (first, second, other):
        for listed in (text, all_text):
            assert created["key"] not in listed
            assert hashlib.sha256(created["key"].encode()).hexdigest() not in listed

    assert (await admin(gw, "DELETE", f"/admin/keys/{first['id']}")) == (204, None)
    status, body = await admin(gw, "DELETE", f"/admin/keys/{first['id']}")
    assert status == 404
    assert_error(body, 404, "invalid_request_error")
    assert (await chat(gw, first["key"]))[0] == 401
    assert (await chat(gw, second["key"]))[0] == 200
    status, listing, _ = await call(gw, "GET", "/admin/keys?team=team-a", ADMIN)
    assert [row["id"] for row in listing["data"]] == [second["id"]]


# --- secrets at rest and in logs -------------------------------------------------------------------------


async def dump_namespace(prefix: str) -> str:
    """Every key under the test's Redis prefix with its value, as one string."""
    client = aioredis.Redis.from_url(REDIS_URL)
    parts: list[str] = []
    try:
        async for raw_key in client.scan_iter(match=f"{prefix}*", count=500):
            kind = (await client.type(raw_key)).decode()
            if kind == "string":
                value: Any = await client.get(raw_key)
            elif kind == "hash":
                value = await client.hgetall(raw_key)
            elif kind == "set":
                value = await client.smembers(raw_key)
            elif kind == "zset":
                value = await client.zrange(raw_key, 0, -1, withscores=True)
            elif kind == "list":
                value = await client.lrange(raw_key, 0, -1)
            else:
                value = f"<{kind}>"
            parts.append(f"{raw_key!r} => {value!r}")
    finally:
        await client.aclose()
    return "\n".join(parts)


async def test_plaintext_keys_never_reach_redis_or_the_logs(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"rpm": 100, "tpm": 100000, "max_parallel": 5})
    cfg["teams"][0]["budgets"] = {"daily_usd": 100.0}
    gw = await make_gateway(cfg)
    assert (await admin(gw, "POST", "/admin/teams", {"id": "runtime", "limits": {"rpm": 10}}))[0] == 201
    created = [await create_key(gw, team=t, limits={"tpm": 10000}) for t in ("team-a", "runtime")]
    keys = [TEAM_KEY, TEAM_B_KEY, *(c["key"] for c in created)]
    for key in keys:
        client = gw.client(api_key=key)
        await client.chat.completions.create(model="chat", messages=MESSAGES)
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass
        await call(gw, "GET", "/api/v1/usage", {"x-api-key": key})
    with pytest.raises(openai.PermissionDeniedError):
        await gw.client(api_key=MASTER_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    await call(gw, "GET", "/api/v1/usage?team=team-a", ADMIN)
    await admin(gw, "GET", "/admin/keys")
    await gw.gateway.pipeline.drain()

    dump = await dump_namespace(cfg["redis"]["prefix"])
    # The dump does hold the directory and the books (so the scan looked in the right place) ...
    assert hashlib.sha256(created[0]["key"].encode()).hexdigest() in dump
    assert "usage" in dump
    # ... but never a key in plaintext.
    logs = gw.logs.getvalue().decode()
    assert "request" in logs
    for secret in (*keys, MASTER_KEY):
        assert secret not in dump, secret
        assert secret not in logs, secret


@BACKENDS
async def test_numbers_beyond_any_real_limit_are_refused_and_nothing_is_stored(
    upstream, make_gateway, redis
) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    huge = {"id": "t-huge", "limits": {"max_parallel": 4238616804476904800256}}
    status, body = await admin(gw, "POST", "/admin/teams", huge)
    assert status == 400 and "limits.max_parallel" in body["error"]["message"]
    status, body = await admin(gw, "POST", "/admin/keys", {"team": "team-a", "limits": {"rpm": 1e30}})
    assert status == 400
    status, teams = await admin(gw, "GET", "/admin/teams")
    assert status == 200 and "t-huge" not in orjson.dumps(teams).decode()
