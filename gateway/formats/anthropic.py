"""Anthropic's Messages API ↔ OpenAI chat: the one home of the Anthropic wire format.

Used by the ``anthropic`` provider (``/v1/chat/completions`` and the native API sent to Claude): an
OpenAI chat body becomes a Messages request (``chat_to_messages``), a Message becomes a
``chat.completion`` (``message_to_chat``) and a Messages event stream becomes OpenAI chunks, one
request's state in one ``ChatStream``. The full mapping table is in docs/anthropic.md.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.logging import REDACTOR

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; used when neither the request nor the model says

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Request fields passed through as they are: Anthropic's own, sent by OpenAI SDK users as extra_body.
# SECURITY: never service_tier (a billing choice) or anything else that routes or bills.
_PASS_THROUGH = ("temperature", "top_p", "top_k", "thinking", "metadata")


def chat_to_messages(body: dict[str, Any], model: str, max_output_tokens: int | None) -> dict[str, Any]:
    """An OpenAI chat body as a Messages request for ``model``."""
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(body.get("messages") or ()):
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.extend(_blocks(content, f"messages[{i}]"))
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": str(message.get("tool_call_id") or ""),
                "content": _blocks(content, f"messages[{i}]") or "",
            }
            _append(messages, "user", [result])
        elif role == "assistant":
            blocks = _blocks(content, f"messages[{i}]")
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    continue
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": str(call.get("id") or ""),
                        "name": str(function.get("name") or ""),
                        "input": _arguments(function.get("arguments")),
                    }
                )
            _append(messages, "assistant", blocks)
        else:
            _append(messages, "user", _blocks(content, f"messages[{i}]"))
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": requested if isinstance(requested, int) else max_output_tokens or DEFAULT_MAX_TOKENS,
    }
    if system:
        out["system"] = system
    for name in _PASS_THROUGH:
        if name in body and body[name] is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [s for s in stop if isinstance(s, str)]
    if body.get("stream") is True:
        out["stream"] = True
    user = body.get("user")
    if isinstance(user, str) and "metadata" not in out:
        out["metadata"] = {"user_id": user}
    _tools(body, out)
    return out


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """One turn per role: consecutive messages of a role (tool results after tool calls) are merged."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or an array of parts", param=where)
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), where))
        else:
            raise InvalidRequest(
                f"{where}: content parts of type {kind!r} cannot be sent to an Anthropic model "
                "(text and image_url can)",
                param=where,
                code="unsupported_content",
            )
    return blocks


def _image(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}: image_url needs a url", param=where)
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64" or not data:
            raise InvalidRequest(f"{where}: an image data URL must be base64", param=where)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise InvalidRequest("tool call arguments must be a JSON object", param="messages") from None
    return parsed if isinstance(parsed, dict) else {}


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [
            {
                "name": fn.get("name"),
                **({"description": fn["description"]} if fn.get("description") else {}),
                "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
            }
            for tool in tools
            if isinstance(tool, dict) and isinstance(fn := tool.get("function"), dict)
        ]
    choice = body.get("tool_choice")
    mapped: dict[str, Any] | None = None
    if choice == "auto":
        mapped = {"type": "auto"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        mapped = {"type": "tool", "name": choice["function"].get("name")}
    if body.get("parallel_tool_calls") is False and "tools" in out:
        mapped = {**(mapped or {"type": "auto"}), "disable_parallel_tool_use": True}
    if mapped is not None and "tools" in out:
        out["tool_choice"] = mapped


def usage_to_chat(usage: Any) -> dict[str, Any]:
    """Anthropic's usage as OpenAI's: the prompt counts every input token, cache reads included."""
    usage = usage if isinstance(usage, dict) else {}
    cached = _count(usage.get("cache_read_input_tokens"))
    prompt = _count(usage.get("input_tokens")) + cached + _count(usage.get("cache_creation_input_tokens"))
    completion = _count(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _finish(stop_reason: Any) -> str:
    return STOP_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def message_to_chat(message: dict[str, Any]) -> dict[str, Any]:
    """A Message as a ``chat.completion``."""
    text: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(str(block.get("text", "")))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if thinking:
        reply["reasoning_content"] = "".join(thinking)
    if calls:
        reply["tool_calls"] = calls
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": _finish(message.get("stop_reason")),
            }
        ],
        "usage": usage_to_chat(message.get("usage")),
    }


class ChatStream:
    """One request's Messages event stream → OpenAI ``chat.completion.chunk`` events.

    Fed the upstream's bytes as they arrive; returns whole OpenAI events (a partial Anthropic event is
    held until its end). A new content block of another kind starts a new OpenAI delta kind: text →
    ``content``, ``tool_use`` → ``tool_calls[i]`` (its ``input_json_delta`` pieces as ``arguments``,
    ``{}`` for a tool called without any), thinking → ``reasoning_content``. ``message_stop`` ends it
    with the finish reason, a usage chunk and ``[DONE]``; an ``error`` event becomes an OpenAI error
    event, which the relay treats as the upstream's failure."""

    __slots__ = ("_buffer", "_created", "_id", "_model", "_tools", "_usage", "finish")

    def __init__(self) -> None:
        self._buffer = b""
        self._id = "chatcmpl-anthropic"
        self._model: Any = None
        self._created = int(time.time())
        self._tools: dict[int, list[Any]] = {}  # block index -> [tool call index, got arguments]
        self._usage: dict[str, Any] = {}
        self.finish: str | None = None

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            payload = event_data(buffer[start:end])
            start = end + 2
            if payload is not None:
                out.append(self._event(payload))
        self._buffer = buffer[start:]
        return b"".join(out)

    def _event(self, payload: bytes) -> bytes:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return b""
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "content_block_delta":
            return self._delta(event.get("index"), event.get("delta") or {})
        if kind == "content_block_start":
            return self._block(event.get("index"), event.get("content_block") or {})
        if kind == "content_block_stop":
            tool = self._tools.get(event.get("index"))
            if tool is not None and not tool[1]:  # called without arguments: "{}", never ""
                return self._chunk({"tool_calls": [{"index": tool[0], "function": {"arguments": "{}"}}]})
            return b""
        if kind == "message_start":
            message = event.get("message") or {}
            self._id = str(message.get("id") or self._id)
            self._model = message.get("model")
            self._usage.update(message.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "message_delta":
            self._usage.update(event.get("usage") or {})
            reason = (event.get("delta") or {}).get("stop_reason")
            self.finish = _finish(reason) if reason else None
            return self._chunk({}, self.finish) if self.finish else b""
        if kind == "message_stop":
            usage = {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": usage_to_chat(self._usage),
            }
            return b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"
        if kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            return b"data: " + orjson.dumps({"error": error}) + b"\n\n"
        return b""  # ping, and event types added later

    def _block(self, index: Any, block: dict[str, Any]) -> bytes:
        kind = block.get("type")
        if kind == "tool_use" and isinstance(index, int):
            self._tools[index] = [len(self._tools), False]
            call = {
                "index": self._tools[index][0],
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return self._chunk({"tool_calls": [call]})
        if kind == "text" and block.get("text"):
            return self._chunk({"content": block["text"]})
        return b""

    def _delta(self, index: Any, delta: dict[str, Any]) -> bytes:
        kind = delta.get("type")
        if kind == "text_delta":
            return self._chunk({"content": delta.get("text", "")})
        if kind == "input_json_delta":
            tool = self._tools.get(index)
            piece = delta.get("partial_json")
            if tool is None or not piece:
                return b""
            tool[1] = True
            return self._chunk({"tool_calls": [{"index": tool[0], "function": {"arguments": piece}}]})
        if kind == "thinking_delta":
            return self._chunk({"reasoning_content": delta.get("thinking", "")})
        return b""  # signature_delta and the like: nothing an OpenAI client reads

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        event = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(event) + b"\n\n"


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one SSE event (Anthropic's name it in ``event:``, repeated in ``type``)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


# -- the Messages API as the client's format (/v1/messages) ------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
FINISH_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (any other 4xx is invalid_request_error, 5xx api_error)."""
    return ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(status: int, message: str) -> bytes:
    # SECURITY: upstream text can end up in a message: masked as in every other error shape.
    message = REDACTOR.clean(message)
    return orjson.dumps({"type": "error", "error": {"type": error_type(status), "message": message}})


def error_event(status: int, message: str) -> bytes:
    return b"event: error\ndata: " + error_body(status, message) + b"\n\n"


def messages_to_chat(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A Messages request as an OpenAI chat body for ``model`` (an OpenAI-compatible target)."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text(system)})
    for message in body.get("messages") or ():
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for block in content or ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(block.get("text", ""))})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"))}})
            elif kind == "tool_use":
                arguments = orjson.dumps(block.get("input") or {}).decode()
                call = {"id": block.get("id"), "type": "function", "function": {"arguments": arguments}}
                call["function"]["name"] = block.get("name")
                calls.append(call)
            elif kind == "tool_result":
                result = block.get("content")
                text = result if isinstance(result, str) else _text(result or [])
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            # thinking blocks are the model's own: an OpenAI-compatible model is not sent them
        if role == "assistant":
            reply: dict[str, Any] = {"role": "assistant", "content": _joined(parts)}
            if calls:
                reply["tool_calls"] = calls
            out.append(reply)
        elif parts:
            out.append({"role": role, "content": parts})
    chat: dict[str, Any] = {"model": model, "messages": out, "max_tokens": body.get("max_tokens")}
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    **({"description": t["description"]} if t.get("description") else {}),
                    "parameters": t.get("input_schema") or {"type": "object", "properties": {}},
                },
            }
            for t in tools
            if isinstance(t, dict) and t.get("name")
        ]
        choice = body.get("tool_choice")
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "any":
            chat["tool_choice"] = "required"
        elif kind in ("auto", "none"):
            chat["tool_choice"] = kind
        elif kind == "tool":
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}  # type: ignore[union-attr]
        if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False
    return chat


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "\n".join(
        str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"
    )


def _joined(parts: list[dict[str, Any]]) -> str | None:
    texts = [p["text"] for p in parts if p["type"] == "text"]
    return "".join(texts) if texts else None


def _image_url(source: Any) -> str:
    if not isinstance(source, dict):
        raise InvalidRequest("an image block needs a source", param="messages")
    if source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise InvalidRequest(f"image source type {source.get('type')!r} is not supported here", param="messages")


def chat_to_message(chat: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` as a Message (the model named as the client named it)."""
    choice = (chat.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if reply.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": reply["reasoning_content"], "signature": ""})
    if reply.get("content"):
        content.append({"type": "text", "text": reply["content"]})
    for call in reply.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        content.append(
            {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments}
        )
    return {
        "id": _message_id(chat.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": FINISH_REASONS.get(choice.get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": usage_from_chat(chat.get("usage")),
    }


def _message_id(chat_id: Any) -> str:
    return f"msg_{chat_id}" if isinstance(chat_id, str) and chat_id else "msg_gateway"


def usage_from_chat(usage: Any) -> dict[str, int]:
    """OpenAI's usage as Anthropic's: cache reads apart from the other input tokens."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    out = {
        "input_tokens": max(0, _count(usage.get("prompt_tokens")) - cached),
        "output_tokens": _count(usage.get("completion_tokens")),
    }
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def estimate_tokens(body: dict[str, Any]) -> int:
    """count_tokens without an Anthropic target: an estimate, ~4 characters of text a token (system,
    messages and tool definitions), never below 1. Anthropic's own count is exact; this is not."""
    chars = len(_text(body.get("system") or ""))
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += len(orjson.dumps(content))
    if body.get("tools"):
        chars += len(orjson.dumps(body["tools"]))
    return max(1, -(-chars // 4))


class MessagesStream:
    """OpenAI chunks (an OpenAI-compatible target) → a Messages event stream, for one request: a
    ``StreamShape`` for ``relay_stream``. ``message_start`` first; then per content block
    ``content_block_start`` / ``_delta`` / ``_stop``, a new block (and index) whenever the kind changes
    between text, thinking and each tool call; ``end`` closes the last block and sends ``message_delta``
    (stop reason and usage) and ``message_stop``."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.started = False
        self.index = -1  # the open block's index
        self.kind: str | None = None  # the open block's kind: "text", "thinking", or a tool call's index
        self.stop = "end_turn"
        self.usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        self.id = "msg_gateway"

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        for event in data.split(b"\n\n"):
            payload = event_data(event)
            if payload is None or payload == b"[DONE]":
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                self._chunk(chunk, out)
        return b"".join(out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        error = chunk.get("error")
        if error and not chunk.get("choices"):  # the upstream's failure mid-stream: Anthropic's error
            said = error.get("message") if isinstance(error, dict) else error
            out.append(error_event(502, f"the upstream reported an error: {str(said)[:200]}"))
            return
        if not self.started:
            self.started = True
            self.id = _message_id(chunk.get("id"))
            message: dict[str, Any] = {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": dict(self.usage),
            }
            out.append(sse_event("message_start", {"message": message}))
        if chunk.get("usage"):
            self.usage = usage_from_chat(chunk["usage"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                self._open("thinking", {"type": "thinking", "thinking": ""}, out)
                out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
            if delta.get("content"):
                self._open("text", {"type": "text", "text": ""}, out)
                out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                key = f"tool{call.get('index', 0)}"
                if self.kind != key:  # a new tool call (by its index; a repeated id is the same call)
                    block = {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "input": {},
                    }
                    self._open(key, block, out)
                if function.get("arguments"):
                    out.append(
                        self._delta({"type": "input_json_delta", "partial_json": function["arguments"]})
                    )
            if choice.get("finish_reason"):
                self.stop = FINISH_REASONS.get(choice["finish_reason"], "end_turn")

    def _open(self, kind: str, block: dict[str, Any], out: list[bytes], force: bool = False) -> None:
        if self.kind == kind and not force:
            return
        if self.kind is not None:
            out.append(sse_event("content_block_stop", {"index": self.index}))
        self.index += 1
        self.kind = kind
        out.append(sse_event("content_block_start", {"index": self.index, "content_block": block}))

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event("content_block_delta", {"index": self.index, "delta": delta})

    def error(self, status: int, message: str, code: str | None) -> bytes:
        return error_event(status, message)

    def end(self, ctx: Any) -> bytes:
        out: list[bytes] = []
        if self.kind is not None:
            out.append(sse_event("content_block_stop", {"index": self.index}))
            self.kind = None
        delta = {"delta": {"stop_reason": self.stop, "stop_sequence": None}, "usage": self.usage}
        out.append(sse_event("message_delta", delta))
        out.append(sse_event("message_stop", {}))
        return b"".join(out)


class PassThrough:
    """An Anthropic target's own event stream, relayed byte for byte: only a failure after the first
    byte is the gateway's to write (as Anthropic's ``event: error``)."""

    def feed(self, data: bytes) -> bytes:
        return data

    def error(self, status: int, message: str, code: str | None) -> bytes:
        return error_event(status, message)

    def end(self, ctx: Any) -> bytes:
        return b""


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One Messages stream event: ``event: NAME`` and its JSON, whose ``type`` repeats the name."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


_PING = re.compile(rb'"type"\s*:\s*"ping"')


class EventScanner:
    """An Anthropic event stream read on the side, as ``gateway.sse.SSEScanner`` reads OpenAI's: whole
    events forwarded untouched, data events counted (``ping`` is not data: it must not hold off the
    idle timeout), usage from ``message_start`` and ``message_delta``, ``message_stop`` as the end and an
    ``error`` event noted. Only events that mention usage or an error are decoded."""

    __slots__ = ("_pending", "_usage", "data_events", "done", "error")

    def __init__(self) -> None:
        self._pending = b""
        self._usage: dict[str, Any] = {}
        self.data_events = 0
        self.done = False
        self.error: dict[str, Any] | None = None

    @property
    def usage(self) -> dict[str, Any] | None:
        return usage_to_chat(self._usage) if self._usage else None

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        whole, self._pending = data[: end + 2], data[end + 2 :]
        for event in whole.split(b"\n\n"):
            if b"data:" not in event or event.startswith(b"event: ping") or _PING.search(event):
                continue
            self.data_events += 1
            if b'"usage"' in event or b'"type":"error"' in event or event.startswith(b"event: error"):
                self._decode(event)
            elif b'"message_stop"' in event:
                self.done = True
        return whole

    def _decode(self, event: bytes) -> None:
        payload = event_data(event)
        try:
            parsed = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return
        if not isinstance(parsed, dict):
            return
        kind = parsed.get("type")
        if kind == "message_start":
            self._usage.update((parsed.get("message") or {}).get("usage") or {})
        elif kind == "message_delta":
            self._usage.update(parsed.get("usage") or {})
        elif kind == "error":
            error = parsed.get("error")
            self.error = error if isinstance(error, dict) else {"message": str(error)}

    def finish(self) -> bytes:
        tail, self._pending = self._pending, b""
        return tail


def message_events(message: dict[str, Any]) -> bytes:
    """A Message as the event stream that would have carried it (a cached answer, replayed as a stream)."""
    usage = message.get("usage") or {}
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 0},
    }
    out = [sse_event("message_start", {"message": start})]
    for i, block in enumerate(message.get("content") or ()):
        kind = block.get("type")
        if kind == "text":
            out.append(
                sse_event("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}})
            )
            out.append(
                sse_event(
                    "content_block_delta",
                    {"index": i, "delta": {"type": "text_delta", "text": block.get("text", "")}},
                )
            )
        elif kind == "thinking":
            empty = {"type": "thinking", "thinking": ""}
            out.append(sse_event("content_block_start", {"index": i, "content_block": empty}))
            thought = {"type": "thinking_delta", "thinking": block.get("thinking", "")}
            out.append(sse_event("content_block_delta", {"index": i, "delta": thought}))
            if block.get("signature"):
                signature = {"type": "signature_delta", "signature": block["signature"]}
                out.append(sse_event("content_block_delta", {"index": i, "delta": signature}))
        elif kind == "tool_use":
            head = {"type": "tool_use", "id": block.get("id"), "name": block.get("name"), "input": {}}
            out.append(sse_event("content_block_start", {"index": i, "content_block": head}))
            arguments = orjson.dumps(block.get("input") or {}).decode()
            out.append(
                sse_event(
                    "content_block_delta",
                    {"index": i, "delta": {"type": "input_json_delta", "partial_json": arguments}},
                )
            )
        else:
            out.append(sse_event("content_block_start", {"index": i, "content_block": block}))
        out.append(sse_event("content_block_stop", {"index": i}))
    delta = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    out.append(
        sse_event(
            "message_delta", {"delta": delta, "usage": {"output_tokens": usage.get("output_tokens", 0)}}
        )
    )
    out.append(sse_event("message_stop", {}))
    return b"".join(out)


def events_message(stream: bytes) -> dict[str, Any] | None:
    """An Anthropic event stream assembled into its Message (to cache an answer that was streamed)."""
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    arguments: dict[int, str] = {}
    for raw in stream.replace(b"\r\n", b"\n").split(b"\n\n"):
        payload = event_data(raw)
        try:
            event = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "message_start":
            message = {**(event.get("message") or {}), "content": []}
        elif kind == "content_block_start" and isinstance(event.get("index"), int):
            blocks[event["index"]] = dict(event.get("content_block") or {})
        elif kind == "content_block_delta" and event.get("index") in blocks:
            index, delta = event["index"], event.get("delta") or {}
            block = blocks[index]
            kind = delta.get("type")
            if kind == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif kind == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            elif kind == "signature_delta":
                block["signature"] = delta.get("signature", "")
            elif kind == "input_json_delta":
                arguments[index] = arguments.get(index, "") + delta.get("partial_json", "")
        elif kind == "message_delta" and message is not None:
            message.update(event.get("delta") or {})
            message["usage"] = {**(message.get("usage") or {}), **(event.get("usage") or {})}
    if message is None:
        return None
    for index, text in arguments.items():
        try:
            blocks[index]["input"] = orjson.loads(text) if text else {}
        except orjson.JSONDecodeError:
            return None
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message
