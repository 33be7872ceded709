"""``llm-gateway check-config`` and ``llm-gateway serve``, run as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.cli import main
from gateway.providers import mock
from tests.helpers import eventually, free_port, openai_client

ROOT = Path(__file__).resolve().parents[1]
PROVIDER_SECRET = "prov-cli-secret-9f8e7d6c5b4a"  # no sk- prefix: only the config's secret list masks it
MASTER_SECRET = "master-cli-secret-1a2b3c4d"
TEAM_SECRET = "team-cli-secret-5e6f7a8b"
CLIENT_SECRET = "client-cli-secret-9c0d1e2f"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any provider key, so the embedded default uses the mock."""
    drop = ("DEEPSEEK_API_KEY", "OPENROUTER_API_KEY", "GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_MASTER_KEY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def check_config(path: Path | str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write_config(tmp_path: Path, cfg: dict[str, Any], name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- check-config ----------------------------------------------------------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``llm-gateway ARGV`` in this process (same code path as the console script, no start-up cost)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_accepts_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "check-config", str(ROOT / "config" / "gateway.yaml"))
    assert code == 0, err
    assert "ok" in out
    assert err == ""


@pytest.mark.parametrize(
    ("plugins", "refused"),
    [
        (["cache", "auth"], ["plugins[0]: cache is listed before auth"]),
        (["rate_limit", "auth"], ["plugins[0]: rate_limit is listed before auth"]),
        (
            ["quota", "cache", "auth"],
            ["plugins[0]: quota is listed before auth", "plugins[1]: cache is listed"],
        ),
    ],
)
def test_check_config_refuses_a_plugin_that_needs_the_team_before_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], plugins: list[str], refused: list[str]
) -> None:
    # Before auth the cache would put every caller in one anonymous namespace: one team's answers would
    # go to callers with no key at all.
    cfg = {
        "providers": [{"name": "m", "type": "mock", "base_url": "http://127.0.0.1:9/v1"}],
        "models": [{"name": "chat", "targets": [{"provider": "m", "model": "mock-chat"}]}],
        "teams": [{"id": "a", "api_keys": [TEAM_SECRET]}],
        "plugins": plugins,
    }
    code, out, err = run_main(capsys, "check-config", str(write_config(tmp_path, cfg)))
    assert code == 2 and out == ""
    problems = [line.strip() for line in err.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == len(refused), err
    for problem, start in zip(problems, refused, strict=True):
        assert problem.startswith(f"- {start}") and "list auth before" in problem, problem


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "config").glob("*.yaml"), *(ROOT / "load").glob("*.yaml")]),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_check_config_accepts_the_shipped_configs(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "check-config", str(path))
    assert code == 0, err
    assert "ok" in out


def test_check_config_accepts_a_good_file_with_env_values(tmp_path: Path) -> None:
    cfg = {
        "providers": [
            {"name": "ds", "type": "deepseek", "base_url": "https://api.deepseek.com", "api_key": "${DS_KEY}"}
        ],
        "models": [{"name": "chat", "targets": [{"provider": "ds", "model": "deepseek-chat"}]}],
        "teams": [{"id": "a", "api_keys": ["${TEAM_KEY}"]}],
    }
    result = check_config(write_config(tmp_path, cfg), DS_KEY="ds-secret-77", TEAM_KEY=TEAM_SECRET)
    assert result.returncode == 0, result.stderr
    assert "1 providers, 1 models, 1 teams" in result.stdout
    assert "ds-secret-77" not in result.stdout + result.stderr
    assert TEAM_SECRET not in result.stdout + result.stderr


def test_check_config_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    cfg = {
        "server": {"port": "eighty"},
        "providers": [{"name": "p", "type": "nope", "base_url": "x", "api_key": "${MISSING_KEY}"}],
        "models": [{"name": "chat", "targets": [{"provider": "ghost", "model": "m"}]}],
        "routing": {"retries": -1, "circuit_breaker": {"failures": 0}},
        "extra": 1,
    }
    path = write_config(tmp_path, cfg)
    result = check_config(path)
    assert result.returncode == 2
    for key in (
        "server.port",
        "providers[0].type",
        "providers[0].base_url",
        "providers[0].api_key: environment variable MISSING_KEY is not set",
        "models[0].targets[0].provider",
        "routing.retries",
        "routing.circuit_breaker.failures",
        "extra",
    ):
        assert key in result.stderr, f"{key!r} not reported:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(problems) >= 8
    assert f"{len(problems)} problem" in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read"), (b"a: [b\n", "not valid YAML"), (b"\x7fELF\x02\x01\xff\xfe", "not UTF-8")],
    ids=["missing", "not-yaml", "binary"],
)
def test_check_config_unreadable_or_not_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run_main(capsys, "check-config", str(path))
    assert code == 2
    assert f"{path}: {expected}" in err
    assert out == ""


# --- serve -----------------------------------------------------------------------------------------------


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    port: int
    lines: list[bytes] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str = CLIENT_SECRET) -> openai.AsyncOpenAI:
        return openai_client(self.url, api_key, timeout=10)

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines if line.strip()]

    async def stop(self, timeout: float = 10) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self.reader is not None:
            await self.reader
        return code


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    started: list[Served] = []

    async def start(*args: str, **env: str) -> Served:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--port",
            str(port),
            *args,
            cwd=ROOT,
            env=clean_env(**env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        served = Served(proc, port)
        started.append(served)
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            assert line, b"".join(served.lines).decode()
            served.lines.append(line)
            if b'"gateway_started"' in line:
                break
        served.reader = asyncio.create_task(_collect(proc, served.lines))
        return served

    yield start
    for served in started:
        if served.proc.returncode is None:
            served.proc.kill()
        with contextlib.suppress(Exception):
            await served.stop()


async def _collect(proc: asyncio.subprocess.Process, lines: list[bytes]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        lines.append(line)


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):  # reset: the listener closed mid-handshake
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_serve_embedded_default_answers_from_the_mock(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve()
    async with served.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat",
            messages=[{"role": "user", "content": "hello cli"}],
            extra_headers={"x-request-id": "cli-1"},
        )
        assert raw.parse().choices[0].message.content == "Mock answer: hello cli"
        assert raw.headers["x-gateway-provider"] == "mock"
        models = await client.models.list()
        assert "chat" in [m.id for m in models.data]
    assert await served.stop() == 0

    events = served.events()  # every line on stdout is a JSON object
    names = [e.get("event") for e in events]
    started = events[names.index("gateway_started")]
    assert started["port"] == served.port
    assert started["state"] == "memory"
    assert "model_routes_to_mock" in names
    access = [e for e in events if e.get("event") == "request" and e.get("request_id") == "cli-1"]
    assert access and access[0]["status"] == 200 and access[0]["provider"] == "mock"
    assert names.index("gateway_started") < names.index("gateway_stopped")


async def test_a_served_gateway_does_not_stop_for_full_garbage_collections(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    """Once serving, the start-up heap is out of the cyclic collector's reach: hundreds of requests
    run without one collection (each used to walk ~100k start-up objects, 20 % of the CPU per request,
    and a full one paused every request in flight for ~100 ms)."""
    served = await serve()

    async def collections() -> dict[str, float]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{served.port}/metrics") as r,
        ):
            text = await r.text()
        return {
            line.split('generation="')[1][0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("python_gc_collections_total{")
        }

    before = await collections()
    async with served.client() as client:
        for _ in range(20):
            await asyncio.gather(
                *(
                    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
                    for _ in range(20)
                )
            )
    after = await collections()
    assert set(before) == {"0", "1", "2"}
    assert after == before  # 400 requests, not one collection of any generation


async def test_serve_logs_no_secret(
    serve: Callable[..., Awaitable[Served]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
) -> None:
    upstream = await aiohttp_server(mock.build_app())
    cfg = {
        "providers": [
            {
                "name": "real",
                "type": "openai",
                "base_url": str(upstream.make_url("/v1")),
                "api_key": "${REAL_KEY}",
                "timeouts": {"first_byte": 0.5},
            }
        ],
        "models": [
            {"name": "chat", "targets": [{"provider": "real", "model": "mock-chat"}]},
            {"name": "broken", "targets": [{"provider": "real", "model": "mock-chat:status=401"}]},
            {"name": "slow", "targets": [{"provider": "real", "model": "mock-chat:hang"}]},
        ],
        "teams": [{"id": "t", "api_keys": [TEAM_SECRET]}],
        "admin": {"master_key": MASTER_SECRET},
        "routing": {"retries": 0},
        "plugins": [],
    }
    path = write_config(tmp_path, cfg)
    served = await serve("--config", str(path), "--log-level", "debug", REAL_KEY=PROVIDER_SECRET)
    messages = [{"role": "user", "content": "hi"}]
    async with served.client() as client:
        reply = await client.chat.completions.create(model="chat", messages=messages)
        assert reply.choices[0].message.content == "Mock answer: hi"
        chunks = await client.chat.completions.create(model="chat", messages=messages, stream=True)
        assert [c async for c in chunks]
        for model, status in (("broken", 502), ("slow", 504), ("missing", 404)):
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(model=model, messages=messages)
            assert info.value.status_code == status
            assert PROVIDER_SECRET not in info.value.response.text
    assert await served.stop() == 0

    output = b"".join(served.lines).decode()
    assert '"api_key":"set"' in output.replace(" ", "")  # the summary says a key is there ...
    for secret in (PROVIDER_SECRET, MASTER_SECRET, TEAM_SECRET, CLIENT_SECRET):
        assert secret not in output  # ... and never shows it
    assert len([e for e in served.events() if e.get("event") == "request"]) == 5


async def test_serve_with_a_bad_config_exits_2(
    serve: Callable[..., Awaitable[Served]], tmp_path: Path
) -> None:
    path = write_config(tmp_path, {"providers": [], "models": []})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(path),
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"providers" in out + err
    assert b"Traceback" not in out + err


async def run_serve(*args: str) -> tuple[int, str, str]:
    """``llm-gateway serve ARGS`` that is expected to stop by itself: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        *args,
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "two-workers"])
async def test_serve_on_a_busy_port_says_so_in_one_line_and_exits_1(workers: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run_serve("--port", str(port), *workers)
    assert code == 1
    assert err == f"llm-gateway: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert "Traceback" not in out + err
    assert "Unclosed" not in out + err  # what start-up had opened was closed
    assert '"gateway_started"' not in out


BAD_URL = "is not a valid URL (check the host, and the port: a number from 0 to 65535)"


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "two-workers"])
async def test_serve_with_an_unusable_redis_url_says_so_and_exits_2(
    tmp_path: Path, workers: list[str]
) -> None:
    cfg = {
        "redis": {"url": "redis://:redis-pass-0a1b2c3d@127.0.0.1:notaport/0"},
        "providers": [{"name": "mock", "type": "mock"}],
        "models": [{"name": "chat", "targets": [{"provider": "mock", "model": "mock-chat"}]}],
        "plugins": [],
    }
    code, out, err = await run_serve("--config", str(write_config(tmp_path, cfg)), *workers)
    assert code == 2
    events = [orjson.loads(line) for line in out.splitlines()]
    assert [e["problems"] for e in events if e["event"] == "config_invalid"] == [[f"redis.url: {BAD_URL}"]]
    assert "Traceback" not in out + err
    assert "redis-pass-0a1b2c3d" not in out + err


async def test_sigterm_drains_in_flight_stream_then_exits_0(
    serve: Callable[..., Awaitable[Served]], tmp_path: Path
) -> None:
    cfg = {
        "server": {"shutdown_grace_seconds": 8},
        "providers": [{"name": "mock", "type": "mock"}],
        "models": [{"name": "chat", "targets": [{"provider": "mock", "model": "mock-chat:chunk_delay=0.1"}]}],
        "plugins": [],
    }
    served = await serve("--config", str(write_config(tmp_path, cfg)))
    words = " ".join(f"w{i}" for i in range(12))
    async with served.client() as client:
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": words}], stream=True
        )
        parts: list[str] = []
        finish: list[str | None] = []
        signalled = 0.0
        async for chunk in stream:
            if not chunk.choices:
                continue
            parts.append(chunk.choices[0].delta.content or "")
            finish.append(chunk.choices[0].finish_reason)
            if not signalled and "".join(parts):
                served.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                # no new connections while draining
                await eventually(lambda: connection_refused(served.port), within=3, interval=0.02)
    # the stream that was in flight when SIGTERM arrived was delivered whole
    assert "".join(parts) == f"Mock answer: {words}"
    assert finish[-1] == "stop"
    assert time.monotonic() - signalled > 0.8  # it really was still running after the signal

    code = await asyncio.wait_for(served.proc.wait(), 8)
    assert code == 0
    assert time.monotonic() - signalled < 8
    assert await connection_refused(served.port)
    await served.stop()
    names = [e.get("event") for e in served.events()]
    assert names.index("gateway_draining") < names.index("gateway_stopped")


async def test_workers_share_the_port_and_report_one_set_of_metrics(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    served = await serve("--workers", "2")
    await eventually(
        lambda: sum(b'"gateway_started"' in line for line in served.lines) >= 2,  # both workers listening
        within=20,
        interval=0.05,
        message=lambda: b"".join(served.lines).decode(),
    )
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(20):  # a new connection each time, so the kernel spreads them over the workers
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.post(served.url + "/chat/completions", json=body) as r,
        ):
            assert r.status == 200

    async def total() -> float:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(f"http://127.0.0.1:{served.port}/metrics") as r,
        ):
            text = await r.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "llm_gateway_requests"
            for sample in family.samples
            if sample.name == "llm_gateway_requests_total" and sample.labels.get("model") == "chat"
        )

    # Each worker folds its request metrics into the shared files once a second (metrics.Tally).
    await asyncio.sleep(metrics.Tally.FOLD_SECONDS + 0.2)
    for _ in range(6):  # whichever worker answers the scrape reports the whole pool
        assert await total() == 20
    assert await served.stop() == 0


async def test_two_gateway_processes_on_one_redis_admit_exactly_the_rpm(
    serve: Callable[..., Awaitable[Served]], tmp_path: Path
) -> None:
    # The acceptance case as written: two separate processes, one Redis, 60 concurrent requests, rpm 20.
    import uuid

    from tests.conftest import REDIS_URL

    team_key = "team-cli-key-0123456789"
    cfg = {
        "redis": {"url": REDIS_URL, "prefix": f"cli{uuid.uuid4().hex[:10]}"},
        "providers": [{"name": "mock", "type": "mock"}],
        "models": [{"name": "chat", "targets": [{"provider": "mock", "model": "mock-chat"}]}],
        "teams": [{"id": "team-a", "api_keys": [team_key], "limits": {"rpm": 20}}],
        "plugins": ["auth", "rate_limit"],
    }
    path = write_config(tmp_path, cfg)
    a, b = await serve("--config", str(path)), await serve("--config", str(path))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:

        async def call(url: str) -> int:
            headers = {"Authorization": f"Bearer {team_key}"}
            async with session.post(url + "/chat/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(call(a.url if i % 2 else b.url) for i in range(60)))
    assert (statuses.count(200), statuses.count(429)) == (20, 40)
