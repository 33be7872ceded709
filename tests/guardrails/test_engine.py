"""The stream guard on its own: decisions that do not depend on where chunks split, a bounded hold,
and text RE2 cannot read as it is (a lone surrogate)."""

from __future__ import annotations

import json
import time
import types
from typing import Any

import orjson

from gateway.config import GuardrailRule, GuardrailsConfig
from gateway.guardrails.engine import Guard, StreamGuard

SECRET = "sk-proj-AbCdEf0123456789GhIjKlMnOpQrSt"


def guard(*rules: dict[str, Any]) -> tuple[Guard, StreamGuard]:
    config = types.SimpleNamespace(
        guardrails=GuardrailsConfig(rules=tuple(GuardrailRule(**r) for r in rules))
    )
    g = Guard(config)  # type: ignore[arg-type]
    return g, StreamGuard(g, g.output_rules(None), "req-1")


def chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if text is None else {"content": text}
    event = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


def relayed(out: bytes) -> str:
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])


def test_a_block_is_not_decided_on_a_chunk_boundary() -> None:
    _, sg = guard(
        {"name": "falcon", "pattern": r"(?i)\bproject falcon\b", "applies_to": "output", "action": "block"}
    )
    out = sg.feed(chunk("the project falcon")) + sg.feed(chunk("ry club")) + sg.feed(chunk(None, "stop"))
    assert not sg.stopped and relayed(out) == "the project falconry club"  # as a whole answer would be


def test_a_cut_never_makes_a_match_that_is_not_one() -> None:
    _, sg = guard(
        {"name": "falcon", "pattern": r"(?i)\bfalcon\b", "applies_to": "output", "action": "redact"}
    )
    out = sg.feed(chunk("see falconry, " + "y" * 200 + " a falcon " + "z" * 42)) + sg.feed(
        chunk(None, "stop")
    )
    assert relayed(out) == "see falconry, " + "y" * 200 + " a [REDACTED:falcon] " + "z" * 42


def test_the_hold_is_bounded_even_for_an_open_ended_match() -> None:
    _, sg = guard({"name": "pw", "pattern": r"password[^\n]*", "applies_to": "output", "action": "redact"})
    sg.feed(chunk("the password is "))
    started = time.perf_counter()
    for _ in range(2_000):
        sg.feed(chunk("abcdefghij"))
    assert len(sg.text.pending) <= 2048 and time.perf_counter() - started < 5


def test_a_lone_surrogate_does_not_get_text_past_the_rules() -> None:
    _, sg = guard({"name": "sec", "detector": "secret", "applies_to": "output", "action": "block"})
    raw = (
        b"data: "
        + json.dumps({"choices": [{"index": 0, "delta": {"content": f"key {SECRET} \ud800"}}]}).encode()
    )
    out = sg.feed(raw + b"\n\n") + sg.feed(chunk(None, "stop"))
    assert SECRET.encode() not in out and sg.stopped


def test_crlf_events_are_checked_and_kept() -> None:
    _, sg = guard({"name": "sec", "detector": "secret", "applies_to": "output", "action": "redact"})
    events = chunk("Hi ") + chunk(f"the key {SECRET} ok") + chunk(None, "stop") + b"data: [DONE]\n\n"
    out = sg.feed(events.replace(b"\n", b"\r\n"))
    assert relayed(out) == "Hi the key [REDACTED:sec] ok" and out.endswith(b"data: [DONE]\n\n")
