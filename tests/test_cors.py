"""CORS for browser front-ends: only configured origins, preflights answered, streams included."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway import config_parser
from gateway.config import ConfigError
from tests.conftest import TEAM_KEY, Upstream, base_config, tenancy_config

APP = "https://app.example.com"
BODY = {"messages": [{"role": "user", "content": "hi"}]}


async def test_allowed_origins_get_cors_headers_on_answers_streams_and_errors(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["server"] = {"cors_origins": [APP]}
    gw = await make_gateway(cfg)
    async with aiohttp.ClientSession() as session:
        preflight = {"Origin": APP, "Access-Control-Request-Method": "POST"}
        async with session.options(gw.root + "/api/v1/llm/complete", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
            assert "Access-Control-Allow-Credentials" not in r.headers
        key = {"Origin": APP, "Authorization": f"Bearer {TEAM_KEY}"}
        for path in ("/api/v1/llm/complete", "/api/v1/llm/complete/stream"):
            async with session.post(gw.root + path, json=BODY, headers=key) as r:
                await r.read()
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == APP
                assert "x-request-id" in r.headers["Access-Control-Expose-Headers"]
        async with session.post(gw.root + "/api/v1/llm/complete", json=BODY, headers={"Origin": APP}) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == APP  # errors readable
        # An EventSource from the app reads its stream with a ticket.
        async with session.post(gw.root + "/api/v1/llm/complete/stream/ticket", json=BODY, headers=key) as r:
            url = (await r.json())["url"]
        async with session.get(gw.root + url, headers={"Origin": APP}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
            assert b'"done":true' in await r.read()
        # Another origin gets nothing it could use.
        other = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        async with session.options(gw.root + "/api/v1/llm/complete", headers=other) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
        async with session.post(
            gw.root + "/api/v1/llm/complete", json=BODY, headers={**key, "Origin": "https://evil.example"}
        ) as r:
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_no_cors_headers_unless_configured(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(base_config(upstream.url))
    async with aiohttp.ClientSession() as session:
        preflight = {"Origin": APP, "Access-Control-Request-Method": "POST"}
        async with session.options(gw.root + "/v1/chat/completions", headers=preflight) as r:
            assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers
        body = {"model": "chat", **BODY}
        async with session.post(gw.url + "/chat/completions", json=body, headers={"Origin": APP}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("origin", ["*", "https://app.example.com/", "app.example.com", "https://a.com/path"])
def test_check_config_accepts_exact_origins_only(origin: str) -> None:
    cfg = base_config("http://127.0.0.1:9/v1", server={"cors_origins": [origin]})
    with pytest.raises(ConfigError) as caught:
        config_parser.parse(cfg, env={})
    assert any("cors_origins" in p for p in caught.value.problems)
    config_parser.parse(base_config("http://127.0.0.1:9/v1", server={"cors_origins": [APP]}), env={})
