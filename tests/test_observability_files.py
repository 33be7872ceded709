"""The shipped Grafana dashboard and Prometheus alert rules only query metrics the gateway exports.

The exported names come from the live ``prometheus_client`` registry after importing ``gateway.metrics``,
so renaming a metric there (or dropping one) makes these tests fail until the observability files follow.
When ``promtool`` is on PATH the rules are also checked and unit-tested with it; otherwise that part skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import gateway.metrics  # registers the gateway's collectors in REGISTRY

OBSERVABILITY = Path(__file__).resolve().parents[1] / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
ALERTS = OBSERVABILITY / "alerts.yaml"

# Sample-name suffixes prometheus_client exposes per family type (counters lose "_total" in family.name).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
_PREFIX = "llm_gateway_"
# Series Prometheus itself adds for every scrape target.
_SCRAPE_SERIES = frozenset({"up"})

# --- a small PromQL identifier extractor -------------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label matchers: label names and (already removed) values
_RANGE = re.compile(r"\[[^\[\]]*\]")  # range and subquery selectors: [5m], [$__rate_interval], [1h:1m]
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[\w$]+")
_VARIABLE = re.compile(r"\$\{?\w+\}?")  # Grafana variables ($__range, ${job}, ...)
_NUMBER = re.compile(r"(?<![\w:.])(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"inf", "nan", "atan2"}
)
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((?P<query>.*),\s*(?P<label>\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((?P<query>.*)\)\s*$", re.S)


def exported_metric_names() -> frozenset[str]:
    """Every series name the gateway's /metrics can expose, plus Prometheus' own ``up``."""
    names = set(_SCRAPE_SERIES)
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def gateway_families() -> dict[str, frozenset[str]]:
    """The gateway's own metric families and the series names each one exports."""
    return {
        family.name: frozenset(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        for family in REGISTRY.collect()
        if family.name.startswith(_PREFIX)
    }


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names excluded)."""
    text = _STRING.sub('""', expr)
    text = _COMMENT.sub(" ", text)
    for pattern in (_MATCHERS, _RANGE, _LABEL_LIST, _OFFSET, _VARIABLE, _NUMBER):
        text = pattern.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation: rate(, sum(, histogram_quantile(, ...
        if name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def unknown_metrics(expr: str, exported: frozenset[str]) -> set[str]:
    return metric_names(expr) - exported


# --- the files -------------------------------------------------------------------------------------------
def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _alerts() -> dict[str, Any]:
    return yaml.safe_load(ALERTS.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows keep their panels inside


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def variable_expressions(dashboard: dict[str, Any]) -> list[str]:
    """PromQL inside the query variables (label_values(QUERY, label) / query_result(QUERY))."""
    exprs = []
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") != "query":
            continue
        query = _variable_query(variable)
        match = _LABEL_VALUES.match(query) or _QUERY_RESULT.match(query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        exprs.append(match.group("query"))
    return exprs


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", []) if "expr" in t]
    return exprs + variable_expressions(dashboard)


def alert_rules(alerts: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in alerts["groups"] for rule in group["rules"]]


def all_expressions() -> list[str]:
    return dashboard_expressions(_dashboard()) + [rule["expr"] for rule in alert_rules(_alerts())]


# --- the extractor itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.95, sum by (le, model) "
            '(rate(x_bucket{model=~"a|b",le!="+Inf"}[$__rate_interval])))',
            {"x_bucket"},
        ),
        ("sum(rate(a_total[5m])) by (team) / on (team) group_left (model) b offset 5m", {"a_total", "b"}),
        ("sum without (instance) (rate(foo_total[5m] @ 1609746000)) > bool 0", {"foo_total"}),
        ('count(max by (p, q) (m{p=~"$provider"}) == 1) or vector(0)', {"m"}),
        ('absent(up{job="llm-gateway"})', {"up"}),
        ('sum(rate(c_total{job=~"${job}", x="{y}"}[1h])) * 86400 > 1e3 unless d', {"c_total", "d"}),
        ("rate(e_total[1h:5m]) # comment mentioning not_a_metric", {"e_total"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exported_names_come_from_the_gateway_registry() -> None:
    exported = exported_metric_names()
    assert gateway.metrics.REQUESTS._name == "llm_gateway_requests"
    assert {
        "llm_gateway_requests_total",
        "llm_gateway_request_duration_seconds_bucket",
        "llm_gateway_request_duration_seconds_count",
        "llm_gateway_in_flight_requests",
        "llm_gateway_circuit_open",
        "up",
    } <= exported
    assert "llm_gateway_requests" not in exported  # counters are only exposed with _total


def test_checker_rejects_misspelled_and_renamed_metrics() -> None:
    exported = exported_metric_names()
    good = 'sum(rate(llm_gateway_requests_total{status_code=~"5.."}[5m]))'
    assert unknown_metrics(good, exported) == set()
    misspelled = good.replace("llm_gateway_requests_total", "llm_gateway_request_total")
    assert unknown_metrics(misspelled, exported) == {"llm_gateway_request_total"}
    assert unknown_metrics("rate(llm_gateway_tokens[5m])", exported) == {"llm_gateway_tokens"}
    # As if a metric had been renamed in gateway/metrics.py: its old names vanish from the registry, and
    # every file that queries it must then fail the check. Every gateway metric is queried somewhere.
    exprs = all_expressions()
    for family, names in gateway_families().items():
        renamed = exported - names
        assert any(unknown_metrics(e, renamed) for e in exprs), f"{family} is not checked by any expression"


# --- the dashboard ----------------------------------------------------------------------------------------
def test_dashboard_metadata_and_variables() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["DS_PROMETHEUS"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for name in ("team", "model", "provider"):
        variable = variables[name]
        assert variable["type"] == "query"
        match = _LABEL_VALUES.match(_variable_query(variable))
        assert match and match.group("label") == name, name


def test_every_panel_has_a_title_and_a_query() -> None:
    dashboard = _dashboard()
    ids = []
    for panel in _panels(dashboard["panels"]):
        assert panel.get("title"), panel
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        targets = panel.get("targets") or []
        assert targets, panel["title"]
        for target in targets:
            assert target.get("expr", "").strip(), panel["title"]
            assert target.get("refId"), panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for expr in dashboard_expressions(_dashboard()):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert not names - exported, f"unknown metric(s) {names - exported} in {expr!r}"


def test_dashboard_shows_every_gateway_metric() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_expressions(_dashboard())))
    missing = [family for family, names in gateway_families().items() if not names & used]
    assert not missing, f"no dashboard panel for {missing}"


# --- the alerts -------------------------------------------------------------------------------------------
EXPECTED_ALERTS = {
    "LLMGatewayDown",
    "LLMGatewayTargetMissing",
    "LLMGatewayHighErrorRate",
    "LLMGatewayHighLatencyP95",
    "LLMGatewayModelAllTargetsDown",
    "LLMGatewayProviderAllCircuitsOpen",
    "LLMGatewayCircuitOpen",
    "LLMGatewayRedisDown",
    "LLMGatewaySettlementBacklog",
    "LLMGatewayBudgetExhausted",
    "LLMGatewayBudgetNearExhaustion",
    "LLMGatewayHighSpendRate",
}


def test_alert_rules_are_complete() -> None:
    rules = alert_rules(_alerts())
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS
    for rule in rules:
        assert rule.get("expr", "").strip(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_alerts_query_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for rule in alert_rules(_alerts()):
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert not names - exported, f"{rule['alert']}: unknown metric(s) {names - exported}"


# --- promtool (optional) ----------------------------------------------------------------------------------
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    def concrete(expr: str) -> str:
        expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$__interval", "1m")
        return _VARIABLE.sub(".*", expr)  # the remaining variables sit inside regex matchers

    rules = [{"record": f"dashboard_query_{i}", "expr": concrete(e)} for i, e in enumerate(all_expressions())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{rendered}}}", "values": values}


def _firing(eval_time: str, *alerts: dict[str, str]) -> dict[str, Any]:
    return {
        "expr": 'ALERTS{alertstate="firing"}',
        "eval_time": eval_time,
        "exp_samples": [
            {"labels": "ALERTS{" + ",".join(f'{k}="{v}"' for k, v in a.items()) + "}", "value": 1}
            for a in alerts
        ],
    }


UP = _series("up", "1x200", job="llm-gateway", instance="gw:8080")
REQ = "llm_gateway_requests_total"


def _scenarios() -> list[dict[str, Any]]:
    crit, warn = (
        {"alertstate": "firing", "severity": "critical"},
        {"alertstate": "firing", "severity": "warning"},
    )
    request = {"provider": "deepseek", "team": "a"}
    bucket = "llm_gateway_request_duration_seconds_bucket"
    circuit = "llm_gateway_circuit_open"
    cost = "llm_gateway_cost_usd_total"
    return [
        {  # 10% 5xx and the scrape target down
            "input_series": [
                _series(REQ, "0+6x30", model="chat", status_code="500", **request),
                _series(REQ, "0+60x30", model="chat", status_code="200", **request),
                _series("up", "1 1 0x30", job="llm-gateway", instance="gw:8080"),
            ],
            "promql_expr_test": [
                _firing("3m"),
                _firing(
                    "15m",
                    {"alertname": "LLMGatewayDown", "instance": "gw:8080", "job": "llm-gateway", **crit},
                    {"alertname": "LLMGatewayHighErrorRate", **crit},
                ),
            ],
        },
        {  # every non-4xx request for "chat" fails; "embed" is healthy; no scrape target at all
            "input_series": [
                _series(REQ, "0+6x30", model="chat", status_code="503", **request),
                _series(REQ, "0+30x30", model="chat", status_code="429", **request),
                _series(REQ, "0+600x30", model="embed", status_code="200", **request),
            ],
            "promql_expr_test": [
                _firing(
                    "10m",
                    {"alertname": "LLMGatewayModelAllTargetsDown", "model": "chat", **crit},
                    {"alertname": "LLMGatewayTargetMissing", "job": "llm-gateway", **crit},
                )
            ],
        },
        {  # p95 of "slow" is ~58 s, "fast" answers within a second
            "input_series": [
                UP,
                _series(bucket, "0x30", model="slow", provider="p", le="30"),
                _series(bucket, "0+1x30", model="slow", provider="p", le="60"),
                _series(bucket, "0+1x30", model="slow", provider="p", le="+Inf"),
                _series(bucket, "0+5x30", model="fast", provider="p", le="1"),
                _series(bucket, "0+5x30", model="fast", provider="p", le="+Inf"),
            ],
            "promql_expr_test": [
                _firing("8m"),
                _firing("16m", {"alertname": "LLMGatewayHighLatencyP95", "model": "slow", **warn}),
            ],
        },
        {  # every deepseek target open; one of two openrouter targets open
            "input_series": [
                UP,
                _series(circuit, "1x20", provider="deepseek", upstream_model="deepseek-chat"),
                _series(circuit, "1x20", provider="openrouter", upstream_model="a"),
                _series(circuit, "0x20", provider="openrouter", upstream_model="b"),
            ],
            "promql_expr_test": [
                _firing(
                    "3m", {"alertname": "LLMGatewayProviderAllCircuitsOpen", "provider": "deepseek", **crit}
                ),
                _firing(
                    "10m",
                    {"alertname": "LLMGatewayCircuitOpen", "provider": "deepseek", **warn}
                    | {"upstream_model": "deepseek-chat"},
                    {
                        "alertname": "LLMGatewayCircuitOpen",
                        "provider": "openrouter",
                        "upstream_model": "a",
                        **warn,
                    },
                    {"alertname": "LLMGatewayProviderAllCircuitsOpen", "provider": "deepseek", **crit},
                ),
            ],
        },
        {  # Redis failing; team a out of budget (and spending fast); team b only hits its rpm limit
            "input_series": [
                UP,
                _series("llm_gateway_redis_errors_total", "0+10x10 100x200", operation="script"),
                _series("llm_gateway_settlement_backlog", "5x200"),
                _series("llm_gateway_rate_limited_total", "0+1x200", team="a", limit="budget"),
                _series("llm_gateway_rate_limited_total", "0+5x200", team="b", limit="rpm"),
                _series(cost, "0+0.05x200", team="a", model="chat"),
                _series(cost, "0+0.0001x200", team="b", model="chat"),
            ],
            "promql_expr_test": [
                _firing(
                    "6m",
                    {"alertname": "LLMGatewayBudgetExhausted", "team": "a", **warn},
                    {"alertname": "LLMGatewayRedisDown", **crit},
                ),
                _firing(
                    "100m",
                    {"alertname": "LLMGatewayBudgetExhausted", "team": "a", **warn},
                    {"alertname": "LLMGatewayBudgetNearExhaustion", "team": "a", **warn},
                    {"alertname": "LLMGatewayHighSpendRate", "team": "a", **warn},
                    {"alertname": "LLMGatewaySettlementBacklog", **warn},
                ),
            ],
        },
    ]


@needs_promtool
def test_promtool_alert_scenarios(tmp_path: Path) -> None:
    tests = [{"interval": "1m", **scenario} for scenario in _scenarios()]
    path = tmp_path / "alerts-test.yaml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests})
    )
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
