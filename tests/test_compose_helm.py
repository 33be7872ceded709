"""The compose files and the Helm chart are valid for the tools that will read them, checked offline.

- Every ``docker-compose*.yml`` is validated against the Compose Specification JSON schema, vendored in
  ``tests/schemas/`` (see its README for source and hashes); ``docker compose config`` runs too when a
  Compose binary is on PATH.
- ``docker-compose.test.yml`` wires Redis, the mock upstream posing as OpenRouter, and the gateway.
- No ``helm`` binary here: a tiny renderer below evaluates the handful of template constructs that
  ``configmap.yaml``, ``service.yaml``, ``prometheusrule.yaml`` and ``grafana-dashboard-configmap.yaml``
  use (``if``/``with``/``end``, ``.Values``, ``.Files.Get``, ``toYaml``, ``indent``/``nindent``, ``quote``)
  and refuses anything else, so a template that outgrows it fails here instead of passing unchecked. The
  ``_helpers.tpl`` names it meets are stubbed with what Helm gives for release ``gw``. The rendered objects
  are checked against the Kubernetes JSON schemas of ``kubernetes-validate`` (ConfigMap, Service) or, for
  the ``PrometheusRule`` custom resource, against the CRD's rule constraints written out below.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway import config_parser as config_mod

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CHART = ROOT / "helm" / "llm-gateway"
OBSERVABILITY = ROOT / "observability"
TEST_COMPOSE = ROOT / "docker-compose.test.yml"
COMPOSE_FILES = sorted({*ROOT.glob("docker-compose*.y*ml"), *ROOT.glob("compose*.y*ml")})


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- compose files against the Compose Specification schema ---------------------------------------------


def compose_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def compose_errors(document: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in compose_validator().iter_errors(document)
    ]


def test_vendored_compose_schema_is_the_documented_one() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    digest = hashlib.sha256((SCHEMAS / "compose-spec.json").read_bytes()).hexdigest()
    assert f"file sha256 `{digest}`" in readme, "tests/schemas/compose-spec.json changed: update its README"
    assert (SCHEMAS / "LICENSE.compose-spec").is_file()


def test_every_compose_file_is_found() -> None:
    names = {p.name for p in COMPOSE_FILES}
    assert {"docker-compose.yml", "docker-compose.test.yml"} <= names, names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    errors = compose_errors(load_yaml(path))
    assert not errors, f"{path.name} is not a valid Compose file:\n" + "\n".join(errors)


def test_compose_schema_rejects_a_stray_top_level_key_in_configs() -> None:
    """The bug of issue #12: `plugins:` dedented out of the config's content became `configs.plugins`."""
    document = load_yaml(ROOT / "docker-compose.yml")
    assert not compose_errors(document)
    document["configs"]["plugins"] = ["auth", "rate_limit", "quota", "cache"]
    assert any(e.startswith("configs.plugins") for e in compose_errors(document))
    document = load_yaml(ROOT / "docker-compose.yml")
    document["plugins"] = ["auth"]
    assert compose_errors(document)


def test_compose_configs_keep_plugins_inside_the_gateway_config() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    assert set(compose["configs"]) == {"gateway"}
    raw = yaml.safe_load(compose["configs"]["gateway"]["content"].replace("$$", "$"))
    assert raw["plugins"] == ["auth", "rate_limit", "quota", "cache"]
    cfg = config_mod.parse(
        raw, env={"REDIS_URL": "redis://redis:6379/0", "GATEWAY_MASTER_KEY": "m" * 32}, source="compose"
    )
    assert cfg.plugins == ("auth", "rate_limit", "quota", "cache")


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return [docker, "compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="no docker compose / docker-compose binary")
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_config_accepts_the_file(path: Path) -> None:
    """`docker compose config` parses, interpolates and validates without a Docker engine."""
    command = compose_command()
    assert command is not None
    env = {**os.environ, "GATEWAY_MASTER_KEY": "m" * 32}
    result = subprocess.run(
        [*command, "-f", str(path), "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- docker-compose.test.yml -------------------------------------------------------------------------------


def test_compose_test_file_runs_redis_the_mock_as_openrouter_and_the_gateway() -> None:
    compose = load_yaml(TEST_COMPOSE)
    services = compose["services"]
    assert set(services) == {"redis", "mock", "gateway"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"

    assert services["redis"]["image"].startswith("redis:7")

    mock = services["mock"]
    assert mock["build"] == "." and services["gateway"]["build"] == "."  # the project's own image
    argv = "python -m gateway.providers.mock --host 0.0.0.0 --port 9000"
    assert mock["command"] == argv.split()
    assert "9000" in " ".join(mock["healthcheck"]["test"])

    gateway = services["gateway"]
    assert gateway["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "mock": {"condition": "service_healthy"},
    }
    assert "/health/ready" in " ".join(gateway["healthcheck"]["test"])
    assert "127.0.0.1:8080:8080" in gateway["ports"]
    mounts = {m["target"]: m["source"] for m in gateway["configs"]}
    content = compose["configs"][mounts["/etc/llm-gateway/gateway.yaml"]]["content"]
    # Nothing to set in the environment: no Compose variable, no gateway ${VAR}.
    assert "$" not in content and "${" not in TEST_COMPOSE.read_text(encoding="utf-8")

    cfg = config_mod.parse(yaml.safe_load(content), env={}, source="docker-compose.test.yml")
    [provider] = cfg.providers
    assert provider.type == "openrouter" and provider.base_url == "http://mock:9000/v1" and provider.api_key
    assert {t.provider for m in cfg.models for t in m.targets} == {provider.name}
    assert cfg.redis is not None and cfg.redis.url == "redis://redis:6379/0"
    assert {"auth", "rate_limit", "quota"} <= set(cfg.plugins)
    assert cfg.master_key_hash is not None
    assert any(t.limits.rpm and t.budgets.daily_usd for t in cfg.teams)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080  # noqa: S104 - in a container

    # The keys the file's header comment tells people to use are the ones the config sets.
    header = TEST_COMPOSE.read_text(encoding="utf-8").split("\nname:", 1)[0]
    team_keys = {k for team in yaml.safe_load(content)["teams"] for k in team["api_keys"]}
    assert any(f"Bearer {k}" in header for k in team_keys)
    assert "GATEWAY_TEST_REDIS_URL=redis://127.0.0.1:6379/0" in header
    assert "127.0.0.1:6379:6379" in services["redis"]["ports"]


def test_mock_upstream_accepts_the_command_line_the_test_compose_gives_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.providers.mock", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--host" in result.stdout and "--port" in result.stdout


# --- a tiny Helm template renderer -------------------------------------------------------------------------

RELEASE = "gw"
_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.DOTALL)
_WORD = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s"]+')


class Unsupported(Exception):
    """A template construct outside the subset this renderer evaluates."""


def _chart() -> dict[str, Any]:
    chart: dict[str, Any] = load_yaml(CHART / "Chart.yaml")
    return chart


def _helper(name: str) -> str:
    """What _helpers.tpl gives for release RELEASE with no name overrides (stubs, not evaluated)."""
    chart = _chart()
    selector = f"app.kubernetes.io/name: {chart['name']}\napp.kubernetes.io/instance: {RELEASE}"
    helpers = {
        "llm-gateway.fullname": f"{RELEASE}-{chart['name']}",
        "llm-gateway.selectorLabels": selector,
        "llm-gateway.labels": (
            f"helm.sh/chart: {chart['name']}-{chart['version']}\n{selector}\n"
            f'app.kubernetes.io/version: "{chart["appVersion"]}"\napp.kubernetes.io/managed-by: Helm'
        ),
    }
    if name not in helpers:
        raise Unsupported(f"include {name!r}")
    return helpers[name]


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, dict | list) and not value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        raise Unsupported(f"printing a map or list without toYaml: {value!r}")
    return str(value)


def _to_yaml(value: Any) -> str:
    return (
        "" if value is None else yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")
    )


def _indent(width: str, text: str) -> str:
    pad = " " * int(width)
    return pad + text.replace("\n", "\n" + pad)


_PIPED: dict[str, Callable[..., str]] = {
    "indent": _indent,
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "toYaml": _to_yaml,
    "quote": lambda text: json.dumps(_text(text)),
}


class Renderer:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def _operand(self, word: str, dot: Any) -> Any:
        if word == ".":
            return dot
        if word.startswith(".Values.") or word == ".Values":
            node: Any = self.values
            for part in word.split(".")[2:]:
                node = node.get(part) if isinstance(node, dict) else None
            return node
        if word.startswith('"'):
            return json.loads(word)
        raise Unsupported(word)

    def _command(self, words: list[str], dot: Any) -> Any:
        head, args = words[0], words[1:]
        if head == "include" and len(args) == 2 and args[1] == ".":
            return _helper(json.loads(args[0]))
        if head == ".Files.Get" and len(args) == 1:
            path = CHART / json.loads(args[0])
            return path.read_text(encoding="utf-8") if path.is_file() else ""
        if head == "toYaml" and len(args) == 1:
            return _to_yaml(self._operand(args[0], dot))
        if args:
            raise Unsupported(" ".join(words))
        return self._operand(head, dot)

    def pipeline(self, text: str, dot: Any) -> Any:
        stages = [_WORD.findall(stage) for stage in text.split("|")]
        value = self._command(stages[0], dot)
        for stage in stages[1:]:
            name, args = stage[0], stage[1:]
            if name not in _PIPED:
                raise Unsupported(f"| {name}")
            value = _PIPED[name](*args, value)
        return value

    def render(self, template: str) -> str:
        # Tokens: ("text", s) and ("action", s), with {{- and -}} whitespace trimming applied.
        tokens: list[tuple[str, str]] = []
        pos, trim_next = 0, False
        for match in _ACTION.finditer(template):
            text = template[pos : match.start()]
            if trim_next:
                text = text.lstrip()
            if match.group(1):
                text = text.rstrip()
            tokens.append(("text", text))
            tokens.append(("action", match.group(2)))
            pos, trim_next = match.end(), bool(match.group(3))
        rest = template[pos:]
        tokens.append(("text", rest.lstrip() if trim_next else rest))
        if "{{" in "".join(t for kind, t in tokens if kind == "text"):
            raise Unsupported("an unclosed {{")

        out, index = self._block(tokens, 0, self.values, top=True)
        assert index == len(tokens)
        return out

    def _block(
        self, tokens: list[tuple[str, str]], index: int, dot: Any, *, top: bool = False
    ) -> tuple[str, int]:
        """Render tokens[index:] up to the matching `end` (or the end); return the text and the next index."""
        out: list[str] = []
        while index < len(tokens):
            kind, text = tokens[index]
            index += 1
            if kind == "text":
                out.append(text)
            elif text == "end":
                if top:
                    raise Unsupported("an `end` without its block")
                return "".join(out), index
            elif text.startswith(("if ", "with ")):
                keyword, _, expr = text.partition(" ")
                value = self.pipeline(expr, dot)
                body, index = self._block(tokens, index, value if keyword == "with" else dot)
                if _truthy(value):
                    out.append(body)
            elif re.match(r"(else|range|define|template|block)\b|/\*|\$", text):
                raise Unsupported(text)
            else:
                out.append(_text(self.pipeline(text, dot)))
        if not top:
            raise Unsupported("a block without its `end`")
        return "".join(out), index


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render(template: str, overrides: dict[str, Any] | None = None) -> str:
    values = deep_merge(load_yaml(CHART / "values.yaml"), overrides or {})
    return Renderer(values).render((CHART / "templates" / template).read_text(encoding="utf-8"))


def render_object(template: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(render(template, overrides)) if d is not None]
    assert len(documents) == 1, f"{template} rendered {len(documents)} objects"
    obj: dict[str, Any] = documents[0]
    assert obj["metadata"]["name"] and isinstance(obj["metadata"]["name"], str)
    assert all(isinstance(v, str) for v in obj["metadata"].get("labels", {}).values())
    return obj


def k8s_validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_renderer_follows_helm_semantics_on_a_sample() -> None:
    template = (
        "a:\n  {{- if .Values.on }}\n  b: {{ .Values.n }}\n  {{- end }}\n"
        "  {{- with .Values.m }}\n  m:\n    {{- toYaml . | nindent 4 }}\n  {{- end }}\n"
        "  q: {{ .Values.s | quote }}\n"
    )
    values = {"on": True, "n": 3, "m": {"y": 1, "x": [1, 2]}, "s": 'say "hi"'}
    assert Renderer(values).render(template) == (
        'a:\n  b: 3\n  m:\n    x:\n    - 1\n    - 2\n    y: 1\n  q: "say \\"hi\\""\n'
    )
    assert Renderer({"on": False, "m": {}, "s": ""}).render(template) == 'a:\n  q: ""\n'
    for bad in ("{{ range .Values.x }}{{ end }}", "{{ if .Values.on }}", "{{ end }}", "{{ .Values.m }}"):
        with pytest.raises(Unsupported):
            Renderer(values).render(bad)


# --- the chart --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("copy_path", "source"),
    [("files/alerts.yaml", "alerts.yaml"), ("files/grafana-dashboard.json", "grafana-dashboard.json")],
)
def test_chart_copies_of_the_observability_files_are_identical(copy_path: str, source: str) -> None:
    assert (CHART / copy_path).read_bytes() == (OBSERVABILITY / source).read_bytes(), (
        f"helm/llm-gateway/{copy_path} differs from observability/{source}: "
        f"cp observability/{source} helm/llm-gateway/{copy_path}"
    )


def test_values_switch_both_observability_objects_off_by_default() -> None:
    values = load_yaml(CHART / "values.yaml")
    assert values["prometheusRule"]["enabled"] is False
    assert values["grafanaDashboard"]["enabled"] is False
    assert render("prometheusrule.yaml").strip() == ""
    assert render("grafana-dashboard-configmap.yaml").strip() == ""


# The PrometheusRule CRD's constraints on spec (monitoring.coreos.com/v1): group names required and
# non-empty, every rule has an expr, durations match the operator's Duration pattern. Stricter than the
# CRD in one way: unknown rule keys are rejected (the operator would silently drop them).
_DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUS_RULE_SPEC = {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": _DURATION,
                    "query_offset": _DURATION,
                    "limit": {"type": "integer"},
                    "labels": _STRING_MAP,
                    "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
                    "rules": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "additionalProperties": False,
                            "properties": {
                                "alert": {"type": "string", "minLength": 1},
                                "record": {"type": "string", "minLength": 1},
                                "expr": {"type": ["string", "integer"], "minLength": 1},
                                "for": _DURATION,
                                "keep_firing_for": _DURATION,
                                "labels": _STRING_MAP,
                                "annotations": _STRING_MAP,
                            },
                        },
                    },
                },
            },
        }
    },
}


def test_prometheus_rule_renders_the_alert_rules() -> None:
    obj = render_object("prometheusrule.yaml", {"prometheusRule": {"enabled": True}})
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PrometheusRule"
    assert obj["metadata"]["name"] == f"{RELEASE}-llm-gateway"
    assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "llm-gateway"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(PROMETHEUS_RULE_SPEC).iter_errors(obj["spec"])
    ]
    assert not errors, "\n".join(errors)
    assert obj["spec"] == {"groups": load_yaml(OBSERVABILITY / "alerts.yaml")["groups"]}
    alerts = [r["alert"] for g in obj["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) == len(set(alerts)) and "LLMGatewayDown" in alerts
    # Prometheus' own templating in annotations reaches the operator untouched (Helm never evaluates it).
    assert any(
        "{{ $labels." in a
        for g in obj["spec"]["groups"]
        for r in g["rules"]
        for a in r["annotations"].values()
    )


def test_prometheus_rule_takes_extra_labels_for_the_rule_selector() -> None:
    obj = render_object(
        "prometheusrule.yaml",
        {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    )
    assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_grafana_dashboard_configmap_renders_the_dashboard() -> None:
    obj = render_object("grafana-dashboard-configmap.yaml", {"grafanaDashboard": {"enabled": True}})
    k8s_validate(obj)
    assert obj["apiVersion"] == "v1" and obj["kind"] == "ConfigMap"
    assert obj["metadata"]["name"] == f"{RELEASE}-llm-gateway-dashboard"
    assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in obj["metadata"]
    [(key, text)] = obj["data"].items()
    assert key.endswith(".json")
    dashboard = json.loads(text)
    assert dashboard == json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    assert dashboard["uid"] == "llm-gateway"
    assert len(text.encode()) < 1024 * 1024  # a ConfigMap holds at most 1 MiB


def test_grafana_dashboard_configmap_takes_extra_labels_and_annotations() -> None:
    obj = render_object(
        "grafana-dashboard-configmap.yaml",
        {
            "grafanaDashboard": {
                "enabled": True,
                "labels": {"team": "llm"},
                "annotations": {"grafana_folder": "LLM"},
            }
        },
    )
    k8s_validate(obj)
    assert (
        obj["metadata"]["labels"]["team"] == "llm" and obj["metadata"]["labels"]["grafana_dashboard"] == "1"
    )
    assert obj["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def test_gateway_configmap_renders_a_valid_configmap_holding_a_valid_gateway_config() -> None:
    obj = render_object("configmap.yaml")
    k8s_validate(obj)
    cfg = config_mod.parse(yaml.safe_load(obj["data"]["gateway.yaml"]), env={}, source="rendered configmap")
    assert list(cfg.plugins) == load_yaml(CHART / "values.yaml")["config"]["plugins"]


def test_service_renders_a_valid_service() -> None:
    obj = render_object("service.yaml", {"service": {"annotations": {"a": "b"}}})
    k8s_validate(obj)
    assert obj["spec"]["ports"][0]["port"] == 8080 and obj["metadata"]["annotations"] == {"a": "b"}


def test_kubernetes_schema_check_catches_a_broken_object() -> None:
    obj = render_object("grafana-dashboard-configmap.yaml", {"grafanaDashboard": {"enabled": True}})
    obj["metadata"]["labels"]["grafana_dashboard"] = 1  # an unquoted label value: the API server refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(obj)


# --- against the real Helm engine, when one is installed ---------------------------------------------

RENDERED = ("configmap.yaml", "service.yaml", "prometheusrule.yaml", "grafana-dashboard-configmap.yaml")
ALL_ON: dict[str, Any] = {
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboard": {
        "enabled": True,
        "labels": {"team": "llm"},
        "annotations": {"grafana_folder": "LLM"},
    },
    "service": {"annotations": {"a": "b"}},
}


def helm_render(overrides: dict[str, Any], tmp_path: Path) -> dict[str, str] | None:
    """Template name -> Helm's own output for release RELEASE, or None without a Helm engine.

    Uses a `helm` binary, or the `helm-python-sdk` package (Helm's Go SDK as a library); neither is a
    dependency of the project, so this part skips where neither is installed.
    """
    helm = shutil.which("helm")
    if helm:
        values = tmp_path / "values.yaml"
        values.write_text(yaml.safe_dump(overrides), encoding="utf-8")
        out = {}
        for template in RENDERED:
            result = subprocess.run(
                [
                    helm,
                    "template",
                    RELEASE,
                    str(CHART),
                    "-f",
                    str(values),
                    "--show-only",
                    f"templates/{template}",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            # --show-only fails on a template that renders nothing: that is an empty output.
            out[template] = result.stdout if result.returncode == 0 else ""
        return out
    try:
        import helm_python  # type: ignore[import-not-found]
    except ImportError:
        return None
    with helm_python.Chart.load(str(CHART)) as chart:
        manifests = chart.render(overrides, name=RELEASE, namespace="default")
    return {name.rsplit("/", 1)[-1]: text for name, text in manifests.items()}


def comparable(text: str) -> list[Any]:
    """The rendered objects, with embedded YAML documents (ConfigMap data *.yaml) parsed as well."""
    objects = [d for d in yaml.safe_load_all(text) if d is not None]
    for obj in objects:
        if isinstance(obj, dict) and obj.get("kind") == "ConfigMap":
            for key, value in obj.get("data", {}).items():
                if key.endswith((".yaml", ".yml")):
                    obj["data"][key] = yaml.safe_load(value)
    return objects


@pytest.mark.parametrize("overrides", [{}, ALL_ON], ids=["defaults", "switches-on"])
def test_test_renderer_agrees_with_helm(overrides: dict[str, Any], tmp_path: Path) -> None:
    real = helm_render(overrides, tmp_path)
    if real is None:
        pytest.skip("no helm binary and no helm-python-sdk")
    for template in RENDERED:
        assert comparable(render(template, overrides)) == comparable(real[template]), template


# --- README ----------------------------------------------------------------------------------------------


def test_readme_deployment_section_documents_the_test_compose_file_and_the_switches() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Deployment")
    section = text[start : text.index("\n## ", start + 1)]
    for needle in ("docker-compose.test.yml", "prometheusRule.enabled", "grafanaDashboard.enabled"):
        assert needle in section, needle
