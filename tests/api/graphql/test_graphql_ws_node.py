"""End to end with the official ``graphql-ws`` npm client (on Node, with ``ws`` as its WebSocket):
a ``completionStream`` subscription against a running gateway, and a bad key refused with 4403.

The npm packages are installed once into ``.test-node/`` at the repository root (ignored by git) and
reused while their major versions match. Skipped only when ``node`` or ``npm`` is not on PATH; a failing
``npm install`` fails the test.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEAM_KEY, Upstream, tenancy_config

NODE_DIR = Path(__file__).resolve().parents[3] / ".test-node"
PACKAGES = {"graphql-ws": 6, "ws": 8, "graphql": 16}  # name -> major version
MESSAGES = [{"role": "user", "content": "one two three four five"}]

# Runs one completionStream subscription; prints one JSON object per line: {"next": result} for each
# result, {"closed": code} when the socket closes, then {"done": true} or {"failed": {code, message}}.
CLIENT = """\
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const [url, key, input] = process.argv.slice(2);
const print = (line) => process.stdout.write(JSON.stringify(line) + '\\n');
const client = createClient({
  url,
  webSocketImpl: WebSocket,
  connectionParams: { authorization: `Bearer ${key}` },
  retryAttempts: 0,
  on: { closed: (event) => print({ closed: event.code, reason: event.reason }) },
});
const query = `subscription ($input: CompletionInput!) {
  completionStream(input: $input) {
    id content model finishReason usage { promptTokens completionTokens totalTokens }
  }
}`;
try {
  for await (const result of client.iterate({ query, variables: { input: JSON.parse(input) } })) {
    print({ next: result });
  }
  print({ done: true });
} catch (error) {
  const code = error && typeof error.code === 'number' ? error.code : null;
  print({ failed: { code, message: String((error && (error.reason || error.message)) || error) } });
  process.exitCode = 1;
} finally {
  await client.dispose();
}
"""


async def _run(*args: str, cwd: Path, timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"{' '.join(args[:2])} did not finish within {timeout} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _installed() -> bool:
    for name, major in PACKAGES.items():
        try:
            manifest = json.loads((NODE_DIR / "node_modules" / name / "package.json").read_text())
            if int(str(manifest["version"]).split(".")[0]) != major:
                return False
        except (OSError, ValueError, KeyError):
            return False
    return True


async def _client_script() -> Path:
    """The client script in the npm directory (so Node resolves its imports there), packages installed."""
    if not _installed():
        NODE_DIR.mkdir(exist_ok=True)
        manifest = NODE_DIR / "package.json"
        if not manifest.exists():  # a project of its own: npm must not look further up
            manifest.write_text('{"private": true}\n')
        specs = [f"{name}@{major}" for name, major in PACKAGES.items()]
        code, out, err = await _run(
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(NODE_DIR),
            *specs,
            cwd=NODE_DIR,
            timeout=150,
        )
        if code != 0:
            pytest.fail(f"npm install {' '.join(specs)} failed ({code}):\n{out[-2000:]}\n{err[-4000:]}")
        assert _installed(), f"npm install did not install {specs} into {NODE_DIR}"
    script = NODE_DIR / "graphql_ws_completion_stream.mjs"
    if not script.exists() or script.read_text() != CLIENT:
        partial = script.with_suffix(".tmp")
        partial.write_text(CLIENT)
        partial.replace(script)
    return script


async def _subscribe(script: Path, url: str, key: str) -> tuple[int, list[dict[str, Any]], str]:
    code, out, err = await _run(
        "node",
        str(script),
        url,
        key,
        json.dumps({"messages": MESSAGES, "options": {"model": "chat"}}),
        cwd=NODE_DIR,
        timeout=30,
    )
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


@pytest.mark.timeout(180)
async def test_graphql_ws_client_streams_a_completion_and_is_refused_with_a_bad_key(
    upstream: Upstream, make_gateway: Any
) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the graphql-ws client test")
    script = await _client_script()
    gw = await make_gateway(tenancy_config(upstream.url))
    url = gw.root.replace("http", "ws", 1) + "/graphql"

    code, lines, err = await _subscribe(script, url, TEAM_KEY)
    assert code == 0 and {"done": True} in lines, (lines, err)
    results = [line["next"] for line in lines if "next" in line]
    assert results and not [r for r in results if r.get("errors")], results
    events = [r["data"]["completionStream"] for r in results]
    assert all(e["finishReason"] is None and e["usage"] is None for e in events[:-1]), events
    last = events[-1]
    assert last["finishReason"] == "stop", last
    assert last["usage"]["completionTokens"] > 0 and last["usage"]["totalTokens"] > 0, last
    assert {e["model"] for e in events} == {"chat"} and len({e["id"] for e in events}) == 1

    client = gw.client(api_key=TEAM_KEY)
    chunks = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert "".join(e["content"] for e in events) == text and text

    lines_logged = [x for x in gw.log_lines() if x.get("event") == "request" and x.get("path") == "/graphql"]
    assert [(x["status"], x["stream"], x["team"]) for x in lines_logged] == [(200, True, "team-a")]

    # A bad key: the server closes the socket with 4403 and the client fails with that code.
    code, lines, err = await _subscribe(script, url, "wrong-key-0123456789")
    assert code == 1, (lines, err)
    assert {"closed": 4403, "reason": "Forbidden"} in lines, lines
    failed = [line["failed"] for line in lines if "failed" in line]
    assert failed and failed[0]["code"] == 4403, lines
    assert not [line for line in lines if "next" in line]
