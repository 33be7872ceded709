"""``SSEScanner``: the relay's view of an upstream stream, fed in whatever pieces TCP delivers.

What a client would notice if it went wrong: a chunk lost or doubled at a read boundary, a usage
chunk it never asked for (or a content chunk dropped in its place), a stream cut short at the end,
an error event not recognised, or a ``[DONE]`` not seen (the gateway would then report an incomplete
stream).
"""

from __future__ import annotations

import pytest

from gateway.sse import SSEScanner

ROLE = b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
UNICODE = "h\u00e9 \u2713 \U0001f600 \u4f60\u597d"  # é ✓ 😀 CJK
TEXT = ('data: {"id":"c1","choices":[{"index":0,"delta":{"content":"' + UNICODE + '"}}]}\n\n').encode()
FINISH = b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
USAGE_ONLY = (
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'
)
DONE = b"data: [DONE]\n\n"
COMMENTS = b": OPENROUTER PROCESSING\n\n: keep-alive\n\n"

STREAM = COMMENTS + ROLE + TEXT + FINISH + USAGE_ONLY + DONE
STRIPPED = COMMENTS + ROLE + TEXT + FINISH + DONE


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def run(scanner: SSEScanner, pieces: list[bytes]) -> bytes:
    out = b"".join(scanner.feed(p) for p in pieces)
    return out + scanner.finish()


def splits(data: bytes) -> list[list[bytes]]:
    """The stream cut in two at every byte boundary, plus one byte at a time."""
    cuts = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    return [*cuts, [data[i : i + 1] for i in range(len(data))]]


@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_pass_through_at_every_byte_boundary(newline: str) -> None:
    stream = crlf(STREAM) if newline == "crlf" else STREAM
    for pieces in splits(stream):
        scanner = SSEScanner()
        assert run(scanner, pieces) == stream
        assert scanner.data_events == 5  # role, content, finish, usage, [DONE]; comments are not data
        assert scanner.done
        assert scanner.usage == USAGE
        assert scanner.error is None


@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_strip_mode_at_every_byte_boundary_drops_only_the_usage_chunk(newline: str) -> None:
    stream, expected = (crlf(STREAM), crlf(STRIPPED)) if newline == "crlf" else (STREAM, STRIPPED)
    for pieces in splits(stream):
        scanner = SSEScanner(strip_usage=True)
        assert run(scanner, pieces) == expected
        assert scanner.data_events == 5
        assert scanner.done
        assert scanner.usage == USAGE  # noted for accounting even though the client never sees it


@pytest.mark.parametrize("strip", [False, True])
def test_only_whole_events_are_forwarded(strip: bool) -> None:
    # If the upstream dies after half an event, the client must not hold that half: the gateway's
    # error event would be glued onto it and the client could not parse either.
    scanner = SSEScanner(strip_usage=strip)
    assert scanner.feed(TEXT[:20]) == b""  # half an event is held back ...
    assert scanner.feed(TEXT[20:-1]) == b""
    assert scanner.feed(TEXT[-1:]) == TEXT  # ... and forwarded once it is complete
    assert scanner.feed(FINISH + ROLE[:9]) == FINISH
    assert scanner.feed(ROLE[9:] + DONE) == ROLE + DONE
    assert scanner.data_events == 4


def test_pass_through_returns_the_very_same_bytes_object() -> None:
    scanner = SSEScanner()
    for chunk in (COMMENTS, ROLE, TEXT + FINISH, USAGE_ONLY, crlf(TEXT), DONE):
        assert scanner.feed(chunk) is chunk
    assert scanner.finish() == b""
    assert scanner.usage == USAGE
    assert scanner.done
    assert scanner.data_events == 6


def test_usage_on_a_chunk_with_choices_loses_only_its_usage_in_strip_mode() -> None:
    # OpenRouter and some others put usage on the last chunk that still has choices: the finish reason
    # stays, the usage the gateway asked for goes (issue #12: whatever the chunk's shape).
    last = (
        b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10,"cost":0.001}}\n\n'
    )
    without = b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    scanner = SSEScanner(strip_usage=True)
    assert run(scanner, [ROLE + last + DONE]) == ROLE + without + DONE
    assert scanner.usage == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10, "cost": 0.001}
    scanner = SSEScanner(strip_usage=False)  # the client asked for usage: untouched
    assert run(scanner, [ROLE + last + DONE]) == ROLE + last + DONE


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_litellm_usage_chunk_with_an_empty_delta_is_dropped(newline: str) -> None:
    # LiteLLM sends the usage on a chunk whose choices hold one empty delta, not "choices": [].
    litellm = (
        b'data: {"id":"c1","choices":[{"index":0,"delta":{}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'
    )
    stream = ROLE + TEXT + FINISH + litellm + DONE
    for pieces in ([stream], [stream[:i], stream[i:]] if (i := len(ROLE + TEXT + FINISH) + 20) else []):
        scanner = SSEScanner(strip_usage=True)
        data = [p.replace(b"\n", newline.encode()) for p in pieces]
        out = run(scanner, data)
        assert out.replace(newline.encode(), b"\n") == ROLE + TEXT + FINISH + DONE
        assert scanner.usage == USAGE


def test_content_on_a_usage_chunk_is_never_lost() -> None:
    both = (
        b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"tail"}}],"usage":{"total_tokens":8}}\n\n'
    )
    scanner = SSEScanner(strip_usage=True)
    out = run(scanner, [ROLE + both + DONE])
    assert out == ROLE + b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"tail"}}]}\n\n' + DONE


def test_null_usage_on_every_chunk_is_kept_and_the_real_usage_wins() -> None:
    # OpenAI with include_usage: every chunk carries "usage":null, then a usage-only chunk.
    chunk = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'
    scanner = SSEScanner(strip_usage=True)
    assert run(scanner, [chunk, chunk, USAGE_ONLY, DONE]) == chunk + chunk + DONE
    assert scanner.usage == USAGE


def test_multi_line_data_is_one_event() -> None:
    usage = b'data: {"choices": [],\ndata: "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'
    for strip in (False, True):
        scanner = SSEScanner(strip_usage=strip)
        out = run(scanner, [ROLE, usage, DONE])
        assert scanner.data_events == 3
        assert scanner.usage == {"prompt_tokens": 1, "completion_tokens": 2}
        assert out == (ROLE + DONE if strip else ROLE + usage + DONE)  # both lines dropped together


def test_comments_are_forwarded_but_not_counted_as_data() -> None:
    for strip in (False, True):
        scanner = SSEScanner(strip_usage=strip)
        assert run(scanner, [COMMENTS, COMMENTS]) == COMMENTS + COMMENTS
        assert scanner.data_events == 0
        assert not scanner.done


def test_done_without_a_space_and_data_without_json() -> None:
    scanner = SSEScanner(strip_usage=True)
    odd = b'data: not json but says "usage" and "error"\n\n'
    assert run(scanner, [odd, b"data:[DONE]\n\n"]) == odd + b"data:[DONE]\n\n"
    assert scanner.done
    assert scanner.usage is None
    assert scanner.error is None


def test_error_event_is_recognised() -> None:
    # OpenRouter: an error delivered as a data event inside a 200 stream.
    event = (
        b'data: {"id":"c1","error":{"code":502,"message":"provider down"},'
        b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n'
    )
    scanner = SSEScanner(strip_usage=True)
    assert run(scanner, [event]) == event  # the client still sees it if it comes mid-stream
    assert scanner.error == {"code": 502, "message": "provider down"}
    assert scanner.data_events == 1

    scanner = SSEScanner()
    scanner.feed(b'data: {"error":"plain text"}\n\n')
    assert scanner.error == {"message": "plain text"}


@pytest.mark.parametrize("strip", [False, True])
def test_finish_dispatches_an_unterminated_last_event(strip: bool) -> None:
    scanner = SSEScanner(strip_usage=strip)
    assert scanner.feed(ROLE + b"data: [DONE]") == ROLE  # the upstream closed without the blank line
    assert not scanner.done
    assert scanner.finish() == b"data: [DONE]"
    assert scanner.done
    assert scanner.data_events == 2


@pytest.mark.parametrize("strip", [False, True])
def test_finish_with_one_newline_missing(strip: bool) -> None:
    scanner = SSEScanner(strip_usage=strip)
    assert scanner.feed(ROLE + b"data: [DONE]\n") == ROLE
    assert scanner.finish() == b"data: [DONE]\n"
    assert scanner.done


def test_finish_drops_an_unterminated_usage_only_chunk_in_strip_mode() -> None:
    scanner = SSEScanner(strip_usage=True)
    out = scanner.feed(FINISH + USAGE_ONLY[:-2])
    assert out == FINISH
    assert scanner.finish() == b""
    assert scanner.usage == USAGE


def test_finish_on_an_empty_stream() -> None:
    for strip in (False, True):
        scanner = SSEScanner(strip_usage=strip)
        assert scanner.finish() == b""
        assert scanner.data_events == 0
        assert not scanner.done


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_a_stream_cut_anywhere(newline: str, strip: bool) -> None:
    """Wherever the upstream stops: whole events only go out as they arrive, the unfinished rest is
    left to ``finish()``, and a usage chunk nobody asked for never leaks."""
    stream, event = (crlf(STREAM), crlf(USAGE_ONLY)) if newline == "crlf" else (STREAM, USAGE_ONLY)
    line = event.rstrip(b"\r\n")
    start = stream.index(event)
    for end in range(len(stream) + 1):
        scanner = SSEScanner(strip_usage=strip)
        fed = scanner.feed(stream[:end])
        assert fed == b"" or fed.endswith((b"\n\n", b"\n\r\n")), end
        out = fed + scanner.finish()
        expected = stream[:end]
        if strip:
            assert line not in out, end
            if end >= start + len(event):
                expected = expected.replace(event, b"")
            elif end > start:
                continue  # cut inside the usage chunk: what is left of it is not parseable
        assert out == expected, end


@pytest.mark.parametrize(
    ("stream", "done"),
    [
        (b'data: {"a":1}\n\ndata: [DONE]\nid: 7\n\n', True),
        (b"data: [DONE]\n: bye\n\n", True),
        (b"data: x\ndata: [DONE]\n\n", False),  # one event whose data is "x\n[DONE]", not the end
    ],
)
def test_done_is_read_the_same_way_on_every_path(stream: bytes, done: bool) -> None:
    whole = SSEScanner()
    whole.feed(stream)
    split = SSEScanner()
    for i in range(len(stream)):
        split.feed(stream[i : i + 1])
    assert (whole.done, split.done) == (done, done)
    assert whole.data_events == split.data_events


def test_a_role_chunk_carrying_usage_keeps_its_role() -> None:
    first = (
        b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":0,"total_tokens":3}}\n\n'
    )
    scanner = SSEScanner(strip_usage=True)
    out = run(scanner, [first + TEXT + FINISH + DONE])
    role = b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    assert out == role + TEXT + FINISH + DONE
