"""``llm-gateway serve | check-config``."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
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


async def serve(
    cfg: Config,
    host: str,
    port: int,
    started: Callable[[int], None] | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    app = build_app(cfg)
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=cfg.server.shutdown_grace_seconds,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway_started", host=host, port=bound, **_summary(cfg))
    if started is not None:
        started(bound)
    await stop.wait()
    app[GATEWAY].draining = True
    log.info("gateway_draining", grace_seconds=cfg.server.shutdown_grace_seconds)
    # Stops accepting, lets in-flight requests and streams finish (up to the grace period),
    # then closes the provider sessions.
    await runner.cleanup()
    log.info("gateway_stopped")


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
    _run(lambda: serve(cfg, host, port, reuse_port=args.reuse_port))


def _supervise(args: argparse.Namespace, host: str, port: int) -> int:
    """Run ``--workers`` copies of this server on one port; forward SIGTERM/SIGINT; stop all if one dies.

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
    workers = [subprocess.Popen(command, env=env) for _ in range(args.workers)]  # noqa: S603
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
        while all(w.poll() is None for w in workers):
            time.sleep(0.2)
        if not stopping:
            log.error("worker_exited", detail="stopping the other workers")
            forward(signal.SIGTERM, None)
        return max(w.wait() for w in workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
