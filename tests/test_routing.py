"""Fallback, retries, circuit breakers and what reaches the upstream, seen through the official SDK.

Every model here has two targets on the project's mock upstream: ``primary`` (upstream model
``mock-a``, where the fault is injected) and ``secondary`` (``mock-b``, healthy unless a test says
otherwise), each provider with its own key.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import config_parser as config_mod
from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.limits.limiter import Limiter
from gateway.limits.upstream import UpstreamLimits
from gateway.providers import create
from gateway.relay import unary_attempt
from gateway.routing import CircuitBreaker, Router
from gateway.state.memory import MemoryStore
from tests.conftest import PROVIDER_KEY, RunningGateway, Upstream, base_config
from tests.helpers import echo_credentials_app, eventually, free_port

SECOND_KEY = "sk-second-provider-secret-fedcba9876543210"
ECHO_KEY = "echo-provider-key-5c1e9b2a7d"  # likewise: only the configured-secret list can mask it
CLIENT_KEY = "client-key-7f3a9c2e1d5b4a68"  # no sk- prefix: the log redactor has no pattern for it
MESSAGES = [{"role": "user", "content": "hello"}]
ANSWER = "Mock answer: hello"
FAST = {"connect": 1, "first_byte": 0.3, "idle": 2, "total": 10}
MakeGateway = Callable[[dict[str, Any]], Awaitable[RunningGateway]]
both_modes = pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])


def two_targets(
    upstream_url: str,
    first: str = "mock-a",
    second: str = "mock-b",
    *,
    primary_url: str | None = None,
    primary_timeouts: dict[str, float] | None = None,
    **routing: Any,
) -> dict[str, Any]:
    timeouts = {"connect": 1, "first_byte": 5, "idle": 5, "total": 30}
    return {
        "providers": [
            {
                "name": "primary",
                "type": "openai",
                "base_url": primary_url or upstream_url,
                "api_key": PROVIDER_KEY,
                "timeouts": primary_timeouts or timeouts,
            },
            {
                "name": "secondary",
                "type": "openai",
                "base_url": upstream_url,
                "api_key": SECOND_KEY,
                "timeouts": timeouts,
            },
        ],
        "models": [
            {
                "name": "chat",
                "targets": [
                    {"provider": "primary", "model": first},
                    {"provider": "secondary", "model": second},
                ],
            }
        ],
        "routing": {"retries": 0, "backoff_seconds": 0.01, **routing},
        "plugins": [],
    }


async def ask(client: openai.AsyncOpenAI, stream: bool, **kw: Any) -> tuple[str, Any]:
    """One chat call; the full answer text and the response headers."""
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, stream=stream, **kw
    )
    if stream:
        chunks = raw.parse()
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    else:
        text = raw.parse().choices[0].message.content or ""
    return text, raw.headers


async def fail(client: openai.AsyncOpenAI, stream: bool) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        await ask(client, stream)
    return info.value


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error response (and check that shape)."""
    body = exc.response.json()
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and isinstance(err["type"], str)
    assert "Traceback" not in exc.response.text
    return err


def gaps(upstream: Upstream, model: str) -> list[float]:
    """Seconds between consecutive upstream calls for ``model``."""
    starts = [r.started for r in upstream.state.requests if r.model.split(":", 1)[0] == model]
    return [b - a for a, b in itertools.pairwise(starts)]


# --- fallback -----------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("status", [500, 503, 429, 402, 401, 403])
async def test_upstream_failure_falls_back_to_the_next_target(
    upstream: Upstream, make_gateway: MakeGateway, status: int, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url, f"mock-a:status={status}"))
    text, headers = await ask(gw.client(), stream)
    assert text == ANSWER
    assert headers["x-gateway-provider"] == "secondary"
    assert headers["x-gateway-upstream-model"] == "mock-b"
    assert headers["x-gateway-attempts"] == "2"
    assert upstream.state.calls("mock-a") == 1
    assert upstream.state.calls("mock-b") == 1
    # each provider is called with its own key
    assert [r.headers["Authorization"] for r in upstream.state.requests] == [
        f"Bearer {PROVIDER_KEY}",
        f"Bearer {SECOND_KEY}",
    ]


@both_modes
async def test_healthy_first_target_answers_alone(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url))
    text, headers = await ask(gw.client(), stream)
    assert text == ANSWER
    assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("primary", "1")
    assert upstream.state.calls("mock-b") == 0


@both_modes
async def test_connection_refused_falls_back(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens there
    gw = await make_gateway(two_targets(upstream.url, primary_url=dead))
    started = time.monotonic()
    text, headers = await ask(gw.client(), stream)
    assert text == ANSWER
    assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("secondary", "2")
    assert time.monotonic() - started < 2


@both_modes
@pytest.mark.parametrize("fault", ["first_byte_delay=3", "hang"])
async def test_first_byte_timeout_falls_back(
    upstream: Upstream, make_gateway: MakeGateway, fault: str, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url, f"mock-a:{fault}", primary_timeouts=FAST))
    started = time.monotonic()
    text, headers = await ask(gw.client(), stream)
    elapsed = time.monotonic() - started
    assert text == ANSWER
    assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("secondary", "2")
    assert 0.25 < elapsed < 2
    # the abandoned upstream call is hung up, not left running
    slow = next(r for r in upstream.state.requests if r.model.startswith("mock-a"))
    await eventually(lambda: slow.disconnected, within=3.0, interval=0.005)


async def test_keepalive_comments_do_not_count_as_a_first_token(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(two_targets(upstream.url, "mock-a:no_data", primary_timeouts=FAST))
    started = time.monotonic()
    text, headers = await ask(gw.client(), True)
    assert text == ANSWER
    assert headers["x-gateway-provider"] == "secondary"
    assert time.monotonic() - started < 2


@both_modes
async def test_upstream_400_is_the_clients_error_and_never_falls_back(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url, "mock-a:status=400"))
    exc = await fail(gw.client(), stream)
    assert isinstance(exc, openai.BadRequestError)
    assert exc.status_code == 400
    error_of(exc)
    assert exc.response.headers["x-request-id"]
    assert upstream.state.calls("mock-a") == 1
    assert upstream.state.calls("mock-b") == 0


async def test_upstream_400_does_not_open_the_circuit(upstream: Upstream, make_gateway: MakeGateway) -> None:
    cfg = two_targets(upstream.url, circuit_breaker={"failures": 1, "cooldown_seconds": 30})
    gw = await make_gateway(cfg)
    client = gw.client()
    upstream.state.faults["mock-a"] = {"status": 400}
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            await ask(client, False)
    upstream.state.faults.clear()
    _, headers = await ask(client, False)
    assert headers["x-gateway-provider"] == "primary"
    assert upstream.state.calls("mock-a") == 3


# --- every target failing ----------------------------------------------------------------------------


@both_modes
async def test_all_targets_failing_is_a_502(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url, "mock-a:status=500", "mock-b:status=503"))
    exc = await fail(gw.client(), stream)
    assert exc.status_code == 502
    err = error_of(exc)
    assert err["type"] == "upstream_error"
    assert exc.response.headers["x-request-id"]
    assert upstream.state.calls("mock-a") == upstream.state.calls("mock-b") == 1


@both_modes
async def test_every_target_rate_limiting_is_a_429_with_the_soonest_retry_after(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    cfg = two_targets(upstream.url, "mock-a:status=429,retry_after=7", "mock-b:status=429,retry_after=3")
    gw = await make_gateway(cfg)
    exc = await fail(gw.client(), stream)
    assert isinstance(exc, openai.RateLimitError)  # the SDK backs off and retries a 429
    err = error_of(exc)
    assert (err["type"], err["code"]) == ("rate_limit_error", "upstream_rate_limited")
    assert exc.response.headers["retry-after"] == "3"
    assert upstream.state.calls("mock-a") == upstream.state.calls("mock-b") == 1


async def test_circuits_opened_by_429s_answer_429_until_they_let_a_trial_through(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = two_targets(
        upstream.url,
        "mock-a:status=429,retry_after=2",
        "mock-b:status=429,retry_after=3",
        circuit_breaker={"failures": 1, "cooldown_seconds": 30},
    )
    gw = await make_gateway(cfg)
    first = await fail(gw.client(), False)  # both answer 429: both circuits open
    assert first.status_code == 429 and first.response.headers["retry-after"] == "2"
    second = await fail(gw.client(), False)  # nothing is called: both circuits are open
    assert second.status_code == 429  # not 503 "no available target"
    assert error_of(second)["code"] == "upstream_rate_limited"
    assert 28 <= int(second.response.headers["retry-after"]) <= 30  # when a trial is let through
    assert upstream.state.calls("mock-a") == upstream.state.calls("mock-b") == 1


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "1e999"])
async def test_a_retry_after_that_is_not_a_usable_number_is_ignored(
    upstream: Upstream, make_gateway: MakeGateway, value: str
) -> None:
    gw = await make_gateway(
        two_targets(upstream.url, f"mock-a:status=429,retry_after={value}", "mock-b:status=429")
    )
    exc = await fail(gw.client(), False)
    assert exc.status_code == 429  # not a 500 from converting it
    assert exc.response.headers["retry-after"] == "1"


async def test_a_429_beside_a_circuit_opened_by_errors_is_still_a_429(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = two_targets(
        upstream.url, "mock-a:status=500", "mock-b:status=429,retry_after=4", circuit_breaker={"failures": 1}
    )
    gw = await make_gateway(cfg)
    assert (await fail(gw.client(), False)).status_code == 502  # a real failure and a 429
    # Both circuits are open now: A's by an error (skipped, no say), B's by its 429 (rate-limited).
    second = await fail(gw.client(), False)
    assert second.status_code == 429  # not 503 "no available target"
    assert 28 <= int(second.response.headers["retry-after"]) <= 30  # B's cooldown
    assert upstream.state.calls("mock-a") == upstream.state.calls("mock-b") == 1


async def test_a_429_and_another_failure_is_still_a_502(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(two_targets(upstream.url, "mock-a:status=429", "mock-b:status=500"))
    exc = await fail(gw.client(), False)
    assert exc.status_code == 502 and error_of(exc)["type"] == "upstream_error"


@both_modes
async def test_all_targets_timing_out_is_a_504(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    cfg = two_targets(upstream.url, "mock-a:hang", "mock-b:first_byte_delay=3", primary_timeouts=FAST)
    cfg["providers"][1]["timeouts"] = FAST
    gw = await make_gateway(cfg)
    started = time.monotonic()
    exc = await fail(gw.client(), stream)
    assert exc.status_code == 504
    assert error_of(exc)["code"] == "upstream_timeout"
    assert time.monotonic() - started < 2


@both_modes
async def test_rejected_provider_key_is_never_reported_as_the_clients(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url, "mock-a:status=401", "mock-b:status=403"))
    exc = await fail(gw.client(CLIENT_KEY), stream)
    # the client's key is fine: a 401 would make it rotate a key that works
    assert exc.status_code == 502
    err = error_of(exc)
    assert "mock failure" not in err["message"]  # the provider's own words stay inside
    assert PROVIDER_KEY not in exc.response.text
    assert SECOND_KEY not in exc.response.text
    assert CLIENT_KEY not in exc.response.text


async def test_retries_hit_the_same_target_with_growing_backoff(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = two_targets(upstream.url, "mock-a:status=500", "mock-b:status=500", retries=2, backoff_seconds=0.1)
    gw = await make_gateway(cfg)
    exc = await fail(gw.client(), False)
    assert exc.status_code == 502
    assert upstream.state.calls("mock-a") == 3
    assert upstream.state.calls("mock-b") == 3
    # exponential with jitter: 50-100 % of 0.1 s, then of 0.2 s
    for model in ("mock-a", "mock-b"):
        first, second = gaps(upstream, model)
        assert 0.045 <= first < 0.5
        assert 0.095 <= second < 0.6


async def test_a_retry_can_succeed_on_the_same_target(upstream: Upstream, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(two_targets(upstream.url, retries=1, backoff_seconds=0.2))
    upstream.state.faults["mock-a"] = {"status": 502}
    clear = asyncio.create_task(clear_fault_after(upstream, "mock-a", 1))
    text, headers = await ask(gw.client(), False)
    await clear
    assert text == ANSWER
    assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("primary", "2")
    assert upstream.state.calls("mock-b") == 0


async def clear_fault_after(upstream: Upstream, model: str, calls: int) -> None:
    await eventually(lambda: upstream.state.calls(model) >= calls, within=3.0, interval=0.005)
    upstream.state.faults.pop(model, None)


@both_modes
async def test_retry_after_is_honoured_on_the_same_target(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url, retries=1, backoff_seconds=0.01))
    upstream.state.faults["mock-a"] = {"status": 429, "retry_after": 0.4}
    clear = asyncio.create_task(clear_fault_after(upstream, "mock-a", 1))
    text, headers = await ask(gw.client(), stream)
    await clear
    assert text == ANSWER
    assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("primary", "2")
    [gap] = gaps(upstream, "mock-a")
    assert 0.39 <= gap < 1.5  # the upstream's Retry-After, not the 0.01 s backoff


async def test_retry_after_is_capped(upstream: Upstream, make_gateway: MakeGateway) -> None:
    cfg = two_targets(upstream.url, retries=1, backoff_seconds=0.01, retry_after_cap_seconds=0.2)
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-a"] = {"status": 429, "retry_after": 30}
    started = time.monotonic()
    text, headers = await ask(gw.client(), False)
    assert text == ANSWER
    assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("secondary", "3")
    [gap] = gaps(upstream, "mock-a")
    assert 0.19 <= gap < 1
    assert time.monotonic() - started < 2


# --- circuit breaker ---------------------------------------------------------------------------------


async def test_circuit_opens_skips_then_one_trial_decides(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = two_targets(upstream.url, circuit_breaker={"failures": 2, "cooldown_seconds": 0.6})
    gw = await make_gateway(cfg)
    client = gw.client()
    upstream.state.faults["mock-a"] = {"status": 500}

    async def served_by() -> tuple[str, str]:
        text, headers = await ask(client, False)
        assert text == ANSWER
        return headers["x-gateway-provider"], headers["x-gateway-attempts"]

    # two consecutive failures: each request still answered by the fallback
    assert await served_by() == ("secondary", "2")
    assert await served_by() == ("secondary", "2")
    assert upstream.state.calls("mock-a") == 2
    # open: the broken target is not called at all
    assert await served_by() == ("secondary", "1")
    assert await served_by() == ("secondary", "1")
    assert upstream.state.calls("mock-a") == 2

    # after the cooldown one trial goes through; still failing → open again
    await asyncio.sleep(0.65)
    assert await served_by() == ("secondary", "2")
    assert upstream.state.calls("mock-a") == 3
    assert await served_by() == ("secondary", "1")
    assert upstream.state.calls("mock-a") == 3

    # fault gone: the next trial closes the circuit and the target serves again
    upstream.state.faults.clear()
    await asyncio.sleep(0.65)
    assert await served_by() == ("primary", "1")
    assert await served_by() == ("primary", "1")
    assert upstream.state.calls("mock-a") == 5


async def test_half_open_circuit_lets_exactly_one_trial_through(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = two_targets(upstream.url, circuit_breaker={"failures": 1, "cooldown_seconds": 0.2})
    gw = await make_gateway(cfg)
    client = gw.client()
    upstream.state.faults["mock-a"] = {"status": 500}
    await ask(client, False)  # opens the circuit
    await asyncio.sleep(0.25)
    upstream.state.faults["mock-a"] = {"first_byte_delay": 0.6, "status": 500}
    trial = asyncio.create_task(ask(client, False))
    await eventually(lambda: upstream.state.calls("mock-a") == 2, within=3.0, interval=0.005)
    # while the trial is in flight, others skip the target
    others = await asyncio.gather(*(ask(client, False) for _ in range(3)))
    assert [h["x-gateway-provider"] for _, h in others] == ["secondary"] * 3
    assert upstream.state.calls("mock-a") == 2
    _, headers = await trial
    assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("secondary", "2")


@both_modes
async def test_every_circuit_open_is_a_503_without_an_upstream_call(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    cfg = two_targets(upstream.url, "mock-a:status=500", "mock-b:status=500", circuit_breaker={"failures": 1})
    gw = await make_gateway(cfg)
    client = gw.client()
    assert (await fail(client, stream)).status_code == 502
    exc = await fail(client, stream)
    assert exc.status_code == 503
    assert error_of(exc)["code"] == "no_available_target"
    assert len(upstream.state.requests) == 2


async def test_model_without_any_usable_provider_says_so(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    cfg = two_targets(upstream.url)
    cfg["providers"].append({"name": "ds", "type": "deepseek", "base_url": upstream.url, "api_key": ""})
    cfg["models"].append({"name": "keyless", "targets": [{"provider": "ds", "model": "deepseek-chat"}]})
    gw = await make_gateway(cfg)  # no routing.unconfigured_provider to fall back to
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client().chat.completions.create(model="keyless", messages=MESSAGES)
    assert info.value.status_code == 503
    err = error_of(info.value)
    assert err["code"] == "no_available_target"
    assert "circuit" not in err["message"]  # nothing failed: no provider of it has a key
    assert "API key" in err["message"]
    assert upstream.state.requests == []


# --- what reaches the upstream -----------------------------------------------------------------------


@both_modes
async def test_client_credentials_and_headers_never_reach_the_upstream(
    upstream: Upstream, make_gateway: MakeGateway, stream: bool
) -> None:
    gw = await make_gateway(two_targets(upstream.url))
    client = gw.client(
        CLIENT_KEY,
        default_headers={
            "x-api-key": CLIENT_KEY,
            "Cookie": f"session={CLIENT_KEY}",
            "Connection": "keep-alive, x-secret-hop",
            "X-Secret-Hop": "hop",
            "Proxy-Authorization": f"Basic {CLIENT_KEY}",
            "X-Forwarded-For": "10.0.0.1",
            "OpenAI-Organization": "org-client",
        },
    )
    text, _ = await ask(client, stream)
    assert text == ANSWER
    [seen] = upstream.state.requests
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    for name in ("x-api-key", "cookie", "x-secret-hop", "proxy-authorization", "x-forwarded-for"):
        assert name not in headers
    assert "openai-organization" not in headers
    assert headers["host"] == f"127.0.0.1:{upstream.server.port}"
    assert CLIENT_KEY not in str(seen.headers)
    assert CLIENT_KEY.encode() not in seen.body


@pytest.fixture
async def decoy(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[TestServer, list[str]]:
    """A server that must never be called: it records any request that reaches it."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"error": {"message": "decoy", "type": "x"}}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    return await aiohttp_server(app), hits


@both_modes
async def test_client_cannot_redirect_the_call_elsewhere(
    upstream: Upstream,
    make_gateway: MakeGateway,
    decoy: tuple[TestServer, list[str]],
    stream: bool,
) -> None:
    server, hits = decoy
    evil = str(server.make_url("/v1"))
    gw = await make_gateway(two_targets(upstream.url))
    client = gw.client(
        default_headers={
            "X-Api-Base": evil,
            "X-Base-Url": evil,
            "X-Forwarded-Host": f"127.0.0.1:{server.port}",
        }
    )
    text, headers = await ask(
        client, stream, extra_body={"api_base": evil, "base_url": evil, "api_key": "attacker"}
    )
    assert text == ANSWER
    assert headers["x-gateway-provider"] == "primary"
    assert hits == []
    assert len(upstream.state.requests) == 1
    assert upstream.state.requests[0].headers["Authorization"] == f"Bearer {PROVIDER_KEY}"


@both_modes
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_upstream_redirects_are_never_followed(
    upstream: Upstream,
    make_gateway: MakeGateway,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    status: int,
    stream: bool,
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{upstream.url}{request.path[3:]}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    redirector = await aiohttp_server(app)
    cfg = two_targets(upstream.url, primary_url=str(redirector.make_url("/v1")))
    cfg["models"][0]["targets"].pop()  # the redirecting provider is the only target
    gw = await make_gateway(cfg)
    exc = await fail(gw.client(), stream)
    assert exc.status_code == 502
    assert error_of(exc)["type"] == "upstream_error"
    assert upstream.state.requests == []  # the redirect target (with our key) was never called


async def test_no_secret_in_any_error_body_or_log_line(
    upstream: Upstream, make_gateway: MakeGateway, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    echo = await aiohttp_server(echo_credentials_app())
    cfg = two_targets(upstream.url, "mock-a:status=401", "mock-b:status=500")
    cfg["providers"].append(
        {"name": "echo", "type": "openai", "base_url": str(echo.make_url("/v1")), "api_key": ECHO_KEY}
    )
    cfg["models"].append({"name": "echo", "targets": [{"provider": "echo", "model": "m"}]})
    gw = await make_gateway(cfg)
    client = gw.client(CLIENT_KEY, default_headers={"x-api-key": CLIENT_KEY})

    bodies: list[str] = []
    for stream in (False, True):
        bodies.append((await fail(client, stream)).response.text)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="echo", messages=MESSAGES, stream=stream)
        bodies.append(info.value.response.text)
    for bad in ({"model": "nope", "messages": MESSAGES}, {"model": "chat"}, {"model": "chat", "messages": 1}):
        with pytest.raises(openai.APIStatusError) as info:
            await client.post("/chat/completions", body=bad, cast_to=object)
        bodies.append(info.value.response.text)

    logs = gw.logs.getvalue().decode()
    assert logs.count('"request_id"') >= 7
    assert bodies[1].count("[REDACTED]") == 1  # the upstream's 400 still reaches the client
    for secret in (PROVIDER_KEY, SECOND_KEY, ECHO_KEY, CLIENT_KEY):
        for body in bodies:
            assert secret not in body
        assert secret not in logs


async def test_access_log_tells_which_target_served(upstream: Upstream, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(two_targets(upstream.url, "mock-a:status=500"))
    _, headers = await ask(gw.client(), False)
    [line] = [e for e in gw.log_lines() if e.get("event") == "request"]
    assert line["request_id"] == headers["x-request-id"]
    assert (line["provider"], line["upstream_model"], line["attempts"], line["status"]) == (
        "secondary",
        "mock-b",
        2,
        200,
    )
    assert any(e.get("event") == "upstream_attempt_failed" for e in gw.log_lines())


async def test_raw_aiohttp_client_sees_the_same_fallback(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(two_targets(upstream.url, "mock-a:status=500"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.url}/chat/completions",
            data=orjson.dumps({"model": "chat", "messages": MESSAGES}),
            headers={"Authorization": "Bearer x", "Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
        assert body["choices"][0]["message"]["content"] == ANSWER
        assert resp.headers["x-gateway-provider"] == "secondary"


def test_a_circuit_is_rate_limited_only_if_every_failure_of_its_run_was_a_429() -> None:
    mixed = CircuitBreaker(threshold=2, cooldown=0.0)
    mixed.failure()
    mixed.failure(throttled=True)
    assert mixed.failures == 2 and not mixed.throttled  # an error and a 429 opened it: broken
    assert mixed.allow() and mixed.trial  # cooldown over: the half-open trial ...
    mixed.failure(throttled=True)  # ... answers 429: a new run, rate-limited
    assert mixed.throttled
    assert mixed.allow()
    mixed.failure()  # the next trial fails with an error: broken again
    assert not mixed.throttled


async def test_the_retry_budget_bounds_the_load_on_a_failing_upstream(upstream, make_gateway) -> None:
    """Issue #12: with retries on, an upstream that fails everything must not get (1 + retries)x the
    traffic. 40 concurrent requests, 3 retries each: without a budget 160 calls; with 20 % far fewer."""
    cfg = base_config(upstream.url)
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:status=500"
    cfg["routing"] = {
        "retries": 3,
        "backoff_seconds": 0.05,
        "circuit_breaker": {"failures": 100_000},
        "retry_budget": {"percent": 20, "min_concurrency": 2},
    }
    gw = await make_gateway(cfg)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(gw.url + "/chat/completions", json=body) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(40)))
    assert statuses == [502] * 40
    calls = upstream.state.calls("mock-chat")
    assert 40 < calls <= 40 * 1.3, calls  # some retries, within the budget
    # Light traffic still retries: one request alone gets all its attempts (the floor).
    before = upstream.state.calls("mock-chat")
    async with aiohttp.ClientSession() as session, session.post(gw.url + "/chat/completions", json=body) as r:
        assert r.status == 502
    assert upstream.state.calls("mock-chat") - before == 4


async def test_retries_cancelled_in_their_backoff_give_their_budget_back(upstream, make_gateway) -> None:
    cfg = base_config(upstream.url)
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:status=500"
    cfg["routing"] = {
        "retries": 1,
        "backoff_seconds": 0.6,
        "circuit_breaker": {"failures": 100_000},
        "retry_budget": {"percent": 20, "min_concurrency": 3},
    }
    gw = await make_gateway(cfg)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def leave_in_the_backoff() -> None:
            with contextlib.suppress(TimeoutError):
                async with session.post(gw.url + "/chat/completions", json=body) as r:
                    await r.read()

        await asyncio.gather(*(leave_in_the_backoff() for _ in range(5)))
    await asyncio.sleep(0.1)
    before = upstream.state.calls("mock-chat")
    async with aiohttp.ClientSession() as session, session.post(gw.url + "/chat/completions", json=body) as r:
        assert r.status == 502
    assert upstream.state.calls("mock-chat") - before == 2  # the retry was still allowed


async def test_the_router_runs_in_process_with_its_breakers_and_upstream_limits(upstream: Upstream) -> None:
    """The router's seam is ``Router.run(ctx, attempt)`` and a provider's is ``Provider.post``: routing,
    circuit breakers and the gateway-wide upstream limits work with no gateway app around them."""
    cfg = two_targets(upstream.url, circuit_breaker={"failures": 1, "cooldown_seconds": 60})
    cfg["providers"][1]["limits"] = {"max_parallel": 1}
    config = config_mod.parse(cfg, env={})
    providers = {p.name: create(p) for p in config.providers}
    limiter = Limiter(MemoryStore())
    router = Router(config, providers, upstream=UpstreamLimits(config, limiter, "inproc"))
    for provider in providers.values():
        await provider.start()
    upstream.state.faults["mock-a"] = {"status": 500}

    def request() -> RequestContext:
        body = {"model": "chat", "messages": MESSAGES}
        return RequestContext(
            "req-1", "chat", body, router.routes["chat"].model, CIMultiDictProxy(CIMultiDict())
        )

    try:
        first = request()
        answer = await router.run(first, lambda t: unary_attempt(first, t, "/chat/completions"))
        assert answer.parsed["choices"][0]["message"]["content"] == ANSWER
        assert (first.provider, first.attempts) == ("secondary", 2)  # the 500 opened the primary's circuit
        # The secondary's one parallel slot is still held by the first request (until it is settled):
        # the primary is skipped (open circuit), the secondary is full → a 429 from the gateway itself.
        second = request()
        with pytest.raises(RateLimited) as refused:
            await router.run(second, lambda t: unary_attempt(second, t, "/chat/completions"))
        assert "gateway-wide limit" in refused.value.message
        assert upstream.state.calls("mock-a") == 1 and upstream.state.calls("mock-b") == 1
        limiter.finish(first)  # the first request ends: its slot is free again
        third = request()
        await router.run(third, lambda t: unary_attempt(third, t, "/chat/completions"))
        assert third.provider == "secondary" and upstream.state.calls("mock-b") == 2
    finally:
        for provider in providers.values():
            await provider.close()
