"""structlog JSON logs to stdout, with a redaction processor as the last line of defence.

The gateway never passes a key to a logger on purpose; the redactor exists for the day a bug does.
It masks bearer tokens, ``sk-``-style keys and every secret the loaded config holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any, BinaryIO

import orjson
import structlog

_GENERIC = [
    r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}",
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}",
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",  # JWTs
]
REDACTED = "[REDACTED]"


class Redactor:
    """A structlog processor that masks secrets in every string value of an event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: frozenset[str] = frozenset()
        self.set_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Mask these too (every app built in this process keeps its secrets masked)."""
        more = self.secrets.union(secrets)
        if more != self.secrets:
            self.set_secrets(more)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        self.secrets = frozenset(secrets)
        literal = [re.escape(s) for s in sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)]
        self.pattern = re.compile("|".join(literal + _GENERIC))
        # A literal pre-check (~0.4 µs) spares the full pattern (~1.4 µs) on the usual clean string.
        self.suspect = re.compile("|".join([*literal, "(?i:earer)", "sk-", "pk-", "rk-", "eyJ"]))

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str | dict | list | tuple):
                event[key] = self.clean(value)
        return event

    def clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.pattern.sub(REDACTED, value) if self.suspect.search(value) else value
        if isinstance(value, dict):
            return {k: self.clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.clean(v) for v in value]
        return value


REDACTOR = Redactor()


class AccessLog:
    """The per-request access line, written without structlog's processor chain (~3 µs, not ~30).

    Its fields are the gateway's own (ids, names, numbers); the two a client can shape, the path
    and the request id, go through the redactor. Lines are buffered and flushed within
    ``FLUSH_SECONDS`` (and whenever another log line flushes), not one write syscall per request.
    """

    FLUSH_SECONDS = 0.2

    def __init__(self) -> None:
        self.enabled = True
        self.stream: BinaryIO = _binary(sys.stdout)
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._second = -1
        self._prefix = ""

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        fields["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stdout must not stop us
            self.stream.write(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): write through
            self._flush()
            return
        if self._flush_loop is not loop:  # none scheduled (or on a loop that has since closed)
            self._flush_loop = loop
            loop.call_later(self.FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        self._flush_loop = None
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stdout must not stop us
            self.stream.flush()


def _orjson_bytes(logger: Any, name: str, event: MutableMapping[str, Any]) -> bytes:
    return orjson.dumps(event, default=str)


def _binary(stream: Any) -> BinaryIO:
    buffer: BinaryIO = getattr(stream, "buffer", stream)
    return buffer


ACCESS = AccessLog()


def reset() -> None:
    """Back to the state of a fresh import: no configured secrets, the access line on stdout. For a
    process that builds several gateways (tests, embedding) and wants none of an earlier one's state."""
    REDACTOR.set_secrets(())
    ACCESS.__init__()  # type: ignore[misc]


def configure(level: str = "info", stream: Any = None, *, cache: bool = True) -> None:
    """Set up structlog (JSON lines, UTC timestamps) and route stdlib logging through it."""
    out = stream or sys.stdout
    ACCESS.stream = _binary(out)
    ACCESS.enabled = logging.getLevelName(level.upper()) <= logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            REDACTOR,
            _orjson_bytes,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.BytesLoggerFactory(_binary(out)),
        cache_logger_on_first_use=cache,
    )
    # aiohttp and asyncio report through stdlib logging: keep their warnings, as JSON too.
    handler = logging.StreamHandler(out)
    handler.setFormatter(_StdlibJSON())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


class _StdlibJSON(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
            "level": record.levelname.lower(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(REDACTOR(None, "", event)).decode()
