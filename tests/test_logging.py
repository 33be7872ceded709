"""Logs: JSON lines, one access line per request with the request's facts, and never a secret."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import structlog

from gateway.logging import REDACTED, Redactor
from tests.conftest import MASTER_KEY, PROVIDER_KEY, TEAM_KEY, Upstream, tenancy_config


async def test_access_line_has_every_field(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url, redis=False)
    cfg["models"][0]["pricing"] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    gw = await make_gateway(cfg)
    client = gw.client(api_key=TEAM_KEY, default_headers={"x-request-id": "trace-abc-123"})
    await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}])
    lines = [line for line in gw.log_lines() if line.get("event") == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "trace-abc-123"
    assert line["team"] == "team-a"
    assert line["model"] == "chat"
    assert line["provider"] == "primary"
    assert line["upstream_model"] == "mock-chat"
    assert line["status"] == 200
    assert line["attempts"] == 1
    assert line["latency_ms"] > 0
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0
    assert line["cost_usd"] > 0
    assert "timestamp" in line and line["level"] == "info"


async def test_no_secret_in_any_log_line(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=False))
    ok = gw.client(api_key=TEAM_KEY)
    await ok.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    stream = await ok.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}], stream=True
    )
    [c async for c in stream]
    with pytest.raises(openai.AuthenticationError):
        await gw.client(api_key="sk-wrong-key-abcdef123456").chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.PermissionDeniedError):
        await gw.client(api_key=MASTER_KEY).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]
        )
    raw = gw.logs.getvalue().decode()
    assert raw.strip(), "the gateway logged nothing"
    for secret in (TEAM_KEY, MASTER_KEY, PROVIDER_KEY, "sk-wrong-key-abcdef123456"):
        assert secret not in raw
    assert gw.log_lines()  # every line parses as JSON


async def test_redactor_masks_secrets_a_bug_tries_to_log(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(tenancy_config(upstream.url, redis=False))
    log = structlog.get_logger("test")
    log.error(
        "oops",
        headers={"Authorization": "Bearer abcdefghijklmnop"},
        detail=f"provider key was {PROVIDER_KEY}",
        items=["sk-live-0123456789abcdef", "harmless"],
    )
    line = gw.log_lines()[-1]
    assert line["headers"]["Authorization"] == REDACTED
    assert PROVIDER_KEY not in line["detail"] and REDACTED in line["detail"]
    assert line["items"] == [REDACTED, "harmless"]


def test_redactor_keeps_ordinary_text() -> None:
    redact = Redactor(["s3cret-value-xyz"])
    event = {"event": "request", "model": "chat", "note": "uses s3cret-value-xyz", "n": 3}
    assert redact(None, "info", event) == {
        "event": "request",
        "model": "chat",
        "note": f"uses {REDACTED}",
        "n": 3,
    }
