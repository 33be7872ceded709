"""The files users deploy and read stay in step with the code: the full example config, the Helm chart,
docker-compose, the Dockerfile, and the README's configuration reference against
``gateway/config_parser.py``."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as gateway_config
from gateway import config_parser as config_mod

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "example.full.yaml"
CHART = ROOT / "helm" / "llm-gateway"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a container must listen beyond its loopback
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def known_keys() -> set[str]:
    """Every key name in a ``known(...)`` call of gateway/config_parser.py (what the parser accepts)."""
    tree = ast.parse((ROOT / "gateway" / "config_parser.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "known":
            for arg in node.args:
                if isinstance(arg, ast.Starred):  # known(*SomeConfig.__slots__): the dataclass's fields
                    assert isinstance(arg.value, ast.Attribute) and arg.value.attr == "__slots__", ast.dump(
                        arg
                    )
                    assert isinstance(arg.value.value, ast.Name), ast.dump(arg)
                    names.update(getattr(gateway_config, arg.value.value.id).__slots__)
                    continue
                assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), ast.dump(arg)
                names.add(arg.value)
    assert len(names) > 40, "the known(...) calls were not found; has gateway/config_parser.py changed shape?"
    return names


def readme_reference_keys() -> dict[str, str]:
    """Key name → the documented path it came from, for every table row of the README's reference."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Configuration reference")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    found: dict[str, str] = {}
    for path in re.findall(r"^\|\s*`([^`]+)`\s*\|", section, flags=re.MULTILINE):
        for part in path.split("."):
            name = part.removesuffix("[]")
            if not name.startswith("<"):  # placeholders such as <model>
                found.setdefault(name, path)
    assert len(found) > 40, "no configuration tables found in the README's reference section"
    return found


def yaml_keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        keys = {str(k) for k in node}
        for value in node.values():
            keys |= yaml_keys(value)
        return keys
    if isinstance(node, list):
        return set().union(*(yaml_keys(v) for v in node)) if node else set()
    return set()


def env_without(names: set[str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


# --- config/example.full.yaml ------------------------------------------------------------------------------


def test_example_full_is_valid_with_no_environment() -> None:
    cfg = config_mod.load(EXAMPLE, env={})
    providers = {p.name: p for p in cfg.providers}
    assert {"deepseek", "openrouter", "mock"} <= set(providers)
    assert any(p.type == "openai" for p in cfg.providers), "an OpenAI-compatible (e.g. vLLM) provider"
    assert set(providers["openrouter"].headers) == {"HTTP-Referer", "X-Title"}
    assert {"chat", "reasoner", "claude"} <= {m.name for m in cfg.models}
    assert all(m.pricing.output_per_mtok > 0 for m in cfg.models if m.name in ("chat", "reasoner", "claude"))
    assert any(len(m.targets) > 1 for m in cfg.models), "at least one model with a fallback target"
    assert cfg.routing.unconfigured_provider == "mock"
    assert cfg.redis is not None and cfg.jwt is not None and cfg.teams
    assert any(t.model_limits and t.budgets.daily_usd for t in cfg.teams)
    # No secret has a default value: with the environment empty, nothing can authenticate.
    assert cfg.master_key_hash is None
    assert all(not p.api_key for p in cfg.providers)


def test_example_full_sets_every_key_the_parser_knows() -> None:
    missing = known_keys() - yaml_keys(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    assert not missing, f"config/example.full.yaml does not show: {sorted(missing)}"


def test_check_config_accepts_example_full_with_its_variables_unset() -> None:
    referenced = set(ENV_REF.findall(EXAMPLE.read_text(encoding="utf-8")))
    assert {"DEEPSEEK_API_KEY", "OPENROUTER_API_KEY", "GATEWAY_MASTER_KEY"} <= referenced
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(EXAMPLE)],
        cwd=ROOT,
        env=env_without(referenced),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok (" in result.stdout


# --- README configuration reference <-> gateway/config_parser.py ---------------------------------------


def test_every_key_in_the_readme_reference_exists_in_the_parser() -> None:
    documented = readme_reference_keys()
    unknown = {name: path for name, path in documented.items() if name not in known_keys()}
    assert not unknown, f"README documents keys gateway/config_parser.py does not accept: {unknown}"


def test_every_key_the_parser_accepts_is_in_the_readme_reference() -> None:
    missing = known_keys() - set(readme_reference_keys())
    assert not missing, f"README's configuration reference lacks: {sorted(missing)}"


# --- Helm chart --------------------------------------------------------------------------------------------


def test_helm_chart_and_values_parse_and_values_config_is_a_valid_gateway_config() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2" and chart["name"] == "llm-gateway" and chart["version"]
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    cfg = config_mod.parse(values["config"], env={}, source="helm values.config")
    assert cfg.server.host == ALL_INTERFACES
    assert "auth" in cfg.plugins and cfg.master_key_hash is None  # keys come from the Secret, not values
    # Kubernetes must not kill a pod before its in-flight streams had their grace period.
    assert values["terminationGracePeriodSeconds"] > (
        values.get("preStopSleepSeconds", 0) + cfg.server.shutdown_grace_seconds
    )
    assert values["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert values["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert set(values["secret"]["env"]) >= {"DEEPSEEK_API_KEY", "OPENROUTER_API_KEY", "GATEWAY_MASTER_KEY"}


@pytest.mark.parametrize(
    "template",
    [
        "_helpers.tpl",
        "NOTES.txt",
        "deployment.yaml",
        "service.yaml",
        "configmap.yaml",
        "secret.yaml",
        "servicemonitor.yaml",
        "hpa.yaml",
        "pdb.yaml",
    ],
)
def test_helm_template_actions_are_balanced(template: str) -> None:
    """No helm binary here: at least every action is closed and every block has its end."""
    text = (CHART / "templates" / template).read_text(encoding="utf-8")
    actions = re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", text, flags=re.DOTALL)
    assert "{{" not in re.sub(r"\{\{.*?\}\}", "", text, flags=re.DOTALL), "an unclosed {{"
    blocks = [a for a in actions if re.match(r"(if|with|range|define)\b", a)]
    ends = [a for a in actions if a == "end"]
    assert len(blocks) == len(ends), f"{len(blocks)} blocks, {len(ends)} ends"


def test_helm_deployment_wires_probes_config_and_secret() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text(encoding="utf-8")
    for needle in (
        ".Values.livenessProbe",
        ".Values.readinessProbe",
        "terminationGracePeriodSeconds",
        "secretRef",
        "configMap",
        "/etc/llm-gateway/gateway.yaml",
        "llm-gateway.secretName",
    ):
        assert needle in deployment, needle
    assert "toYaml .Values.config" in (CHART / "templates" / "configmap.yaml").read_text(encoding="utf-8")


# --- docker-compose.yml and Dockerfile ---------------------------------------------------------------------


def test_compose_runs_the_gateway_with_redis() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert services["redis"]["image"].startswith("redis:7")
    gateway = services["gateway"]
    assert "redis" in gateway["depends_on"]
    env = gateway["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert {"DEEPSEEK_API_KEY", "OPENROUTER_API_KEY", "GATEWAY_MASTER_KEY"} <= set(env)
    mounts = {m["target"]: m["source"] for m in gateway["configs"]}
    config_source = compose["configs"][mounts["/etc/llm-gateway/gateway.yaml"]]
    # `$$` is Compose's escape for a literal `$`: what the gateway reads is the unescaped text.
    raw = yaml.safe_load(config_source["content"].replace("$$", "$"))
    cfg = config_mod.parse(
        raw, env={"REDIS_URL": env["REDIS_URL"], "GATEWAY_MASTER_KEY": "m" * 32}, source="compose"
    )
    assert cfg.redis is not None and "redis:6379" in cfg.redis.url
    assert cfg.server.host == ALL_INTERFACES and cfg.server.port == 8080


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_serves_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    final_stage = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    assert final_stage[0][1].startswith("python:3.11-slim")
    cmd = [rest for word, rest in final_stage if word == "CMD"][-1]
    argv = ast.literal_eval(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert argv[:2] == ["llm-gateway", "serve"]
    assert argv[argv.index("--config") + 1] == "/etc/llm-gateway/gateway.yaml"
    users = [rest for word, rest in final_stage if word == "USER"]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8080") in final_stage
    healthcheck = " ".join(rest for word, rest in final_stage if word == "HEALTHCHECK")
    assert "/health/live" in healthcheck and "python" in healthcheck


def test_readme_lists_every_environment_variable_the_configs_read() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Environment variables")
    table = text[start : text.index("\n## ", start + 1)]
    listed = set(re.findall(r"^\| `([A-Z_][A-Z0-9_]*)` \|", table, flags=re.MULTILINE))
    files = [
        *(ROOT / "config").glob("*.yaml"),
        ROOT / "docker-compose.yml",
        *(ROOT / "helm").rglob("values*.yaml"),
    ]
    read = {
        name for f in files for name in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", f.read_text(encoding="utf-8"))
    }
    read.discard("VAR")  # the placeholder in example.full.yaml's comments
    read.add("PROMETHEUS_MULTIPROC_DIR")  # read by the metrics code itself
    assert read - listed == set(), f"README's environment table lacks {sorted(read - listed)}"
