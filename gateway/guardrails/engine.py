"""Rules applied to a request's text: ``block`` refuses it (400 ``content_filter``, the upstream never
sees it), ``redact`` replaces each match with ``[REDACTED:<rule>]`` before it goes upstream, ``flag``
lets it through and counts and logs it. Only the rule's name is ever logged or counted, never the text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
import structlog

from gateway import jsonx, metrics
from gateway.auth import Identity
from gateway.config import Config, GuardrailRule
from gateway.errors import InvalidRequest, RequestTooLarge, ServiceUnavailable
from gateway.formats.anthropic import event_data, sse_event
from gateway.guardrails.detectors import DETECTORS, compile_pattern, find_pattern
from gateway.providers.base import Provider

log = structlog.get_logger("gateway.guardrails")

CONTENT_FILTER = "content_filter"
PATTERN_HOLD = 256  # a user pattern's longest match, as far as a stream's hold-back goes
MAX_HOLD = 1024  # text a stream holds back at most (a longer match can be cut before it is seen)
MARGIN = 8  # a match ending this close to a stream's held text may still change with the next chunk
MODERATION_MAX_BYTES = 256 * 1024
INLINE_BYTES = 64 * 1024  # a longer request or answer is checked in a worker thread, off the event loop


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: str
    input: bool
    output: bool
    find: Callable[[str], list[tuple[int, int]]]
    hold: int  # characters a stream must hold back for a match split across chunks to be seen whole
    moderation: GuardrailRule | None = None  # type moderation: asked of a provider, never matched here
    pattern: str = ""  # the RE2 pattern its matches come from (every match of the rule matches it)

    @classmethod
    def of(cls, rule: GuardrailRule) -> Rule:
        if rule.type == "moderation":
            return cls(rule.name, rule.action, True, False, _nothing, 0, rule)
        if rule.detector is not None:
            find = DETECTORS[rule.detector].find
            hold = DETECTORS[rule.detector].max_chars
            pattern = DETECTORS[rule.detector].pattern
        else:
            pattern = rule.pattern or ""
            hold = PATTERN_HOLD
            compiled = compile_pattern(rule.pattern or "")

            def find(text: str) -> list[tuple[int, int]]:
                return find_pattern(compiled, text)

        inp, out = rule.applies_to != "output", rule.applies_to != "input"
        return cls(rule.name, rule.action, inp, out, _matchable(find), min(hold, MAX_HOLD), None, pattern)


def _nothing(text: str) -> list[tuple[int, int]]:
    return []


def matchable(text: str) -> str:
    """``text`` as RE2 can read it: a lone surrogate (valid JSON, not UTF-8) becomes U+FFFD — one
    character for one, so spans found in it are spans of ``text``."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _matchable(find: Callable[[str], list[tuple[int, int]]]) -> Callable[[str], list[tuple[int, int]]]:
    def run(text: str) -> list[tuple[int, int]]:
        return find(matchable(text))

    return run


def _never(text: str) -> bool:
    return False


def _always(text: str) -> bool:
    return True


class Guard:
    """Every configured rule, compiled once; a team's own list (``teams[].guardrails``) or all of them."""

    def __init__(self, config: Config, providers: Mapping[str, Provider] | None = None) -> None:
        self.providers = providers or {}
        self.rules = tuple(Rule.of(r) for r in config.guardrails.rules)
        self.by_name = {r.name: r for r in self.rules}
        self.max_chars = config.guardrails.max_scan_chars
        self._input = tuple(r for r in self.rules if r.input)
        self._output = tuple(r for r in self.rules if r.output)
        self._prefilters: dict[tuple[Rule, ...], Callable[[str], bool]] = {}
        self._counters: dict[tuple[str, str, str], Any] = {}

    def candidates(self, rules: tuple[Rule, ...]) -> Callable[[str], bool]:
        """Whether a text may match any of ``rules``: one RE2 search over all their patterns at once
        (the usual clean text costs that one search, not one per rule); False is certain."""
        check = self._prefilters.get(rules)
        if check is None:
            patterns = [r.pattern for r in rules if r.moderation is None]
            try:
                combined = compile_pattern("|".join(f"(?:{p})" for p in patterns)) if patterns else None
            except ValueError:  # too big for one RE2 program: every text is a candidate
                combined = False
            if combined is None:
                check = _never
            elif combined is False:
                check = _always
            else:

                def check(text: str) -> bool:
                    return combined.search(matchable(text)) is not None

            if len(self._prefilters) < 1024:  # one per distinct rule list (teams): bounded anyway
                self._prefilters[rules] = check
        return check

    def input_rules(self, identity: Identity | None) -> tuple[Rule, ...]:
        return self._rules(identity, self._input, "input")

    def output_rules(self, identity: Identity | None) -> tuple[Rule, ...]:
        return self._rules(identity, self._output, "output")

    def _rules(self, identity: Identity | None, every: tuple[Rule, ...], direction: str) -> tuple[Rule, ...]:
        team = identity.team if identity is not None else None
        if team is None or team.guardrails is None:
            return every
        chosen = (self.by_name.get(name) for name in team.guardrails)
        return tuple(r for r in chosen if r is not None and getattr(r, direction))

    def check_answer(
        self, answer: dict[str, Any], anthropic: bool, rules: tuple[Rule, ...], request_id: str
    ) -> bool:
        """Apply ``rules`` to a whole answer in place (a chat.completion, or an Anthropic Message):
        redactions, and for a block the text cut before the match with ``content_filter`` as the finish
        reason (Anthropic's ``refusal``). True when the answer changed."""
        acted: set[tuple[str, str]] = set()
        changed = False
        if anthropic:
            content = answer.get("content")
            blocks: list[Any] = content if isinstance(content, list) else []
            for i, block in enumerate(blocks):
                if not (isinstance(block, dict) and isinstance(block.get("text"), str)):
                    continue
                text, cut = self.scan(block["text"], rules, acted)
                if text != block["text"]:
                    block["text"], changed = text, True
                if cut:
                    del blocks[i + 1 :]
                    answer["stop_reason"], changed = "refusal", True
                    break
        else:
            for choice in answer.get("choices") or ():
                message = choice.get("message") if isinstance(choice, dict) else None
                if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                    continue
                text, cut = self.scan(message["content"], rules, acted)
                if text != message["content"]:
                    message["content"], changed = text, True
                if cut:
                    choice["finish_reason"], changed = CONTENT_FILTER, True
        self.report(acted, "output", request_id)
        return changed

    def scan(self, text: str, rules: tuple[Rule, ...], acted: set[tuple[str, str]]) -> tuple[str, bool]:
        """``text`` with its redactions, cut before the first block match; True when it was cut."""
        if not text or not self.candidates(rules)(text):
            return text, False
        cut: int | None = None
        for rule in rules:
            if rule.action != "block":
                continue
            spans = rule.find(text)
            if spans:
                acted.add((rule.name, "block"))
                cut = spans[0][0] if cut is None else min(cut, spans[0][0])
        if cut is not None:
            text = text[:cut]
        for rule in rules:
            if rule.action == "block":
                continue
            spans = rule.find(text)
            if spans:
                acted.add((rule.name, rule.action))
                if rule.action == "redact":
                    text = redact(text, spans, rule.name)
        return text, cut is not None

    def report(self, acted: set[tuple[str, str]], direction: str, request_id: str) -> None:
        for name, action in sorted(acted):
            if action != "redact":
                log.info(
                    f"guardrail_{'blocked' if action == 'block' else 'flagged'}",
                    rule=name,
                    direction=direction,
                    request_id=request_id,
                )
        self._count(acted, direction)
        acted.clear()

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
        may_match = self.candidates(rules)
        for get, put in texts:
            text = get()
            if not may_match(text):
                continue
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

    async def moderate(
        self, body: dict[str, Any], endpoint: str, rules: tuple[Rule, ...], request_id: str
    ) -> None:
        """Ask each moderation rule's provider about the request's text (after redactions): a flagged
        answer blocks (400 ``content_filter``) or is flagged; an unreachable or failing moderation lets
        the request through (``fail_open``) or refuses it (503 ``moderation_unavailable``)."""
        texts = [get() for get, _ in _texts(body, endpoint)]
        if not texts:
            return
        acted: set[tuple[str, str]] = set()
        for rule in rules:
            setting = rule.moderation
            if setting is None:
                continue
            flagged = await self._ask(setting, texts, request_id)
            if flagged:
                acted.add((rule.name, rule.action))
                if rule.action == "block":
                    self.report(acted, "input", request_id)
                    raise InvalidRequest(
                        f"the request was blocked by the content guardrail {rule.name!r}",
                        code=CONTENT_FILTER,
                        param="messages" if endpoint != "embeddings" else "input",
                    )
        self.report(acted, "input", request_id)

    async def _ask(self, rule: GuardrailRule, texts: list[str], request_id: str) -> bool:
        provider = self.providers.get(rule.provider or "")
        body: dict[str, Any] = {"input": texts}
        if rule.model:
            body["model"] = rule.model
        try:
            if provider is None:
                raise LookupError("no such provider")
            async with asyncio.timeout(rule.timeout_seconds):
                resp = await provider.post("/moderations", orjson.dumps(body), stream=False)
                try:
                    data = await resp.content.read(MODERATION_MAX_BYTES + 1) if resp.status == 200 else None
                    if data is not None and len(data) > MODERATION_MAX_BYTES:
                        raise ValueError("moderation answer too large")
                finally:
                    resp.release()
            results = orjson.loads(data).get("results") if data else None
            if not isinstance(results, list):
                raise ValueError(f"HTTP {resp.status}" if data is None else "no results")
            return any(isinstance(r, dict) and r.get("flagged") is True for r in results)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, LookupError, AttributeError) as exc:
            log.warning(
                "guardrail_moderation_unavailable",
                rule=rule.name,
                error=type(exc).__name__,
                fail_open=rule.fail_open,
                request_id=request_id,
            )
            if rule.fail_open:
                return False
            raise ServiceUnavailable(
                f"the content moderation of guardrail {rule.name!r} is unavailable; try again shortly",
                code="moderation_unavailable",
            ) from None

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
        for call in message.get("tool_calls") or ():  # earlier tool calls' arguments go upstream too
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                yield _slot(function, "arguments")


def _parts(parts: list[Any]) -> Iterator[Text]:
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            yield _slot(part, "text")
        elif part.get("type") == "tool_result":  # Anthropic's tool results carry text too
            content = part.get("content")
            if isinstance(content, str):
                yield _slot(part, "content")
            elif isinstance(content, list):
                yield from _parts(content)


def _slot(container: Any, key: Any) -> Text:
    def get() -> str:
        value: str = container[key]
        return value

    def put(value: str) -> None:
        container[key] = value

    return get, put


class TextHold:
    """One stream's text held back only as far as the rules need (``Rule.hold``, the longest match they
    can make), so that a match split across chunks, events or TCP reads is still seen whole; what is
    safe goes out with its redactions."""

    def __init__(self, guard: Guard, rules: tuple[Rule, ...], acted: set[tuple[str, str]]) -> None:
        self.guard, self.rules, self.acted = guard, rules, acted
        self.others = tuple(r for r in rules if r.action != "block")
        self.hold = max(r.hold for r in rules)
        self.may_match = guard.candidates(rules)
        self.pending = ""

    def take(self, text: str, *, final: bool) -> tuple[str, bool]:
        """Add ``text``: the text safe to relay now (all of it when ``final``), and True when a block
        rule matched — the text is then what came before the match, and nothing more may follow."""
        text = self.pending = self.pending + text
        if not text:
            return "", False
        if not self.may_match(text):  # nothing here can be (or start) a match: all of it may go
            cut = len(text) if final else max(0, len(text) - self.hold)
            out, self.pending = text[:cut], text[cut:]
            return out, False
        cut = len(text) if final else max(0, len(text) - self.hold)
        settled = len(text) if final else len(text) - MARGIN  # matches ending later may still change
        blocked = None
        found: list[tuple[int, int, Rule]] = []  # settled matches of the other rules, in this window
        for rule in self.rules:
            for start, end in rule.find(text):
                if end > settled:
                    cut = min(cut, start)  # ("project falcon" + "ry" is no match): it waits
                elif rule.action == "block":
                    self.acted.add((rule.name, "block"))
                    blocked = start if blocked is None else min(blocked, start)
                else:
                    found.append((start, end, rule))
                    if not final and start < cut < end:
                        cut = start  # never cut inside a match: it waits whole
        if not final:  # bounded: a match longer than the hold is relayed in parts
            cut = max(cut, len(text) - MAX_HOLD - self.hold)
        end_at = cut if blocked is None else blocked  # a block: all the text before its match goes
        out = self._apply(text[:end_at], [f for f in found if f[1] <= end_at])
        if blocked is not None:
            self.pending = ""
            return out, True
        self.pending = text[cut:]
        return out, False

    def _apply(self, text: str, found: list[tuple[int, int, Rule]]) -> str:
        """``text`` with the matches found in the whole window redacted (never re-found in a part of
        it, where a cut could make a match that is not one), and the actions noted."""
        spans: list[tuple[int, int, str]] = []
        for start, end, rule in sorted(found, key=lambda f: (f[0], -f[1])):
            self.acted.add((rule.name, rule.action))
            if rule.action == "redact" and (not spans or start >= spans[-1][1]):
                spans.append((start, end, rule.name))
        out: list[str] = []
        last = 0
        for start, end, name in spans:
            out += (text[last:start], f"[REDACTED:{name}]")
            last = end
        out.append(text[last:])
        return "".join(out)


class OutputFilter(Protocol):
    """What the relay runs a stream's output through (``StreamGuard``, ``MessagesStreamGuard``)."""

    stopped: bool  # a block matched: the answer has ended, the upstream is to be cancelled

    def feed(self, data: bytes) -> bytes: ...


class _EventFilter:
    """Whole SSE events in (LF or CRLF), each through ``_event``; nothing more once ``stopped``."""

    stopped = False

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        for event in data.split(b"\n\n"):
            if self.stopped:
                break  # blocked: nothing more is relayed
            if event.strip():
                out.append(self._event(event))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        raise NotImplementedError


class StreamGuard(_EventFilter):
    """Output rules on an OpenAI chunk stream, for one request: the answer's text (``choices[0]``'s
    ``delta.content``) goes through a ``TextHold`` and out re-chunked. ``redact`` rewrites the relayed
    text; ``block`` relays the text before the match, then a final chunk with ``finish_reason:
    content_filter`` and ``[DONE]``, and sets ``stopped`` (the relay then cancels the upstream). Other
    chunks (roles, tool calls, usage) pass through in order."""

    def __init__(self, guard: Guard, rules: tuple[Rule, ...], request_id: str) -> None:
        self.guard, self.request_id = guard, request_id
        self.acted: set[tuple[str, str]] = set()
        self.text = TextHold(guard, rules, self.acted)
        self.template: dict[str, Any] | None = None  # the last content chunk, to re-chunk the text
        self.stopped = False

    def _event(self, event: bytes) -> bytes:
        payload = event_data(event)
        if payload == b"[DONE]":
            return self._release("", final=True) + event + b"\n\n"
        chunk = _json(payload) if payload is not None else None
        choices = chunk.get("choices") if chunk is not None else None
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        delta = first.get("delta") if first is not None else None
        content = delta.get("content") if isinstance(delta, dict) else None
        if chunk is None or first is None or not isinstance(delta, dict):
            return event + b"\n\n"  # comments, usage and error events: as they are
        out = b""
        if isinstance(content, str) and content:
            self.template = chunk
            out = self._release(content, final=bool(first.get("finish_reason")))
            if self.stopped:
                return out
            rest = {k: v for k, v in delta.items() if k != "content"}
            if not rest and not first.get("finish_reason"):
                return out  # a text-only chunk: its text went out above (or waits in the hold)
            first = {**first, "delta": rest}
            chunk = {**chunk, "choices": [first, *choices[1:]]}  # type: ignore[index]
            return out + _sse(chunk)
        if first.get("finish_reason"):
            out = self._release("", final=True)
            if self.stopped:
                return out
        return out + event + b"\n\n"

    def _release(self, text: str, *, final: bool) -> bytes:
        safe, blocked = self.text.take(text, final=final)
        if blocked:
            self.stopped = True
            self.guard.report(self.acted, "output", self.request_id)
            ending = {**self._base(), "choices": [{"index": 0, "delta": {}, "finish_reason": CONTENT_FILTER}]}
            return self._text(safe) + _sse(ending) + b"data: [DONE]\n\n"
        if final:
            self.guard.report(self.acted, "output", self.request_id)
        return self._text(safe)

    def _base(self) -> dict[str, Any]:
        template = self.template or {}
        return {k: v for k, v in template.items() if k not in ("choices", "usage")}

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        return _sse({**self._base(), "choices": [choice]})


class MessagesStreamGuard(_EventFilter):
    """Output rules on an Anthropic event stream relayed as it is (``/v1/messages`` to an ``anthropic``
    target): each text block's ``text_delta``s go through a ``TextHold`` and out as new deltas; a block
    relays the text before the match, then closes the block, ``message_delta`` with ``stop_reason:
    refusal`` and ``message_stop``. Every other event passes through untouched."""

    def __init__(self, guard: Guard, rules: tuple[Rule, ...], request_id: str) -> None:
        self.guard, self.rules, self.request_id = guard, rules, request_id
        self.acted: set[tuple[str, str]] = set()
        self.blocks: dict[int, TextHold] = {}
        self.stopped = False

    def _event(self, raw: bytes) -> bytes:
        payload = event_data(raw)
        event = _json(payload) if payload is not None else None
        if event is None:
            return raw + b"\n\n"
        kind, index = event.get("type"), event.get("index")
        if kind == "message_stop":
            self.guard.report(self.acted, "output", self.request_id)
        if not isinstance(index, int):
            return raw + b"\n\n"
        if kind == "content_block_start" and (event.get("content_block") or {}).get("type") == "text":
            self.blocks[index] = TextHold(self.guard, self.rules, self.acted)
        elif kind == "content_block_delta" and index in self.blocks:
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                return self._relay(index, *self.blocks[index].take(delta["text"], final=False))
        elif kind == "content_block_stop" and index in self.blocks:
            safe, blocked = self.blocks.pop(index).take("", final=True)
            return self._relay(index, safe, blocked) + (b"" if blocked else raw + b"\n\n")
        return raw + b"\n\n"

    def _relay(self, index: int, text: str, blocked: bool) -> bytes:
        out = sse_event(
            "content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": text}}
        )
        out = out if text else b""
        if not blocked:
            return out
        self.stopped = True
        self.guard.report(self.acted, "output", self.request_id)
        ending = {"delta": {"stop_reason": "refusal", "stop_sequence": None}, "usage": {"output_tokens": 0}}
        return (
            out
            + sse_event("content_block_stop", {"index": index})
            + sse_event("message_delta", ending)
            + sse_event("message_stop", {})
        )


def _json(payload: bytes) -> dict[str, Any] | None:
    try:
        value = jsonx.loads(payload)  # lenient: a lone surrogate is valid JSON, and checked too
    except jsonx.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + jsonx.dumps(chunk) + b"\n\n"
