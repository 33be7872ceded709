"""Configuration: interpolation, validation that reports every problem with its key, defaults,
and the embedded default's behaviour with and without provider keys."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config_parser as config_mod
from gateway.config import (
    DEFAULT_PLUGINS,
    KNOWN_PLUGINS,
    PLUGIN_NEEDS_IDENTITY,
    Config,
    ConfigError,
    hash_key,
)
from gateway.config_parser import parse
from gateway.providers import create
from gateway.routing import Router
from plugins import REGISTRY
from tests.conftest import RunningGateway

EMBEDDED = Path(__file__).resolve().parents[1] / "config" / "gateway.yaml"


def minimal(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": [{"name": "p", "type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}],
        "models": [{"name": "chat", "targets": [{"provider": "p", "model": "m"}]}],
    }
    cfg.update(overrides)
    return cfg


def problems_of(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, env=env or {})
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def routes(cfg: Config) -> dict[str, list[str]]:
    """Each model's effective targets as ``provider/model``, as the router will try them."""
    router = Router(cfg, {p.name: create(p) for p in cfg.providers})
    return {name: [t.label for t in route.targets] for name, route in router.routes.items()}


# --- interpolation ---------------------------------------------------------------------------------------


def test_env_variables_are_interpolated() -> None:
    raw = minimal(
        server={"host": "${HOST}", "port": "${PORT:-8181}"},
        providers=[
            {
                "name": "p",
                "type": "openai",
                "base_url": "https://${DOMAIN}/v1",
                "api_key": "${KEY}",
                "headers": {"X-Title": "${TITLE:-My App} (${ENV_NAME:-dev})"},
            }
        ],
    )
    cfg = parse(
        raw, env={"HOST": "10.1.2.3", "DOMAIN": "api.example.com", "KEY": "secret-1", "ENV_NAME": "prod"}
    )
    assert (cfg.server.host, cfg.server.port) == ("10.1.2.3", 8181)  # a string from YAML, typed after
    provider = cfg.providers[0]
    assert provider.base_url == "https://api.example.com/v1"
    assert provider.api_key == "secret-1"
    assert provider.headers == {"X-Title": "My App (prod)"}
    assert "secret-1" not in repr(cfg)


def test_set_variable_wins_over_default_and_empty_one_falls_back() -> None:
    raw = minimal(server={"port": "${PORT:-8080}", "host": "${HOST:-127.0.0.1}"})
    cfg = parse(raw, env={"PORT": "9999", "HOST": ""})
    assert (cfg.server.port, cfg.server.host) == (9999, "127.0.0.1")
    # ${VAR:-} is an explicit empty default: no problem reported
    raw = minimal(providers=[{"name": "p", "type": "openai", "base_url": "http://h/v1", "api_key": "${K:-}"}])
    assert parse(raw, env={}).providers[0].api_key == ""


def test_unset_variable_without_default_is_reported_with_its_key() -> None:
    raw = minimal(
        providers=[{"name": "p", "type": "openai", "base_url": "${BASE_URL}", "api_key": "${NOPE}"}]
    )
    problems = problems_of(raw)
    assert "providers[0].api_key: environment variable NOPE is not set" in problems
    assert any(p.startswith("providers[0].base_url: environment variable BASE_URL") for p in problems)


def test_interpolation_never_re_expands_a_value() -> None:
    cfg = parse(minimal(server={"host": "${HOST}"}), env={"HOST": "${OTHER}", "OTHER": "evil"})
    assert cfg.server.host == "${OTHER}"


# --- validation ------------------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_its_dotted_path() -> None:
    raw = {
        "server": {"port": 70000, "max_body_bytes": "big"},
        "surprise": True,
        "providers": [
            {
                "name": "p",
                "type": "bogus",
                "base_url": "ftp://x",
                "timeouts": {"first_byte": -1, "idle": 0, "tota": 5},
            },
            {"name": "p", "type": "openai"},
        ],
        "models": [
            {"name": "chat", "targets": [{"provider": "ghost", "model": "m"}]},
            {"name": "empty", "targets": []},
            {"targets": [{"provider": "p"}]},
        ],
        "teams": [{"id": "t", "api_keys": ["sha256:abc"], "models": ["nope"], "limits": {"rpm": "x"}}],
        "routing": {"retries": "two", "circuit_breaker": {"failures": 0}, "unconfigured_provider": "ghost"},
        "cache": {"enabled": "maybe"},
        "redis": {"url": "http://localhost"},
    }
    problems = problems_of(raw)
    text = "\n".join(problems)
    for where in (
        "server.port:",
        "server.max_body_bytes:",
        "surprise: unknown key",
        "providers[0].type:",
        "providers[0].base_url:",
        "providers[0].timeouts.first_byte:",
        "providers[0].timeouts.idle:",
        "providers[0].timeouts.tota: unknown key",
        "providers[1].base_url: is required",
        "providers: duplicate name 'p'",
        "models[0].targets[0].provider: unknown provider 'ghost'",
        "models[1].targets: needs at least one target",
        "models[2].name: is required",
        "models[2].targets[0].model: is required",
        "teams[0].api_keys[0]:",
        "teams[0].models: unknown model 'nope'",
        "teams[0].limits.rpm:",
        "routing.retries:",
        "routing.circuit_breaker.failures:",
        "routing.unconfigured_provider: unknown provider 'ghost'",
        "cache.enabled:",
        "redis.url:",
    ):
        assert where in text, f"{where!r} missing from:\n{text}"
    assert len(problems) >= 22


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (None, "providers: needs at least one provider"),
        ([1, 2], "<root>: must be a mapping"),
        (minimal(providers="p"), "providers: must be a list"),
        (minimal(server=[1]), "server: must be a mapping"),
        (minimal(routing={"backoff_seconds": -1}), "routing.backoff_seconds: must not be negative"),
        (minimal(server={"port": True}), "server.port: must be int"),
        (minimal(server={"port": 8080.5}), "server.port: must be int, got float"),
        (minimal(routing={"retries": 1.5}), "routing.retries: must be int, got float"),
        (minimal(routing={"retries": "2x"}), "routing.retries: must be int, got str"),
        (minimal(plugins="auth"), "plugins: must be a list of strings"),
        (minimal(redis={"url": "unix:///run/redis.sock", "cluster": True}), "redis.url: a Redis Cluster is"),
        (minimal(redis={"url": "redis://r:6379/2", "cluster": True}), "redis.url: a Redis Cluster has only"),
        (minimal(redis={"url": "redis://r:notaport/0"}), "redis.url: is not a valid URL"),
        (minimal(redis={"url": "redis://r:70000/0"}), "redis.url: is not a valid URL"),
        (minimal(redis={"url": "redis://[::1/0"}), "redis.url: is not a valid URL"),
        (minimal(redis={"url": "redis://r:6379/zero"}), "redis.url: the database"),
        (minimal(server={"head_timeout_seconds": 0}), "server.head_timeout_seconds: must be greater than 0"),
        (minimal(server={"body_timeout_seconds": -1}), "server.body_timeout_seconds: must not be negative"),
        (minimal(server={"keepalive_timeout_seconds": 0}), "server.keepalive_timeout_seconds: must be"),
        (minimal(server={"max_connections": 0}), "server.max_connections: must be greater than 0"),
        (minimal(server={"max_connections": 1.5}), "server.max_connections: must be int"),
        (
            minimal(auth={"jwt": {"algorithms": ["none"], "audience": "a", "issuer": "i"}}),
            "auth.jwt.algorithms",
        ),
    ],
)
def test_single_problems(raw: Any, problem: str) -> None:
    assert any(p.startswith(problem) for p in problems_of(raw)), problem


def test_graphql_settings_are_validated() -> None:
    problems = problems_of(minimal(graphql={"max_depth": 0, "max_aliases": "many", "colour": "red"}))
    assert [p.split(" (")[0] for p in problems] == [
        "graphql.colour: unknown key",
        "graphql.max_aliases: must be int, got str",
        "graphql.max_depth: must be greater than 0",
    ]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            minimal(colour=1),
            "colour: unknown key (expected one of: health, metrics, rate_limiting, server, redis, providers, "
            "models, teams, routing, cache, auth, admin, plugins, graphql, guardrails)",
        ),
        (
            minimal(models=[{"name": "chat", "colour": 1, "targets": [{"provider": "p", "model": "m"}]}]),
            "models[0].colour: unknown key (expected one of: name, targets, pricing, context_window, "
            "context_window_fallback, capabilities, cache, allow_fields)",
        ),
        (
            minimal(teams=[{"id": "t", "colour": 1}]),
            "teams[0].colour: unknown key "
            "(expected one of: id, api_keys, models, limits, budgets, model_limits, guardrails)",
        ),
        (
            minimal(auth={"colour": 1}),
            "auth.colour: unknown key (expected one of: jwt, max_stale_seconds)",
        ),
        (
            minimal(
                auth={
                    "jwt": {
                        "algorithms": ["HS256"],
                        "secret": "s",
                        "audience": "a",
                        "issuer": "i",
                        "colour": 1,
                    }
                }
            ),
            "auth.jwt.colour: unknown key (expected one of: algorithms, secret, public_key_file, jwks_url, "
            "jwks_refresh_seconds, audience, issuer, team_claim)",
        ),
        (
            minimal(routing={"retry_budget": {"colour": 1}}),
            "routing.retry_budget.colour: unknown key (expected one of: percent, min_concurrency)",
        ),
    ],
)
def test_an_unknown_key_is_reported_with_the_keys_its_section_takes(raw: Any, problem: str) -> None:
    assert problems_of(raw) == [problem]


SHARED, NO_ONE = "every caller would share one namespace", "it binds no one"


def before_auth(i: int, name: str, harm: str) -> str:
    listed = f"{name} is listed before auth but needs the caller's team"
    return f"plugins[{i}]: {listed} ({harm}): list auth before {name}"


def without_auth(i: int, name: str) -> str:
    return f"plugins[{i}]: {name} needs the caller's team, which auth sets: list auth before it"


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        (["cache", "auth"], [before_auth(0, "cache", SHARED)]),
        (["rate_limit", "auth"], [before_auth(0, "rate_limit", NO_ONE)]),
        (["quota", "cache", "auth"], [before_auth(0, "quota", NO_ONE), before_auth(1, "cache", SHARED)]),
        (
            ["cache", "auth", "quota", "auth"],
            [before_auth(0, "cache", SHARED), "plugins: lists a plugin twice"],
        ),
        (["rate_limit"], [without_auth(0, "rate_limit")]),
        (["cache", "quota"], [without_auth(1, "quota")]),
    ],
)
def test_plugins_that_need_the_callers_team_run_after_auth(plugins: list[str], expected: list[str]) -> None:
    assert problems_of(minimal(plugins=plugins)) == expected


@pytest.mark.parametrize(
    "plugins",
    [
        None,
        [],
        ["auth"],
        ["cache"],  # keyless and single-tenant: every caller is the same anonymous tenant
        ["auth", "cache"],
        ["auth", "cache", "rate_limit", "quota"],
        ["auth", "quota", "rate_limit", "cache"],
    ],
)
def test_plugin_orders_that_keep_teams_apart_are_accepted(plugins: list[str] | None) -> None:
    raw = minimal() if plugins is None else minimal(plugins=plugins)
    assert parse(raw, env={}).plugins == (DEFAULT_PLUGINS if plugins is None else tuple(plugins))


def test_the_parser_enforces_what_each_plugin_class_declares() -> None:
    # The parser cannot import the plugin classes (they import the parser): it reads a copy.
    assert {name: cls.needs_identity for name, cls in REGISTRY.items()} == dict(PLUGIN_NEEDS_IDENTITY)
    assert tuple(REGISTRY) == KNOWN_PLUGINS


def test_defaults() -> None:
    cfg = parse(minimal(), env={})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.server.max_body_bytes == 10 * 1024 * 1024
    s = cfg.server
    assert (s.head_timeout_seconds, s.body_timeout_seconds, s.keepalive_timeout_seconds) == (10, 30, 75)
    assert s.max_connections == 10_000
    t = cfg.providers[0].timeouts
    assert (t.connect, t.first_byte, t.idle, t.total) == (5, 60, 30, 600)
    r = cfg.routing
    assert (r.retries, r.backoff_seconds, r.retry_after_cap_seconds) == (1, 0.2, 10)
    assert (r.circuit_breaker.failures, r.circuit_breaker.cooldown_seconds) == (5, 30)
    assert r.unconfigured_provider is None
    assert cfg.redis is None  # in-memory state
    assert (cfg.cache.enabled, cfg.cache.ttl_seconds) == (False, 3600)
    assert cfg.jwt is None and cfg.master_key_hash is None
    assert cfg.teams == ()


def test_team_keys_plain_and_sha256_forms() -> None:
    digest = hashlib.sha256(b"key-two").hexdigest()
    raw = minimal(
        teams=[
            {
                "id": "team-a",
                "api_keys": ["${TEAM_A_KEY}", f"sha256:{digest.upper()}", f"sha256:{digest}"],
                "models": ["chat"],
                "limits": {"rpm": 600, "tpm": 200000, "max_parallel": 20},
                "budgets": {"daily_usd": 5.0, "monthly_usd": 100.0},
            }
        ]
    )
    [team] = parse(raw, env={"TEAM_A_KEY": "key-one"}).teams
    assert team.key_hashes == (hash_key("key-one"), digest, digest)
    assert hash_key("key-one") == hashlib.sha256(b"key-one").hexdigest()
    assert "key-one" not in repr(team)
    assert team.models == ("chat",)
    assert (team.limits.rpm, team.limits.tpm, team.limits.max_parallel) == (600, 200000, 20)
    assert (team.budgets.daily_usd, team.budgets.monthly_usd) == (5.0, 100.0)


@pytest.mark.parametrize("bad", ["sha256:", "sha256:xyz", "sha256:" + "0" * 63, "sha256:" + "g" * 64])
def test_malformed_sha256_key_is_reported(bad: str) -> None:
    problems = problems_of(minimal(teams=[{"id": "t", "api_keys": ["ok-key", bad]}]))
    assert problems == ["teams[0].api_keys[1]: sha256: must be followed by 64 hex digits"]


def test_secrets_are_listed_for_redaction_but_never_shown() -> None:
    raw = minimal(
        auth={"jwt": {"algorithms": ["HS256"], "secret": "jwt-secret-value", "audience": "a", "issuer": "i"}}
    )
    cfg = parse(raw, env={})
    assert set(cfg.secrets()) >= {"k", "jwt-secret-value"}
    assert "jwt-secret-value" not in repr(cfg)


def test_load_reports_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        config_mod.load(tmp_path / "nope.yaml")
    assert "cannot read" in missing.value.problems[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as invalid:
        config_mod.load(bad)
    assert "not valid YAML at line" in invalid.value.problems[0]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"server:\n  host: \xff\xfe\n")
    with pytest.raises(ConfigError) as not_text:
        config_mod.load(binary)
    assert not_text.value.problems == [f"{binary}: not UTF-8 text (invalid byte at offset 16)"]


def test_whole_floats_and_numeric_strings_are_accepted_where_ints_are_expected() -> None:
    cfg = parse(minimal(server={"port": "9090"}, routing={"retries": 2.0}), env={})
    assert (cfg.server.port, cfg.routing.retries) == (9090, 2)


# --- the embedded default --------------------------------------------------------------------------------


def test_embedded_config_parses() -> None:
    cfg = config_mod.load(EMBEDDED, env={})
    assert {m.name for m in cfg.models} >= {"chat"}
    assert cfg.redis is None
    assert cfg.routing.unconfigured_provider == "mock"
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.secrets() == []


def test_embedded_config_without_keys_routes_everything_to_the_mock() -> None:
    table = routes(config_mod.load(EMBEDDED, env={}))
    assert table
    assert all(len(targets) == 1 and targets[0].startswith("mock/") for targets in table.values()), table


def test_embedded_config_with_a_deepseek_key_uses_deepseek() -> None:
    cfg = config_mod.load(EMBEDDED, env={"DEEPSEEK_API_KEY": "ds-key-123456"})
    table = routes(cfg)
    assert table["chat"] == ["deepseek/deepseek-chat"]  # openrouter has no key: not tried
    assert cfg.secrets() == ["ds-key-123456"]
    both = routes(config_mod.load(EMBEDDED, env={"DEEPSEEK_API_KEY": "a" * 8, "OPENROUTER_API_KEY": "b" * 8}))
    assert both["chat"] == ["deepseek/deepseek-chat", "openrouter/deepseek/deepseek-chat"]


def test_unconfigured_keyed_providers_fall_back_to_the_named_provider() -> None:
    raw = {
        "providers": [
            {
                "name": "openrouter",
                "type": "openrouter",
                "base_url": "https://openrouter.ai/api/v1",
                "api_key": "",
            },
            {"name": "deepseek", "type": "deepseek", "base_url": "https://api.deepseek.com", "api_key": ""},
            {"name": "local", "type": "openai", "base_url": "http://127.0.0.1:9/v1"},  # keyless is fine
            {"name": "mock", "type": "mock"},
        ],
        "models": [
            {
                "name": "a",
                "targets": [{"provider": "deepseek", "model": "x"}, {"provider": "openrouter", "model": "y"}],
            },
            {
                "name": "b",
                "targets": [{"provider": "openrouter", "model": "z"}, {"provider": "local", "model": "l"}],
            },
        ],
        "routing": {"unconfigured_provider": "mock"},
    }
    assert routes(parse(raw, env={})) == {"a": ["mock/x"], "b": ["local/l"]}
    raw["routing"] = {}
    assert routes(parse(raw, env={}))["a"] == []  # nothing to fall back to: the model has no target


async def test_embedded_config_answers_from_the_builtin_mock(
    make_gateway: Callable[[dict[str, Any]], Awaitable[RunningGateway]],
) -> None:
    gw = await make_gateway(yaml.safe_load(EMBEDDED.read_text()))
    raw = await gw.client().chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "no keys here"}]
    )
    assert raw.parse().choices[0].message.content == "Mock answer: no keys here"
    assert raw.headers["x-gateway-provider"] == "mock"


# --- auth.jwt.jwks_url -------------------------------------------------------------------------------------


def jwt_settings(**settings: Any) -> dict[str, Any]:
    return minimal(auth={"jwt": {"algorithms": ["RS256"], "audience": "a", "issuer": "i", **settings}})


def test_jwks_url_is_parsed_with_its_refresh_interval() -> None:
    cfg = parse(jwt_settings(jwks_url="https://id.example.com/.well-known/jwks.json"), env={})
    assert cfg.jwt is not None
    assert cfg.jwt.jwks_url == "https://id.example.com/.well-known/jwks.json"
    assert cfg.jwt.jwks_refresh_seconds == 300
    assert cfg.jwt.public_key_file is None
    cfg = parse(jwt_settings(jwks_url="http://127.0.0.1:8081/jwks", jwks_refresh_seconds=2.5), env={})
    assert cfg.jwt is not None and cfg.jwt.jwks_refresh_seconds == 2.5
    with_password = parse(jwt_settings(jwks_url="https://user:jwks-pass-0123@id.example.com/jwks"), env={})
    assert "jwks-pass-0123" in with_password.secrets()


def test_jwks_url_and_public_key_file_together_is_a_problem(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n")
    problems = problems_of(jwt_settings(public_key_file=str(pem), jwks_url="https://id.example.com/jwks"))
    assert problems == ["auth.jwt.jwks_url: set either public_key_file or jwks_url, not both"]


def test_neither_jwks_url_nor_public_key_file_is_a_problem() -> None:
    problems = problems_of(jwt_settings())
    assert problems == [
        "auth.jwt.public_key_file: is required for RS*/ES*/PS*/EdDSA algorithms (or set jwks_url)"
    ]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"jwks_url": "ftp://id.example.com/jwks"}, "auth.jwt.jwks_url: must start with http:// or https://"),
        ({"jwks_url": "file:///etc/jwks.json"}, "auth.jwt.jwks_url: must start with http:// or https://"),
        ({"jwks_url": "id.example.com/jwks"}, "auth.jwt.jwks_url: must start with http:// or https://"),
        ({"jwks_url": "https:///jwks"}, "auth.jwt.jwks_url: must name a host"),
        ({"jwks_url": "http://id.example.com/jwks"}, "auth.jwt.jwks_url: must use https://"),
        ({"jwks_url": "https://id.example.com:99999/jwks"}, "auth.jwt.jwks_url: is not a valid URL"),
        (
            {"jwks_url": "https://id.example.com/jwks", "jwks_refresh_seconds": 0},
            "auth.jwt.jwks_refresh_seconds: must be greater than 0",
        ),
        (
            {"jwks_url": "https://id.example.com/jwks", "jwks_refresh_seconds": "often"},
            "auth.jwt.jwks_refresh_seconds: must be float",
        ),
    ],
    ids=["ftp", "file", "no-scheme", "no-host", "plain-http", "bad-port", "zero-refresh", "not-a-number"],
)
def test_bad_jwks_settings_are_problems(settings: dict[str, Any], problem: str) -> None:
    assert any(p.startswith(problem) for p in problems_of(jwt_settings(**settings))), problem
