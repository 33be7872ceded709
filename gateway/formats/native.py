"""The platform's native API (``/api/v1``) ↔ OpenAI chat: request, response and stream events.

The native request (``LLMRequest``, camelCase) becomes an OpenAI chat body once, right after parsing;
from there the request runs the same pipeline as ``/v1/chat/completions``. Answers are translated
back: a chat.completion into ``LLMResponse``, and a stream event by event (``NativeStream``: one
upstream event in, at most one native event out, never re-reading what was already sent).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gateway import jsonx
from gateway.accounting import cost_usd
from gateway.context import RequestContext, Usage
from gateway.errors import InvalidRequest, native_body

OPTIONS = {"model", "temperature", "maxTokens", "topP", "stop", "requirements"}
REQUIREMENTS = {"minContextWindow", "multimodal", "strengths", "useCases", "maxInputPrice", "maxOutputPrice"}
AUTO = "auto"


def _bad(message: str, param: str, code: str = "invalid_type") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _unknown(given: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(k for k in given if k not in known)
    if extra:
        raise _bad(
            f"unknown field {where}{extra[0]} (expected one of: {', '.join(sorted(known))})",
            f"{where}{extra[0]}",
            "unknown_parameter",
        )


def _number(value: Any, name: str, low: float, high: float | None = None) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
        raise _bad(f"{name} must be a number >= {low:g}", name)
    if high is not None and value > high:
        raise _bad(f"{name} must be a number between {low:g} and {high:g}", name)
    return value


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad(f"{name} must be an array of strings", name)
    return value


def parse_request(body: dict[str, Any]) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """Validate an ``LLMRequest``; return (OpenAI chat body without ``model``, the model name or None
    for automatic selection, the selection requirements)."""
    _unknown(body, {"messages", "options"}, "")
    messages = body.get("messages")
    if messages is None:
        raise _bad("you must provide messages", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        if not isinstance(m.get("content"), str | list):
            raise _bad(
                f"messages[{i}].content must be a string or an array of parts", f"messages[{i}].content"
            )
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _bad("options must be an object", "options")
    _unknown(options, OPTIONS, "options.")
    chat: dict[str, Any] = {"messages": messages}
    if options.get("temperature") is not None:
        chat["temperature"] = _number(options["temperature"], "options.temperature", 0, 2)
    if options.get("topP") is not None:
        chat["top_p"] = _number(options["topP"], "options.topP", 0, 1)
    max_tokens = options.get("maxTokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _bad("options.maxTokens must be a positive integer", "options.maxTokens")
        chat["max_tokens"] = max_tokens
    stop = options.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else _strings(stop, "options.stop")
        if len(stops) > 4:
            raise _bad("options.stop takes at most 4 sequences", "options.stop")
        chat["stop"] = stops
    model = options.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise _bad('options.model must be a model name, or "auto"', "options.model")
    requirements = options.get("requirements")
    if requirements is None:
        requirements = {}
    if not isinstance(requirements, dict):
        raise _bad("options.requirements must be an object", "options.requirements")
    _check_requirements(requirements)
    return chat, None if model in (None, AUTO) else model, requirements


def _check_requirements(req: dict[str, Any]) -> None:
    _unknown(req, REQUIREMENTS, "options.requirements.")
    where = "options.requirements."
    window = req.get("minContextWindow")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise _bad(f"{where}minContextWindow must be a positive integer", where + "minContextWindow")
    if req.get("multimodal") is not None and not isinstance(req["multimodal"], bool):
        raise _bad(f"{where}multimodal must be a boolean", where + "multimodal")
    for name in ("strengths", "useCases"):
        if req.get(name) is not None:
            _strings(req[name], where + name)
    for name in ("maxInputPrice", "maxOutputPrice"):
        if req.get(name) is not None:
            _number(req[name], where + name, 0)
    for name in [k for k, v in req.items() if v is None]:
        del req[name]


def usage_json(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        usage = Usage()  # the upstream reported none (the contract's usage is never null)
    return {
        "promptTokens": usage.prompt_tokens,
        "completionTokens": usage.completion_tokens,
        "totalTokens": usage.total_tokens,
    }


def completion_text(parsed: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(content, finish reason, upstream id) of an OpenAI chat.completion (the first choice)."""
    choices = parsed.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    finish = choice.get("finish_reason")
    upstream_id = parsed.get("id")
    return (
        content if isinstance(content, str) else "",
        finish if isinstance(finish, str) else None,
        upstream_id if isinstance(upstream_id, str) else None,
    )


UPSTREAM_STREAM_ERROR = "the upstream reported an error mid-stream"


def chunk_events(data: bytes) -> Iterator[tuple[str, str]]:
    """What whole OpenAI ``chat.completion.chunk`` events say, in order: ("content", text delta),
    ("finish", finish reason), ("comment", an SSE comment line) or ("error", ""). Role-only and
    usage-only chunks, odd shapes and ``[DONE]`` say nothing. Each event is decoded once."""
    for line in data.split(b"\n"):
        if line.startswith(b":"):
            yield "comment", line.decode("utf-8", "replace")
            continue
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            event = jsonx.loads(payload)
        except jsonx.DecodeError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("error"):
            yield "error", ""
            continue
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            continue
        choice = choices[0]
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(text, str) and text:
            yield "content", text
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            yield "finish", finish


def sse_event(data: dict[str, Any]) -> bytes:
    return b"data: " + jsonx.dumps(data) + b"\n\n"


def sse_error(status: int, message: str, code: str | None, request_id: str, provider: str | None) -> bytes:
    return b"event: error\ndata: " + native_body(status, message, code, request_id, provider) + b"\n\n"


class NativeStream:
    """OpenAI ``chat.completion.chunk`` events (whole events, as ``SSEScanner`` forwards them) in,
    native delta events out. Role-only and usage-only chunks produce nothing; an upstream error event
    becomes the native ``error`` event."""

    __slots__ = ("failed", "finish_reason", "provider", "request_id")

    def __init__(self, request_id: str, provider: str | None) -> None:
        self.request_id, self.provider = request_id, provider
        self.finish_reason: str | None = None
        self.failed = False

    def feed(self, data: bytes) -> bytes:
        if self.failed:
            return b""  # after an error event nothing more goes out
        out = []
        for kind, value in chunk_events(data):
            if kind == "content":
                out.append(b'data: {"content":' + jsonx.dumps(value) + b',"done":false}\n\n')
            elif kind == "finish":
                self.finish_reason = value
            elif kind == "comment":
                out.append(value.encode() + b"\n\n")  # keep-alives keep idle proxies from cutting the stream
            else:
                out.append(self.error(502, UPSTREAM_STREAM_ERROR, "upstream_stream_error"))
                break
        return b"".join(out)

    def error(self, status: int, message: str, code: str | None) -> bytes:
        """The stream's one error event (a second failure adds nothing)."""
        if self.failed:
            return b""
        self.failed = True
        return sse_error(status, message, code, self.request_id, self.provider)

    def end(self, ctx: RequestContext) -> bytes:
        return done_event(ctx, self.finish_reason)


def response_cost(ctx: RequestContext) -> float | None:
    """What the request costs the team: nothing for a cache hit; set on the context so the access
    line and the spend metrics book the same figure."""
    if ctx.cache == "hit":
        return 0.0
    if ctx.usage is not None and ctx.cost_usd is None:
        ctx.cost_usd = cost_usd(ctx.model.pricing, ctx.usage)
    return ctx.cost_usd


def done_event(ctx: RequestContext, finish_reason: str | None) -> bytes:
    return sse_event(
        {
            "content": "",
            "done": True,
            "finishReason": finish_reason,
            "usage": usage_json(ctx.usage),
            "costUsd": response_cost(ctx),
            "model": ctx.model.name,
            "provider": ctx.provider,
        }
    )
