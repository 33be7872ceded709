"""Who may call the gateway: team API keys (config and runtime), JWTs, the master key, allowlists."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import openai
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import MASTER_KEY, TEAM_B_KEY, TEAM_KEY, RunningGateway, tenancy_config
from tests.helpers import eventually, free_port, raw_request

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "chat", "messages": MESSAGES}
BACKENDS = pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
AUDIENCE = "llm-gateway"
ISSUER = "https://id.example.com"
HS_SECRET = "jwt-hs-secret-" + "0123456789abcdef" * 4


async def call(
    gw: RunningGateway,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    """One HTTP call with aiohttp (no SDK): status and the parsed JSON body (None when empty)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.root + path, headers=headers or {}, json=body) as resp,
    ):
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(body: Any, type_: str, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_, err
    if code is not None:
        assert err["code"] == code, err
    return err


async def create_key(gw: RunningGateway, **fields: Any) -> dict[str, Any]:
    status, body = await call(gw, "POST", "/admin/keys", bearer(MASTER_KEY), fields)
    assert status == 201, body
    return dict(body)


async def chat_status(gw: RunningGateway, key: str, model: str = "chat") -> int:
    status, _ = await call(
        gw, "POST", "/v1/chat/completions", bearer(key), {"model": model, "messages": MESSAGES}
    )
    return status


def with_second_model(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["models"].append({"name": "other", "targets": [{"provider": "primary", "model": "mock-other"}]})
    return cfg


# --- API keys --------------------------------------------------------------------------------------------


async def test_bearer_and_x_api_key_both_accepted(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    reply = await gw.client(api_key=TEAM_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content == "Mock answer: hi"
    status, body = await call(gw, "POST", "/v1/chat/completions", {"x-api-key": TEAM_B_KEY}, CHAT)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Mock answer: hi"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        (bearer("wrong-key-0123456789"), "invalid_api_key"),
        ({"x-api-key": "wrong-key-0123456789"}, "invalid_api_key"),
        ({"Authorization": f"Basic {TEAM_KEY}"}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
        ({"Authorization": "Bearer    "}, "missing_api_key"),
        ({"Authorization": TEAM_KEY}, "missing_api_key"),
    ],
    ids=[
        "none",
        "wrong-bearer",
        "wrong-x-api-key",
        "basic-scheme",
        "bearer-empty",
        "bearer-blank",
        "no-scheme",
    ],
)
async def test_missing_wrong_or_malformed_key_is_401(upstream, make_gateway, headers, code) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    for path, method, body in (("/v1/chat/completions", "POST", CHAT), ("/v1/models", "GET", None)):
        status, answer = await call(gw, method, path, headers, body)
        assert status == 401, answer
        err = assert_error(answer, "authentication_error", code)
        assert "wrong-key" not in err["message"]
    assert upstream.state.count == 0


# --- ambiguous credentials (issue #12) ---------------------------------------------------------------------
# Two copies of the caller's key are refused, never settled by taking one: a proxy in front that checked the
# other copy would disagree with the gateway about who is calling. These need a raw request: HTTP clients
# (aiohttp, the openai SDK) merge a header given twice before sending it.

A, B = f"Bearer {TEAM_KEY}", f"Bearer {TEAM_B_KEY}"
AMBIGUOUS = {
    "authorization-twice": [("Authorization", A), ("Authorization", B)],
    "authorization-in-two-spellings": [("Authorization", A), ("authorization", B)],
    "authorization-twice-same-key": [("authorization", A), ("AUTHORIZATION", A)],
    "authorization-then-empty": [("Authorization", A), ("Authorization", "")],
    "empty-then-authorization": [("Authorization", ""), ("Authorization", A)],
    "x-api-key-twice": [("x-api-key", TEAM_KEY), ("X-API-Key", TEAM_B_KEY)],
    "x-api-key-then-empty": [("x-api-key", TEAM_KEY), ("x-api-key", "")],
    "bearer-and-another-x-api-key": [("Authorization", A), ("x-api-key", TEAM_B_KEY)],
    "x-api-key-and-another-bearer": [("x-api-key", TEAM_B_KEY), ("Authorization", A)],
    "bearer-and-empty-x-api-key": [("Authorization", A), ("x-api-key", "")],
    "bearer-and-x-api-key-with-the-scheme": [("Authorization", A), ("x-api-key", A)],
    "bearer-and-x-api-key-with-more": [("Authorization", A), ("x-api-key", f"{TEAM_KEY} {TEAM_B_KEY}")],
    "basic-and-x-api-key": [("Authorization", f"Basic {TEAM_KEY}"), ("x-api-key", TEAM_KEY)],
    "empty-bearer-and-x-api-key": [("Authorization", "Bearer"), ("x-api-key", TEAM_KEY)],
}
NATIVE = {"messages": MESSAGES, "options": {"model": "chat"}}


def assert_ambiguous(status: int, body: Any, *secrets: str, type_: str = "authentication_error") -> None:
    assert status == 401, body
    err = body["error"]
    assert err["type"] == type_ and err["code"] == "ambiguous_credentials", err
    assert "ambiguous" in err["message"]
    for secret in secrets:
        assert secret not in err["message"]


@pytest.mark.parametrize("headers", list(AMBIGUOUS.values()), ids=list(AMBIGUOUS))
async def test_ambiguous_credentials_are_401_on_every_api(upstream, make_gateway, headers) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    secrets = (TEAM_KEY, TEAM_B_KEY)
    for method, path, body in (
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/v1/models", None),
        ("GET", "/api/v1/usage", None),
        ("GET", "/admin/teams", None),
    ):
        status, answer = await raw_request(gw.root, method, path, headers, body)
        assert_error(answer, "authentication_error")
        assert_ambiguous(status, answer, *secrets)
    # The native API, in its own error shape.
    status, answer = await raw_request(gw.root, "POST", "/api/v1/llm/complete", headers, NATIVE)
    assert_ambiguous(status, answer, *secrets, type_="INVALID_REQUEST")
    assert set(answer["error"]) == {"type", "code", "message", "provider", "requestId"}
    # GraphQL over HTTP: refused before the document is even parsed.
    status, answer = await raw_request(gw.root, "POST", "/graphql", headers, {"query": "{ models { name } }"})
    assert answer["data"] is None, answer
    assert answer["errors"][0]["extensions"]["errorCode"] == "ambiguous_credentials"
    assert upstream.state.count == 0
    assert TEAM_KEY not in gw.logs.getvalue().decode() and TEAM_B_KEY not in gw.logs.getvalue().decode()


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", A), ("x-api-key", TEAM_KEY)],
        [("x-api-key", TEAM_KEY), ("authorization", f"bearer   {TEAM_KEY}")],
    ],
    ids=["same-key", "same-key-other-spelling-and-spaces"],
)
async def test_the_same_key_in_both_headers_is_served(upstream, make_gateway, headers) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    status, body = await raw_request(gw.root, "POST", "/v1/chat/completions", headers, CHAT)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Mock answer: hi"
    status, body = await raw_request(gw.root, "POST", "/api/v1/llm/complete", headers, NATIVE)
    assert status == 200, body
    assert [line["team"] for line in gw.log_lines() if line.get("event") == "request"] == ["team-a"] * 2


async def test_sdk_default_headers_naming_another_key_are_refused(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    client = gw.client(api_key=TEAM_KEY, default_headers={"x-api-key": TEAM_B_KEY})
    for stream in (False, True):
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES, stream=stream)
        assert caught.value.status_code == 401
        assert caught.value.code == "ambiguous_credentials"
    assert upstream.state.count == 0
    agreeing = gw.client(api_key=TEAM_KEY, default_headers={"x-api-key": TEAM_KEY})
    reply = await agreeing.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content == "Mock answer: hi"


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", f"Bearer {TEAM_KEY}"), ("x-api-key", MASTER_KEY)],
        [("Authorization", f"Bearer {MASTER_KEY}"), ("x-api-key", TEAM_KEY)],
        [("Authorization", f"Bearer {TEAM_KEY}"), ("authorization", f"Bearer {MASTER_KEY}")],
        [("Authorization", f"Bearer {MASTER_KEY}"), ("Authorization", f"Bearer {TEAM_KEY}")],
        [("x-api-key", MASTER_KEY), ("x-api-key", MASTER_KEY)],
    ],
    ids=[
        "team-bearer-master-x-api-key",
        "master-bearer-team-x-api-key",
        "team-then-master",
        "master-then-team",
        "master-x-api-key-twice",
    ],
)
async def test_admin_api_refuses_ambiguous_credentials(upstream, make_gateway, headers) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    status, body = await raw_request(gw.root, "POST", "/admin/teams", headers, {"id": "team-x"})
    assert_ambiguous(status, body, MASTER_KEY, TEAM_KEY)
    status, body = await raw_request(gw.root, "GET", "/admin/teams", [("x-api-key", MASTER_KEY)])
    assert status == 200 and "team-x" not in orjson.dumps(body).decode()


async def test_sdk_raises_authentication_error_for_a_wrong_key(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    with pytest.raises(openai.AuthenticationError) as caught:
        await gw.client(api_key="sk-not-a-real-key-0123456789").chat.completions.create(
            model="chat", messages=MESSAGES
        )
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


async def test_sha256_config_key(upstream, make_gateway) -> None:
    secret = "hashed-only-key-0123456789"
    cfg = tenancy_config(upstream.url)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    cfg["teams"][1]["api_keys"] = [f"sha256:{digest.upper()}"]
    gw = await make_gateway(cfg)
    reply = await gw.client(api_key=secret).chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content
    # The digest itself is not a key.
    assert await chat_status(gw, digest) == 401
    assert await chat_status(gw, f"sha256:{digest}") == 401


async def test_team_model_allowlist(upstream, make_gateway) -> None:
    gw = await make_gateway(with_second_model(tenancy_config(upstream.url, models=["chat"])))
    client = gw.client(api_key=TEAM_KEY)
    assert (await client.chat.completions.create(model="chat", messages=MESSAGES)).choices
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="other", messages=MESSAGES)
    assert caught.value.status_code == 403
    assert caught.value.body["type"] == "permission_error"  # type: ignore[index]
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert upstream.state.calls("mock-other") == 0
    assert [m.id async for m in client.models.list()] == ["chat"]
    # team-b has no allowlist: every model.
    other = gw.client(api_key=TEAM_B_KEY)
    assert [m.id async for m in other.models.list()] == ["chat", "other"]
    assert (await other.chat.completions.create(model="other", messages=MESSAGES)).choices


@BACKENDS
async def test_runtime_key_model_allowlist(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(with_second_model(tenancy_config(upstream.url, redis=redis)))
    created = await create_key(gw, team="team-b", models=["other"])
    client = gw.client(api_key=created["key"])
    assert (await client.chat.completions.create(model="other", messages=MESSAGES)).choices
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert [m.id async for m in client.models.list()] == ["other"]
    # The team's own key is not narrowed by its runtime key's list.
    assert await chat_status(gw, TEAM_B_KEY) == 200


async def test_key_allowlist_cannot_widen_the_team_allowlist(upstream, make_gateway) -> None:
    gw = await make_gateway(with_second_model(tenancy_config(upstream.url, models=["chat"])))
    created = await create_key(gw, team="team-a", models=["chat", "other"])
    assert await chat_status(gw, created["key"], "other") == 403
    assert await chat_status(gw, created["key"], "chat") == 200


@BACKENDS
async def test_expired_key_is_401(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    expired = await create_key(gw, team="team-a", expires_at=past)
    status, body = await call(gw, "POST", "/v1/chat/completions", bearer(expired["key"]), CHAT)
    assert status == 401
    assert_error(body, "authentication_error")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    valid = await create_key(gw, team="team-a", expires_at=future)
    assert await chat_status(gw, valid["key"]) == 200


async def test_key_expiring_while_in_use_is_refused(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat()
    created = await create_key(gw, team="team-a", expires_at=soon)
    assert await chat_status(gw, created["key"]) == 200
    await asyncio.sleep(1.1)
    assert await chat_status(gw, created["key"]) == 401


@BACKENDS
async def test_key_of_a_deleted_team_is_401(upstream, make_gateway, redis) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=redis))
    status, body = await call(gw, "POST", "/admin/teams", bearer(MASTER_KEY), {"id": "temp"})
    assert status == 201, body
    created = await create_key(gw, team="temp")
    assert await chat_status(gw, created["key"]) == 200
    status, _ = await call(gw, "DELETE", "/admin/teams/temp", bearer(MASTER_KEY))
    assert status == 204
    status, body = await call(gw, "POST", "/v1/chat/completions", bearer(created["key"]), CHAT)
    assert status == 401
    assert_error(body, "authentication_error")


async def test_master_key_is_not_a_team_key(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gw.client(api_key=MASTER_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 403
    assert upstream.state.count == 0


async def test_unknown_model_is_only_revealed_after_auth(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    with pytest.raises(openai.NotFoundError) as caught:
        await gw.client(api_key=TEAM_KEY).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    body = {"model": "no-such-model", "messages": MESSAGES}
    for headers in ({}, bearer("wrong-key-0123456789")):
        status, answer = await call(gw, "POST", "/v1/chat/completions", headers, body)
        assert status == 401
        assert_error(answer, "authentication_error")


async def test_refused_requests_take_no_rate_limit_tokens(upstream, make_gateway) -> None:
    cfg = with_second_model(tenancy_config(upstream.url, models=["chat"], limits={"rpm": 2}))
    gw = await make_gateway(cfg)
    for _ in range(3):
        assert await chat_status(gw, TEAM_KEY, "no-such-model") == 404
        assert await chat_status(gw, TEAM_KEY, "other") == 403
    assert [await chat_status(gw, TEAM_KEY) for _ in range(3)] == [200, 200, 429]


# --- revocation across instances -------------------------------------------------------------------------


async def test_key_revoked_on_one_instance_is_refused_by_another_within_a_second(
    upstream, make_gateway
) -> None:
    cfg = tenancy_config(upstream.url)
    a, b = await make_gateway(cfg), await make_gateway(cfg)
    created = await create_key(a, team="team-a", name="shared")
    assert await chat_status(b, created["key"]) == 200  # B now holds the key in its cache
    status, _ = await call(a, "DELETE", f"/admin/keys/{created['id']}", bearer(MASTER_KEY))
    assert status == 204
    revoked = time.monotonic()
    assert await chat_status(a, created["key"]) == 401  # at once on the instance that revoked it
    while True:
        status = await chat_status(b, created["key"])
        elapsed = time.monotonic() - revoked
        if status == 401:
            break
        assert status == 200
        assert elapsed <= 1.2, "instance B still accepts a revoked key"
        await asyncio.sleep(0.05)
    assert elapsed <= 1.2


# --- JWT -------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "user-1", "team": "team-a", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 300}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[Any, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public_pem


@pytest.fixture(scope="module")
def other_rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwt_config(upstream_url: str, jwt_settings: dict[str, Any]) -> dict[str, Any]:
    cfg = tenancy_config(upstream_url)
    cfg["auth"] = {"jwt": {"audience": AUDIENCE, "issuer": ISSUER, "team_claim": "team", **jwt_settings}}
    return cfg


@pytest.fixture
async def rs_gateway(upstream, make_gateway, rsa_keys, tmp_path: Path) -> RunningGateway:
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(rsa_keys[1])
    settings = {"algorithms": ["RS256"], "public_key_file": str(pem)}
    return await make_gateway(jwt_config(upstream.url, settings))


def rs256(private: Any, **claims: Any) -> str:
    return jwt.encode(_claims(**claims), private, algorithm="RS256")


async def test_jwt_with_team_claim_is_served(rs_gateway, rsa_keys) -> None:
    client = rs_gateway.client(api_key=rs256(rsa_keys[0]))
    reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content == "Mock answer: hi"
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Mock answer: hi"
    # Team keys keep working next to JWTs.
    assert await chat_status(rs_gateway, TEAM_B_KEY) == 200


def _bad_tokens(private: Any, other: Any, public_pem: bytes) -> dict[str, str]:
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    confused = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    none_input = (
        f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(_claims()).encode())}"
    )
    valid = rs256(private)
    head, _, sig = valid.split(".")
    forged_claims = _b64(json.dumps(_claims(team="team-b", role="admin")).encode())
    return {
        "expired": rs256(private, iat=now - 600, exp=now - 60),
        "not-yet-valid": rs256(private, nbf=now + 300),
        "wrong-audience": rs256(private, aud="someone-else"),
        "wrong-issuer": rs256(private, iss="https://evil.example.com"),
        "missing-exp": rs256(private, exp=None),
        "missing-aud": rs256(private, aud=None),
        "wrong-signing-key": rs256(other),
        "alg-none": none_input + ".",
        "alg-none-with-signature": f"{none_input}.{sig}",
        "hs256-with-public-key": f"{signing_input}.{_b64(confused)}",
        "tampered-payload": f"{head}.{forged_claims}.{sig}",
        "unknown-team": rs256(private, team="no-such-team"),
        "no-team-claim": rs256(private, team=None),
        "garbage": "eyJhbGciOiJSUzI1NiJ9.not-base64!.x",
    }


BAD_TOKENS = [
    "expired",
    "not-yet-valid",
    "wrong-audience",
    "wrong-issuer",
    "missing-exp",
    "missing-aud",
    "wrong-signing-key",
    "alg-none",
    "alg-none-with-signature",
    "hs256-with-public-key",
    "tampered-payload",
    "unknown-team",
    "no-team-claim",
    "garbage",
]


@pytest.mark.parametrize("case", BAD_TOKENS)
async def test_bad_jwt_is_401(rs_gateway, upstream, rsa_keys, other_rsa_key, case) -> None:
    token = _bad_tokens(rsa_keys[0], other_rsa_key, rsa_keys[1])[case]
    status, body = await call(rs_gateway, "POST", "/v1/chat/completions", bearer(token), CHAT)
    assert status == 401, body
    assert_error(body, "authentication_error")
    status, body = await call(rs_gateway, "GET", "/admin/teams", bearer(token))
    assert status == 401, body
    assert upstream.state.count == 0


async def test_jwt_admin_role_grants_the_admin_api(rs_gateway, rsa_keys) -> None:
    admin = rs256(rsa_keys[0], team=None, role="admin")
    status, body = await call(rs_gateway, "GET", "/admin/teams", bearer(admin))
    assert status == 200, body
    assert {t["id"] for t in body["data"]} >= {"team-a", "team-b"}
    status, body = await call(rs_gateway, "POST", "/admin/keys", bearer(admin), {"team": "team-b"})
    assert status == 201, body
    assert await chat_status(rs_gateway, body["key"]) == 200
    # A team token without the role claim is a team caller, never an admin.
    team_token = rs256(rsa_keys[0])
    for method, path in (("GET", "/admin/teams"), ("GET", "/admin/keys"), ("DELETE", "/admin/teams/team-a")):
        status, body = await call(rs_gateway, method, path, bearer(team_token))
        assert status == 403, (method, path, body)
        assert_error(body, "permission_error")
    # An admin token is not a team token: no model calls with it.
    assert await chat_status(rs_gateway, admin) == 403
    # A different role is no admin either.
    status, _ = await call(rs_gateway, "GET", "/admin/teams", bearer(rs256(rsa_keys[0], role="viewer")))
    assert status == 403


async def test_jwks_file_as_public_key(upstream, make_gateway, rsa_keys, other_rsa_key, tmp_path) -> None:
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), "kid": kid, "use": "sig"}
            for kid, k in (("old", other_rsa_key), ("current", rsa_keys[0]))
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    gw = await make_gateway(jwt_config(upstream.url, {"algorithms": ["RS256"], "public_key_file": str(path)}))
    for kid, private in (("current", rsa_keys[0]), ("old", other_rsa_key)):
        token = jwt.encode(_claims(), private, algorithm="RS256", headers={"kid": kid})
        reply = await gw.client(api_key=token).chat.completions.create(model="chat", messages=MESSAGES)
        assert reply.choices[0].message.content
    # Without a kid every published key is tried.
    assert await chat_status(gw, rs256(rsa_keys[0])) == 200
    # A kid names the one key to check: a token signed by another published key is refused.
    mislabelled = jwt.encode(_claims(), rsa_keys[0], algorithm="RS256", headers={"kid": "old"})
    assert await chat_status(gw, mislabelled) == 401


async def test_hs256_secret(upstream, make_gateway) -> None:
    gw = await make_gateway(jwt_config(upstream.url, {"algorithms": ["HS256"], "secret": HS_SECRET}))
    token = jwt.encode(_claims(team="team-b"), HS_SECRET, algorithm="HS256")
    reply = await gw.client(api_key=token).chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content
    for bad in (
        jwt.encode(_claims(), "another-secret-" + "fedcba9876543210" * 4, algorithm="HS256"),
        jwt.encode(_claims(), HS_SECRET, algorithm="HS512"),
        jwt.encode(_claims(aud="other"), HS_SECRET, algorithm="HS256"),
    ):
        assert await chat_status(gw, bad) == 401


async def test_hmac_with_the_public_key_is_refused_even_when_hs256_is_allowed(
    upstream, make_gateway, rsa_keys, tmp_path
) -> None:
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(rsa_keys[1])
    settings = {"algorithms": ["RS256", "HS256"], "public_key_file": str(pem), "secret": HS_SECRET}
    gw = await make_gateway(jwt_config(upstream.url, settings))
    assert await chat_status(gw, rs256(rsa_keys[0])) == 200
    assert await chat_status(gw, jwt.encode(_claims(), HS_SECRET, algorithm="HS256")) == 200
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(_claims()).encode())}"
    forged = hmac.new(rsa_keys[1], signing_input.encode(), hashlib.sha256).digest()
    assert await chat_status(gw, f"{signing_input}.{_b64(forged)}") == 401


# --- JWT keys from a JWKS URL ----------------------------------------------------------------------------


def jwk_of(private: Any, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def kid_token(private: Any, kid: str, **claims: Any) -> str:
    return jwt.encode(_claims(**claims), private, algorithm="RS256", headers={"kid": kid})


class JwksServer:
    """A small identity provider on a loopback port of its own: serves ``jwks`` at /jwks.json and
    counts the requests it receives; ``status``/``redirect_to``/``delay`` change how it answers."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.jwks: dict[str, Any] = {"keys": []}
        self.hits = 0
        self.status = 200
        self.redirect_to: str | None = None
        self.delay = 0.0
        self.runner: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        if self.status != 200:
            return web.Response(status=self.status, text="identity provider trouble")
        return web.json_response(self.jwks)

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/jwks.json", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def jwks_server() -> Any:
    servers: list[JwksServer] = []

    async def make(*keys: dict[str, Any], start: bool = True) -> JwksServer:
        server = JwksServer()
        server.jwks = {"keys": list(keys)}
        servers.append(server)
        if start:
            await server.start()
        return server

    yield make
    for server in servers:
        await server.stop()


def jwks_gateway_config(upstream_url: str, url: str, refresh: float = 300) -> dict[str, Any]:
    return jwt_config(
        upstream_url, {"algorithms": ["RS256"], "jwks_url": url, "jwks_refresh_seconds": refresh}
    )


def events(gw: RunningGateway, name: str) -> list[dict[str, Any]]:
    return [e for e in gw.log_lines() if e.get("event") == name]


async def test_jwks_url_keys_verify_tokens_end_to_end(
    upstream, make_gateway, jwks_server, rsa_keys, other_rsa_key
) -> None:
    idp = await jwks_server(
        jwk_of(rsa_keys[0], "k1"),
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},  # unusable: skipped, not fatal
        {"kty": "oct", "kid": "shared", "k": _b64(b"not-a-public-key")},  # a shared secret: ignored
    )
    gw = await make_gateway(jwks_gateway_config(upstream.url, idp.url))
    assert idp.hits == 1  # fetched at start-up
    client = gw.client(api_key=kid_token(rsa_keys[0], "k1"))
    reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content == "Mock answer: hi"
    assert await chat_status(gw, rs256(rsa_keys[0])) == 200  # no kid: every published key is tried
    # Every existing refusal holds with keys from a URL, and none of them fetches the JWKS again.
    for case, token in _bad_tokens(rsa_keys[0], other_rsa_key, rsa_keys[1]).items():
        status, body = await call(gw, "POST", "/v1/chat/completions", bearer(token), CHAT)
        assert status == 401, (case, body)
        assert_error(body, "authentication_error")
    assert idp.hits == 1
    assert upstream.state.count == 2
    verifier = gw.gateway.auth.jwt
    assert verifier is not None
    assert {k.key_id for k in verifier._keys} == {"k1"}  # the broken key and the shared secret skipped


async def test_jwks_key_rotation_needs_no_restart(
    upstream, make_gateway, jwks_server, rsa_keys, other_rsa_key
) -> None:
    idp = await jwks_server(jwk_of(rsa_keys[0], "k1"))
    gw = await make_gateway(jwks_gateway_config(upstream.url, idp.url))
    rotated = kid_token(other_rsa_key, "k2")
    assert await chat_status(gw, kid_token(rsa_keys[0], "k1")) == 200
    idp.jwks = {"keys": [jwk_of(rsa_keys[0], "k1"), jwk_of(other_rsa_key, "k2")]}
    assert await chat_status(gw, rotated) == 200  # the unknown kid triggered one fetch
    assert idp.hits == 2
    assert await chat_status(gw, rotated) == 200
    assert await chat_status(gw, kid_token(rsa_keys[0], "k1")) == 200
    assert idp.hits == 2


async def test_unknown_kids_fetch_at_most_once_per_window(
    upstream, make_gateway, jwks_server, rsa_keys, other_rsa_key
) -> None:
    idp = await jwks_server(jwk_of(rsa_keys[0], "k1"))
    idp.delay = 0.2  # a slow IdP: the burst piles up on the fetch under way
    gw = await make_gateway(jwks_gateway_config(upstream.url, idp.url))
    assert idp.hits == 1
    made_up = [kid_token(other_rsa_key, f"made-up-{i}") for i in range(25)]
    assert await asyncio.gather(*(chat_status(gw, t) for t in made_up)) == [401] * 25
    assert idp.hits == 2  # one shared fetch for the whole burst
    assert await asyncio.gather(*(chat_status(gw, t) for t in made_up)) == [401] * 25
    assert idp.hits == 2  # inside the window: no fetch at all
    assert await chat_status(gw, kid_token(rsa_keys[0], "k1")) == 200
    verifier = gw.gateway.auth.jwt
    assert verifier is not None
    verifier.on_demand_interval = 0.3  # an instance override, so the test need not wait 10 s
    await asyncio.sleep(0.35)
    assert await asyncio.gather(*(chat_status(gw, t) for t in made_up[:5])) == [401] * 5
    assert idp.hits == 3  # the next window allows exactly one more


async def test_jwks_redirect_is_not_followed(upstream, make_gateway, jwks_server, rsa_keys) -> None:
    target = await jwks_server(jwk_of(rsa_keys[0], "k1"))
    idp = await jwks_server()
    idp.redirect_to = target.url
    gw = await make_gateway(jwks_gateway_config(upstream.url, idp.url, refresh=0.1))
    token = kid_token(rsa_keys[0], "k1")
    status, body = await call(gw, "POST", "/v1/chat/completions", bearer(token), CHAT)
    assert status == 503, body
    assert_error(body, "service_unavailable", "jwks_unavailable")
    # a few background refreshes: each one a refused redirect
    await eventually(lambda: idp.hits >= 3, within=5.0, interval=0.05)
    assert await chat_status(gw, token) == 503
    assert target.hits == 0
    assert upstream.state.count == 0


async def test_jwks_server_down_at_start_up_is_503_until_it_comes_up(
    upstream, make_gateway, jwks_server, rsa_keys
) -> None:
    idp = await jwks_server(jwk_of(rsa_keys[0], "k1"), start=False)
    gw = await make_gateway(jwks_gateway_config(upstream.url, idp.url, refresh=0.1))
    token = kid_token(rsa_keys[0], "k1")
    for path, method, payload in (("/v1/chat/completions", "POST", CHAT), ("/v1/models", "GET", None)):
        status, body = await call(gw, method, path, bearer(token), payload)
        assert status == 503, body
        assert_error(body, "service_unavailable", "jwks_unavailable")
    # API keys do not depend on the identity provider.
    assert await chat_status(gw, TEAM_KEY) == 200
    await asyncio.sleep(0.3)  # several failed refreshes: logged once for the whole streak
    assert len(events(gw, "jwks_refresh_failed")) == 1
    await idp.start()

    async def served() -> bool:
        return await chat_status(gw, token) == 200

    await eventually(served, within=5.0, interval=0.05)
    assert [e["recovered"] for e in events(gw, "jwks_loaded")] == [True]
    assert token not in gw.logs.getvalue().decode()


async def test_failed_jwks_refresh_keeps_the_last_good_keys(
    upstream, make_gateway, jwks_server, rsa_keys
) -> None:
    idp = await jwks_server(jwk_of(rsa_keys[0], "k1"))
    gw = await make_gateway(jwks_gateway_config(upstream.url, idp.url, refresh=0.1))
    token = kid_token(rsa_keys[0], "k1")
    assert await chat_status(gw, token) == 200
    for trouble in ("error", "not-a-jwks", "down"):
        if trouble == "error":
            idp.status = 500
        elif trouble == "not-a-jwks":
            idp.status, idp.jwks = 200, {"keys": []}
        else:
            await idp.stop()
        seen = idp.hits
        if trouble == "down":
            await asyncio.sleep(0.35)  # a few refreshes, every one failing
        else:
            await eventually(lambda seen=seen: idp.hits >= seen + 2, within=5.0, interval=0.05)
        assert await chat_status(gw, token) == 200, trouble
    assert len(events(gw, "jwks_refresh_failed")) == 1  # one streak, one line
    assert not events(gw, "jwks_loaded")[1:]  # only the start-up load
