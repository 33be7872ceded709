"""Exact limits across two gateway instances sharing one Redis."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import MASTER_KEY as MASTER
from tests.conftest import TEAM_KEY, tenancy_config


async def test_rpm_exact_across_two_instances(upstream, make_gateway) -> None:
    cfg = tenancy_config(upstream.url, limits={"rpm": 20})
    a, b = await make_gateway(cfg), await make_gateway(cfg)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {TEAM_KEY}"}
    async with aiohttp.ClientSession() as session:

        async def call(url: str) -> int:
            async with session.post(url + "/chat/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(call(a.url if i % 2 else b.url) for i in range(60)))
    assert statuses.count(200) == 20
    assert statuses.count(429) == 40


async def test_admin_key_lifecycle(upstream, make_gateway) -> None:
    gw = await make_gateway(tenancy_config(upstream.url))
    admin = {"Authorization": f"Bearer {MASTER}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.root + "/admin/keys", json={"team": "team-a", "name": "ci"}, headers=admin
        ) as r:
            assert r.status == 201, await r.text()
            created = await r.json()
        key = created["key"]
        client = gw.client(api_key=key)
        reply = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]
        )
        assert reply.choices[0].message.content
        async with session.delete(gw.root + f"/admin/keys/{created['id']}", headers=admin) as r:
            assert r.status == 204
        async with session.post(
            gw.url + "/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {key}"},
        ) as r:
            assert r.status == 401
