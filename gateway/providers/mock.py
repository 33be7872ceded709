"""The built-in fake upstream: a small OpenAI-compatible aiohttp app with fault modes.

Used by the embedded demo config, the tests and the load tests. Behaviour is chosen per upstream
model name, ``name[:opt=value,opt,...]`` (so a config target such as ``mock-chat:status=500``
always fails), or at run time with ``POST /_mock/faults {"model": NAME, "options": {...}}``.

Options:
  status=N            answer with HTTP N and an OpenAI-shaped error (retry_after=S adds Retry-After)
  hang                never answer (until the caller goes away)
  first_byte_delay=S  wait S seconds before the response starts
  chunks=N            split the answer into N stream chunks (default: one per word)
  chunk_delay=S       wait S seconds between stream chunks
  keepalive=N         N ``: keep-alive`` comments (every keepalive_interval=S) before the first chunk;
                      with no_data, the stream then only ever sends comments
  processing          OpenRouter's ``: OPENROUTER PROCESSING`` comment before the first chunk
  cut_after=N         drop the connection after N data chunks
  stall_after=N       after N content chunks, send only ``: keep-alive`` comments, forever
  stream_error        a 200 stream whose first event is an error (OpenRouter style)
  reasoning           DeepSeek-style ``reasoning_content`` in the answer
  cost=X              report ``usage.cost`` (OpenRouter style)
  blank_lines=N       DeepSeek-style blank lines before a non-stream body
  set_cookie          answer with a ``Set-Cookie`` header (as CDNs in front of real providers do)
  lone_surrogate      the answer's text ends with a lone-surrogate escape (``\\ud800``): valid JSON that
                      orjson refuses
  litellm_usage       the stream's usage chunk has ``choices: [{"index": 0, "delta": {}}]`` (LiteLLM's
                      shape) instead of ``[]``
  tool_call           the answer calls the request's first tool (``{"city": "Paris", "unit": "celsius"}``);
                      a stream sends its arguments in three pieces
  max_context=N       a prompt over N tokens (~4 characters each) gets OpenAI's 400
                      ``context_length_exceeded``, worded as DeepSeek and OpenRouter word it

``POST /v1/messages`` is Anthropic's Messages API (an ``anthropic`` provider whose base_url is the
mock's root), streamed and not, with ``status=N`` (Anthropic's error shape; 529 is "overloaded"),
``first_byte_delay``, ``chunk_delay``, ``cut_after`` and these of its own:
  tool_call           the answer calls the request's first tool; a stream sends its input in pieces
  thinking            a thinking block before the text
  stream_error        an ``event: error`` (overloaded) after the first text delta
  cache_read=N        usage reports N ``cache_read_input_tokens``

``POST /moderations`` is OpenAI's moderation endpoint (an input saying "violent" is flagged).

``GET /models`` answers in OpenRouter's shape (context length, per-token prices as strings, input
modalities); tests may replace ``MockState.models``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway import jsonx
from gateway.errors import error_body
from gateway.formats import anthropic as formats_anthropic
from gateway.formats.anthropic import sse_event as _event


@dataclass(slots=True)
class RequestRecord:
    model: str
    headers: dict[str, str]
    body: bytes
    started: float
    ended: float | None = None
    disconnected: bool = False


MODELS: tuple[dict[str, Any], ...] = (
    {
        "id": "mock-chat",
        "object": "model",
        "context_length": 32768,
        "pricing": {"prompt": "0.000001", "completion": "0.000002"},
        "architecture": {"input_modalities": ["text"]},
        "top_provider": {"max_completion_tokens": 4096},
    },
)


@dataclass
class MockState:
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    record: bool = True
    count: int = 0
    models: list[dict[str, Any]] = field(default_factory=lambda: [dict(m) for m in MODELS])

    def calls(self, model: str) -> int:
        return sum(1 for r in self.requests if r.model.split(":", 1)[0] == model.split(":", 1)[0])


STATE = web.AppKey("mock_state", MockState)


def parse_options(model: str) -> dict[str, Any]:
    if ":" not in model:
        return {}
    opts: dict[str, Any] = {}
    for part in model.split(":", 1)[1].split(","):
        key, _, value = part.partition("=")
        if key:
            opts[key.strip()] = _number(value.strip()) if value else True
    return opts


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _answer(body: dict[str, Any]) -> tuple[str, int]:
    messages = body.get("messages") or []
    prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    last = str(messages[-1].get("content", "")) if messages and isinstance(messages[-1], dict) else ""
    return f"Mock answer: {last[:200]}", _tokens(prompt)


TOOL_ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'


def _tool_name(body: dict[str, Any], opts: dict[str, Any]) -> str | None:
    """The tool the answer calls (option ``tool_call`` and a request with tools), else None."""
    tools = body.get("tools")
    if not opts.get("tool_call") or not isinstance(tools, list) or not tools:
        return None
    function = tools[0].get("function") if isinstance(tools[0], dict) else None
    return str(function.get("name")) if isinstance(function, dict) else None


def _completion(
    model: str, text: str, prompt_tokens: int, opts: dict[str, Any], tool: str | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if opts.get("reasoning"):
        message["reasoning_content"] = "Thinking about it."
    if tool is not None:
        message["content"] = None
        call = {
            "id": "call_mock1",
            "type": "function",
            "function": {"name": tool, "arguments": TOOL_ARGUMENTS},
        }
        message["tool_calls"] = [call]
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": "stop" if tool is None else "tool_calls"}
        ],
        "usage": _usage(prompt_tokens, _tokens(text), opts),
    }


def _usage(prompt: int, completion: int, opts: dict[str, Any]) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if "cost" in opts:
        usage["cost"] = opts["cost"]
    return usage


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + jsonx.dumps(event) + b"\n\n"


async def _intake(
    request: web.Request, bad_json: bytes
) -> tuple[dict[str, Any], str, dict[str, Any], RequestRecord] | web.Response:
    """Read and record one request: its body, model, options (name and run-time faults) and record."""
    state = request.app[STATE]
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return web.Response(status=400, body=bad_json, content_type="application/json")
    model = str(body.get("model", ""))
    opts = {**parse_options(model), **state.faults.get(model.split(":", 1)[0], {})}
    record = RequestRecord(model, dict(request.headers), raw, time.monotonic())
    state.count += 1
    if state.record:
        state.requests.append(record)
    return body, model, opts, record


async def chat_completions(request: web.Request) -> web.StreamResponse:
    intake = await _intake(request, error_body("bad json", "invalid_request_error"))
    if isinstance(intake, web.Response):
        return intake
    body, model, opts, record = intake
    return await _tracked(record, _respond(request, body, model, opts))


async def _tracked(record: RequestRecord, answer: Awaitable[web.StreamResponse]) -> web.StreamResponse:
    """Answer, noting when it ended and whether the caller went away first."""
    try:
        return await answer
    except asyncio.CancelledError:
        record.disconnected = True
        raise
    finally:
        record.ended = time.monotonic()


async def _faults(opts: dict[str, Any]) -> web.Response | None:
    """The delay, hang and status options, common to every endpoint: the failure answer, if any."""
    if opts.get("first_byte_delay"):
        await asyncio.sleep(float(opts["first_byte_delay"]))
    if opts.get("hang"):
        await asyncio.sleep(3600)
    if "status" not in opts:
        return None
    status = int(opts["status"])
    headers = {"Retry-After": str(opts["retry_after"])} if "retry_after" in opts else {}
    return web.Response(
        status=status,
        headers=headers,
        content_type="application/json",
        body=error_body(f"mock failure {status}", "upstream_error", str(status)),
    )


async def _respond(
    request: web.Request, body: dict[str, Any], model: str, opts: dict[str, Any]
) -> web.StreamResponse:
    failure = await _faults(opts)
    if failure is not None:
        return failure
    text, prompt_tokens = _answer(body)
    if opts.get("lone_surrogate"):
        text += "\ud800"
    if "max_context" in opts and prompt_tokens > int(opts["max_context"]):
        limit = int(opts["max_context"])
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens} tokens. Please reduce the length of the messages."
        )
        return web.Response(
            status=400,
            content_type="application/json",
            body=error_body(message, "invalid_request_error", "context_length_exceeded", "messages"),
        )
    if not body.get("stream"):
        payload = jsonx.dumps(_completion(model, text, prompt_tokens, opts, _tool_name(body, opts)))
        blank = int(opts.get("blank_lines", 0))
        if not blank:
            response = web.Response(body=payload, content_type="application/json")
            if opts.get("set_cookie"):
                response.set_cookie("upstream_session", "from-an-earlier-request", path="/")
            return response
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(blank):
            await resp.write(b"\n")
            await asyncio.sleep(float(opts.get("keepalive_interval", 0.05)))
        await resp.write(payload)
        await resp.write_eof()
        return resp
    return await _stream(request, body, model, text, prompt_tokens, opts)


async def _stream(
    request: web.Request,
    body: dict[str, Any],
    model: str,
    text: str,
    prompt_tokens: int,
    opts: dict[str, Any],
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    interval = float(opts.get("keepalive_interval", 0.05))
    if opts.get("processing"):
        await resp.write(b": OPENROUTER PROCESSING\n\n")
    for _ in range(int(opts.get("keepalive", 0))):
        await resp.write(b": keep-alive\n\n")
        await asyncio.sleep(interval)
    if opts.get("no_data"):
        while True:
            await resp.write(b": keep-alive\n\n")
            await asyncio.sleep(interval)
    if opts.get("stream_error"):
        err = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "model": model,
            "error": {"code": 502, "message": "mock provider error"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }
        await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
        await resp.write_eof()
        return resp
    words = text.split(" ")
    n = int(opts.get("chunks", len(words)))
    size = max(1, -(-len(words) // max(1, n)))
    pieces = [
        " ".join(words[i : i + size]) + (" " if i + size < len(words) else "")
        for i in range(0, len(words), size)
    ]
    delay = float(opts.get("chunk_delay", 0))
    cut_after = opts.get("cut_after")
    stall_after = opts.get("stall_after")
    await resp.write(_chunk(model, {"role": "assistant", "content": ""}))
    if opts.get("reasoning"):
        await resp.write(_chunk(model, {"content": None, "reasoning_content": "Thinking."}))
    tool = _tool_name(body, opts)
    if tool is not None:
        head = {
            "index": 0,
            "id": "call_mock1",
            "type": "function",
            "function": {"name": tool, "arguments": ""},
        }
        await resp.write(_chunk(model, {"tool_calls": [head]}))
        third = len(TOOL_ARGUMENTS) // 3
        for k in range(0, len(TOOL_ARGUMENTS), third):
            part = {"index": 0, "function": {"arguments": TOOL_ARGUMENTS[k : k + third]}}
            await resp.write(_chunk(model, {"tool_calls": [part]}))
        pieces = []
    for i, piece in enumerate(pieces):
        if cut_after is not None and i >= int(cut_after):
            assert request.transport is not None
            request.transport.abort()
            return resp
        if stall_after is not None and i >= int(stall_after):
            while True:  # alive, but no data: only the idle timeout can end this
                await resp.write(b": keep-alive\n\n")
                await asyncio.sleep(interval)
        if delay and i:
            await asyncio.sleep(delay)
        await resp.write(_chunk(model, {"content": piece}))
    await resp.write(_chunk(model, {}, "stop" if tool is None else "tool_calls"))
    stream_options = body.get("stream_options") or {}
    if isinstance(stream_options, dict) and stream_options.get("include_usage"):
        usage = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {}}] if opts.get("litellm_usage") else [],
            "usage": _usage(prompt_tokens, _tokens(text), opts),
        }
        await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def anthropic_error(status: int, message: str) -> bytes:
    return formats_anthropic.error_body(status, message)


def _anthropic_answer(body: dict[str, Any]) -> tuple[str, int]:
    messages = body.get("messages") or []
    texts: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"
            )
    last = texts[-1] if texts else ""
    return f"Mock answer: {last[:200]}", _tokens(" ".join(texts))


def _anthropic_blocks(body: dict[str, Any], text: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if opts.get("thinking"):
        blocks.append({"type": "thinking", "thinking": "Thinking about it.", "signature": "sig"})
    tools = body.get("tools") or []
    if opts.get("tool_call") and tools:
        blocks.append({"type": "text", "text": "Let me check."})
        blocks.append(
            {
                "type": "tool_use",
                "id": "toolu_mock1",
                "name": tools[0].get("name"),
                "input": {"city": "Paris", "unit": "celsius"},
            }
        )
    else:
        blocks.append({"type": "text", "text": text})
    return blocks


def _anthropic_usage(prompt: int, completion: int, opts: dict[str, Any]) -> dict[str, Any]:
    usage = {"input_tokens": prompt, "output_tokens": completion}
    if "cache_read" in opts:
        usage["cache_read_input_tokens"] = int(opts["cache_read"])
    return usage


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API, recorded like a chat completion."""
    intake = await _intake(request, anthropic_error(400, "bad json"))
    if isinstance(intake, web.Response):
        return intake
    body, model, opts, record = intake
    return await _tracked(record, _answer_messages(request, body, model, opts))


async def _answer_messages(
    request: web.Request, body: dict[str, Any], model: str, opts: dict[str, Any]
) -> web.StreamResponse:
    if opts.get("first_byte_delay"):
        await asyncio.sleep(float(opts["first_byte_delay"]))
    if "status" in opts:
        status = int(opts["status"])
        return web.Response(
            status=status,
            body=anthropic_error(status, f"mock failure {status}"),
            content_type="application/json",
        )
    if not isinstance(body.get("max_tokens"), int):
        return web.Response(
            status=400,
            body=anthropic_error(400, "max_tokens: Field required"),
            content_type="application/json",
        )
    text, prompt_tokens = _anthropic_answer(body)
    blocks = _anthropic_blocks(body, text, opts)
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    usage = _anthropic_usage(prompt_tokens, _tokens(text), opts)
    message = {
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
    if not body.get("stream"):
        return web.Response(body=orjson.dumps(message), content_type="application/json")
    return await _anthropic_stream(request, message, opts)


async def _anthropic_stream(
    request: web.Request, message: dict[str, Any], opts: dict[str, Any]
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    delay = float(opts.get("chunk_delay", 0))
    cut_after = opts.get("cut_after")
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events = [_event("message_start", {"message": start}), _event("ping", {})]
    for i, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "text":
            events.append(
                _event("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}})
            )
            words = block["text"].split(" ")
            for j, word in enumerate(words):
                piece = word + (" " if j < len(words) - 1 else "")
                events.append(
                    _event(
                        "content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": piece}}
                    )
                )
                if opts.get("stream_error") and j == 0:
                    events.append(
                        _event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
                    )
        elif kind == "thinking":
            events.append(
                _event(
                    "content_block_start", {"index": i, "content_block": {"type": "thinking", "thinking": ""}}
                )
            )
            events.append(
                _event(
                    "content_block_delta",
                    {"index": i, "delta": {"type": "thinking_delta", "thinking": block["thinking"]}},
                )
            )
            events.append(
                _event(
                    "content_block_delta",
                    {"index": i, "delta": {"type": "signature_delta", "signature": "sig"}},
                )
            )
        elif kind == "tool_use":
            events.append(
                _event(
                    "content_block_start",
                    {
                        "index": i,
                        "content_block": {
                            "type": "tool_use",
                            "id": block["id"],
                            "name": block["name"],
                            "input": {},
                        },
                    },
                )
            )
            arguments = orjson.dumps(block["input"]).decode()
            third = max(1, len(arguments) // 3)
            for k in range(0, len(arguments), third):
                events.append(
                    _event(
                        "content_block_delta",
                        {
                            "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": arguments[k : k + third]},
                        },
                    )
                )
        events.append(_event("content_block_stop", {"index": i}))
    events.append(
        _event(
            "message_delta",
            {
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    events.append(_event("message_stop", {}))
    for n, event in enumerate(events):
        if cut_after is not None and n >= int(cut_after):
            assert request.transport is not None
            request.transport.abort()
            return resp
        if delay and n:
            await asyncio.sleep(delay)
        await resp.write(event)
        if b'"type":"error"' in event:
            break
    await resp.write_eof()
    return resp


async def moderations(request: web.Request) -> web.StreamResponse:
    """OpenAI's moderation endpoint: an input is flagged when it says "violent"; the ``model`` field takes
    the options above (``status=N``, ``first_byte_delay=S``, ``hang``)."""
    intake = await _intake(request, error_body("bad json", "invalid_request_error"))
    if isinstance(intake, web.Response):
        return intake
    body, _, opts, record = intake
    return await _tracked(record, _moderate(body, opts))


async def _moderate(body: dict[str, Any], opts: dict[str, Any]) -> web.StreamResponse:
    failure = await _faults(opts)
    if failure is not None:
        return failure
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    results = [{"flagged": "violent" in str(item).lower(), "categories": {}} for item in items]
    return web.json_response({"id": "modr-mock", "model": "mock-moderation", "results": results})


async def count_tokens(request: web.Request) -> web.Response:
    """Anthropic's count_tokens: ~4 characters a token of the messages' text, recorded."""
    state = request.app[STATE]
    raw = await request.read()
    body = orjson.loads(raw)
    state.requests.append(RequestRecord("count_tokens", dict(request.headers), raw, time.monotonic()))
    _, tokens = _anthropic_answer(body)
    return web.json_response({"input_tokens": tokens + 1000})  # +1000: tests tell it from the estimate


async def embeddings(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, float(len(str(x)))]}
        for i, x in enumerate(items)
    ]
    tokens = sum(_tokens(str(x)) for x in items)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        dumps=lambda o: orjson.dumps(o).decode(),
    )


async def models(request: web.Request) -> web.Response:
    data = request.app[STATE].models
    return web.json_response({"object": "list", "data": data}, dumps=lambda o: orjson.dumps(o).decode())


async def set_faults(request: web.Request) -> web.Response:
    data = await request.json()
    request.app[STATE].faults[str(data["model"])] = dict(data.get("options") or {})
    return web.json_response({"ok": True})


async def clear_faults(request: web.Request) -> web.Response:
    request.app[STATE].faults.clear()
    return web.json_response({"ok": True})


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"requests": state.count, "faults": state.faults})


def build_app(*, record: bool = True) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = MockState(record=record)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_post("/moderations", moderations)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/models", models)
    app.router.add_post("/_mock/faults", set_faults)
    app.router.add_delete("/_mock/faults", clear_faults)
    app.router.add_get("/_mock/stats", stats)
    return app


async def start(host: str = "127.0.0.1", port: int = 0, *, record: bool = False) -> tuple[web.AppRunner, str]:
    """Start the mock on a loopback port; return the runner and its base URL (``.../v1``)."""
    runner = web.AppRunner(build_app(record=record), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, f"http://{host}:{bound}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the llm-gateway mock upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(
        build_app(record=False),
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        print=None,
    )


if __name__ == "__main__":
    main()
