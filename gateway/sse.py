"""Incremental server-sent-events scanner for relayed streams.

Bytes go in as the upstream sends them; the scanner notes what the gateway needs (data-event count
for the idle timeout, ``usage``, an ``error`` event, ``[DONE]``) and returns the bytes to forward.
Only whole events are forwarded: an event split across reads is held back until its blank line
arrives, so a client never holds half an event when an upstream dies mid-line (the gateway's SSE
error event would otherwise be glued onto it). In pass-through mode a chunk that ends on an event
boundary — the usual case — is returned untouched (the same object). In strip mode — used when the
gateway itself asked for ``stream_options.include_usage`` — the usage the gateway added is removed,
whatever the chunk's shape: a chunk that carries nothing else (``"choices": []``, or LiteLLM's
``[{"index": 0, "delta": {}}]``) is dropped; one that also carries content or a finish reason is
re-encoded without its ``usage`` (rare: one event per stream), so no content is ever lost.

Only events that mention ``"usage"`` or ``"error"`` are JSON-decoded; the rest are just counted.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway import jsonx

_DATA = b"data:"
_DONE = b"[DONE]"


class StreamScanner(Protocol):
    """What the relay reads of an upstream stream on the side (``SSEScanner`` for OpenAI's wire
    format, ``formats.anthropic.EventScanner`` for Anthropic's)."""

    data_events: int
    done: bool
    error: dict[str, Any] | None

    @property
    def usage(self) -> dict[str, Any] | None: ...

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class SSEScanner:
    __slots__ = (
        "_data",
        "_dropped",
        "_held",
        "_pending",
        "_rewrite",
        "data_events",
        "done",
        "error",
        "strip_usage",
        "usage",
    )

    def __init__(self, *, strip_usage: bool = False) -> None:
        self.strip_usage = strip_usage
        self.data_events = 0
        self.done = False
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self._pending = b""  # an incomplete trailing line
        self._data: list[bytes] = []  # data lines of the event being read
        self._held: list[bytes] = []  # raw lines of the event being read (not yet forwarded)
        self._dropped = False  # strip mode: the event that just ended is the usage-only chunk
        self._rewrite: bytes | None = None  # strip mode: that event, without its usage

    def feed(self, chunk: bytes) -> bytes:
        if self._pending:
            data = self._pending + chunk
        else:
            data = chunk
            if (
                not self._held
                and not self._data
                and chunk.endswith(b"\n\n")
                and b"\r" not in chunk
                and b'"usage"' not in chunk
                and b'"error"' not in chunk
                and b"[DONE]" not in chunk  # the end of a stream takes the exact path
            ):
                # The usual read: whole events with nothing to decode (and so nothing to strip).
                # Count them and forward the very same bytes, without a Python loop per line.
                self._count(chunk)
                return chunk
            if not self.strip_usage and not self._held and chunk.endswith((b"\n\n", b"\n\r\n")):
                for line in chunk.split(b"\n")[:-1]:
                    self._line(line)
                return chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        out: list[bytes] = []
        for line in lines:
            self._held.append(line)
            if self._line(line):  # an event just ended: forward, rewrite or drop it
                if self._rewrite is not None:
                    out.append(self._rewrite)
                    self._rewrite = None
                elif not self._dropped:
                    out.append(b"\n".join(self._held) + b"\n")
                self._held = []
        return b"".join(out)

    def _count(self, chunk: bytes) -> None:
        if b"data:" not in chunk:
            return  # comments only (keep-alives): they never count as data
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data:") or b"\ndata:" in event:
                self.data_events += 1

    def finish(self) -> bytes:
        """At end of stream: dispatch a final event that had no trailing blank line."""
        tail = self._pending
        self._pending = b""
        self._dropped = False  # before the tail: a lone "\r" tail ends (and may drop) the last event
        if tail:
            self._held.append(tail)
            self._line(tail)
        if self._data:
            self._dispatch()
        held, self._held = self._held, []
        if self._rewrite is not None:
            rewrite, self._rewrite = self._rewrite, None
            return rewrite
        if self._dropped or not held:
            return b""
        return b"\n".join(held) + (b"" if tail else b"\n")

    def _line(self, line: bytes) -> bool:
        """Note one line; return True when it ends an event (a blank line)."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dropped = False
            if self._data:
                self._dispatch()
            return True
        if line.startswith(_DATA):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        return False

    def _dispatch(self) -> None:
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        self.data_events += 1
        if payload == _DONE:
            self.done = True
            return
        if b'"usage"' not in payload and b'"error"' not in payload:
            return
        try:
            event = jsonx.loads(payload)
        except jsonx.DecodeError:
            return
        if not isinstance(event, dict):
            return
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if self.strip_usage:
                choices = event.get("choices")
                if isinstance(choices, list) and any(_carries_content(c) for c in choices):
                    del event["usage"]
                    self._rewrite = b"data: " + jsonx.dumps(event) + b"\n\n"
                else:
                    self._dropped = True
        error = event.get("error")
        if error and self.error is None:
            self.error = error if isinstance(error, dict) else {"message": str(error)}


def _carries_content(choice: Any) -> bool:
    """Whether a stream choice says anything besides an empty delta (a role, text, a tool call, a
    finish): the first chunk of some upstreams carries the role together with usage."""
    if not isinstance(choice, dict):
        return False
    if choice.get("finish_reason") is not None or choice.get("logprobs"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and any(v not in (None, "", [], {}) for v in delta.values())
