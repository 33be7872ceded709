"""Helpers shared by the tests (more of them move here with issue #13)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


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
