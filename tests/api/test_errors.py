"""What a client sees when it gets something wrong, request ids, and the rest of the OpenAI surface."""

from __future__ import annotations

import gzip
import io
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import RunningGateway, Upstream

MESSAGES = [{"role": "user", "content": "hi"}]
TWENTY_MB = 20 * 1024 * 1024


async def post(
    gw: RunningGateway, path: str, data: bytes | Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    """POST raw bytes (or a JSON-able value) with aiohttp; return status, parsed body and headers."""
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    payload = io.BytesIO(body) if len(body) > 1 << 20 else body  # aiohttp warns about big raw bytes
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.root}{path}",
            data=payload,
            headers={"Content-Type": "application/json", "Authorization": "Bearer k", **(headers or {})},
        ) as resp,
    ):
        raw = await resp.read()
        assert resp.content_type == "application/json"
        return resp.status, orjson.loads(raw), resp.headers


def assert_openai_error(body: dict[str, Any], status: int) -> dict[str, Any]:
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]
    expected_type = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error"}
    if status in expected_type:
        assert err["type"] == expected_type[status]
    return err


# --- validation ----------------------------------------------------------------------------------------

CHAT_CASES: list[tuple[str, Any, int, str | None, str | None]] = [
    # (id, body, status, param, code)
    ("invalid-json", b'{"model": "chat", "messages": [', 400, None, "invalid_json"),
    ("not-utf8", b'{"model": "\xff\xfe"}', 400, None, "invalid_json"),
    ("empty-body", b"", 400, None, "invalid_json"),
    ("array-body", [{"model": "chat"}], 400, None, "invalid_json"),
    ("string-body", "chat", 400, None, "invalid_json"),
    ("null-body", None, 400, None, "invalid_json"),
    ("missing-model", {"messages": MESSAGES}, 400, "model", "missing_required_parameter"),
    ("empty-model", {"model": "", "messages": MESSAGES}, 400, "model", "missing_required_parameter"),
    ("model-not-string", {"model": 42, "messages": MESSAGES}, 400, "model", "invalid_type"),
    ("model-is-list", {"model": ["chat"], "messages": MESSAGES}, 400, "model", "invalid_type"),
    ("unknown-model", {"model": "gpt-9", "messages": MESSAGES}, 404, "model", "model_not_found"),
    ("missing-messages", {"model": "chat"}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", {"model": "chat", "messages": []}, 400, "messages", "invalid_type"),
    ("messages-string", {"model": "chat", "messages": "hi"}, 400, "messages", "invalid_type"),
    ("messages-object", {"model": "chat", "messages": {"role": "user"}}, 400, "messages", "invalid_type"),
    ("message-not-object", {"model": "chat", "messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
    (
        "message-without-role",
        {"model": "chat", "messages": [*MESSAGES, {"content": "x"}]},
        400,
        "messages[1]",
        None,
    ),
    ("stream-string", {"model": "chat", "messages": MESSAGES, "stream": "true"}, 400, "stream", None),
    ("stream-int", {"model": "chat", "messages": MESSAGES, "stream": 1}, 400, "stream", None),
    (
        "stream-options",
        {"model": "chat", "messages": MESSAGES, "stream_options": 1},
        400,
        "stream_options",
        None,
    ),
    ("max-tokens-zero", {"model": "chat", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", None),
    (
        "max-tokens-negative",
        {"model": "chat", "messages": MESSAGES, "max_tokens": -5},
        400,
        "max_tokens",
        None,
    ),
    ("max-tokens-float", {"model": "chat", "messages": MESSAGES, "max_tokens": 1.5}, 400, "max_tokens", None),
    (
        "max-tokens-string",
        {"model": "chat", "messages": MESSAGES, "max_tokens": "10"},
        400,
        "max_tokens",
        None,
    ),
    ("max-tokens-bool", {"model": "chat", "messages": MESSAGES, "max_tokens": True}, 400, "max_tokens", None),
    (
        "max-completion-tokens",
        {"model": "chat", "messages": MESSAGES, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "code"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES]
)
async def test_chat_validation_errors(
    gw: RunningGateway, upstream: Upstream, body: Any, status: int, param: str | None, code: str | None
) -> None:
    got, data, headers = await post(gw, "/v1/chat/completions", body)
    assert got == status
    err = assert_openai_error(data, status)
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert headers["x-request-id"]
    assert upstream.state.requests == []  # refused before any upstream call


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"model": "chat"}, "input", 400),
        ({"model": "chat", "input": ""}, "input", 400),
        ({"model": "chat", "input": []}, "input", 400),
        ({"model": "chat", "input": 7}, "input", 400),
        ({"model": "chat", "input": {"text": "x"}}, "input", 400),
        ({"input": "x"}, "model", 400),
        ({"model": "nope", "input": "x"}, "model", 404),
    ],
)
async def test_embeddings_validation_errors(
    gw: RunningGateway, upstream: Upstream, body: Any, param: str, status: int
) -> None:
    got, data, _ = await post(gw, "/v1/embeddings", body)
    assert got == status
    assert assert_openai_error(data, status)["param"] == param
    assert upstream.state.requests == []


async def test_sdk_raises_typed_errors_for_client_mistakes(gw: RunningGateway) -> None:
    client = gw.client()
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="gpt-404", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    assert not_found.value.param == "model"
    assert "gpt-404" in not_found.value.message

    with pytest.raises(openai.BadRequestError) as empty:
        await client.chat.completions.create(model="chat", messages=[])
    assert empty.value.param == "messages"

    with pytest.raises(openai.BadRequestError) as tokens:
        await client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=0, stream=True)
    assert tokens.value.param == "max_tokens"

    # and after all that the gateway still answers
    reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content == "Mock answer: hi"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("POST", "/v1/completions/legacy", 404),
        ("POST", "/v2/chat/completions", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
async def test_unknown_endpoints_and_methods(gw: RunningGateway, method: str, path: str, status: int) -> None:
    async with aiohttp.ClientSession() as session, session.request(method, f"{gw.root}{path}") as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert_openai_error(await resp.json(), status)
        assert resp.headers["x-request-id"]


async def test_a_corrupt_gzip_body_is_a_400(gw: RunningGateway, upstream: Upstream) -> None:
    status, data, _ = await post(gw, "/v1/chat/completions", b"not gzip at all", {"Content-Encoding": "gzip"})
    assert status == 400
    assert_openai_error(data, 400)


async def test_a_gzip_body_is_read(gw: RunningGateway) -> None:
    body = gzip.compress(orjson.dumps({"model": "chat", "messages": MESSAGES}))
    status, data, _ = await post(gw, "/v1/chat/completions", body, {"Content-Encoding": "gzip"})
    assert status == 200
    assert data["choices"][0]["message"]["content"] == "Mock answer: hi"


async def test_a_gzip_bomb_is_a_413(gw: RunningGateway, upstream: Upstream) -> None:
    body = gzip.compress(huge_chat_body())  # ~20 kB on the wire, 20 MB once inflated
    status, data, _ = await post(gw, "/v1/chat/completions", body, {"Content-Encoding": "gzip"})
    assert status == 413
    assert assert_openai_error(data, 413)["code"] == "request_too_large"
    assert upstream.state.requests == []


async def test_unknown_endpoint_with_the_sdk(gw: RunningGateway) -> None:
    with pytest.raises(openai.NotFoundError):
        await gw.client().post("/assistants", body={}, cast_to=object)


# --- oversized bodies ----------------------------------------------------------------------------------


def huge_chat_body() -> bytes:
    return orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * TWENTY_MB}]})


async def still_serving(gw: RunningGateway) -> None:
    reply = await gw.client().chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content == "Mock answer: hi"


async def test_twenty_megabytes_with_the_sdk_is_a_413(gw: RunningGateway, upstream: Upstream) -> None:
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x" * TWENTY_MB}]
        )
    assert info.value.status_code == 413
    err = assert_openai_error(info.value.response.json(), 413)
    assert err["code"] == "request_too_large"
    assert info.value.response.headers["x-request-id"]
    assert upstream.state.requests == []
    await still_serving(gw)


async def test_twenty_megabytes_with_aiohttp_is_a_413(gw: RunningGateway, upstream: Upstream) -> None:
    status, data, _ = await post(gw, "/v1/chat/completions", huge_chat_body())
    assert status == 413
    assert assert_openai_error(data, 413)["code"] == "request_too_large"
    status, data, _ = await post(
        gw, "/v1/embeddings", orjson.dumps({"model": "chat", "input": "y" * TWENTY_MB})
    )
    assert status == 413
    assert upstream.state.requests == []
    await still_serving(gw)


async def test_twenty_megabytes_chunked_without_length_is_a_413(
    gw: RunningGateway, upstream: Upstream
) -> None:
    async def chunks() -> Any:
        body = huge_chat_body()
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.url}/chat/completions", data=chunks(), headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        assert resp.status == 413
        assert_openai_error(await resp.json(), 413)
        assert resp.headers["x-request-id"]
    assert upstream.state.requests == []
    await still_serving(gw)


async def test_a_body_just_under_the_limit_is_served(upstream: Upstream, make_gateway: Any) -> None:
    from tests.conftest import base_config

    cfg = base_config(upstream.url, server={"max_body_bytes": 4096})
    gw = await make_gateway(cfg)
    client = gw.client()
    reply = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a" * 3500}]
    )
    assert reply.choices[0].message.content == "Mock answer: " + "a" * 200
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "a" * 5000}])
    assert info.value.status_code == 413


# --- request ids ---------------------------------------------------------------------------------------


async def test_request_id_is_echoed_on_success_stream_and_error(gw: RunningGateway) -> None:
    client = gw.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, extra_headers={"x-request-id": "trace-abc.123:x_y-z"}
    )
    assert raw.headers["x-request-id"] == "trace-abc.123:x_y-z"

    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, stream=True, extra_headers={"x-request-id": "trace-stream-1"}
    )
    assert raw.headers["x-request-id"] == "trace-stream-1"
    assert [c async for c in raw.parse()]

    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="missing", messages=MESSAGES, extra_headers={"x-request-id": "trace-err-1"}
        )
    assert info.value.response.headers["x-request-id"] == "trace-err-1"
    assert info.value.request_id == "trace-err-1"  # what the SDK shows users to quote

    logged = {e["request_id"]: e for e in gw.log_lines() if e.get("event") == "request"}
    assert logged["trace-abc.123:x_y-z"]["status"] == 200
    assert logged["trace-stream-1"]["stream"] is True
    assert logged["trace-err-1"]["status"] == 404


async def test_request_id_is_generated_when_absent_or_invalid(gw: RunningGateway) -> None:
    client = gw.client()
    seen = []
    for sent in (None, "has spaces in it", "x" * 200, "semi;colon", ""):
        extra = {} if sent is None else {"x-request-id": sent}
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=MESSAGES, extra_headers=extra
        )
        rid = raw.headers["x-request-id"]
        assert rid and rid != sent and " " not in rid and len(rid) <= 128
        seen.append(rid)
    assert len(set(seen)) == len(seen)  # a fresh id each time

    status, _, headers = await post(gw, "/v1/chat/completions", b"not json")
    assert status == 400
    rid = headers["x-request-id"]
    logged = [e for e in gw.log_lines() if e.get("event") == "request"]
    assert [e["request_id"] for e in logged] == [*seen, rid]
    assert logged[-1]["status"] == 400


# --- the rest of the surface ---------------------------------------------------------------------------


async def test_models_lists_configured_names(upstream: Upstream, make_gateway: Any) -> None:
    from tests.conftest import base_config

    cfg = base_config(upstream.url)
    cfg["models"].append({"name": "embed", "targets": [{"provider": "primary", "model": "mock-embed"}]})
    gw = await make_gateway(cfg)
    page = await gw.client().models.list()
    assert [m.id for m in page.data] == ["chat", "embed"]
    assert all(m.object == "model" for m in page.data)
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/models") as resp:
        body = await resp.json()
        assert body["object"] == "list"
        assert resp.headers["x-request-id"]
    assert upstream.state.requests == []  # answered from config


async def test_embeddings_pass_through(gw: RunningGateway) -> None:
    client = gw.client()
    raw = await client.embeddings.with_raw_response.create(model="chat", input=["one", "two words"])
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    assert [d.embedding for d in result.data] == [[0.1, 0.2, 3.0], [0.1, 0.2, 9.0]]
    assert result.usage.prompt_tokens > 0
    assert raw.headers["x-gateway-provider"] == "primary"
    assert raw.headers["x-gateway-attempts"] == "1"
    assert result.model == "mock-chat"  # the upstream's answer, byte for byte
    single = await client.embeddings.create(model="chat", input="solo")
    assert len(single.data) == 1


async def test_unknown_fields_are_forwarded_untouched(gw: RunningGateway, upstream: Upstream) -> None:
    reply = await gw.client().chat.completions.create(
        model="chat", messages=MESSAGES, temperature=0.2, extra_body={"top_k": 3, "custom": {"a": [1]}}
    )
    assert reply.choices[0].message.content == "Mock answer: hi"
    sent = orjson.loads(upstream.state.requests[-1].body)
    assert sent["model"] == "mock-chat"  # the gateway's name for it, not the client's
    assert (sent["temperature"], sent["top_k"], sent["custom"]) == (0.2, 3, {"a": [1]})
