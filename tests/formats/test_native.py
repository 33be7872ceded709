"""Native request/stream translation, without a server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.formats.native import NativeStream, completion_text, parse_request

MESSAGES = [{"role": "user", "content": "hi"}]


def test_options_become_openai_fields_and_nothing_else() -> None:
    chat, model, req = parse_request(
        {
            "messages": MESSAGES,
            "options": {"model": "chat", "temperature": 0, "maxTokens": 10, "topP": 0.5, "stop": "END"},
        }
    )
    assert chat == {"messages": MESSAGES, "temperature": 0, "max_tokens": 10, "top_p": 0.5, "stop": ["END"]}
    assert model == "chat" and req == {}


@pytest.mark.parametrize("model", [None, "auto"])
def test_absent_or_auto_model_means_selection(model: Any) -> None:
    options: dict[str, Any] = {"requirements": {"multimodal": True, "strengths": None}}
    if model is not None:
        options["model"] = model
    _, chosen, req = parse_request({"messages": MESSAGES, "options": options})
    assert chosen is None and req == {"multimodal": True}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": MESSAGES, "model": "chat"}, "model"),  # top-level typo: options.model
        ({"messages": MESSAGES, "options": []}, "options"),
        ({"messages": MESSAGES, "options": {"max_tokens": 5}}, "options.max_tokens"),
        ({"messages": MESSAGES, "options": {"maxTokens": 0}}, "options.maxTokens"),
        ({"messages": MESSAGES, "options": {"maxTokens": True}}, "options.maxTokens"),
        ({"messages": MESSAGES, "options": {"temperature": 2.5}}, "options.temperature"),
        ({"messages": MESSAGES, "options": {"topP": -1}}, "options.topP"),
        ({"messages": MESSAGES, "options": {"stop": ["a", "b", "c", "d", "e"]}}, "options.stop"),
        ({"messages": MESSAGES, "options": {"model": 3}}, "options.model"),
        ({"messages": MESSAGES, "options": {"model": ""}}, "options.model"),
        (
            {"messages": MESSAGES, "options": {"requirements": {"minContext": 5}}},
            "options.requirements.minContext",
        ),
        (
            {"messages": MESSAGES, "options": {"requirements": {"minContextWindow": "big"}}},
            "options.requirements.minContextWindow",
        ),
        (
            {"messages": MESSAGES, "options": {"requirements": {"strengths": "coding"}}},
            "options.requirements.strengths",
        ),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body)
    assert caught.value.param == param
    assert caught.value.status == 400


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def test_stream_translates_each_event_once() -> None:
    shape = NativeStream("req_1", "p")
    assert shape.feed(_chunk({"role": "assistant", "content": ""})) == b""
    out = shape.feed(_chunk({"content": 'He said "hi"\n'}) + _chunk({"content": "!"}))
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert events == [{"content": 'He said "hi"\n', "done": False}, {"content": "!", "done": False}]
    assert (
        shape.feed(_chunk({}, "length") + b'data: {"choices":[],"usage":{}}\n\n' + b"data: [DONE]\n\n") == b""
    )
    assert shape.finish_reason == "length"


def test_stream_error_event_has_the_native_shape() -> None:
    shape = NativeStream("req_1", "openrouter")
    out = shape.feed(b'data: {"error": {"message": "boom", "code": 502}}\n\n')
    assert out.startswith(b"event: error\ndata: ")
    error = orjson.loads(out.split(b"data: ", 1)[1])["error"]
    assert error == {
        "type": "PROVIDER_ERROR",
        "code": "upstream_stream_error",
        "message": "the upstream reported an error mid-stream",
        "provider": "openrouter",
        "requestId": "req_1",
    }


def test_completion_text_tolerates_odd_answers() -> None:
    assert completion_text(
        {"id": "c1", "choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}
    ) == (
        "x",
        "stop",
        "c1",
    )
    assert completion_text({"choices": [{"message": {"content": None, "tool_calls": []}}]}) == (
        "",
        None,
        None,
    )
    assert completion_text({}) == ("", None, None)


def test_odd_chunks_are_skipped_and_nothing_follows_an_error() -> None:
    shape = NativeStream("req_1", "p")
    assert shape.feed(b'data: {"choices": {"0": {}}}\n\ndata: {"choices": 5}\n\ndata: [1]\n\n') == b""
    assert shape.feed(b": keep-alive\n\n") == b": keep-alive\n\n"  # proxies see the stream is alive
    first = shape.feed(b'data: {"error": {"message": "x"}}\n\n' + _chunk({"content": "late"}))
    assert first.count(b"event: error") == 1 and b"late" not in first
    assert shape.feed(_chunk({"content": "later"})) == b""
    assert shape.error(502, "cut", "upstream_incomplete") == b""  # one error event per stream
