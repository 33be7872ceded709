"""Input guardrails through the gateway, with the openai and anthropic SDKs: block, redact, flag, per
team, on every surface; patterns RE2 cannot run refused at config time; nothing matched in the logs."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import orjson
import pytest
from prometheus_client import REGISTRY

from gateway import config_parser as config_mod
from gateway.config import ConfigError
from tests.conftest import TEAM_B_KEY, TEAM_KEY, RunningGateway, Upstream, tenancy_config
from tests.helpers import eventually

CARD = "4111 1111 1111 1111"  # Luhn-valid (a test card number)
NOT_A_CARD = "4111 1111 1111 1112"  # Luhn-invalid
SECRET = "sk-proj-AbCdEf0123456789GhIjKlMnOpQrSt"
RULES = [
    {"name": "no-secrets", "detector": "secret", "applies_to": "input", "action": "block"},
    {"name": "cards", "detector": "credit_card", "applies_to": "both", "action": "redact"},
    {"name": "emails", "detector": "email", "applies_to": "input", "action": "flag"},
    {"name": "falcon", "pattern": r"(?i)\bproject falcon\b", "applies_to": "input", "action": "block"},
]


def config(upstream: Upstream, rules: list[dict[str, Any]] = RULES, **team_a: Any) -> dict[str, Any]:
    cfg = tenancy_config(upstream.url, redis=False, **team_a)
    cfg["plugins"] = ["auth", "guardrails", "rate_limit", "quota"]
    cfg["guardrails"] = {"rules": rules}
    return cfg


def sent(upstream: Upstream) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(upstream.state.requests[-1].body)
    return body


def actions(rule: str, action: str) -> float:
    labels = {"rule": rule, "action": action, "direction": "input"}
    return REGISTRY.get_sample_value("llm_gateway_guardrail_actions_total", labels) or 0.0


async def ask(gw: RunningGateway, text: str, key: str = TEAM_KEY) -> Any:
    return await gw.client(api_key=key).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": text}]
    )


async def test_block_refuses_before_anything_goes_upstream(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream))
    before = actions("no-secrets", "block")
    with pytest.raises(openai.BadRequestError) as info:
        await ask(gw, f"my key is {SECRET}, keep it safe")
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "content_filter"
    assert "no-secrets" in error["message"] and SECRET not in error["message"]
    assert upstream.state.requests == []
    assert actions("no-secrets", "block") == before + 1
    with pytest.raises(openai.BadRequestError):  # a user pattern, in a multi-part message
        await gw.client(api_key=TEAM_KEY).chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": [{"type": "text", "text": "About Project Falcon:"}]}],
        )
    assert upstream.state.requests == []


async def test_redact_replaces_the_match_before_the_upstream_sees_it(
    upstream: Upstream, make_gateway
) -> None:
    gw = await make_gateway(config(upstream))
    answer = await ask(gw, f"charge {CARD} please, not {NOT_A_CARD}")
    content = sent(upstream)["messages"][0]["content"]
    assert content == f"charge [REDACTED:cards] please, not {NOT_A_CARD}"  # Luhn-invalid: not a card
    assert CARD not in (answer.choices[0].message.content or "")


async def test_flag_serves_counts_and_logs_the_rule_never_the_text(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream))
    before = actions("emails", "flag")
    answer = await ask(gw, "write to alice@example.com today")
    assert answer.choices[0].message.content == "Mock answer: write to alice@example.com today"
    assert actions("emails", "flag") == before + 1
    flagged = [e for e in gw.log_lines() if e.get("event") == "guardrail_flagged"]
    assert flagged and flagged[-1]["rule"] == "emails"
    with pytest.raises(openai.BadRequestError):
        await ask(gw, f"here: {SECRET}")
    raw = gw.logs.getvalue().decode()
    assert "alice@example.com" not in raw and SECRET not in raw


async def test_rules_per_team(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream, guardrails=["cards"]))  # team-a: only "cards"
    await ask(gw, f"my key is {SECRET}")  # no-secrets does not apply to team-a
    assert SECRET in sent(upstream)["messages"][0]["content"]
    with pytest.raises(openai.BadRequestError):
        await ask(gw, f"my key is {SECRET}", key=TEAM_B_KEY)  # team-b: every rule


async def test_every_surface_is_guarded(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream))
    with pytest.raises(openai.BadRequestError):
        await gw.client(api_key=TEAM_KEY).embeddings.create(model="chat", input=["fine", f"key {SECRET}"])
    status, body = await _post(
        gw,
        "/api/v1/llm/complete",
        {"messages": [{"role": "user", "content": SECRET}], "options": {"model": "chat"}},
    )
    assert status == 400 and body["error"]["code"] == "content_filter"
    async with anthropic.AsyncAnthropic(base_url=gw.root.rstrip("/"), api_key=TEAM_KEY, max_retries=0) as c:
        with pytest.raises(anthropic.BadRequestError) as info:
            await c.messages.create(
                model="chat",
                max_tokens=10,
                system=f"use {SECRET}",
                messages=[{"role": "user", "content": "hi"}],
            )
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert upstream.state.requests == []


async def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.root.rstrip("/") + path, json=body, headers={"Authorization": f"Bearer {TEAM_KEY}"}
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_catastrophic_pattern_runs_in_linear_time(upstream: Upstream, make_gateway) -> None:
    rules = [{"name": "redos", "pattern": "(a+)+$", "applies_to": "input", "action": "block"}]
    gw = await make_gateway(config(upstream, rules))
    answer = await ask(gw, "a" * 200_000 + "b")  # a backtracking engine would never finish this
    assert answer.choices[0].message.content is not None
    gw = await make_gateway(config(upstream))
    with pytest.raises(openai.BadRequestError):  # a long text is checked off the event loop, as well
        await ask(gw, "x " * 100_000 + SECRET)


async def test_more_text_than_can_be_checked_is_refused(upstream: Upstream, make_gateway) -> None:
    cfg = config(upstream)
    cfg["guardrails"]["max_scan_chars"] = 1000
    gw = await make_gateway(cfg)
    with pytest.raises(openai.APIStatusError) as info:
        await ask(gw, "x" * 1001)
    assert info.value.status_code == 413 and upstream.state.requests == []


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"name": "r", "pattern": r"(a)\1", "action": "block"}, "guardrails.rules[0].pattern: not supported"),
        ({"name": "r", "pattern": "(?=a)b", "action": "block"}, "guardrails.rules[0].pattern: not supported"),
        ({"name": "r", "detector": "ssn", "action": "block"}, "guardrails.rules[0].detector: must be one of"),
        (
            {"name": "r", "detector": "email", "action": "delete"},
            "guardrails.rules[0].action: must be one of",
        ),
        ({"name": "r", "action": "block"}, "guardrails.rules[0]: needs exactly one of pattern and detector"),
        ({"name": "bad name!", "detector": "email", "action": "flag"}, "guardrails.rules[0].name: must be"),
        (
            {"name": "m", "type": "moderation", "action": "block", "applies_to": "input"},
            "guardrails.rules[0].provider: is required",
        ),
        (
            {
                "name": "m",
                "type": "moderation",
                "provider": "primary",
                "action": "redact",
                "applies_to": "input",
            },
            "guardrails.rules[0].action: a moderation rule can block or flag",
        ),
        (
            {"name": "m", "type": "moderation", "provider": "nope", "action": "flag", "applies_to": "input"},
            "guardrails.rules[0].provider: unknown",
        ),
    ],
)
def test_check_config_refuses_bad_rules(upstream_url: str, rule: dict[str, Any], problem: str) -> None:
    cfg = tenancy_config(upstream_url, redis=False)
    cfg["plugins"] = ["auth", "guardrails"]
    cfg["guardrails"] = {"rules": [rule]}
    with pytest.raises(ConfigError) as info:
        config_mod.parse(cfg, env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_rules_without_the_plugin_or_unknown_team_rules_are_refused(upstream_url: str) -> None:
    cfg = tenancy_config(upstream_url, redis=False, guardrails=["nope"])
    cfg["guardrails"] = {"rules": [{"name": "r", "detector": "email", "action": "flag"}]}
    with pytest.raises(ConfigError) as info:
        config_mod.parse(cfg, env={})
    problems = " ".join(info.value.problems)
    assert "guardrails plugin is not in plugins" in problems
    assert "teams[0].guardrails: unknown guardrail rule 'nope'" in problems


@pytest.fixture
def upstream_url() -> str:
    return "http://127.0.0.1:9/v1"


OUTPUT_RULES = [
    {"name": "out-secret", "detector": "secret", "applies_to": "output", "action": "block"},
    {"name": "out-email", "detector": "email", "applies_to": "output", "action": "redact"},
    {"name": "falcon", "pattern": r"(?i)\bproject falcon\b", "applies_to": "output", "action": "redact"},
    {"name": "osprey", "pattern": r"(?i)\bproject osprey\b", "applies_to": "output", "action": "block"},
]


async def test_output_rules_on_a_whole_answer(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream, OUTPUT_RULES))
    redacted = await ask(gw, "write to alice@example.com about Project Falcon")  # the mock echoes it
    assert (
        redacted.choices[0].message.content
        == "Mock answer: write to [REDACTED:out-email] about [REDACTED:falcon]"
    )
    assert "alice@example.com" in sent(upstream)["messages"][0]["content"]  # output rules: input untouched
    blocked = await ask(gw, f"the key {SECRET} again")
    assert blocked.choices[0].message.content == "Mock answer: the key "
    assert blocked.choices[0].finish_reason == "content_filter"


async def stream_text(gw: RunningGateway, text: str) -> tuple[str, list[str | None]]:
    stream = await gw.client(api_key=TEAM_KEY).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": text}], stream=True
    )
    chunks = [c async for c in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return content, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


async def test_output_rules_hold_on_streams_across_events_and_writes(
    upstream: Upstream, make_gateway
) -> None:
    cfg = config(upstream, OUTPUT_RULES)
    cfg["providers"][0]["base_url"] = upstream.url  # (the mock splits answers one word per event)
    gw = await make_gateway(cfg)
    upstream.state.faults["mock-chat"] = {"chunk_delay": 0.01}  # every event its own TCP write
    text, finishes = await stream_text(gw, "we met about Project Falcon at alice@example.com today")
    assert text == "Mock answer: we met about [REDACTED:falcon] at [REDACTED:out-email] today"
    assert finishes == ["stop"]
    before = actions_out("osprey", "block")
    text, finishes = await stream_text(gw, "then Project Osprey started and everything else")
    assert text == "Mock answer: then "  # cut before the match, which spanned two events
    assert finishes == ["content_filter"]
    assert actions_out("osprey", "block") == before + 1
    record = upstream.state.requests[-1]
    await eventually(lambda: record.disconnected or record.ended is not None, within=3)
    assert record.disconnected  # the upstream was cancelled, not read to its end


def actions_out(rule: str, action: str) -> float:
    labels = {"rule": rule, "action": action, "direction": "output"}
    return REGISTRY.get_sample_value("llm_gateway_guardrail_actions_total", labels) or 0.0


def moderated(upstream: Upstream, model: str, fail_open: bool = True) -> dict[str, Any]:
    rule = {
        "name": "moderation",
        "type": "moderation",
        "provider": "primary",
        "model": model,
        "applies_to": "input",
        "action": "block",
        "timeout_seconds": 0.5,
        "fail_open": fail_open,
    }
    return config(upstream, [rule])


async def test_a_moderation_rule_blocks_what_the_endpoint_flags(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(moderated(upstream, "mock-moderation"))
    assert (await ask(gw, "a calm question")).choices[0].message.content == "Mock answer: a calm question"
    with pytest.raises(openai.BadRequestError) as info:
        await ask(gw, "something violent")
    assert info.value.body["code"] == "content_filter" and "moderation" in info.value.body["message"]  # type: ignore[index]
    asked = [r for r in upstream.state.requests if r.model == "mock-moderation"]
    assert orjson.loads(asked[-1].body)["input"] == ["something violent"]
    assert upstream.state.calls("mock-chat") == 1  # the blocked request never went to the model


@pytest.mark.parametrize("fault", ["status=500", "first_byte_delay=2"])
async def test_moderation_unavailable_fails_open_or_closed(
    upstream: Upstream, make_gateway, fault: str
) -> None:
    gw = await make_gateway(moderated(upstream, f"mock-moderation:{fault}", fail_open=True))
    assert (await ask(gw, "something violent")).choices[0].message.content  # open: served anyway
    gw = await make_gateway(moderated(upstream, f"mock-moderation:{fault}", fail_open=False))
    with pytest.raises(openai.APIStatusError) as info:
        await ask(gw, "a calm question")
    assert info.value.status_code == 503 and info.value.body["code"] == "moderation_unavailable"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
async def test_output_rules_on_an_anthropic_targets_own_answers(
    upstream: Upstream, make_gateway, stream: bool
) -> None:
    cfg = config(upstream, OUTPUT_RULES)
    root = upstream.url.removesuffix("/v1")
    cfg["providers"].append(
        {"name": "claude", "type": "anthropic", "base_url": root, "api_key": "sk-ant-x-0123456789"}
    )
    cfg["models"].append(
        {"name": "claude", "targets": [{"provider": "claude", "model": "claude-x:chunk_delay=0.01"}]}
    )
    gw = await make_gateway(cfg)
    async with anthropic.AsyncAnthropic(base_url=gw.root.rstrip("/"), api_key=TEAM_KEY, max_retries=0) as c:
        ask_ = [{"role": "user", "content": "mail alice@example.com on Project Falcon"}]
        block = [{"role": "user", "content": "then Project Osprey started and more"}]
        if stream:
            async with c.messages.stream(model="claude", max_tokens=50, messages=ask_) as s:
                redacted = await s.get_final_message()
            async with c.messages.stream(model="claude", max_tokens=50, messages=block) as s:
                blocked = await s.get_final_message()
        else:
            redacted = await c.messages.create(model="claude", max_tokens=50, messages=ask_)
            blocked = await c.messages.create(model="claude", max_tokens=50, messages=block)
    assert redacted.content[0].text == "Mock answer: mail [REDACTED:out-email] on [REDACTED:falcon]"  # type: ignore[union-attr]
    assert blocked.content[0].text == "Mock answer: then "  # type: ignore[union-attr]
    assert blocked.stop_reason == "refusal"


async def test_output_flag_and_the_native_api(upstream: Upstream, make_gateway) -> None:
    rules = [
        *OUTPUT_RULES,
        {"name": "out-ip", "detector": "ip_address", "applies_to": "output", "action": "flag"},
    ]
    gw = await make_gateway(config(upstream, rules))
    before = actions_out("out-ip", "flag")
    answer = await ask(gw, "the host is 10.1.2.3")
    assert answer.choices[0].message.content == "Mock answer: the host is 10.1.2.3"  # flag: served as is
    assert actions_out("out-ip", "flag") == before + 1
    status, body = await _post(
        gw,
        "/api/v1/llm/complete",
        {"messages": [{"role": "user", "content": "mail alice@example.com"}], "options": {"model": "chat"}},
    )
    assert status == 200 and body["content"] == "Mock answer: mail [REDACTED:out-email]"


async def test_a_cached_answer_is_only_served_under_the_rules_it_was_filtered_by(
    upstream: Upstream, make_gateway
) -> None:
    rules = [{"name": "sec", "detector": "secret", "applies_to": "output", "action": "redact"}]
    cfg = config(upstream, rules, guardrails=[])  # team-a: no rules; team-b: every rule
    cfg["plugins"] = ["auth", "guardrails", "rate_limit", "quota", "cache"]
    cfg["cache"] = {"enabled": True, "ttl_seconds": 60, "shared": True}
    gw = await make_gateway(cfg)
    first = await ask(gw, f"echo {SECRET}")
    assert SECRET in (first.choices[0].message.content or "")  # team-a: no rules apply
    await gw.gateway.pipeline.drain()  # the cache write
    second = await ask(gw, f"echo {SECRET}", key=TEAM_B_KEY)
    assert SECRET not in (second.choices[0].message.content or "")  # not team-a's cached answer
    cfg["plugins"] = ["auth", "rate_limit", "quota", "cache", "guardrails"]
    with pytest.raises(ConfigError, match="guardrails must come before cache"):
        config_mod.parse(cfg, env={})


async def test_tool_results_and_earlier_tool_call_arguments_are_checked(
    upstream: Upstream, make_gateway
) -> None:
    gw = await make_gateway(config(upstream))
    arguments = orjson.dumps({"k": SECRET}).decode()
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    with pytest.raises(openai.BadRequestError):
        await gw.client(api_key=TEAM_KEY).chat.completions.create(model="chat", messages=history)  # type: ignore[arg-type]
    async with anthropic.AsyncAnthropic(base_url=gw.root.rstrip("/"), api_key=TEAM_KEY, max_retries=0) as c:
        with pytest.raises(anthropic.BadRequestError):
            await c.messages.create(
                model="chat",
                max_tokens=10,
                messages=[
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "read", "input": {}}],
                    },
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t", "content": f"key={SECRET}"}],
                    },
                ],
            )
    assert upstream.state.requests == []


async def test_an_answer_with_a_lone_surrogate_is_still_checked_and_served(
    upstream: Upstream, make_gateway
) -> None:
    cfg = config(upstream, OUTPUT_RULES)
    cfg["models"][0]["targets"][0]["model"] = "mock-chat:lone_surrogate"
    gw = await make_gateway(cfg)
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/chat/completions",
            headers={"Authorization": f"Bearer {TEAM_KEY}"},
            json={"model": "chat", "messages": [{"role": "user", "content": "mail alice@example.com"}]},
        ) as resp,
    ):
        raw = await resp.read()
    assert resp.status == 200 and b"[REDACTED:out-email]" in raw and b"alice@example.com" not in raw


async def test_several_choices_cannot_bypass_output_rules(upstream: Upstream, make_gateway) -> None:
    gw = await make_gateway(config(upstream, OUTPUT_RULES))
    with pytest.raises(openai.BadRequestError) as info:
        await gw.client(api_key=TEAM_KEY).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert "n > 1" in str(info.value)
