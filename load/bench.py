"""Loopback benchmark: the gateway against a bare aiohttp proxy and against the upstream itself.

Starts three servers on 127.0.0.1, each its own process:

  direct   the mock upstream (``python -m gateway.providers.mock``, request recording off)
  bare     ``load/bare_proxy.py`` in front of the mock: the least a proxy on this stack can do
  gateway  ``llm-gateway serve --config load/bench.yaml`` in front of the mock, default (info)
           logging with stdout sent to /dev/null: the access line is part of the measured path

With ``--native``, a fourth target, ``native``: the same gateway process driven through its native
API (``/api/v1/llm/complete`` and ``.../complete/stream``) instead of ``/v1/chat/completions``, with
the median of the per-round ratios native/gateway for req/s and CPU per request.

With ``--messages``, a target ``messages``: the same gateway process again, driven at Anthropic's
Messages API (``/v1/messages``, an Anthropic body, ``x-api-key``) for model ``bench-claude``, whose only
target is an ``anthropic`` provider on the same mock (its ``/v1/messages``), with the median of the
per-round ratios messages/gateway (issue #14: at most 1.1x the CPU per request of ``gateway``).

With ``--plugins``, the gateway runs ``load/bench-plugins.yaml`` (auth, limits, budgets) against a
private Redis that bench.py starts. ``--plugins --guardrails`` adds a target ``guarded``: a second
gateway process, ``load/bench-guardrails.yaml`` (the same plus the ``guardrails`` plugin with ten
rules, input and output), on the same Redis, key and CPU, driven like ``gateway`` in the same rounds,
with the median of the per-round ratios guarded/gateway (issue #15: at most 1.15x the CPU per request
of ``gateway`` non-stream; streams per second reported). With ``--peers litellm,portkey``, other
gateways (``load/peers.py`` installs them into ``load/.peers/``) take their turn in the same rounds
against the same mock, and a side-by-side table shows req/s, p50 at concurrency 1 and the peak RSS of
every server.

then drives closed-loop load with ``wrk`` (or ``load/loadgen.py`` when wrk is not installed) in
interleaved rounds, non-stream and stream, at ``--concurrency`` and at concurrency 1, and prints
medians plus the median of the per-round ratios gateway/bare and gateway/direct. See load/README.md.

    .venv/bin/python load/bench.py                  # full run (5-9 min: noisy rounds are redone)
    .venv/bin/python load/bench.py --quick          # smoke run (~1 min)
    .venv/bin/python load/bench.py --json out.json  # also write a JSON summary
    .venv/bin/python load/bench.py --native         # also the native API on the same gateway
    .venv/bin/python load/bench.py --messages       # also /v1/messages to an anthropic target
    .venv/bin/python load/bench.py --plugins --guardrails  # also a gateway with guardrails on
    .venv/bin/python load/bench.py --plugins --peers litellm,portkey --rounds 2 --duration 3
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import peers as peer_defs  # load/peers.py (this directory is on sys.path when run as a script)

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"  # every process binds here and every request goes here
PATH = "/v1/chat/completions"
TARGETS = ("direct", "bare", "gateway")
NATIVE = "native"  # --native: the gateway process again, through its native API
NATIVE_PATHS = {"non-stream": "/api/v1/llm/complete", "stream": "/api/v1/llm/complete/stream"}
MESSAGES = "messages"  # --messages: the gateway process again, Anthropic's Messages API
MESSAGES_PATH = "/v1/messages"
MESSAGES_MODEL = "bench-claude"  # load/bench.yaml's model whose only target is an `anthropic` provider
MESSAGES_MAX_TOKENS = 16
ANTHROPIC_VERSION = "2023-06-01"  # what the anthropic SDKs send; the gateway forwards it upstream
MODES = ("non-stream", "stream")
UPSTREAM_MODEL = "mock-chat"  # must match the target model in load/bench.yaml
GOAL_THROUGHPUT = 0.8  # gateway req/s >= 0.8x bare proxy
GOAL_P50_C1_MS = 0.3  # gateway p50 at concurrency 1 within 0.3 ms of the bare proxy
GOAL_NATIVE_CPU = 1.1  # a native non-stream completion costs <= 1.1x the CPU of the same on /v1
GOAL_MESSAGES_CPU = 1.1  # /v1/messages to an anthropic target <= 1.1x /v1/chat/completions to openai
GOAL_GUARDRAILS_CPU = 1.15  # ten input rules on: a non-stream request <= 1.15x the CPU without them

PLUGINS_CONFIG = HERE / "bench-plugins.yaml"
PLUGINS_API_KEY = "bench-team-key-0123456789"  # the team key in load/bench-plugins.yaml
GUARDED = "guarded"  # --guardrails: a second gateway process, bench-plugins.yaml plus guardrails
GUARDRAILS_CONFIG = HERE / "bench-guardrails.yaml"
GATEWAYS = ("gateway", GUARDED)  # the servers that are llm-gateway processes
# --guardrails, before the rounds: a prompt that rules of bench-guardrails.yaml act on (see check_guardrails)
GUARDRAILS_PROBE = "w0 mail bench-probe@example.com from 10.1.2.3"
GUARDRAILS_PROBE_SECRET = "bench-probe@example.com"  # redacted by the input rule `email`
GUARDRAILS_PROBE_FLAGGED = "ip-address"  # flagged on the request (input) and on the echo (output)

WRK_SCRIPT = """\
wrk.method = "POST"
{headers}
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,'
    .. '"status_errors":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"""


# --------------------------------------------------------------------------- processes


class BenchError(Exception):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None


@dataclass
class Processes:
    """Every child process bench.py starts, each in its own session so it can be stopped as a group."""

    tmp: Path
    src: Path = ROOT  # the checkout whose ``gateway`` package the servers import
    nice: int = 0  # added to every child's niceness (negative needs root)
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpus: set[int] | None,
        env: dict[str, str] | None = None,
        stdout: str | None = None,
        capture: bool = False,
        cwd: Path | None = None,
    ) -> Proc:
        log = None if capture else self.tmp / f"{name}.log"
        out: Any
        err: Any
        if capture:
            out, err = subprocess.PIPE, subprocess.PIPE
        else:
            assert log is not None
            err = log.open("wb")
            out = err if stdout is None else open(stdout, "ab")  # noqa: SIM115

        nice = self.nice

        def preexec() -> None:
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)
            if nice:
                os.nice(nice)

        pythonpath = os.pathsep.join(p for p in (str(self.src), os.environ.get("PYTHONPATH")) if p)
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
            cwd=cwd or self.src,
            start_new_session=True,  # Ctrl-C reaches bench.py only; it stops the children itself
            preexec_fn=preexec,
        )
        if not capture:
            err.close()
            if out is not err:
                out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 3.0) -> None:
        p = proc.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def check_alive(self, skip: frozenset[str] = frozenset()) -> None:
        for proc in self.procs:
            if proc.name not in skip and proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited with code {proc.popen.returncode}\n{tail(proc.log)}")


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM it if bench.py dies without cleaning up (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG (Linux)


def tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    """The live processes of a session: every server is started as a session leader, so this is the
    server and whatever it forked (LiteLLM's workers, say)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids or [sid]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a server (all threads of all the live processes of its session), from /proc;
    0.0 where /proc is missing."""
    total = 0
    for p in session_pids(pid):
        fields = _stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of a server (``VmHWM`` summed over the processes of its session), MB."""
    kb = 0
    for p in session_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kb += int(line.split()[1])
    return kb / 1024 if kb else None


def system_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all CPUs), from /proc/stat. Interrupt and softirq time is
    left out: on loopback most of it is this benchmark's own network traffic. Steal counts: it is
    time another virtual machine took from this one."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children (the load generator runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def post(
    port: int, path: str, body: bytes, headers: dict[str, str], timeout: float = 5.0
) -> tuple[int, str, bytes]:
    # http.client, not urllib: no proxy environment variable can send this anywhere but loopback.
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- workload


class Request(NamedTuple):
    path: str
    body: bytes
    headers: dict[str, str]  # every header sent, Content-Type included


def request_path(target: str, mode: str) -> str:
    if target == MESSAGES:
        return MESSAGES_PATH
    return NATIVE_PATHS[mode] if target == NATIVE else PATH


def request_body(target: str, model: str, stream: bool, chunks: int) -> bytes:
    # The mock answers "Mock answer: <last message>" and streams one chunk per word, so a prompt of
    # chunks-2 words gives `chunks` content chunks (plus the role chunk, the stop chunk and [DONE]).
    words = " ".join(f"w{i}" for i in range(max(1, chunks - 2)))
    messages = [{"role": "user", "content": words}]
    body: dict[str, Any]
    if target == NATIVE:  # the same request in the native shape; the path says whether it streams
        body = {"messages": messages, "options": {"model": model}}
    elif target == MESSAGES:  # Anthropic's shape: max_tokens is required
        body = {"model": model, "max_tokens": MESSAGES_MAX_TOKENS, "messages": messages}
        if stream:
            body["stream"] = True
    else:
        body = {"model": model, "messages": messages}
        if stream:
            body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def validate(target: str, mode: str, status: int, content_type: str, data: bytes) -> None:
    if status != 200:
        raise BenchError(f"{target} ({mode}) answered HTTP {status}: {data[:300]!r}")
    if mode == "stream":
        complete = {NATIVE: native_stream_done, MESSAGES: anthropic_stream_done}.get(
            target, openai_stream_done
        )
        if not content_type.startswith("text/event-stream") or not complete(data):
            raise BenchError(f"{target} ({mode}) did not stream a complete answer: {data[:300]!r}")
    else:
        key = "content" if target in (NATIVE, MESSAGES) else "choices"
        if f'"{key}"'.encode() not in data:
            raise BenchError(f"{target} ({mode}) answer has no {key}: {data[:300]!r}")


def openai_stream_done(data: bytes) -> bool:
    return data.rstrip().endswith(b"data: [DONE]")


def anthropic_stream_done(data: bytes) -> bool:
    """Anthropic's stream ends with ``event: message_stop`` (no [DONE])."""
    last = data.rstrip().rsplit(b"\n\n", 1)[-1].strip()
    return last.startswith(b"event: message_stop")


def native_stream_done(data: bytes) -> bool:
    """The native stream ends with one ``data: {..., "done": true, ...}`` event (no [DONE])."""
    last = data.rstrip().rsplit(b"\n\n", 1)[-1].strip()
    if not last.startswith(b"data:"):
        return False
    try:
        event = json.loads(last[5:])
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("done") is True


@dataclass
class Layout:
    """Which CPU each process runs on (``--pin``)."""

    name: str
    load: set[int] | None = None
    mock: set[int] | None = None
    proxies: set[int] | None = None

    def describe(self) -> str:
        if self.name == "none":
            return "no pinning (the kernel schedules everything)"
        return (
            f"load generator on CPU {fmt_cpus(self.load)}, mock on CPU {fmt_cpus(self.mock)}, "
            f"bare proxy, gateway and peers on CPU {fmt_cpus(self.proxies)}"
        )


def fmt_cpus(cpus: set[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus or ()))


def make_layout(pin: str) -> Layout:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if pin == "none" or len(cpus) < 2:
        return Layout("none")
    a, b = {cpus[0]}, {cpus[1]}
    if pin == "split":  # load generator alone; every server shares the other CPU
        return Layout("split", load=a, mock=b, proxies=b)
    # "sut": the proxy under test alone on its CPU; the load generator and the upstream share the other.
    return Layout("sut", load=a, mock=a, proxies=b)


# --------------------------------------------------------------------------- load generation


class Runner(Protocol):
    """What ``measure`` drives: one closed-loop run, answering the wrk script's JSON summary."""

    def run(self, port: int, request: Request, concurrency: int, duration: int) -> dict[str, Any]: ...


class LoadGenerator:
    def __init__(self, kind: str, procs: Processes, layout: Layout, tmp: Path) -> None:
        self.kind, self.procs, self.layout, self.tmp = kind, procs, layout, tmp
        self._files: dict[tuple[bytes, tuple[tuple[str, str], ...]], Path] = {}

    def _file(self, body: bytes, headers: dict[str, str]) -> Path:
        key = (body, tuple(sorted(headers.items())))
        path = self._files.get(key)
        if path is None:
            n = len(self._files)
            if self.kind == "wrk":
                path = self.tmp / f"post{n}.lua"
                lines = "\n".join(f"wrk.headers[{lua_str(k)}] = {lua_str(v)}" for k, v in headers.items())
                path.write_text(WRK_SCRIPT.format(headers=lines, body=body.decode()))
            else:
                path = self.tmp / f"body{n}.json"
                path.write_bytes(body)
            self._files[key] = path
        return path

    def run(self, port: int, request: Request, concurrency: int, duration: int) -> dict[str, Any]:
        path, body, headers = request
        url = f"http://{HOST}:{port}{path}"
        if self.kind == "wrk":
            argv = [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{duration}s",
                "--timeout",
                "10s",
                "-s",
                str(self._file(body, headers)),
                url,
            ]
        else:
            argv = [
                sys.executable,
                str(HERE / "loadgen.py"),
                "--url",
                url,
                "--body-file",
                str(self._file(body, headers)),
                "--headers",
                json.dumps(headers),
                "--concurrency",
                str(concurrency),
                "--duration",
                str(duration),
            ]
        proc = self.procs.start("loadgen", argv, cpus=self.layout.load, capture=True)
        try:
            out, err = proc.popen.communicate(timeout=duration + 30)
        finally:
            self.procs.stop(proc)
        lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
        if proc.popen.returncode != 0 or not lines:
            raise BenchError(f"load generator failed ({proc.popen.returncode}): {err.decode()[-500:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


def lua_str(value: str) -> str:
    return json.dumps(value)  # a JSON string of ASCII text is a valid Lua string literal


# --------------------------------------------------------------------------- the bench


@dataclass
class Servers:
    ports: dict[str, int]  # per target ("native" and "messages" are the gateway's port)
    pids: dict[str, int]  # per server: "mock", "bare", "gateway", "redis" (a private one), each peer
    targets: dict[str, list[str]] = field(default_factory=dict)  # per mode: the targets that run
    peers: dict[str, peer_defs.Peer] = field(default_factory=dict)  # the peers that started
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # target -> mode -> reason
    rss_mb: dict[str, float | None] = field(default_factory=dict)  # per server: peak RSS, at the end

    def fail(self, target: str, modes: tuple[str, ...] | list[str], reason: str) -> None:
        for mode in modes:
            self.failed.setdefault(target, {})[mode] = reason
            if target in self.targets.get(mode, ()):
                self.targets[mode].remove(target)


def redis_url(procs: Processes, layout: Layout, args: argparse.Namespace) -> tuple[str | None, int | None]:
    """``--redis``: the Redis URL the gateway gets (None: the config's default) and the pid of a
    private redis-server started here (on the mock's CPU, as load/floor.sh does)."""
    choice = args.redis
    if choice == "auto":
        has_redis = any(line.startswith("redis:") for line in args.config.read_text().splitlines())
        choice = "private" if has_redis and "BENCH_REDIS_URL" not in os.environ else "none"
    if choice == "none":
        return None, None
    if choice != "private":
        return choice, None
    if not shutil.which("redis-server"):
        raise BenchError("--redis private: redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    proc = procs.start(
        "redis",
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
         "--dir", str(procs.tmp)],
        cpus=layout.mock,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        procs.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return f"redis://{HOST}:{port}/0", proc.popen.pid
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server did not come up on port {port}\n{tail(proc.log)}")
        time.sleep(0.05)


def start_servers(procs: Processes, layout: Layout, args: argparse.Namespace) -> Servers:
    py = sys.executable
    ports = {t: free_port() for t in TARGETS}
    if GUARDED in args.targets:
        ports[GUARDED] = free_port()
    pids: dict[str, int] = {}
    url, redis_pid = redis_url(procs, layout, args)
    if redis_pid is not None:
        pids["redis"] = redis_pid
    mock = procs.start(
        "mock", [py, "-m", "gateway.providers.mock", "--host", HOST, "--port", str(ports["direct"])],
        cpus=layout.mock,
    )  # fmt: skip
    upstream = f"http://{HOST}:{ports['direct']}"
    bare = procs.start(
        "bare",
        [
            py,
            str(HERE / "bare_proxy.py"),
            "--host",
            HOST,
            "--port",
            str(ports["bare"]),
            "--upstream",
            upstream,
        ],
        cpus=layout.proxies,
    )
    gateway_bin = Path(py).with_name("llm-gateway")
    gateway_cmd = [str(gateway_bin)] if gateway_bin.exists() else [py, "-m", "gateway.cli"]
    configs = {"gateway": args.config, **({GUARDED: args.guardrails} if GUARDED in args.targets else {})}
    for name, config in configs.items():  # --guardrails: a second gateway, alike but for its config
        gateway = procs.start(
            name,
            [
                *gateway_cmd,
                "serve",
                "--config",
                str(config),
                "--host",
                HOST,
                "--port",
                str(ports[name]),
                "--log-level",
                args.gateway_log_level,
            ],
            cpus=layout.proxies,
            env={"BENCH_MOCK_PORT": str(ports["direct"]), **({"BENCH_REDIS_URL": url} if url else {})},
            stdout=args.gateway_log,  # the access log is written (it is part of the hot path), to /dev/null
        )
        pids[name] = gateway.popen.pid
    ports[NATIVE] = ports[MESSAGES] = ports["gateway"]
    pids.update(mock=mock.popen.pid, bare=bare.popen.pid)
    servers = Servers(ports, pids, targets={mode: list(args.targets) for mode in args.modes})
    deadline = time.monotonic() + 20
    for mode in MODES:
        for target, (path, body, headers) in requests_for(args, mode, servers).items():
            while True:
                procs.check_alive()
                try:
                    validate(target, mode, *post(ports[target], path, body, headers))
                    break
                except BenchError as exc:
                    quiet = server_of(target) in GATEWAYS and args.gateway_log == os.devnull
                    hint = " (rerun with --gateway-log FILE to see its log)" if quiet else ""
                    raise BenchError(f"{exc}{hint}") from None
                except (OSError, http.client.HTTPException) as exc:
                    if time.monotonic() > deadline:
                        raise BenchError(f"{target} did not come up on port {ports[target]}: {exc}") from None
                    time.sleep(0.1)
    if GUARDED in args.targets:
        check_guardrails(servers, args)
    return servers


def check_guardrails(servers: Servers, args: argparse.Namespace) -> None:
    """``--guardrails``: check, before the rounds, that the guarded gateway's rules run on requests and
    on answers, whole and streamed, so that its figures cannot be those of rules that never run. The
    probe's email address must come back (the mock echoes the prompt) redacted by the input rule
    ``email``, and its IP address must be flagged by ``ip-address`` once on the request and once on
    the answer (``llm_gateway_guardrail_actions_total`` on the guarded gateway's /metrics)."""
    port = servers.ports[GUARDED]
    messages = [{"role": "user", "content": GUARDRAILS_PROBE}]
    expected = guardrail_directions(args.guardrails, GUARDRAILS_PROBE_FLAGGED)
    redacts_input = "input" in guardrail_directions(args.guardrails, "email")
    for mode in MODES:
        before = guardrail_actions(port, GUARDRAILS_PROBE_FLAGGED)
        stream = {"stream": True} if mode == "stream" else {}
        body = json.dumps({"model": args.model, "messages": messages, **stream}).encode()
        status, content_type, data = post(port, PATH, body, gateway_headers(args, GUARDED))
        validate(GUARDED, mode, status, content_type, data)
        if redacts_input and (GUARDRAILS_PROBE_SECRET.encode() in data or b"[REDACTED:email]" not in data):
            raise BenchError(
                f"{GUARDED} ({mode}): the input rule `email` did not redact the probe: {data[:300]!r}"
            )
        deadline = time.monotonic() + 2  # a stream's output actions are counted as it ends
        while True:
            after = guardrail_actions(port, GUARDRAILS_PROBE_FLAGGED)
            missing = [d for d in expected if after.get(d, 0) <= before.get(d, 0)]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{GUARDED} ({mode}): rule `{GUARDRAILS_PROBE_FLAGGED}` was not counted on the "
                    f"{' and '.join(missing)} (is `guardrails` in the plugins of "
                    f"{display_path(args.guardrails)}?)"
                )
            time.sleep(0.05)


def guardrail_directions(config: Path, rule: str) -> tuple[str, ...]:
    """The directions (input, output) the rule named ``rule`` of a gateway config applies to."""
    import yaml

    for entry in (yaml.safe_load(config.read_text()).get("guardrails") or {}).get("rules") or ():
        if entry.get("name") == rule:
            applies = entry.get("applies_to", "both")
            return tuple(d for d in ("input", "output") if applies in (d, "both"))
    return ()


def guardrail_actions(port: int, rule: str) -> dict[str, float]:
    """``llm_gateway_guardrail_actions_total`` of one rule from a gateway's /metrics, per direction."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"GET /metrics on port {port} answered HTTP {resp.status}: {text[:200]!r}")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("llm_gateway_guardrail_actions_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("rule") == rule:
            direction = found.get("direction", "")
            out[direction] = out.get(direction, 0.0) + float(value)
    return out


def start_peers(
    procs: Processes,
    layout: Layout,
    args: argparse.Namespace,
    servers: Servers,
    log: Callable[[str], None],
) -> None:
    """``--peers``: start each installed peer next to the gateway (same CPU) in front of the same mock,
    and check it answers each mode; a peer that cannot is reported as failed for that mode and the
    benchmark goes on without it."""
    started: dict[str, tuple[Proc, float]] = {}
    for name in args.peers:
        reason = args.peer_failures.get(name)
        try:
            if reason:
                raise peer_defs.PeerError(reason)
            version = peer_defs.install(name, log, offline=args.in_netns)
            port = free_port()
            peer = peer_defs.prepare(name, port, servers.ports["direct"], procs.tmp, version)
        except peer_defs.PeerError as exc:
            log(f"peers: {name} failed: {exc}")
            servers.fail(name, MODES, str(exc))
            continue
        proc = procs.start(
            name, peer.argv, cpus=layout.proxies, env=peer.env, stdout=os.devnull, cwd=procs.tmp
        )
        servers.ports[name], servers.pids[name], servers.peers[name] = port, proc.popen.pid, peer
        started[name] = (proc, time.monotonic() + peer.startup_s)
        for mode in args.modes:
            servers.targets[mode].append(name)
    for name, (proc, deadline) in started.items():
        for mode in args.modes:
            path, body, headers = requests_for(args, mode, servers)[name]
            while True:
                if proc.popen.poll() is not None:
                    reason = f"exited with code {proc.popen.returncode}: {peer_log_hint(proc)}"
                    servers.fail(name, MODES, reason)
                    break
                try:
                    validate(name, mode, *post(servers.ports[name], path, body, headers, timeout=30))
                    break
                except BenchError as exc:
                    servers.fail(name, [mode], f"{exc} {peer_log_hint(proc)}".strip())
                    break
                except (OSError, http.client.HTTPException) as exc:
                    if time.monotonic() > deadline:
                        servers.fail(name, MODES, f"did not come up: {exc}")
                        break
                    time.sleep(0.2)
        if not any(name in servers.targets[mode] for mode in args.modes):
            stop_peer(procs, servers, name)
        failed = {mode: why for mode, why in servers.failed.get(name, {}).items() if mode in args.modes}
        for mode, reason in failed.items():
            log(f"peers: {name} ({mode}) failed: {reason}")
        if len(failed) < len(args.modes):
            log(f"peers: {name} {servers.peers[name].version} on port {servers.ports[name]}")


def peer_log_hint(proc: Proc) -> str:
    """The first line of a peer's stderr that names an error, if any (why a request failed)."""
    for line in tail(proc.log, 200).splitlines():
        if "error" in line.lower():
            return f"(its log: {line.strip()[:200]})"
    return ""


def stop_peer(procs: Processes, servers: Servers, name: str) -> None:
    """Stop a peer that failed every mode (or died), keeping its peak RSS."""
    servers.rss_mb[name] = peak_rss_mb(servers.pids[name])
    for proc in [p for p in procs.procs if p.name == name]:
        procs.stop(proc)
    servers.pids.pop(name, None)


SUT_PID = {"direct": "mock", "bare": "bare", "gateway": "gateway", NATIVE: "gateway", MESSAGES: "gateway"}


def server_of(target: str) -> str:
    """The server whose CPU a target's requests are charged to (a peer is its own server)."""
    return SUT_PID.get(target, target)


def model_for(target: str, args: argparse.Namespace) -> str:
    if target == MESSAGES:
        return str(args.messages_model)
    return args.model if server_of(target) in GATEWAYS else UPSTREAM_MODEL


def gateway_headers(args: argparse.Namespace, target: str = "gateway") -> dict[str, str]:
    # The gateway's team key when the config has auth on (load/bench-plugins.yaml); the mock and the
    # bare proxy ignore it. /v1/messages gets it as the anthropic SDKs send it: x-api-key.
    if target == MESSAGES:
        return {
            "Content-Type": "application/json",
            "x-api-key": args.api_key,
            "anthropic-version": ANTHROPIC_VERSION,
        }
    return {"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"}


def requests_for(args: argparse.Namespace, mode: str, servers: Servers | None = None) -> dict[str, Request]:
    """Per target (and per started peer): the path, body and headers of one request of this mode."""
    stream = mode == "stream"
    out = {
        t: Request(
            request_path(t, mode),
            request_body(t, model_for(t, args), stream, args.chunks),
            gateway_headers(args, t),
        )
        for t in args.targets
    }
    for name, peer in (servers.peers if servers else {}).items():
        headers = {"Content-Type": "application/json", **peer.headers}
        out[name] = Request(PATH, request_body(name, peer.model, stream, args.chunks), headers)
    return out


def measure(
    gen: Runner,
    servers: Servers,
    procs: Processes,
    target: str,
    request: Request,
    concurrency: int,
    duration: int,
) -> dict[str, Any]:
    before = {name: cpu_seconds(pid) for name, pid in servers.pids.items()}
    busy0, children0, wall0 = system_busy_seconds(), children_cpu_seconds(), time.monotonic()
    raw = gen.run(servers.ports[target], request, concurrency, duration)
    busy1, children1, wall1 = system_busy_seconds(), children_cpu_seconds(), time.monotonic()
    after = {name: cpu_seconds(pid) for name, pid in servers.pids.items()}
    procs.check_alive(skip=frozenset(servers.peers))
    seconds = raw["duration_us"] / 1e6
    requests = raw["requests"]
    cpu = {name: after[name] - before[name] for name in before}
    cpu["loadgen"] = children1 - children0
    # CPU used by anything but the benchmark's own processes (other jobs on a shared machine).
    other = max(0.0, (busy1 - busy0) - sum(cpu.values()))
    errors = sum(raw[k] for k in ("status_errors", "connect", "read", "write", "timeout"))
    sut_cpu = cpu[server_of(target)]
    return {
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "requests": requests,
        "errors": errors,
        "cpu_pct": {name: round(100 * v / seconds, 1) for name, v in cpu.items()} if seconds else {},
        "sut_cpu_us_per_req": 1e6 * sut_cpu / requests if requests else None,
        "other_cpu_pct": round(100 * other / (wall1 - wall0), 1),
        "raw": raw,
    }


def run_bench(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    elif loadgen == "wrk" and not shutil.which("wrk"):
        raise BenchError("--loadgen wrk: wrk is not installed (apt-get install -y wrk)")
    layout = make_layout(args.pin)
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp, args.src, args.nice)
        try:
            log(f"load generator: {loadgen}; pinning: {layout.describe()}")
            servers = start_servers(procs, layout, args)
            start_peers(procs, layout, args, servers, log)
            log(f"ports: {servers.ports}")
            gen = LoadGenerator(loadgen, procs, layout, tmp)
            started = time.monotonic()
            retries_left = args.retries
            for mode in args.modes:
                requests = requests_for(args, mode, servers)
                for target in list(servers.targets[mode]):  # warm-up: pools, caches, first-request paths
                    warm_up = partial(gen.run, servers.ports[target], requests[target], args.concurrency, 1)
                    run_guarded(servers, procs, target, warm_up)
                rnd = redone = 0
                while rnd < args.rounds:
                    wait_quiet(servers, args.max_other, args.quiet_wait, log)
                    round_runs = run_round(args, gen, servers, procs, mode, rnd, requests, log)
                    noisiest = max(r["other_cpu_pct"] for r in round_runs)
                    # Redo a noisy round, at most twice, so one long busy spell cannot eat every retry.
                    if noisiest > args.max_other and retries_left > 0 and redone < 2:
                        retries_left -= 1
                        redone += 1
                        log(f"  round redone: other% reached {noisiest:.0f} (> {args.max_other:g})")
                        discarded.extend(round_runs)
                        continue
                    runs.extend(round_runs)
                    rnd += 1
                    redone = 0
            elapsed = time.monotonic() - started
            for name, pid in servers.pids.items():
                servers.rss_mb[name] = peak_rss_mb(pid)
        finally:
            procs.stop_all()
    result = summarize(args, runs, loadgen, layout, elapsed, servers)
    result["discarded_runs"] = discarded
    return result


def run_guarded(servers: Servers, procs: Processes, target: str, run: Callable[[], T]) -> T | None:
    """Run one load-generator run (or measurement) against a target. A peer that dies or makes the
    load generator fail is reported as failed and dropped from the rest of the benchmark; anything
    else that fails stops the benchmark."""
    if target not in servers.peers:
        return run()
    proc = next(p for p in procs.procs if p.name == target)
    try:
        result = run()
        if proc.popen.poll() is not None:
            raise BenchError(f"exited with code {proc.popen.returncode}: {peer_log_hint(proc)}")
    except BenchError as exc:
        servers.fail(target, MODES, f"during the runs: {exc}")
        stop_peer(procs, servers, target)
        return None
    return result


def run_round(
    args: argparse.Namespace,
    gen: LoadGenerator,
    servers: Servers,
    procs: Processes,
    mode: str,
    rnd: int,
    requests: dict[str, Request],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One run per target at --concurrency, then one per target at concurrency 1."""
    targets = servers.targets[mode]
    first = rnd % len(targets)
    order = targets[first:] + targets[:first]  # rotate who goes first
    out = []
    for concurrency in (args.concurrency, 1):
        for target in order:
            if target not in servers.targets[mode]:
                continue  # a peer that failed earlier in this round
            run = partial(measure, gen, servers, procs, target, requests[target], concurrency, args.duration)
            m = run_guarded(servers, procs, target, run)
            settle(servers, target)
            if m is None:
                log(f"[{mode} {rnd + 1}/{args.rounds}] {target} failed: {servers.failed[target][mode]}")
                continue
            m.update(mode=mode, round=rnd, target=target, concurrency=concurrency)
            out.append(m)
            log(
                f"[{mode} {rnd + 1}/{args.rounds}] {target:<7} c={concurrency:<3} "
                f"{m['rps']:8.0f} req/s  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms"
                f"  cpu% {fmt_cpu(m['cpu_pct'])} other {m['other_cpu_pct']:.0f}"
                + (f"  ERRORS {m['errors']}" if m["errors"] else "")
            )
    return out


def settle(servers: Servers, target: str, limit_s: float = 3.0) -> None:
    """After a run, wait (up to ``limit_s``) until the server just measured is idle: a slow server still
    works through the requests in flight when the load generator stopped (LiteLLM's take ~0.3 s at
    concurrency 32), and that must not run into the next target's run on the same CPU."""
    pid = servers.pids.get(server_of(target))
    if pid is None:
        return
    deadline = time.monotonic() + limit_s
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now - last <= 0.01:  # at most one clock tick in 100 ms: idle
            return
        last = now


def wait_quiet(servers: Servers, limit: float, max_wait: float, log: Callable[[str], None]) -> None:
    """Before a round: wait (up to max_wait s) for a 1 s window in which other jobs use <= limit% CPU."""
    deadline = time.monotonic() + max_wait
    waited = False
    while True:
        before = sum(cpu_seconds(pid) for pid in servers.pids.values())
        busy0, wall0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        busy1, wall1 = system_busy_seconds(), time.monotonic()
        ours = sum(cpu_seconds(pid) for pid in servers.pids.values()) - before
        other = 100 * max(0.0, busy1 - busy0 - ours) / (wall1 - wall0)
        if other <= limit or time.monotonic() >= deadline:
            if waited:
                log(f"  machine {'quiet' if other <= limit else 'still busy'}: other% {other:.0f}")
            return
        if not waited:
            log(f"  waiting for other jobs to calm down (other% {other:.0f} > {limit:.0f})")
            waited = True


# --------------------------------------------------------------------------- summary


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


Table = dict[str, dict[int, dict[str, Any]]]  # target -> round -> run


def round_ratios(table: Table, num: str, den: str, key: str, rounds: range) -> list[float]:
    values = []
    for r in rounds:
        a, b = table[num][r][key], table[den][r][key]
        if a is not None and b:
            values.append(a / b)
    return values


def per_round_ratio(table: Table, num: str, den: str, key: str, rounds: range) -> float | None:
    return median(round_ratios(table, num, den, key, rounds))


def over_gateway_ratios(at_c: Table, target: str, rounds: range) -> dict[str, Any]:
    """--native, --messages: another API of the same gateway over /v1/chat/completions, median of
    per-round ratios and each round's, for req/s and for CPU per request."""
    out: dict[str, Any] = {}
    for name, key in (("rps", "rps"), ("cpu_per_req", "sut_cpu_us_per_req")):
        out[f"{target}_over_gateway_{name}"] = per_round_ratio(at_c, target, "gateway", key, rounds)
        out[f"{target}_over_gateway_{name}_per_round"] = round_ratios(at_c, target, "gateway", key, rounds)
    return out


def cpu_goal(cpu_ratio: float | None, limit: float) -> dict[str, Any]:
    met = cpu_ratio is not None and cpu_ratio <= limit
    return {"goal": f"<= {limit}", "value": cpu_ratio, "met": met}


def per_round_diff(table: Table, a: str, b: str, key: str, rounds: range) -> float | None:
    return median([table[a][r][key] - table[b][r][key] for r in rounds])


def summarize(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    loadgen: str,
    layout: Layout,
    elapsed: float,
    servers: Servers | None = None,
) -> dict[str, Any]:
    def pick(mode: str, target: str, concurrency: int) -> list[dict[str, Any]]:
        return [
            r for r in runs if r["mode"] == mode and r["target"] == target and r["concurrency"] == concurrency
        ]

    def by_round(mode: str, target: str, concurrency: int) -> dict[int, dict[str, Any]]:
        return {r["round"]: r for r in pick(mode, target, concurrency)}

    summary: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    c = args.concurrency
    for mode in args.modes:
        summary[mode] = {}
        for target in servers.targets[mode] if servers else args.targets:
            hi, lo = pick(mode, target, c), pick(mode, target, 1)
            if not hi or not lo:
                continue
            summary[mode][target] = {
                "rps": median([r["rps"] for r in hi]),
                "rps_min": min(r["rps"] for r in hi),
                "rps_max": max(r["rps"] for r in hi),
                "p50_ms": median([r["p50_ms"] for r in hi]),
                "p99_ms": median([r["p99_ms"] for r in hi]),
                "p50_c1_ms": median([r["p50_ms"] for r in lo]),
                "p99_c1_ms": median([r["p99_ms"] for r in lo]),
                "rps_c1": median([r["rps"] for r in lo]),
                "cpu_us_per_req": median([r["sut_cpu_us_per_req"] for r in hi]),
                "errors": sum(r["errors"] for r in hi + lo),
                "other_cpu_pct": median([r["other_cpu_pct"] for r in hi + lo]),
            }
        at_c = {t: by_round(mode, t, c) for t in args.targets}
        at_1 = {t: by_round(mode, t, 1) for t in args.targets}
        rounds = range(args.rounds)

        ratios[mode] = {
            "gateway_over_bare_rps": per_round_ratio(at_c, "gateway", "bare", "rps", rounds),
            "gateway_over_direct_rps": per_round_ratio(at_c, "gateway", "direct", "rps", rounds),
            "bare_over_direct_rps": per_round_ratio(at_c, "bare", "direct", "rps", rounds),
            "gateway_over_bare_cpu_per_req": per_round_ratio(
                at_c, "gateway", "bare", "sut_cpu_us_per_req", rounds
            ),
            "gateway_minus_bare_p50_c1_ms": per_round_diff(at_1, "gateway", "bare", "p50_ms", rounds),
            "gateway_minus_direct_p50_c1_ms": per_round_diff(at_1, "gateway", "direct", "p50_ms", rounds),
            "bare_minus_direct_p50_c1_ms": per_round_diff(at_1, "bare", "direct", "p50_ms", rounds),
            "gateway_over_bare_rps_per_round": [
                at_c["gateway"][r]["rps"] / at_c["bare"][r]["rps"] for r in rounds if at_c["bare"][r]["rps"]
            ],
        }
        tp = ratios[mode]["gateway_over_bare_rps"]
        lat = ratios[mode]["gateway_minus_bare_p50_c1_ms"]
        goals[mode] = {
            "throughput_vs_bare": {
                "goal": f">= {GOAL_THROUGHPUT}",
                "value": tp,
                "met": tp >= GOAL_THROUGHPUT,
            },
            "p50_c1_vs_bare_ms": {"goal": f"<= {GOAL_P50_C1_MS}", "value": lat, "met": lat <= GOAL_P50_C1_MS},
        }
        if args.native:
            ratios[mode].update(over_gateway_ratios(at_c, NATIVE, rounds))
            if mode == "non-stream":  # the issue's bar is on non-stream completions
                cpu = ratios[mode]["native_over_gateway_cpu_per_req"]
                goals[mode]["native_cpu_vs_gateway"] = cpu_goal(cpu, GOAL_NATIVE_CPU)
        if MESSAGES in args.targets:  # issue #14: judged in both modes
            ratios[mode].update(over_gateway_ratios(at_c, MESSAGES, rounds))
            cpu = ratios[mode]["messages_over_gateway_cpu_per_req"]
            goals[mode]["messages_cpu_vs_gateway"] = cpu_goal(cpu, GOAL_MESSAGES_CPU)
        if GUARDED in args.targets:  # issue #15: CPU judged non-stream; streams per second reported
            ratios[mode].update(over_gateway_ratios(at_c, GUARDED, rounds))
            if mode == "non-stream":
                cpu = ratios[mode]["guarded_over_gateway_cpu_per_req"]
                goals[mode]["guardrails_cpu_vs_gateway"] = cpu_goal(cpu, GOAL_GUARDRAILS_CPU)
    return {
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "modes": list(args.modes),
            "stream_content_chunks": args.chunks,
            "messages_model": args.messages_model if MESSAGES in args.targets else None,
            "config": str(args.config),
            "guardrails_config": str(args.guardrails) if GUARDED in args.targets else None,
            "redis": args.redis,
            "peers": list(args.peers),
            "network_namespace": args.in_netns,
            "gateway_source": str(args.src),
            "gateway_log": args.gateway_log,
            "max_other_cpu_pct": args.max_other,
            "retries": args.retries,
            "quiet_wait_s": args.quiet_wait,
            "nice": args.nice,
            "gateway_log_level": args.gateway_log_level,
            "load_generator": loadgen,
            "pinning": layout.name,
            "pinning_detail": layout.describe(),
        },
        "environment": environment(loadgen, args.src),
        "elapsed_s": round(elapsed, 1),
        "summary": summary,
        "ratios": ratios,
        "goals": goals,
        "servers": describe_servers(args, servers),
        "failed": servers.failed if servers else {},
        "runs": runs,
    }


def describe_servers(args: argparse.Namespace, servers: Servers | None) -> dict[str, dict[str, Any]]:
    """Per target: what runs it and the peak RSS of its server's processes (MB)."""
    if servers is None:
        return {}
    what = {
        "direct": "the mock upstream",
        "bare": "load/bare_proxy.py",
        "gateway": f"llm-gateway, {display_path(args.config)}",
        NATIVE: "llm-gateway, native API",
        MESSAGES: f"llm-gateway, /v1/messages to {getattr(args, 'messages_model', MESSAGES_MODEL)}",
        GUARDED: f"llm-gateway, {display_path(args.guardrails) if args.guardrails else ''}",
    }
    out = {}
    for target in [*args.targets, *args.peers]:
        server = server_of(target)
        peer = servers.peers.get(target)
        label = f"{target} {peer.version}" if peer is not None else what.get(target, target)
        out[target] = {"server": server, "what": label, "peak_rss_mb": servers.rss_mb.get(server)}
    return out


def display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


def environment(loadgen: str, src: Path) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for module in ("aiohttp", "uvloop", "orjson"):
        with contextlib.suppress(Exception):
            env[module] = __import__(module).__version__
    if loadgen == "wrk":
        with contextlib.suppress(Exception):
            out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
            env["wrk"] = (out.stdout or out.stderr).splitlines()[0]
    if src.resolve() != ROOT:
        env["source"] = str(src)
        return env
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "gateway"], capture_output=True, text=True, cwd=ROOT
        )
        env["git"] = out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return env


def fmt_cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.0f}" for k, v in cpu.items() if v >= 0.5)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"llm-gateway loopback benchmark: {s['rounds']} rounds x {s['duration_s']} s per run, "
        f"concurrency {s['concurrency']} and 1, load generator {s['load_generator']}",
        f"pinning: {s['pinning_detail']}; gateway log level {s['gateway_log_level']} (stdout -> "
        f"{s['gateway_log']})" + (f"; nice {s['nice']:+d}" if s["nice"] else ""),
        "medians over rounds; cpu us/req = CPU time of the server under test per request at concurrency "
        f"{s['concurrency']};",
        "other% = CPU used meanwhile by processes outside the benchmark (100 = one core): noise",
        "",
    ]
    c = s["concurrency"]
    header = (
        f"{'mode':<11}{'target':<9}{'req/s':>9}{'(min-max)':>15}{f'p50 ms@{c}':>11}{f'p99 ms@{c}':>11}"
        f"{'p50 ms@1':>10}{'p99 ms@1':>10}{'cpu us/req':>12}{'errors':>8}{'other%':>8}"
    )
    lines += [header, "-" * len(header)]
    for mode, targets in result["summary"].items():
        for target, v in targets.items():
            spread = f"{v['rps_min']:.0f}-{v['rps_max']:.0f}"
            lines.append(
                f"{mode:<11}{target:<9}{fmt(v['rps'], '.0f'):>9}{spread:>15}{fmt(v['p50_ms'], '.2f'):>11}"
                f"{fmt(v['p99_ms'], '.2f'):>11}{fmt(v['p50_c1_ms'], '.3f'):>10}"
                f"{fmt(v['p99_c1_ms'], '.3f'):>10}{fmt(v['cpu_us_per_req'], '.0f'):>12}{v['errors']:>8}"
                f"{fmt(v['other_cpu_pct'], '.0f'):>8}"
            )
    lines += ["", "median of per-round ratios:"]
    for mode, r in result["ratios"].items():
        g = result["goals"][mode]
        tp, lat = g["throughput_vs_bare"], g["p50_c1_vs_bare_ms"]
        lines += [
            f"  {mode}:",
            f"    gateway/bare   req/s      {fmt(r['gateway_over_bare_rps'], '.2f')}x   "
            f"(goal >= {GOAL_THROUGHPUT}: {'met' if tp['met'] else 'NOT met'}; per round "
            + ", ".join(f"{x:.2f}" for x in r["gateway_over_bare_rps_per_round"])
            + ")",
            f"    gateway/direct req/s      {fmt(r['gateway_over_direct_rps'], '.2f')}x   "
            f"(bare/direct {fmt(r['bare_over_direct_rps'], '.2f')}x)",
            f"    gateway/bare   cpu/req    {fmt(r['gateway_over_bare_cpu_per_req'], '.2f')}x",
            f"    p50@1 gateway-bare        {fmt(r['gateway_minus_bare_p50_c1_ms'], '+.3f')} ms "
            f"(goal <= {GOAL_P50_C1_MS}: {'met' if lat['met'] else 'NOT met'}); gateway-direct "
            f"{fmt(r['gateway_minus_direct_p50_c1_ms'], '+.3f')} ms, bare-direct "
            f"{fmt(r['bare_minus_direct_p50_c1_ms'], '+.3f')} ms",
        ]
        if "native_over_gateway_rps" in r:
            lines += render_over_gateway(r, NATIVE, g.get("native_cpu_vs_gateway"), GOAL_NATIVE_CPU)
        if "messages_over_gateway_rps" in r:
            lines += render_over_gateway(r, MESSAGES, g.get("messages_cpu_vs_gateway"), GOAL_MESSAGES_CPU)
        if "guarded_over_gateway_rps" in r:
            goal = g.get("guardrails_cpu_vs_gateway")
            lines += render_over_gateway(
                r,
                GUARDED,
                goal,
                GOAL_GUARDRAILS_CPU,
                goal_text=f"<= {GOAL_GUARDRAILS_CPU}x CPU (non-stream)",
                rps_note="streams/s, no goal; " if mode == "stream" else "",
            )
    lines += render_side_by_side(result)
    targets = max(1, len(next(iter(result["summary"].values()))))
    redone = len(result.get("discarded_runs", ())) // (2 * targets)
    limit = s["max_other_cpu_pct"]
    lines.append(f"\ntook {result['elapsed_s']} s; {redone} noisy round(s) redone (other% > {limit:g})")
    return "\n".join(lines)


def render_side_by_side(result: dict[str, Any]) -> list[str]:
    """Every target in one row: req/s at --concurrency and p50 at concurrency 1 per mode (medians), the
    peak RSS of its server's processes, and why a peer failed."""
    servers: dict[str, dict[str, Any]] = result.get("servers") or {}
    if not servers:
        return []
    s = result["settings"]
    modes = list(result["summary"])
    failed: dict[str, dict[str, str]] = result.get("failed") or {}
    header = (
        f"{'target':<9}"
        + "".join(f"{mode + ' req/s':>18}{'p50 ms@1':>10}" for mode in modes)
        + f"{'peak RSS MB':>13}  what"
    )
    lines = [
        "",
        f"side by side: req/s at concurrency {s['concurrency']}, p50 at concurrency 1 (medians over "
        "rounds); peak RSS = VmHWM of the server's processes",
        header,
        "-" * len(header),
    ]
    for target, info in servers.items():
        cells = ""
        for mode in modes:
            v = result["summary"][mode].get(target)
            if v is None:
                cells += f"{'failed' if mode in failed.get(target, {}) else '-':>18}{'-':>10}"
            else:
                cells += f"{fmt(v['rps'], '.0f'):>18}{fmt(v['p50_c1_ms'], '.2f'):>10}"
        rss = fmt(info["peak_rss_mb"], ".0f")
        lines.append(f"{target:<9}{cells}{rss:>13}  {info['what']}")
    for target, by_mode in failed.items():
        reasons = {mode: by_mode[mode] for mode in modes if mode in by_mode}
        if len(reasons) == len(modes) and len(set(reasons.values())) == 1:
            lines.append(f"  {target}: failed: {reasons[modes[0]]}")
        else:
            lines += [f"  {target} ({mode}): failed: {reason}" for mode, reason in reasons.items()]
    return lines


def render_over_gateway(
    r: dict[str, Any],
    target: str,
    goal: dict[str, Any] | None,
    limit: float,
    *,
    goal_text: str | None = None,
    rps_note: str = "",
) -> list[str]:
    def per_round(key: str) -> str:
        return "per round " + ", ".join(f"{x:.2f}" for x in r[f"{key}_per_round"])

    judged = f"goal {goal_text or f'<= {limit}'}: {'met' if goal['met'] else 'NOT met'}; " if goal else ""
    name = f"{target}/gateway"
    name = f"{name:<{max(15, len(name) + 1)}}"  # the gateway/bare lines' column, or one space more
    return [
        f"    {name}req/s      {fmt(r[f'{target}_over_gateway_rps'], '.2f')}x   "
        f"({rps_note}{per_round(f'{target}_over_gateway_rps')})",
        f"    {name}cpu/req    {fmt(r[f'{target}_over_gateway_cpu_per_req'], '.2f')}x   "
        f"({judged}{per_round(f'{target}_over_gateway_cpu_per_req')})",
    ]


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the gateway against a bare aiohttp proxy and the mock upstream (loopback).",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per mode (default 5)")
    p.add_argument("--duration", type=int, default=4, help="seconds per run (whole seconds, default 4)")
    p.add_argument("--concurrency", type=int, default=32, help="connections for the throughput runs")
    p.add_argument("--quick", action="store_true", help="2 rounds x 2 s: a smoke run")
    p.add_argument("--json", metavar="FILE", help="write the summary and every run as JSON")
    p.add_argument("--mode", choices=("both", *MODES), default="both")
    p.add_argument("--chunks", type=int, default=6, help="content chunks per streamed answer (default 6)")
    p.add_argument("--pin", choices=("sut", "split", "none"), default="sut", help="CPU layout (README)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--config", type=Path, default=None, help="gateway config (load/bench.yaml)")
    p.add_argument(
        "--plugins",
        action="store_true",
        help="the gateway with plugins on: --config load/bench-plugins.yaml, a private Redis, its team key",
    )
    p.add_argument(
        "--redis",
        default="auto",
        metavar="auto|private|none|URL",
        help="Redis for the gateway (BENCH_REDIS_URL): private = a redis-server started here on the mock's "
        "CPU; auto (default) = private when the config has a redis section and BENCH_REDIS_URL is unset",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="bearer key sent to the gateway (BENCH_API_KEY; with --plugins, bench-plugins.yaml's team key)",
    )
    p.add_argument(
        "--peers",
        default="",
        metavar="LIST",
        help=f"other gateways in the same rounds, comma-separated: {', '.join(peer_defs.PEERS)} "
        "(installed into load/.peers/ on first use)",
    )
    p.add_argument(
        "--netns",
        choices=("auto", "on", "off"),
        default="auto",
        help="with --peers, run everything in a new network namespace with only loopback (auto: when "
        "root and `unshare` exist), so no peer can reach anything but 127.0.0.1",
    )
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="bench", help="model name the gateway config routes to the mock")
    p.add_argument(
        "--gateway-log-level",
        default="info",
        help="info (default) is the headline figure; others are for study",
    )
    p.add_argument(
        "--gateway-log",
        default=os.devnull,
        metavar="FILE",
        help="where the gateway's stdout goes (/dev/null)",
    )
    p.add_argument(
        "--src",
        type=Path,
        default=ROOT,
        help="checkout whose gateway package the mock and gateway run (default: this repo), "
        "e.g. a `git archive HEAD` export to measure a committed version",
    )
    p.add_argument(
        "--max-other",
        type=float,
        default=40.0,
        metavar="PCT",
        help="CPU%% other jobs may use (100 = a core): wait for less before a round, redo rounds above it",
    )
    p.add_argument(
        "--retries", type=int, default=4, help="noisy rounds redone at most, in all (4; 2 per round)"
    )
    p.add_argument("--quiet-wait", type=float, default=10.0, help="seconds to wait for quiet per round (10)")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness added to every benchmark process; e.g. -5 (as root) on a busy shared machine",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="add target `native`: the same gateway through /api/v1/llm/complete[/stream]",
    )
    p.add_argument(
        "--messages",
        action="store_true",
        help="add target `messages`: the same gateway through /v1/messages (Anthropic's API) to a model "
        "whose target is an `anthropic` provider on the mock (--messages-model)",
    )
    p.add_argument(
        "--messages-model",
        default=MESSAGES_MODEL,
        help=f"with --messages: the model sent to /v1/messages (default {MESSAGES_MODEL}, load/bench*.yaml)",
    )
    p.add_argument(
        "--guardrails",
        nargs="?",
        type=Path,
        const=GUARDRAILS_CONFIG,
        default=None,
        metavar="CONFIG",
        help="with --plugins, add target `guarded`: a second gateway running CONFIG (default "
        "load/bench-guardrails.yaml: bench-plugins.yaml plus ten input rules; "
        "load/bench-guardrails-output.yaml: ten output rules) on the same Redis, key and CPU",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if a goal is not met")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = min(args.rounds, 2), min(args.duration, 2)
        args.retries, args.quiet_wait = min(args.retries, 1), min(args.quiet_wait, 5.0)
    if args.rounds < 1 or args.duration < 1 or args.concurrency < 1 or args.chunks < 3:
        p.error("--rounds, --duration and --concurrency must be >= 1, --chunks >= 3")
    args.modes = MODES if args.mode == "both" else (args.mode,)
    args.targets = (
        *TARGETS,
        *((GUARDED,) if args.guardrails else ()),
        *((NATIVE,) if args.native else ()),
        *((MESSAGES,) if args.messages else ()),
    )
    if args.config is None:
        args.config = PLUGINS_CONFIG if args.plugins else HERE / "bench.yaml"
    if args.guardrails and args.config.resolve() != PLUGINS_CONFIG:
        p.error(
            f"--guardrails compares {display_path(args.guardrails)} with "
            f"{display_path(PLUGINS_CONFIG)}: add --plugins"
        )
    if args.api_key is None:
        default = PLUGINS_API_KEY if args.config.resolve() == PLUGINS_CONFIG else "none"
        args.api_key = os.environ.get("BENCH_API_KEY", default)
    args.peers = tuple(dict.fromkeys(name.strip() for name in args.peers.split(",") if name.strip()))
    unknown = [name for name in args.peers if name not in peer_defs.PEERS]
    if unknown:
        p.error(f"--peers: unknown {', '.join(unknown)} (known: {', '.join(peer_defs.PEERS)})")
    args.peer_failures = json.loads(os.environ.get("BENCH_PEER_FAILURES", "{}")) if args.in_netns else {}
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop every child


def install_peers(names: tuple[str, ...], log: Callable[[str], None]) -> dict[str, str]:
    """Install the peers (network: PyPI, npm) before the benchmark; return name -> why it failed."""
    failures = {}
    for name in names:
        try:
            peer_defs.install(name, log)
        except peer_defs.PeerError as exc:
            failures[name] = str(exc)
    return failures


def reexec_in_netns(argv: list[str], args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """``--netns``: once the peers are installed, run this benchmark again (same pid, via exec) in a
    new network namespace whose only interface is loopback. Returns only if that is not possible."""
    missing = [tool for tool in ("unshare", "ip") if not shutil.which(tool)]
    reason = f"{' and '.join(missing)} not found" if missing else ""
    if not reason and os.geteuid() != 0:
        reason = "not root"
    if reason:
        if args.netns == "on":
            raise BenchError(f"--netns on: {reason}")
        log(f"netns: {reason}; the peers run in this machine's network namespace")
        return
    env = {**os.environ, "BENCH_PEER_FAILURES": json.dumps(args.peer_failures)}
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--in-netns"]
    os.execvpe("unshare", ["unshare", "--net", "--", *cmd], env)


def loopback_up() -> None:
    """In the new network namespace: bring up its loopback interface (it starts down)."""
    done = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"ip link set lo up: {done.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.peers and not args.in_netns:
            args.peer_failures = install_peers(args.peers, log)
            if args.netns != "off":
                reexec_in_netns(argv, args, log)
        if args.in_netns:
            loopback_up()
            log("netns: running in a new network namespace (loopback only)")
        result = run_bench(args, log)
    except KeyboardInterrupt:
        log("interrupted: all benchmark processes stopped")
        return 130
    except BenchError as exc:
        log(f"bench failed: {exc}")
        return 2
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON summary: {args.json}")
    met = all(g["met"] for goals in result["goals"].values() for g in goals.values())
    return 1 if args.check and not met else 0


def run_script(
    name: str,
    run: Callable[[Callable[[str], None]], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    json_path: str | None,
) -> tuple[int, dict[str, Any] | None]:
    """The common main of the load scripts: signals stop every child, progress on stderr, the
    rendered result on stdout and optionally as JSON. Returns (exit status, result)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run(log)
    except KeyboardInterrupt:
        log("interrupted: all processes stopped")
        return 130, None
    except BenchError as exc:
        log(f"{name} failed: {exc}")
        return 2, None
    print(render(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON: {json_path}")
    return 0, result


if __name__ == "__main__":
    sys.exit(main())
