"""Other gateways for ``load/bench.py --peers``: LiteLLM's proxy and Portkey's open-source gateway.

Each is installed once by this module into ``load/.peers/`` (gitignored) from its own registry, at a
pinned version, and started by bench.py on 127.0.0.1 in front of the same mock as the bare proxy and
the gateway:

  litellm  ``pip install 'litellm[proxy]==VERSION'`` into ``load/.peers/litellm-venv``; a config
           routing model ``bench`` to the mock as an ``openai/`` model with ``api_base`` the mock,
           a master key and no database; ``litellm --config ... --num_workers 1``
  portkey  ``npm install @portkey-ai/gateway@VERSION`` into ``load/.peers/portkey`` (no install
           scripts); ``node .../build/start-server.js --port P`` on the machine's Node; each request
           carries ``x-portkey-provider: openai`` and ``x-portkey-custom-host: <mock>/v1``

Both are told not to call home (LiteLLM reads its bundled model-cost map, telemetry off) and their
HTTP(S)_PROXY points at a closed loopback port, so a call to anywhere but loopback fails at once
instead of leaving the machine. Install only (e.g. to prepare a machine):

    .venv/bin/python load/peers.py litellm portkey
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / ".peers"
HOST = "127.0.0.1"
PEERS = ("litellm", "portkey")
# Pinned: a benchmark compares versions it names, and a pin never pulls a release pushed later
# (LiteLLM had compromised releases on PyPI: 1.82.7, 1.82.8, 1.107.0). Later versions' proxy extra
# pins a `litellm-proxy` (1.110), `litellm-proxy-extras` (1.108.14, 1.109) or `litellm-enterprise`
# (1.108.8-1.108.11) release that the index does not have: 1.108.4 is a recent one that installs.
LITELLM_SPEC = "litellm[proxy]==1.108.4"
PORTKEY_SPEC = "@portkey-ai/gateway@1.15.2"
LITELLM_KEY = "sk-bench-0123456789"
INSTALL_TIMEOUT_S = 1200
# Loopback only: anything that ignores NO_PROXY and calls out meets a closed port on this machine.
NO_EGRESS = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


class PeerError(Exception):
    """A peer could not be installed or started; the message is the reason bench.py reports."""


@dataclass(frozen=True)
class Peer:
    """How bench.py starts one peer and what its requests look like."""

    name: str
    argv: list[str]
    env: dict[str, str]
    headers: dict[str, str]  # sent with every request (besides Content-Type)
    model: str  # the model name in the request body
    startup_s: float  # how long it may take to answer its first request
    version: str
    files: list[Path] = field(default_factory=list)


def install(name: str, log: Callable[[str], None], *, offline: bool = False) -> str:
    """Install a peer (once; later calls find it installed) and return its version string. With
    ``offline``, only check that it is installed."""
    PEERS_DIR.mkdir(exist_ok=True)
    if name == "litellm":
        return _install_litellm(log, offline)
    if name == "portkey":
        return _install_portkey(log, offline)
    raise PeerError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")


def _run(argv: list[str], logfile: Path, what: str) -> None:
    with logfile.open("ab") as out:
        try:
            done = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=INSTALL_TIMEOUT_S, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerError(f"{what}: {exc}") from None
    if done.returncode != 0:
        last = logfile.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise PeerError(f"{what} exited {done.returncode}: {last[0][:200]} (see {logfile})")


def _litellm_venv() -> Path:
    return PEERS_DIR / "litellm-venv"


def _install_litellm(log: Callable[[str], None], offline: bool) -> str:
    venv = _litellm_venv()
    marker = venv / ".bench-installed"
    if not (marker.exists() and marker.read_text() == LITELLM_SPEC):
        if offline:
            raise PeerError(f"{LITELLM_SPEC} is not installed in {venv}")
        logfile = PEERS_DIR / "litellm-install.log"
        log(f"peers: installing {LITELLM_SPEC} into {venv} (a few minutes; log {logfile})")
        if not (venv / "bin" / "python").exists():
            _run([sys.executable, "-m", "venv", str(venv)], logfile, "python -m venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, LITELLM_SPEC], logfile, "pip install")
        marker.write_text(LITELLM_SPEC)
    if not (venv / "bin" / "litellm").exists():
        raise PeerError(f"no litellm command in {venv}/bin")
    return LITELLM_SPEC.split("==", 1)[1]


def _portkey_dir() -> Path:
    return PEERS_DIR / "portkey"


def _portkey_package() -> Path:
    return _portkey_dir() / "node_modules" / "@portkey-ai" / "gateway"


def _install_portkey(log: Callable[[str], None], offline: bool) -> str:
    if not shutil.which("node") or not shutil.which("npm"):
        raise PeerError("node and npm are not installed (apt-get install -y nodejs npm)")
    package = _portkey_package()
    wanted = PORTKEY_SPEC.rsplit("@", 1)[1]
    if _package_version(package) != wanted:
        if offline:
            raise PeerError(f"{PORTKEY_SPEC} is not installed in {_portkey_dir()}")
        logfile = PEERS_DIR / "portkey-install.log"
        log(f"peers: installing {PORTKEY_SPEC} into {_portkey_dir()} (log {logfile})")
        _portkey_dir().mkdir(parents=True, exist_ok=True)
        npm = ["npm", "install", "--prefix", str(_portkey_dir()), "--ignore-scripts", "--no-audit"]
        _run([*npm, "--no-fund", "--save-exact", PORTKEY_SPEC], logfile, "npm install")
    if not _portkey_entry().exists():
        raise PeerError(f"{_portkey_entry()} is missing after npm install")
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{wanted} (node {node})"


def _package_version(package: Path) -> str | None:
    try:
        version = json.loads((package / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        return None
    return version if isinstance(version, str) else None


def _portkey_entry() -> Path:
    return _portkey_package() / "build" / "start-server.js"


def prepare(name: str, port: int, mock_port: int, tmp: Path, version: str) -> Peer:
    """The command, environment and request headers of one installed peer on ``port``."""
    upstream = f"http://{HOST}:{mock_port}/v1"
    if name == "litellm":
        config = tmp / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: bench\n"
            "    litellm_params:\n"
            "      model: openai/mock-chat\n"
            f"      api_base: {upstream}\n"
            "      api_key: none\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "general_settings:\n"
            f"  master_key: {LITELLM_KEY}\n"
        )
        venv = _litellm_venv()
        argv = [
            str(venv / "bin" / "litellm"), "--config", str(config), "--host", HOST, "--port", str(port),
            "--num_workers", "1",
        ]  # fmt: skip
        env = {
            **NO_EGRESS,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled price list, not a download
            "LITELLM_TELEMETRY": "False",
            "DISABLE_SCHEMA_UPDATE": "True",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": "",  # not the gateway's checkout
        }
        headers = {"Authorization": f"Bearer {LITELLM_KEY}"}
        return Peer(name, argv, env, headers, "bench", 90.0, version, [config])
    if name == "portkey":
        argv = ["node", str(_portkey_entry()), f"--port={port}"]
        headers = {
            "Authorization": "Bearer none",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": upstream,
        }
        return Peer(name, argv, {**NO_EGRESS, "NODE_ENV": "production"}, headers, "mock-chat", 30.0, version)
    raise PeerError(f"unknown peer {name!r}")


def main(argv: list[str]) -> int:
    names = argv or list(PEERS)
    failed = 0
    for name in names:
        try:
            print(f"{name}: installed {install(name, print)}")
        except PeerError as exc:
            print(f"{name}: failed: {exc}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
