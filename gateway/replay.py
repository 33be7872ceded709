"""Cached answers replayed either way: a stored JSON completion as SSE, a stored stream as JSON.

A stream is stored as the client saw it, minus any usage-only chunk; usage is kept beside it, and
added back as the final chunk when the replaying client asked for ``include_usage``.
"""

from __future__ import annotations

from typing import Any

from gateway import jsonx
from gateway.sse import SSEScanner

DONE = b"data: [DONE]\n\n"


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + jsonx.dumps(obj) + b"\n\n"


def _usage_chunk(base: dict[str, Any], usage: dict[str, Any]) -> bytes:
    return _event({**base, "choices": [], "usage": usage})


def json_to_sse(body: bytes, include_usage: bool) -> bytes:
    """A stored chat.completion as the stream a client would have received."""
    completion = jsonx.loads(body)
    base = {
        "id": completion.get("id", "chatcmpl-cached"),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    if completion.get("system_fingerprint") is not None:
        base["system_fingerprint"] = completion["system_fingerprint"]
    out = []
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = dict(choice.get("message") or {})
        delta = {k: v for k, v in message.items() if v is not None}
        if "tool_calls" in delta:
            delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(delta["tool_calls"])]
        out.append(_event({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}))
        out.append(
            _event(
                {
                    **base,
                    "choices": [{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}],
                }
            )
        )
    if include_usage and isinstance(completion.get("usage"), dict):
        out.append(_usage_chunk(base, completion["usage"]))
    out.append(DONE)
    return b"".join(out)


def sse_for_client(stream: bytes, usage: dict[str, Any] | None, include_usage: bool) -> bytes:
    """A stored stream replayed as a stream: usage chunk added back only if this client asked."""
    scanner = SSEScanner(strip_usage=True)
    body = scanner.feed(stream) + scanner.finish()
    if not include_usage or usage is None:
        return body
    head, sep, _ = body.rpartition(DONE)
    if not sep:
        return body
    return (
        head
        + _usage_chunk({"id": "chatcmpl-cached", "object": "chat.completion.chunk", "created": 0}, usage)
        + DONE
    )


def sse_to_json(stream: bytes, usage: dict[str, Any] | None) -> bytes:
    """A stored stream assembled into the chat.completion a non-stream client expects."""
    completion: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    for line in stream.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]" or not payload:
            continue
        chunk = jsonx.loads(payload)
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in completion:
                completion[key] = chunk[key]
        for c in chunk.get("choices") or []:
            choice = choices.setdefault(
                c.get("index", 0), {"index": c.get("index", 0), "message": {}, "finish_reason": None}
            )
            _merge_delta(choice["message"], c.get("delta") or {})
            if c.get("finish_reason") is not None:
                choice["finish_reason"] = c["finish_reason"]
    completion["choices"] = [choices[i] for i in sorted(choices)]
    for choice in completion["choices"]:
        choice["message"].setdefault("role", "assistant")
        choice["message"].setdefault("content", None)
    if usage is not None:
        completion["usage"] = usage
    return jsonx.dumps(completion)


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls":
            calls = message.setdefault("tool_calls", [])
            for part in value:
                i = part.get("index", len(calls))
                while len(calls) <= i:
                    calls.append({"function": {"name": "", "arguments": ""}})
                call = calls[i]
                for k in ("id", "type"):
                    if part.get(k):
                        call[k] = part[k]
                function = part.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
        elif isinstance(value, str) and key != "role":
            message[key] = message.get(key, "") + value
        else:
            message[key] = value
