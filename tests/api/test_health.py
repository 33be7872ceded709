"""Health endpoints: liveness, readiness flips, and the detailed report's shape."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.probes import Prober
from tests.conftest import RunningGateway, Upstream, base_config
from tests.helpers import PrivateRedis, eventually


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return r.status, await r.json()


async def test_live_and_ready_on_a_healthy_gateway(gw: RunningGateway) -> None:
    assert await _get(gw.root + "/health/live") == (200, {"status": "ok"})
    assert await _get(gw.root + "/health/ready") == (200, {"status": "ok"})


async def test_detailed_health_shape(gw: RunningGateway) -> None:
    for path in ("/api/v1/monitoring/health", "/api/v1/health"):
        status, body = await _get(gw.root + path)
        assert status == 200
        assert body["status"] == "ok"
        redis = body["info"]["redis"]
        # No Redis configured: reported as what it is, not as "up" (issue #12 item 13).
        assert redis["status"] == "not_configured"
        assert redis["details"]["backend"] == "memory" and redis["details"]["connection"] is False
        assert set(redis["details"]) >= {"connection", "latency"}
        providers = body["info"]["providers"]
        assert providers["status"] == "up"
        primary = providers["details"]["primary"]
        assert primary["status"] == "up"
        assert isinstance(primary["latency"], float)  # the start-up probe measured it


async def test_ready_fails_when_every_target_of_a_model_is_down(
    upstream: Upstream, make_gateway: Any
) -> None:
    cfg = base_config(
        upstream.url, routing={"retries": 0, "circuit_breaker": {"failures": 1, "cooldown_seconds": 30}}
    )
    cfg["models"][0]["targets"] = [{"provider": "primary", "model": "mock-chat:status=500"}]
    gw = await make_gateway(cfg)
    async with aiohttp.ClientSession() as session:
        body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        async with session.post(gw.url + "/chat/completions", json=body) as r:
            assert r.status == 502
    status, ready = await _get(gw.root + "/health/ready")
    assert status == 503
    assert "chat" in ready["reason"]
    status, detail = await _get(gw.root + "/api/v1/monitoring/health")
    assert status == 503
    assert detail["status"] == "error"
    assert detail["info"]["providers"]["details"]["primary"]["status"] == "down"


async def test_ready_flips_with_redis_down_and_back(
    upstream: Upstream, make_gateway: Any, private_redis: PrivateRedis
) -> None:
    cfg = base_config(upstream.url, redis={"url": private_redis.url, "timeout_seconds": 0.2})
    cfg["health"] = {"interval_seconds": 0.1, "timeout_seconds": 0.3}
    gw = await make_gateway(cfg)
    assert (await _get(gw.root + "/health/ready"))[0] == 200

    private_redis.kill()
    await eventually(lambda: _ready_is(gw, 503), within=5.0, interval=0.05)
    _, detail = await _get(gw.root + "/api/v1/monitoring/health")
    assert detail["info"]["redis"] == {
        "status": "down",
        "details": {"connection": False, "latency": None, "backend": "redis"},
    }
    assert (await _get(gw.root + "/health/live"))[0] == 200  # alive, just not ready

    private_redis.start()
    await eventually(lambda: _ready_is(gw, 200), within=5.0, interval=0.05)
    _, detail = await _get(gw.root + "/api/v1/monitoring/health")
    assert detail["info"]["redis"]["details"]["connection"] is True


async def _ready_is(gw: RunningGateway, status: int) -> bool:
    return (await _get(gw.root + "/health/ready"))[0] == status


async def test_health_is_not_probed_per_request(gw: RunningGateway) -> None:
    checked = gw.gateway.prober.provider_health["primary"].checked_at
    assert checked is not None
    for _ in range(5):
        await _get(gw.root + "/api/v1/monitoring/health")
        await _get(gw.root + "/health/ready")
    assert gw.gateway.prober.provider_health["primary"].checked_at == checked


async def test_ready_is_503_while_draining(gw: RunningGateway) -> None:
    gw.gateway.draining = True
    status, body = await _get(gw.root + "/health/ready")
    assert (status, body["reason"]) == (503, "draining")


async def test_prober_marks_an_unreachable_provider_down(gw: RunningGateway) -> None:
    prober: Prober = gw.gateway.prober
    provider = gw.gateway.providers["primary"]
    provider.base_url = "http://127.0.0.1:9"  # discard port: connection refused
    await prober.probe_provider("primary")
    assert prober.provider_health["primary"].status == "down"
