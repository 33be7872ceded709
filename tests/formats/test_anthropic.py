"""Anthropic's wire format ↔ OpenAI chat (``gateway.formats.anthropic``): the translations clients see."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.formats.anthropic import ChatStream, chat_to_messages, message_to_chat


def event(kind: str, **data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


TOOL_STREAM = b"".join(
    [
        event("message_start", message={"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 12}}),
        event("ping"),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Checking."}),
        event("content_block_stop", index=0),
        event("content_block_start", index=1, content_block={"type": "tool_use", "id": "t1", "name": "a"}),
        event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": ""}),
        event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"x":'}),
        event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": " 1}"}),
        event("content_block_stop", index=1),
        event("content_block_start", index=2, content_block={"type": "tool_use", "id": "t2", "name": "b"}),
        event("content_block_stop", index=2),
        event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 9}),
        event("message_stop"),
    ]
)


def chunks(out: bytes) -> list[Any]:
    events = [e for e in out.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    return [e[6:] if e[6:] == b"[DONE]" else orjson.loads(e[6:]) for e in events]


@pytest.mark.parametrize("piece", [1, 7, 64, len(TOOL_STREAM)])
def test_a_stream_cut_anywhere_gives_the_same_whole_chunks(piece: int) -> None:
    translate = ChatStream().feed
    out = b"".join(translate(TOOL_STREAM[i : i + piece]) for i in range(0, len(TOOL_STREAM), piece))
    events = chunks(out)
    assert events[-1] == b"[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"content": "Checking."}
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c.get("id"), c["function"].get("name")) for c in calls if "id" in c] == [
        (0, "t1", "a"),
        (1, "t2", "b"),
    ]
    args = {i: "".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in (0, 1)}
    assert args == {0: '{"x": 1}', 1: "{}"}  # never "": a tool called without arguments gets {}
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"
    usage = events[-2]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (12, 9, 21)
    assert all(e["id"] == "msg_1" and e["model"] == "claude-x" for e in events[:-1])


def test_crlf_streams_and_error_events() -> None:
    raw = event("message_start", message={"id": "m", "usage": {}}) + event(
        "error", error={"type": "overloaded_error", "message": "Overloaded"}
    )
    events = chunks(ChatStream().feed(raw.replace(b"\n", b"\r\n")))
    assert events[1] == {"error": {"type": "overloaded_error", "message": "Overloaded"}}


def test_a_message_becomes_a_chat_completion() -> None:
    message = {
        "id": "msg_2",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Hello"},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1]}},
        ],
        "stop_reason": "max_tokens",
        "usage": {
            "input_tokens": 5,
            "cache_read_input_tokens": 20,
            "cache_creation_input_tokens": 3,
            "output_tokens": 7,
        },
    }
    chat = message_to_chat(message)
    reply = chat["choices"][0]["message"]
    assert (reply["content"], reply["reasoning_content"]) == ("Hello", "hmm")
    assert reply["tool_calls"] == [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"a":[1]}'}}
    ]
    assert chat["choices"][0]["finish_reason"] == "length"
    assert chat["usage"] == {
        "prompt_tokens": 28,
        "completion_tokens": 7,
        "total_tokens": 35,
        "prompt_tokens_details": {"cached_tokens": 20},
    }


def test_bad_tool_arguments_and_image_urls_are_the_clients_error() -> None:
    bad_args = {
        "role": "assistant",
        "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{no"}}],
    }
    with pytest.raises(InvalidRequest):
        chat_to_messages({"messages": [bad_args]}, "m", None)
    image = {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}
    with pytest.raises(InvalidRequest):
        chat_to_messages({"messages": [{"role": "user", "content": [image]}]}, "m", None)


def test_tool_choice_and_parallel_calls() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    base = {"messages": [{"role": "user", "content": "x"}], "tools": tools}
    named = {"type": "function", "function": {"name": "f"}}
    assert chat_to_messages({**base, "tool_choice": named}, "m", None)["tool_choice"] == {
        "type": "tool",
        "name": "f",
    }
    assert chat_to_messages({**base, "tool_choice": "none"}, "m", None)["tool_choice"] == {"type": "none"}
    assert chat_to_messages({**base, "parallel_tool_calls": False}, "m", None)["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert "tool_choice" not in chat_to_messages({**base, "tools": None, "tool_choice": "auto"}, "m", None)


def test_a_message_and_its_event_stream_make_each_other() -> None:
    """The cache stores a Message and replays it as a stream, or assembles a stream into one."""
    from gateway.formats.anthropic import events_message, message_events

    message = {
        "id": "msg_3",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1, {"b": "c"}]}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 12},
    }
    stream = message_events(message)
    kinds = [orjson.loads(e.split(b"data: ", 1)[1])["type"] for e in stream.split(b"\n\n") if e]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3
    assert events_message(stream) == message
