"""``gateway.server``'s start-up resources: one cleanup context each, unwound when a later one fails."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from gateway import config_parser as config_mod
from gateway import logging as gw_logging
from gateway.runtime import GATEWAY, Gateway
from gateway.server import build_app
from gateway.state.memory import MemoryStore
from tests.conftest import Upstream, base_config
from tests.helpers import echo_credentials_app


class StoreThatFailsItsFirstProbe(MemoryStore):
    """A state store that breaks while the gateway starts (its first health probe), after the
    provider sessions and the built-in mock are open; it notes what was open at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.gateway: Gateway | None = None
        self.sessions: list[aiohttp.ClientSession] = []
        self.closed = False

    async def ping(self) -> float:
        assert self.gateway is not None
        self.sessions = [p.session for p in self.gateway.providers.values()]
        raise RuntimeError("the store broke during start-up")

    async def close(self) -> None:
        self.closed = True


async def refused(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            await resp.read()
    except aiohttp.ClientConnectionError:
        return True
    return False


async def test_a_resource_failing_at_start_up_closes_every_one_opened_before_it(upstream: Upstream) -> None:
    cfg = base_config(upstream.url)
    cfg["providers"].append({"name": "builtin", "type": "mock"})  # the built-in mock upstream starts too
    cfg["redis"] = {"url": "redis://127.0.0.1:1/0"}  # the store is probed at start-up (the one given here)
    store = StoreThatFailsItsFirstProbe()
    app = build_app(config_mod.parse(cfg, env={}), store=store)
    gw = store.gateway = app[GATEWAY]
    runner = web.AppRunner(app)

    with pytest.raises(RuntimeError, match="the store broke"):
        await runner.setup()
    await runner.cleanup()

    assert len(store.sessions) == 2
    assert all(session.closed for session in store.sessions)  # no "Unclosed client session"
    assert gw.mock_url is not None and await refused(gw.mock_url + "/models")
    assert store.closed
    assert not gw.ready


async def test_an_embedded_app_masks_its_secrets_without_the_cli(aiohttp_server) -> None:
    """``build_app`` alone (no ``llm-gateway serve``, no logging set-up) keeps the provider key out of
    what the client gets, even from an upstream that echoes it back."""
    key = "echo-provider-credential-7f3a9c51"

    echo = await aiohttp_server(echo_credentials_app())
    gw_logging.reset()  # a process that never configured the redactor
    cfg = base_config(str(echo.make_url("/v1")))
    cfg["providers"] = [
        {"name": "echo", "type": "openai", "base_url": str(echo.make_url("/v1")), "api_key": key}
    ]
    cfg["models"] = [{"name": "chat", "targets": [{"provider": "echo", "model": "m"}]}]
    gateway = await aiohttp_server(build_app(config_mod.parse(cfg, env={})))
    async with aiohttp.ClientSession() as session:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(gateway.make_url("/v1/chat/completions"), json=body) as resp:
            text = await resp.text()
    assert resp.status == 400
    assert "bad key" in text and key not in text
