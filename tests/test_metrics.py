"""/metrics after real traffic: exact counts, the contract's names and labels, bounded cardinality."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from tests.conftest import MASTER_KEY, TEAM_KEY, RunningGateway, Upstream, base_config, tenancy_config
from tests.helpers import raw_request

CONTRACT = {
    "llm_gateway_requests": ("counter", {"model", "provider", "status_code", "team"}),
    "llm_gateway_request_duration_seconds": ("histogram", {"model", "provider"}),
    "llm_gateway_time_to_first_token_seconds": ("histogram", {"model", "provider"}),
    "llm_gateway_upstream_requests": ("counter", {"provider", "upstream_model", "outcome"}),
    "llm_gateway_fallbacks": ("counter", {"model", "from_provider", "to_provider"}),
    "llm_gateway_tokens": ("counter", {"team", "model", "kind"}),
    "llm_gateway_cost_usd": ("counter", {"team", "model"}),
    "llm_gateway_cache_requests": ("counter", {"result"}),
    "llm_gateway_rate_limited": ("counter", {"team", "limit"}),
    "llm_gateway_in_flight_requests": ("gauge", set()),
    "llm_gateway_circuit_open": ("gauge", {"provider", "upstream_model"}),
    "llm_gateway_redis_errors": ("counter", {"operation"}),
}


async def scrape(gw: RunningGateway, token: str | None = None) -> dict[tuple[str, frozenset[Any]], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(gw.root + "/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(after: dict[Any, float], before: dict[Any, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_every_contract_metric_is_exported_with_its_labels(gw: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(gw.root + "/metrics") as r:
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, name
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} <= labels, (name, sample.labels)


async def test_counts_and_labels_after_traffic(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url, redis=False)
    cfg["models"][0]["pricing"] = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}
    cfg["models"].append(
        {
            "name": "flaky",
            "targets": [
                {"provider": "primary", "model": "mock-broken:status=503"},
                {"provider": "primary", "model": "mock-chat"},
            ],
        }
    )
    gw = await make_gateway(cfg)
    before = await scrape(gw)
    client = gw.client(api_key=TEAM_KEY)
    usage_prompt = usage_completion = 0
    for _ in range(3):
        reply = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.usage is not None
        usage_prompt += reply.usage.prompt_tokens
        usage_completion += reply.usage.completion_tokens
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    [c async for c in stream]
    await client.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.AuthenticationError):
        await gw.client(api_key="wrong").chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]
        )
    after = await scrape(gw)

    ok = {"model": "chat", "provider": "primary", "status_code": "200", "team": "team-a"}
    assert delta(after, before, "llm_gateway_requests_total", **ok) == 4
    assert (
        delta(
            after,
            before,
            "llm_gateway_requests_total",
            model="unknown",
            provider="none",
            status_code="404",
            team="team-a",
        )
        == 1
    )
    assert (
        delta(
            after,
            before,
            "llm_gateway_requests_total",
            model="chat",
            provider="none",
            status_code="401",
            team="none",
        )
        == 1
    )
    assert (
        delta(after, before, "llm_gateway_request_duration_seconds_count", model="chat", provider="primary")
        == 4
    )
    assert (
        delta(
            after, before, "llm_gateway_time_to_first_token_seconds_count", model="chat", provider="primary"
        )
        == 1
    )
    assert (
        delta(after, before, "llm_gateway_tokens_total", team="team-a", model="chat", kind="prompt")
        >= usage_prompt
    )
    assert (
        delta(after, before, "llm_gateway_tokens_total", team="team-a", model="chat", kind="completion")
        >= usage_completion
    )
    assert delta(after, before, "llm_gateway_cost_usd_total", team="team-a", model="chat") > 0
    assert (
        delta(
            after,
            before,
            "llm_gateway_upstream_requests_total",
            provider="primary",
            upstream_model="mock-broken:status=503",
            outcome="status_503",
        )
        == 1
    )
    assert (
        delta(
            after,
            before,
            "llm_gateway_fallbacks_total",
            model="flaky",
            from_provider="primary",
            to_provider="primary",
        )
        == 1
    )
    # No key, request id or free text ever becomes a label value.
    for _name, labels in after:
        for label_value in dict(labels).values():
            assert TEAM_KEY not in label_value and "req_" not in label_value and "wrong" not in label_value


async def test_rate_limited_and_circuit_metrics(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url, redis=False, limits={"rpm": 1})
    cfg["routing"] = {"retries": 0, "circuit_breaker": {"failures": 1, "cooldown_seconds": 60}}
    cfg["models"].append(
        {"name": "down", "targets": [{"provider": "primary", "model": "mock-down:status=500"}]}
    )
    gw = await make_gateway(cfg)
    before = await scrape(gw)
    client = gw.client(api_key=TEAM_KEY)
    await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    after = await scrape(gw)
    assert delta(after, before, "llm_gateway_rate_limited_total", team="team-a", limit="rpm") == 1

    cfg_b = base_config(
        upstream.url, routing={"retries": 0, "circuit_breaker": {"failures": 1, "cooldown_seconds": 60}}
    )
    cfg_b["models"][0]["targets"] = [{"provider": "primary", "model": "mock-circuit:status=500"}]
    gw_b = await make_gateway(cfg_b)
    with pytest.raises(openai.APIStatusError):
        await gw_b.client().chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    samples = await scrape(gw_b)
    assert (
        value(
            samples, "llm_gateway_circuit_open", provider="primary", upstream_model="mock-circuit:status=500"
        )
        == 1
    )


async def test_metrics_bearer_token(upstream: Upstream, make_gateway: Any) -> None:
    gw = await make_gateway(base_config(upstream.url, metrics={"bearer_token": "metrics-token-123"}))
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.root + "/metrics") as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        async with session.get(gw.root + "/metrics", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
    assert await scrape(gw, token="metrics-token-123")
    # The right token beside a wrong one is ambiguous, whichever comes first.
    for pair in (("Bearer metrics-token-123", "Bearer nope"), ("Bearer nope", "Bearer metrics-token-123")):
        status, _ = await raw_request(gw.root, "GET", "/metrics", [("Authorization", v) for v in pair])
        assert status == 401


async def test_usage_api_and_metrics_agree(upstream: Upstream, make_gateway: Any) -> None:
    cfg = tenancy_config(upstream.url)
    cfg["models"][0]["pricing"] = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    gw = await make_gateway(cfg)
    before = await scrape(gw)
    client = gw.client(api_key=TEAM_KEY)
    for text in ("one", "two two", "three three three"):
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": text}])
    await gw.gateway.pipeline.drain()
    after = await scrape(gw)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.root + "/api/v1/usage",
            params={"team": "team-a"},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as r,
    ):
        report = await r.json()
    total = report["total"]
    assert total["requests"] == 3
    assert total["prompt_tokens"] == delta(
        after, before, "llm_gateway_tokens_total", team="team-a", model="chat", kind="prompt"
    )
    assert total["completion_tokens"] == delta(
        after, before, "llm_gateway_tokens_total", team="team-a", model="chat", kind="completion"
    )
    assert total["cost_usd"] == pytest.approx(
        delta(after, before, "llm_gateway_cost_usd_total", team="team-a", model="chat")
    )


async def test_requests_refused_before_routing_are_counted_without_client_strings(gw) -> None:
    import aiohttp
    from prometheus_client import REGISTRY

    def count(status: str) -> float:
        labels = {"model": "unknown", "provider": "none", "status_code": status, "team": "none"}
        return REGISTRY.get_sample_value("llm_gateway_requests_total", labels) or 0.0

    before = count("400")
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/chat/completions", "/api/v1/llm/complete"):
            async with session.post(gw.root + path, data=b"{not json") as r:
                assert r.status == 400
        async with session.post(
            gw.root + "/v1/chat/completions", json={"model": "secret-name", "messages": []}
        ) as r:
            assert r.status == 400
    assert count("400") == before + 3
    # The client's model name never becomes a label.
    names = {s.labels.get("model") for m in REGISTRY.collect() for s in m.samples}
    assert "secret-name" not in names


async def test_folded_metrics_read_the_same_as_direct_ones() -> None:
    """What the hot path adds up in a Tally is, at the next read of the registry, exactly what
    prometheus_client's own inc/observe would have recorded: every bucket, sum and count."""
    registry_name = f"tally_check_{uuid.uuid4().hex[:8]}"
    direct = Histogram(registry_name + "_direct", "d", ["k"], buckets=metrics.LATENCY_BUCKETS).labels("x")
    folded = Histogram(registry_name + "_folded", "f", ["k"], buckets=metrics.LATENCY_BUCKETS).labels("x")
    count_direct = Counter(registry_name + "_cd", "c", ["k"]).labels("x")
    count_folded = Counter(registry_name + "_cf", "c", ["k"]).labels("x")
    tally = metrics.Tally()
    values = [0.0, 0.01, 0.0100001, 0.3, 1, 119.9, 120, 121, 5000, 0.049]
    for v in values:
        direct.observe(v)
        tally.observe(folded, v)
        count_direct.inc(v)
        tally.inc(count_folded, v)

    def samples(prefix: str) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name.replace(prefix, ""), s.labels, s.value)
            for family in REGISTRY.collect()
            if family.name.startswith(prefix)
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert samples(registry_name + "_folded") == samples(registry_name + "_direct")  # read → folded first
    assert samples(registry_name + "_cf") == samples(registry_name + "_cd")
    assert samples(registry_name + "_cf")[0][2] == pytest.approx(sum(values))
