"""Rules applied to a request's text: ``block`` refuses it (400 ``content_filter``, the upstream never
sees it), ``redact`` replaces each match with ``[REDACTED:<rule>]`` before it goes upstream, ``flag``
lets it through and counts and logs it. Only the rule's name is ever logged or counted, never the text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from gateway import metrics
from gateway.auth import Identity
from gateway.config import Config, GuardrailRule
from gateway.errors import InvalidRequest, RequestTooLarge
from gateway.guardrails.detectors import DETECTORS, compile_pattern, find_pattern

log = structlog.get_logger("gateway.guardrails")

CONTENT_FILTER = "content_filter"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: str
    input: bool
    output: bool
    find: Callable[[str], list[tuple[int, int]]]

    @classmethod
    def of(cls, rule: GuardrailRule) -> Rule:
        if rule.detector is not None:
            find = DETECTORS[rule.detector].find
        else:
            compiled = compile_pattern(rule.pattern or "")

            def find(text: str) -> list[tuple[int, int]]:
                return find_pattern(compiled, text)

        return cls(rule.name, rule.action, rule.applies_to != "output", rule.applies_to != "input", find)


class Guard:
    """Every configured rule, compiled once; a team's own list (``teams[].guardrails``) or all of them."""

    def __init__(self, config: Config) -> None:
        self.rules = tuple(Rule.of(r) for r in config.guardrails.rules)
        self.by_name = {r.name: r for r in self.rules}
        self.max_chars = config.guardrails.max_scan_chars
        self._input = tuple(r for r in self.rules if r.input)
        self._counters: dict[tuple[str, str, str], Any] = {}

    def input_rules(self, identity: Identity | None) -> tuple[Rule, ...]:
        team = identity.team if identity is not None else None
        if team is None or team.guardrails is None:
            return self._input
        return tuple(r for name in team.guardrails if (r := self.by_name.get(name)) is not None and r.input)

    def check_input(
        self, body: dict[str, Any], endpoint: str, rules: tuple[Rule, ...], request_id: str
    ) -> None:
        """Apply ``rules`` to the request's text in place (redactions), or raise for a block."""
        if not rules:
            return
        texts = list(_texts(body, endpoint))
        if sum(len(get()) for get, _ in texts) > self.max_chars:
            raise RequestTooLarge(
                f"the request has more text than guardrails.max_scan_chars ({self.max_chars}) can check",
                code="content_too_large",
            )
        acted: set[tuple[str, str]] = set()
        for get, put in texts:
            text = get()
            for rule in rules:
                spans = rule.find(text)
                if not spans:
                    continue
                acted.add((rule.name, rule.action))
                if rule.action == "block":
                    self._count(acted, "input")
                    log.info("guardrail_blocked", rule=rule.name, direction="input", request_id=request_id)
                    raise InvalidRequest(
                        f"the request was blocked by the content guardrail {rule.name!r}",
                        code=CONTENT_FILTER,
                        param="messages" if endpoint != "embeddings" else "input",
                    )
                if rule.action == "redact":
                    text = redact(text, spans, rule.name)
            if text is not get():
                put(text)
        for name, action in sorted(acted):
            if action == "flag":
                log.info("guardrail_flagged", rule=name, direction="input", request_id=request_id)
        self._count(acted, "input")

    def _count(self, acted: set[tuple[str, str]], direction: str) -> None:
        """One count per rule and request (the matches of a rule in one request count once)."""
        for name, action in acted:
            key = (name, action, direction)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = metrics.GUARDRAIL_ACTIONS.labels(*key)
            counter.inc()


def redact(text: str, spans: list[tuple[int, int]], rule: str) -> str:
    marker = f"[REDACTED:{rule}]"
    out: list[str] = []
    last = 0
    for start, end in spans:
        out.append(text[last:start])
        out.append(marker)
        last = end
    out.append(text[last:])
    return "".join(out)


Text = tuple[Callable[[], str], Callable[[str], None]]


def _texts(body: dict[str, Any], endpoint: str) -> Iterator[Text]:
    """Every piece of text the request sends, as (read, replace): chat messages and their text parts,
    Anthropic messages' text blocks and system prompt, embeddings input."""
    if endpoint == "embeddings":
        value = body.get("input")
        if isinstance(value, str):
            yield _slot(body, "input")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str):
                    yield _slot(value, i)
        return
    if endpoint == "messages":
        system = body.get("system")
        if isinstance(system, str):
            yield _slot(body, "system")
        elif isinstance(system, list):
            yield from _parts(system)
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield _slot(message, "content")
        elif isinstance(content, list):
            yield from _parts(content)


def _parts(parts: list[Any]) -> Iterator[Text]:
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            yield _slot(part, "text")


def _slot(container: Any, key: Any) -> Text:
    def get() -> str:
        value: str = container[key]
        return value

    def put(value: str) -> None:
        container[key] = value

    return get, put
