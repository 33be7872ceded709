"""Shared fixtures: the project's mock upstream and the gateway, both real servers on loopback.

``make_gateway(cfg)`` builds a gateway from a config dict (see ``base_config``) and starts it on a
free port; ``gw.client()`` is an ``openai.AsyncOpenAI`` pointed at it. Log lines written while a
test runs are captured in ``gw.logs`` (a BytesIO of JSON lines). ``private_redis`` is a started
``tests.helpers.PrivateRedis``; the helpers a test calls itself are in ``tests/helpers.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer
from aiohttp.web_runner import BaseRunner

from gateway import config_parser as config_mod
from gateway import logging as gw_logging
from gateway.config import ServerConfig
from gateway.protocol import GatewayRunner
from gateway.providers import mock
from gateway.runtime import GATEWAY, Gateway
from gateway.server import build_app
from tests.helpers import PrivateRedis, openai_client, openai_sync_client

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PROVIDER_KEY = "sk-provider-secret-0123456789abcdef"


class GatewayTestServer(BaseTestServer):
    """aiohttp's test server serving through the gateway's own runner, as ``llm-gateway serve`` does
    (``gateway.protocol``: deadlines, the connection cap, the malformed-request answer)."""

    def __init__(self, app: web.Application, settings: ServerConfig) -> None:
        super().__init__(host="127.0.0.1")
        self.app, self.settings = app, settings

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:  # the hook BaseTestServer declares
        return GatewayRunner(self.app, self.settings)


@dataclass
class Upstream:
    server: TestServer
    app: web.Application

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))

    @property
    def state(self) -> mock.MockState:
        return self.app[mock.STATE]


@dataclass
class RunningGateway:
    server: GatewayTestServer
    app: web.Application
    logs: io.BytesIO
    clients: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))

    @property
    def root(self) -> str:
        return str(self.server.make_url(""))

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    def client(self, api_key: str = "client-key", **kw: Any) -> openai.AsyncOpenAI:
        """An async SDK client for this gateway (closed when the test ends)."""
        client = openai_client(self.url, api_key, **kw)
        self.clients.append(client)
        return client

    def sync_client(self, api_key: str = "client-key", **kw: Any) -> openai.OpenAI:
        client = openai_sync_client(self.url, api_key, **kw)
        self.clients.append(client)
        return client

    async def http(self, method: str, path: str, key: str | None = None, body: Any = None) -> tuple[int, Any]:
        """One plain HTTP call (admin and usage APIs): the status and the parsed JSON body."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.root + path, headers=headers, json=body) as resp,
        ):
            raw = await resp.read()
            return resp.status, orjson.loads(raw) if raw else None

    async def close(self) -> None:
        for client in self.clients:
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()
        await self.server.close()

    def log_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]


def base_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A config dict with one mock provider at ``upstream_url`` and a model ``chat`` routed to it."""
    cfg: dict[str, Any] = {
        "providers": [
            {
                "name": "primary",
                "type": "openai",
                "base_url": upstream_url,
                "api_key": PROVIDER_KEY,
                "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30},
            }
        ],
        "models": [{"name": "chat", "targets": [{"provider": "primary", "model": "mock-chat"}]}],
        "routing": {"retries": 0, "backoff_seconds": 0.01},
        "plugins": [],
    }
    cfg.update(overrides)
    return cfg


TEAM_KEY = "team-a-key-0123456789"
TEAM_B_KEY = "team-b-key-0123456789"
MASTER_KEY = "master-key-0123456789"


def tenancy_config(upstream_url: str, *, redis: bool = True, **team_a: Any) -> dict[str, Any]:
    """``base_config`` plus auth, limits and budgets: teams ``team-a`` (``TEAM_KEY``, extra fields from
    ``team_a``) and ``team-b`` (``TEAM_B_KEY``), the admin master key, and a Redis namespace of its own
    (or the in-memory store with ``redis=False``)."""
    cfg = base_config(
        upstream_url,
        teams=[
            {"id": "team-a", "api_keys": [TEAM_KEY], **team_a},
            {"id": "team-b", "api_keys": [TEAM_B_KEY]},
        ],
        admin={"master_key": MASTER_KEY},
        plugins=["auth", "rate_limit", "quota"],
    )
    if redis:
        cfg["redis"] = {"url": REDIS_URL, "prefix": f"t{uuid.uuid4().hex[:12]}"}
    return cfg


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    app = mock.build_app()
    server = await aiohttp_server(app)
    return Upstream(server, app)


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[RunningGateway]]]:
    running: list[RunningGateway] = []

    async def start(cfg: dict[str, Any]) -> RunningGateway:
        logs = io.BytesIO()
        gw_logging.configure("info", logs, cache=False)
        config = config_mod.parse(cfg, env={})
        gw_logging.REDACTOR.set_secrets(config.secrets())
        app = build_app(config)
        server = GatewayTestServer(app, config.server)
        await server.start_server()
        gateway = RunningGateway(server, app, logs)
        running.append(gateway)
        return gateway

    yield start
    while running:
        await running.pop().close()


@pytest.fixture
async def gw(upstream: Upstream, make_gateway: Callable[..., Awaitable[RunningGateway]]) -> RunningGateway:
    """A gateway with the default test config in front of the mock upstream."""
    return await make_gateway(base_config(upstream.url))


@pytest.fixture
def private_redis(tmp_path: Any) -> Iterator[PrivateRedis]:
    """A started redis-server of the test's own (killed when the test ends)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()
