"""The official SDK, unchanged, against the gateway: the first thing a user tries."""

from __future__ import annotations

import asyncio

from tests.conftest import RunningGateway, Upstream


async def test_sdk_non_stream_and_stream(gw: RunningGateway, upstream: Upstream) -> None:
    client = gw.client()
    reply = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "héllo ✓"}]
    )
    assert reply.choices[0].message.content == "Mock answer: héllo ✓"
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Mock answer: one two three"


async def test_sync_sdk(gw: RunningGateway) -> None:
    def call() -> str:
        with gw.sync_client() as client:
            r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "sync"}])
            chunks = client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "sync"}], stream=True
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return f"{r.choices[0].message.content}|{streamed}"

    assert await asyncio.to_thread(call) == "Mock answer: sync|Mock answer: sync"
