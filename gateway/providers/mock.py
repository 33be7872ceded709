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
  max_context=N       a prompt over N tokens (~4 characters each) gets OpenAI's 400
                      ``context_length_exceeded``, worded as DeepSeek and OpenRouter word it

``GET /models`` answers in OpenRouter's shape (context length, per-token prices as strings, input
modalities); tests may replace ``MockState.models``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway import jsonx
from gateway.errors import error_body


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


def _completion(model: str, text: str, prompt_tokens: int, opts: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if opts.get("reasoning"):
        message["reasoning_content"] = "Thinking about it."
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return web.Response(
            status=400,
            body=error_body("bad json", "invalid_request_error"),
            content_type="application/json",
        )
    model = str(body.get("model", ""))
    opts = {**parse_options(model), **state.faults.get(model.split(":", 1)[0], {})}
    record = RequestRecord(model, dict(request.headers), raw, time.monotonic())
    state.count += 1
    if state.record:
        state.requests.append(record)
    try:
        return await _respond(request, body, model, opts)
    except asyncio.CancelledError:
        record.disconnected = True
        raise
    finally:
        record.ended = time.monotonic()


async def _respond(
    request: web.Request, body: dict[str, Any], model: str, opts: dict[str, Any]
) -> web.StreamResponse:
    if opts.get("first_byte_delay"):
        await asyncio.sleep(float(opts["first_byte_delay"]))
    if opts.get("hang"):
        await asyncio.sleep(3600)
    if "status" in opts:
        status = int(opts["status"])
        headers = {"Retry-After": str(opts["retry_after"])} if "retry_after" in opts else {}
        return web.Response(
            status=status,
            headers=headers,
            content_type="application/json",
            body=error_body(f"mock failure {status}", "upstream_error", str(status)),
        )
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
        payload = jsonx.dumps(_completion(model, text, prompt_tokens, opts))
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
    await resp.write(_chunk(model, {}, "stop"))
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
