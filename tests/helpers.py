"""Helpers shared by the tests (more of them move here with issue #13)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson


async def eventually(check: Callable[[], Any], within: float = 2.0) -> Any:
    """Poll ``check`` until it returns something truthy (or fail after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.01)


async def raw_request(
    root: str, method: str, path: str, headers: Sequence[tuple[str, str]], body: Any = None
) -> tuple[int, Any]:
    """One HTTP/1.1 request written byte for byte: for what HTTP clients will not send (a header twice,
    in two spellings). Returns the status and the parsed JSON body (None when empty)."""
    url = urlsplit(root)
    data = b"" if body is None else orjson.dumps(body)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower(), head  # every answer read here has a Content-Length
    return int(head.split(b" ", 2)[1]), orjson.loads(content) if content else None
