"""``llm-gateway serve | check-config``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import structlog
from aiohttp import web

from gateway import config_parser as config_mod
from gateway import logging as gw_logging
from gateway.config import Config, ConfigError
from gateway.logging import REDACTOR
from gateway.protocol import GatewayRunner
from gateway.runtime import GATEWAY
from gateway.server import build_app

log = structlog.get_logger("gateway")


def _summary(cfg: Config) -> dict[str, object]:
    """What start-up logs about the config: names and counts, never a secret."""
    return {
        "config": cfg.source,
        "providers": [
            {
                "name": p.name,
                "type": p.type,
                "base_url": p.base_url or "(built-in)",
                "api_key": "set" if p.api_key else "unset",
            }
            for p in cfg.providers
        ],
        "models": [m.name for m in cfg.models],
        "teams": len(cfg.teams),
        "state": "redis" if cfg.redis else "memory",
        "plugins": list(cfg.plugins),
    }


class StartupError(Exception):
    """The gateway could not start. Its message is the one line ``main`` prints (exit status 1)."""


async def serve(
    cfg: Config,
    host: str,
    port: int,
    started: Callable[[int], None] | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    try:
        app = build_app(cfg)
    except Exception as exc:  # a bug or an environment the config checks could not foresee
        raise StartupError(f"start-up failed: {_describe(exc)}") from exc
    runner = GatewayRunner(app, cfg.server)
    try:
        bound = await _listen(runner, host, port, reuse_port=reuse_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("gateway_started", host=host, port=bound, **_summary(cfg))
        _settle_heap()
        if started is not None:
            started(bound)
        await stop.wait()
        app[GATEWAY].draining = True
        log.info("gateway_draining", grace_seconds=cfg.server.shutdown_grace_seconds)
    finally:
        # Stops accepting, lets in-flight requests and streams finish (up to the grace period), then
        # closes what start-up opened — after a failed start, whatever it had opened so far.
        await runner.cleanup()
    log.info("gateway_stopped")


GC_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def _settle_heap() -> None:
    """Once start-up is done, move everything it built (config, routes, the GraphQL schema, imported
    modules: ~100k objects) out of the cyclic garbage collector's reach, and let it run less often.
    Requests free their objects by reference counting and make almost no cycles, yet every full
    collection walked the whole start-up heap: measured, 20 % of the CPU per request and pauses of
    ~100 ms (the p99). What stays collectable is only what requests allocate."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)


async def _listen(runner: GatewayRunner, host: str, port: int, *, reuse_port: bool) -> int:
    """Open the resources (``server.py``'s cleanup contexts), then the listening socket: its port."""
    try:
        await runner.setup()
    except Exception as exc:
        raise StartupError(f"start-up failed: {_describe(exc)}") from exc
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {_reason(exc)}") from exc
    return int(runner.addresses[0][1]) if runner.addresses else port


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({str(exc.strerror).lower()})"
    return os.strerror(exc.errno).lower() if exc.errno else _describe(exc)


def _describe(exc: BaseException) -> str:
    """One line, through the redactor (an exception's text may quote a URL with its password)."""
    text = " ".join(str(exc).split())
    return str(REDACTOR.clean(f"{type(exc).__name__}: {text}" if text else type(exc).__name__))


def _raise_file_limit(cfg: Config) -> None:
    """Every client connection is a file descriptor, and so is every upstream and Redis connection:
    lift the soft limit (often 1024 outside containers) towards what the config can use, as far as
    the hard limit allows, so that ``server.max_connections`` is the cap that sheds, not ``EMFILE``."""
    want = cfg.server.max_connections + sum(p.max_connections for p in cfg.providers) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < want:
        log.warning(
            "file_limit_low",
            limit=target,
            wanted=want,
            detail="connections past it fail to open: raise it (ulimit -n) or lower server.max_connections",
        )


def _run(coro_factory: Callable[[], object]) -> None:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro_factory())  # type: ignore[arg-type]


def _load(path: str | None) -> Config:
    return config_mod.load(path or config_mod.default_path())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-gateway", description="OpenAI-compatible LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="YAML config (default: config/gateway.yaml)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--log-level", default="info")
    s.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for pool workers
    s.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # the first pool worker's start-up report
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        try:
            cfg = config_mod.load(args.file)
        except ConfigError as exc:
            print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            sys.exit(2)
        print(
            f"{args.file}: ok ({len(cfg.providers)} providers, {len(cfg.models)} models, "
            f"{len(cfg.teams)} teams)"
        )
        return

    gw_logging.configure(args.log_level)
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        log.error("config_invalid", problems=exc.problems)
        sys.exit(2)
    gw_logging.REDACTOR.set_secrets(cfg.secrets())
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    if args.workers > 1:
        if cfg.redis is None:
            log.warning("workers_without_redis", detail="each worker keeps its own limits and keys in memory")
        sys.exit(_supervise(args, host, port))
    _raise_file_limit(cfg)
    started = _ready_signal(args.ready_fd) if args.ready_fd is not None else None
    try:
        _run(lambda: serve(cfg, host, port, started, reuse_port=args.reuse_port))
    except StartupError as exc:
        log.debug("startup_failed", exc_info=exc.__cause__ or exc)  # the traceback, at --log-level debug
        print(f"llm-gateway: {exc}", file=sys.stderr)
        sys.exit(1)


def _ready_signal(fd: int) -> Callable[[int], None]:
    """For a pool worker: tell the supervisor (one byte on ``fd``) that this worker is listening."""

    def started(_port: int) -> None:
        os.write(fd, b"1")
        os.close(fd)

    return started


def _supervise(args: argparse.Namespace, host: str, port: int) -> int:
    """Run ``--workers`` copies of this server on one port; forward SIGTERM/SIGINT; stop all if one dies.

    The first worker starts alone and reports when it listens (``--ready-fd``): a start-up failure
    (a busy port, say) is then said once, by that worker, and no others are started.

    Prometheus runs in multi-process mode (each worker writes its samples to a shared directory and
    ``/metrics`` on any worker merges them), so the environment is set before a worker imports it.
    """
    metrics_dir = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--reuse-port",
        "--log-level",
        args.log_level,
    ]
    if args.config:
        command += ["--config", args.config]
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        ready_read, ready_write = os.pipe()
        first = [*command, "--ready-fd", str(ready_write)]
        workers.append(subprocess.Popen(first, env=env, pass_fds=(ready_write,)))  # noqa: S603
        os.close(ready_write)
        with os.fdopen(ready_read, "rb") as ready:
            listening = ready.read(1) == b"1"  # empty: it exited (and said why)
        if not listening or stopping:
            return workers[0].wait()
        workers += [subprocess.Popen(command, env=env) for _ in range(args.workers - 1)]  # noqa: S603
        while all(w.poll() is None for w in workers):
            time.sleep(0.2)
        if not stopping:
            log.error("worker_exited", detail="stopping the other workers")
            forward(signal.SIGTERM, None)
        return max(w.wait() for w in workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
