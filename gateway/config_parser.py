"""Configuration: YAML with ``${ENV}`` / ``${ENV:-default}`` interpolation → ``gateway.config`` objects.

This is the only module that reads the environment. Validation collects *every* problem with the
dotted path of the offending key, so ``llm-gateway check-config`` can print them all at once.

One reader per section (``_server``, ``_provider``, ``_model``, ...) builds its section's dataclass with
``_build``: a key is named once, as its dataclass field, which gives its type, its default and whether it
is required; the reader names only the fields it reads its own way (nested sections, lists, checks), and
its known keys are the dataclass's ``__slots__``. Where the YAML differs from the dataclasses, the reader
says so: the top level (``_config``), ``teams[]`` (``api_keys`` gives ``key_hashes``), ``auth`` and
``admin``. (tests/test_deploy_files.py reads the ``known(...)`` calls, literal keys or
``*Dataclass.__slots__``, to keep the README and config/example.full.yaml complete.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_type_hints
from urllib.parse import urlsplit

import yaml

from gateway.config import (
    GUARDRAIL_ACTIONS,
    GUARDRAIL_DIRECTIONS,
    KNOWN_PLUGINS,
    PLUGIN_NEEDS_IDENTITY,
    PROVIDER_TYPES,
    Budgets,
    CacheConfig,
    CapabilitiesConfig,
    CircuitBreakerConfig,
    Config,
    ConfigError,
    GraphQLConfig,
    GuardrailRule,
    GuardrailsConfig,
    HealthConfig,
    JwtConfig,
    Limits,
    MetricsConfig,
    ModelCacheConfig,
    ModelConfig,
    Pricing,
    ProviderConfig,
    RateLimitingConfig,
    RedisConfig,
    RetryBudgetConfig,
    RoutingConfig,
    ServerConfig,
    TargetConfig,
    TeamConfig,
    Timeouts,
    hash_key,
)
from gateway.guardrails.detectors import DETECTORS, compile_pattern
from gateway.steering import STEERING_FIELDS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string scalar of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and (env[name] or default is None):
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


T = TypeVar("T")
# Every number in the config (and in admin API bodies, which go through the same reader) is bounded:
# far above any real limit, price or timeout, and within what JSON encoders and Redis take (2^53).
MAX_NUMBER = 1e15


class _Reader:
    """Typed access to one mapping of the YAML tree; records problems instead of raising."""

    def __init__(self, data: Any, path: str, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem("", "must be a mapping")
            data = {}
        self.data: dict[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str) -> None:
        where = self.key(name) if name else (self.path or "<root>")
        self.problems.append(f"{where}: {message}")

    def known(self, *names: str) -> None:
        for name in self.data:
            if name not in names:
                self.problem(str(name), f"unknown key (expected one of: {', '.join(names)})")

    def get(self, name: str, kind: Callable[[Any], T], default: T, *, required: bool = False) -> T:
        if name not in self.data or self.data[name] in (None, ""):
            if required:
                self.problem(name, "is required")
            return default
        raw = self.data[name]
        try:
            if kind is bool:
                if isinstance(raw, bool):
                    return raw  # type: ignore[return-value]
                if str(raw).lower() in ("true", "false", "1", "0", "yes", "no"):
                    return str(raw).lower() in ("true", "1", "yes")  # type: ignore[return-value]
                raise ValueError
            if kind in (int, float) and isinstance(raw, bool):
                raise ValueError
            if kind is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError  # int(1.5) would silently be 1
            value = kind(raw)
        except (TypeError, ValueError):
            self.problem(name, f"must be {getattr(kind, '__name__', 'valid')}, got {type(raw).__name__}")
            return default
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0:
                self.problem(name, "must not be negative")
                return default
            if not value <= MAX_NUMBER:  # also NaN and infinity
                self.problem(name, f"must be at most {MAX_NUMBER:.0e}")
                return default
        return value

    def child(self, name: str) -> _Reader:
        return _Reader(self.data.get(name), self.key(name), self.problems)

    def items(self, name: str) -> list[_Reader]:
        raw = self.data.get(name) or []
        if not isinstance(raw, list):
            self.problem(name, "must be a list")
            return []
        return [_Reader(item, f"{self.key(name)}[{i}]", self.problems) for i, item in enumerate(raw)]

    def strings(self, name: str) -> tuple[str, ...] | None:
        raw = self.data.get(name)
        if raw is None:
            return None
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            self.problem(name, "must be a list of strings")
            return None
        return tuple(raw)


D = TypeVar("D", bound="DataclassInstance")
# How a reader reads one field its own way: called with the section's reader and the field's key.
Hook = Callable[[_Reader, str], Any]


@functools.cache
def _field_types(cls: type[DataclassInstance]) -> dict[str, tuple[Any, Any]]:
    """Each field's type (its annotation without ``| None``) and default (``MISSING``: it has none)."""
    hints = get_type_hints(cls)
    found = {}
    for f in fields(cls):
        hint = hints[f.name]
        if isinstance(hint, UnionType):
            hint = next(arg for arg in get_args(hint) if arg is not NoneType)
        found[f.name] = (hint, f.default)
    return found


def _scalar(r: _Reader, cls: type[DataclassInstance], name: str, key: str = "") -> Any:
    """Field ``name`` of ``cls`` from the key of that name (or ``key``), by the field's type — bool, int,
    float, str or a list of strings — and default; a field without a default is required."""
    key = key or name
    kind, default = _field_types(cls)[name]
    if kind == tuple[str, ...] and default is not MISSING:
        found = r.strings(key)
        return default if found is None else found
    if kind not in (bool, int, float, str):
        raise TypeError(f"{cls.__name__}.{name} is not a scalar: its section's reader must read it")
    if default is MISSING:
        return r.get(key, kind, kind(), required=True)
    return r.get(key, kind, default)


def _build(r: _Reader, cls: type[D], **hooks: Hook) -> D:
    """``cls`` from the section ``r``, field by field in their order: those in ``hooks`` by their hook,
    every other one by ``_scalar``."""
    names = [f.name for f in fields(cls)]
    assert hooks.keys() <= set(names), f"{cls.__name__} has no field {set(hooks) - set(names)}"
    return cls(**{name: hooks[name](r, name) if name in hooks else _scalar(r, cls, name) for name in names})


def _child(read: Callable[[_Reader], Any]) -> Hook:
    """A hook for a nested section, read by ``read``."""
    return lambda r, key: read(r.child(key))


def _optional(read: Callable[[_Reader], Any]) -> Hook:
    """A hook for a nested section that is None when left out."""
    return lambda r, key: None if r.data.get(key) is None else read(r.child(key))


def _positive(r: _Reader, name: str, value: float, minimum: float = 0.0) -> None:
    if value <= minimum:
        r.problem(name, f"must be greater than {minimum:g}")


def _all_positive(r: _Reader, section: D) -> D:
    """Every number in ``section`` (its booleans are not numbers) must be greater than 0."""
    for f in fields(section):
        value = getattr(section, f.name)
        if not isinstance(value, bool):
            _positive(r, f.name, value)
    return section


def _at_least_one(r: _Reader, name: str, value: int | None, omitted: str) -> None:
    if value is not None and value < 1:
        r.problem(name, f"must be at least 1 (omit it {omitted})")


# --- the top level -------------------------------------------------------------------------------------


def _config(root: _Reader, source: str) -> Config:
    """The whole document, a reader per top-level key. The keys are Config's fields but for ``auth``
    and ``admin`` (see ``_auth``, ``_admin``); ``source`` is where the document came from."""
    root.known(
        "health",
        "metrics",
        "rate_limiting",
        "server",
        "redis",
        "providers",
        "models",
        "teams",
        "routing",
        "cache",
        "auth",
        "admin",
        "plugins",
        "graphql",
        "guardrails",
    )
    server = _server(root.child("server"))
    providers = _providers(root)
    provider_names = {p.name for p in providers}
    models = _models(root, provider_names)
    guardrails = _guardrails(root.child("guardrails"))
    for i, rule in enumerate(guardrails.rules):
        if rule.provider is not None and rule.provider not in provider_names:
            root.problem(f"guardrails.rules[{i}].provider", f"unknown provider {rule.provider!r}")
    plugins = _plugins(root)
    if guardrails.rules and "guardrails" not in plugins:
        root.problem(
            "guardrails", "rules are set but the guardrails plugin is not in plugins (none would apply)"
        )
    if (
        "guardrails" in plugins
        and "cache" in plugins
        and plugins.index("cache") < plugins.index("guardrails")
    ):
        root.problem("plugins", "guardrails must come before cache (a cached answer would skip the rules)")
    return Config(
        server=server,
        providers=providers,
        models=models,
        teams=_teams(root, {m.name for m in models}, {rule.name for rule in guardrails.rules}),
        routing=_routing(root.child("routing"), provider_names),
        redis=_redis(root.child("redis")),
        cache=_cache(root.child("cache")),
        **_auth(root.child("auth")),
        **_admin(root.child("admin")),
        health=_health(root.child("health")),
        metrics=_metrics(root.child("metrics")),
        rate_limiting=_rate_limiting(root.child("rate_limiting")),
        plugins=plugins,
        graphql=_graphql(root.child("graphql")),
        guardrails=guardrails,
        source=source,
    )


def _unique(r: _Reader, what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n and n in seen:
            r.problem(what, f"duplicate name {n!r}")
        seen.add(n)


# --- server ----------------------------------------------------------------------------------------------


def _server(r: _Reader) -> ServerConfig:
    r.known(*ServerConfig.__slots__)
    server = _build(r, ServerConfig)
    for origin in server.cors_origins:
        # SECURITY: exact origins only (scheme://host[:port]); "*" would let any site use a key a
        # browser holds, and a path or trailing slash never matches a browser's Origin header.
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?", origin):
            r.problem("cors_origins", f"{origin!r} is not an origin like https://app.example.com")
    if not 0 <= server.port <= 65535:
        r.problem("port", "must be between 0 and 65535")
    for name in ("head_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
        _positive(r, name, getattr(server, name))
    _positive(r, "max_connections", server.max_connections)
    return server


# --- providers[] -----------------------------------------------------------------------------------------


def _providers(root: _Reader) -> tuple[ProviderConfig, ...]:
    providers = tuple(_provider(p) for p in root.items("providers"))
    if not providers:
        root.problem("providers", "needs at least one provider")
    _unique(root, "providers", [p.name for p in providers])
    return providers


ANTHROPIC_BASE_URL = "https://api.anthropic.com"


def _provider(r: _Reader) -> ProviderConfig:
    r.known(*ProviderConfig.__slots__)
    provider = _build(
        r,
        ProviderConfig,
        base_url=lambda r, key: r.get(key, str, "").rstrip("/"),  # required unless the type is mock
        timeouts=_child(_timeouts),
        headers=_headers,
        probe_path=_probe_path,
        limits=_optional(_limits),
        allow_fields=_allow_fields,
    )
    if provider.type and provider.type not in PROVIDER_TYPES:  # an empty one is reported as required
        r.problem("type", f"must be one of {', '.join(PROVIDER_TYPES)}, got {provider.type!r}")
    if provider.type == "anthropic":  # Anthropic's own API unless told otherwise; its model list probed
        provider = dataclasses.replace(
            provider,
            base_url=provider.base_url or ANTHROPIC_BASE_URL,
            probe_path="/v1/models" if "probe_path" not in r.data else provider.probe_path,
        )
    if provider.type != "mock" and not provider.base_url:
        r.problem("base_url", "is required")
    elif provider.base_url and not provider.base_url.startswith(("http://", "https://")):
        r.problem("base_url", "must start with http:// or https://")
    return provider


def _timeouts(r: _Reader) -> Timeouts:
    r.known(*Timeouts.__slots__)
    return _all_positive(r, _build(r, Timeouts))


def _headers(r: _Reader, key: str) -> dict[str, str]:
    headers = r.data.get(key) or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        r.problem(key, "must be a mapping of header names to strings")
        return {}
    return {str(k): v for k, v in headers.items()}


def _probe_path(r: _Reader, key: str) -> str | None:
    """``false`` turns the probe off; left out or empty, the default path."""
    return None if r.data.get(key) is False else _scalar(r, ProviderConfig, key)


def _allow_fields(r: _Reader, key: str) -> tuple[str, ...]:
    """``allow_fields``: steering fields (``gateway.steering``) this provider or model passes through."""
    names = r.strings(key) or ()
    for i, name in enumerate(names):
        if name not in STEERING_FIELDS:
            r.problem(
                f"{key}[{i}]",
                f"{name!r} is never stripped (allowed: {', '.join(sorted(STEERING_FIELDS))})",
            )
    return names


def _limits(r: _Reader) -> Limits:
    r.known(*Limits.__slots__)
    limits = _build(r, Limits)
    for name in Limits.__slots__:
        _at_least_one(r, name, getattr(limits, name), "for no limit")
    return limits


# --- models[] --------------------------------------------------------------------------------------------


def _models(root: _Reader, provider_names: set[str]) -> tuple[ModelConfig, ...]:
    models = tuple(_model(m, provider_names) for m in root.items("models"))
    if not models:
        root.problem("models", "needs at least one model")
    _unique(root, "models", [m.name for m in models])
    _target_limits_agree(root, models)
    _window_fallbacks(root, models)
    return models


def _model(r: _Reader, provider_names: set[str]) -> ModelConfig:
    r.known(*ModelConfig.__slots__)
    return _build(
        r,
        ModelConfig,
        targets=lambda r, key: _targets(r, key, provider_names),
        pricing=_optional(_pricing),
        context_window=_context_window,
        capabilities=_child(_capabilities),
        cache=_child(_model_cache),
        allow_fields=_allow_fields,
    )


def _targets(r: _Reader, key: str, provider_names: set[str]) -> tuple[TargetConfig, ...]:
    targets = tuple(_target(t, provider_names) for t in r.items(key))
    if not targets:
        r.problem(key, "needs at least one target")
    return targets


def _target(r: _Reader, provider_names: set[str]) -> TargetConfig:
    r.known(*TargetConfig.__slots__)
    target = _build(r, TargetConfig, limits=_optional(_limits))
    if target.provider and target.provider not in provider_names:
        r.problem("provider", f"unknown provider {target.provider!r}")
    return target


def _context_window(r: _Reader, key: str) -> int | None:
    """Left out: no limit; set, at least 1."""
    window = r.get(key, int, 0)
    if r.data.get(key) not in (None, "") and window < 1:
        r.problem(key, "must be at least 1 (omit it for no limit)")
    return window or None


def _pricing(r: _Reader) -> Pricing:
    r.known(*Pricing.__slots__)
    return _build(r, Pricing)


def _capabilities(r: _Reader) -> CapabilitiesConfig:
    r.known(*CapabilitiesConfig.__slots__)
    caps = _build(r, CapabilitiesConfig)
    _at_least_one(r, "max_output_tokens", caps.max_output_tokens, "to use the shipped default")
    return caps


def _model_cache(r: _Reader) -> ModelCacheConfig:
    r.known(*ModelCacheConfig.__slots__)
    return _build(r, ModelCacheConfig)


def _window_fallbacks(r: _Reader, models: tuple[ModelConfig, ...]) -> None:
    """``context_window_fallback`` names another model, and following the chain never loops."""
    by_name = {m.name: m for m in models}
    for i, model in enumerate(models):
        name = model.context_window_fallback
        if name is None:
            continue
        where = f"models[{i}].context_window_fallback"
        if name not in by_name:
            r.problems.append(f"{where}: unknown model {name!r}")
            continue
        seen = {model.name}
        while name is not None and name in by_name:
            if name in seen:
                r.problems.append(f"{where}: the fallback chain loops back to {name!r}")
                break
            seen.add(name)
            name = by_name[name].context_window_fallback


def _target_limits_agree(r: _Reader, models: tuple[ModelConfig, ...]) -> None:
    """A target's limits belong to its upstream (provider, model), shared by every model routing there."""
    seen: dict[tuple[str, str], Limits] = {}
    for model in models:
        for t in model.targets:
            if t.limits is None:
                continue
            first = seen.setdefault((t.provider, t.model), t.limits)
            if first != t.limits:
                r.problem(
                    "models",
                    f"target {t.provider}/{t.model} has different limits in different models; "
                    "they share one upstream, so give them the same limits (or set them once)",
                )


# --- teams[] ---------------------------------------------------------------------------------------------


def _teams(root: _Reader, model_names: set[str], rule_names: set[str]) -> tuple[TeamConfig, ...]:
    teams = tuple(_team(t, model_names, rule_names) for t in root.items("teams"))
    _unique(root, "teams", [t.id for t in teams])
    return teams


def parse_team(
    data: Any,
    model_names: set[str],
    *,
    path: str = "",
    with_keys: bool = False,
    rule_names: set[str] | None = None,
) -> TeamConfig:
    """Validate one team (a ``teams`` entry, or an admin API body); raise ConfigError on problems.
    ``rule_names``: the guardrail rules a team may name (None: not checked, a stored team read back)."""
    problems: list[str] = []
    r = _Reader(data, path, problems)
    if not with_keys and "api_keys" in r.data:
        r.problem("api_keys", "keys are created with POST /admin/keys, not set on a team")
    team = _team(r, model_names, rule_names)
    if problems:
        raise ConfigError(problems)
    return team


def _team(r: _Reader, model_names: set[str], rule_names: set[str] | None = None) -> TeamConfig:
    # TeamConfig's fields, but that the key api_keys gives key_hashes (``_api_keys``).
    r.known("id", "api_keys", "models", "limits", "budgets", "model_limits", "guardrails")
    team = _build(
        r,
        TeamConfig,
        key_hashes=_api_keys,
        limits=_child(_limits),
        budgets=_child(_budgets),
        model_limits=lambda r, key: _model_limits(r.child(key), model_names),
    )
    if team.id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", team.id):
        r.problem("id", "must be 1-64 letters, digits, '.', '_' or '-'")
    for m in team.models or ():
        if m not in model_names:
            r.problem("models", f"unknown model {m!r}")
    for name in team.guardrails or ():
        if rule_names is not None and name not in rule_names:
            r.problem("guardrails", f"unknown guardrail rule {name!r}")
    return team


def _api_keys(r: _Reader, _field: str) -> tuple[str, ...]:
    """TeamConfig.key_hashes from the key ``api_keys``: plaintext keys hashed, ``sha256:<hex>`` as given."""
    hashes = []
    for i, key in enumerate(r.strings("api_keys") or ()):
        if key.startswith("sha256:"):
            digest = key[7:].lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                r.problem(f"api_keys[{i}]", "sha256: must be followed by 64 hex digits")
            hashes.append(digest)
        elif key:
            hashes.append(hash_key(key))
    return tuple(hashes)


def _model_limits(r: _Reader, model_names: set[str]) -> dict[str, Limits]:
    """``model_limits``: a model name to its limits."""
    limits = {}
    for m in r.data:
        if m not in model_names:
            r.problem(str(m), "unknown model")
        limits[str(m)] = _limits(r.child(str(m)))
    return limits


def _budgets(r: _Reader) -> Budgets:
    r.known(*Budgets.__slots__)
    return _build(r, Budgets)


# --- routing, redis, cache -------------------------------------------------------------------------------


def _routing(r: _Reader, provider_names: set[str]) -> RoutingConfig:
    r.known(*RoutingConfig.__slots__)
    routing = _build(
        r, RoutingConfig, circuit_breaker=_child(_circuit_breaker), retry_budget=_child(_retry_budget)
    )
    fallback = routing.unconfigured_provider
    if fallback and fallback not in provider_names:
        r.problem("unconfigured_provider", f"unknown provider {fallback!r}")
    return routing


def _circuit_breaker(r: _Reader) -> CircuitBreakerConfig:
    r.known(*CircuitBreakerConfig.__slots__)
    breaker = _build(r, CircuitBreakerConfig)
    _positive(r, "failures", breaker.failures)
    return breaker


def _retry_budget(r: _Reader) -> RetryBudgetConfig:
    r.known(*RetryBudgetConfig.__slots__)
    budget = _build(r, RetryBudgetConfig)
    if budget.percent > 100:
        r.problem("percent", "must be at most 100")
    return budget


def _redis(r: _Reader) -> RedisConfig | None:
    r.known(*RedisConfig.__slots__)
    if r.data.get("url") in (None, ""):
        return None  # no Redis: the state is in memory
    redis = _build(r, RedisConfig)
    problem = _redis_url_problem(redis)
    if problem is not None:
        r.problem("url", problem)
    return redis


def _redis_url_problem(redis: RedisConfig) -> str | None:
    """What would make the store fail at start-up or on every connect (never echoing the URL: it may
    hold a password)."""
    if not redis.url.startswith(("redis://", "rediss://", "unix://")):
        return "must start with redis://, rediss:// or unix://"
    try:
        parts = urlsplit(redis.url)
        parts.port  # noqa: B018 - a port that is not a number in 0-65535 raises here
    except ValueError:
        return "is not a valid URL (check the host, and the port: a number from 0 to 65535)"
    db = parts.path.strip("/") if parts.scheme != "unix" else ""
    if db and not db.isdigit():
        return "the database (the URL's path) must be a number, e.g. redis://host:6379/0"
    if redis.cluster and parts.scheme == "unix":
        return "a Redis Cluster is reached over TCP: use redis:// or rediss://"
    if redis.cluster and db not in ("", "0"):
        return "a Redis Cluster has only database 0"
    return None


def _cache(r: _Reader) -> CacheConfig:
    r.known(*CacheConfig.__slots__)
    return _build(r, CacheConfig)


# --- auth, admin -----------------------------------------------------------------------------------------


def _auth(r: _Reader) -> dict[str, Any]:
    """``auth``: the fields Config.jwt and Config.auth_max_stale_seconds."""
    r.known("jwt", "max_stale_seconds")
    return {
        "jwt": _jwt(r.child("jwt")),
        "auth_max_stale_seconds": _scalar(r, Config, "auth_max_stale_seconds", "max_stale_seconds"),
    }


def _admin(r: _Reader) -> dict[str, Any]:
    """``admin``: the field Config.master_key_hash, from the key master_key."""
    r.known("master_key")
    master = r.get("master_key", str, "")
    return {"master_key_hash": hash_key(master) if master else None}


def _jwt(r: _Reader) -> JwtConfig | None:
    if not r.data:
        return None
    r.known(*JwtConfig.__slots__)
    jwt = _build(r, JwtConfig, algorithms=_algorithms)
    _positive(r, "jwks_refresh_seconds", jwt.jwks_refresh_seconds)
    if any(a.startswith("HS") for a in jwt.algorithms) and not jwt.secret:
        r.problem("secret", "is required for HS* algorithms")
    key_file, jwks_url = jwt.public_key_file, jwt.jwks_url
    if key_file and jwks_url:
        r.problem("jwks_url", "set either public_key_file or jwks_url, not both")
    elif any(not a.startswith("HS") for a in jwt.algorithms) and not key_file and not jwks_url:
        r.problem("public_key_file", "is required for RS*/ES*/PS*/EdDSA algorithms (or set jwks_url)")
    if key_file and not Path(key_file).is_file():
        r.problem("public_key_file", f"no such file: {key_file}")
    if jwks_url:
        _jwks_url(r, jwks_url)
    return jwt


def _algorithms(r: _Reader, key: str) -> tuple[str, ...]:
    algorithms = r.strings(key) or ()
    if not algorithms:
        r.problem(key, "is required (a list such as [RS256])")
    for alg in algorithms:
        if alg.lower() == "none":
            r.problem(key, '"none" is never allowed')
        elif not re.fullmatch(r"(HS|RS|ES|PS)(256|384|512)|EdDSA", alg):
            r.problem(key, f"unsupported algorithm {alg!r}")
    return algorithms


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _jwks_url(r: _Reader, url: str) -> None:
    """The JWKS endpoint: an absolute http(s) URL with a host (operator config, never client input)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        r.problem("jwks_url", "is not a valid URL")
        return
    if parts.scheme not in ("http", "https"):
        r.problem("jwks_url", "must start with http:// or https://")
    elif not parts.hostname:
        r.problem("jwks_url", "must name a host (http(s)://host/path)")
    elif parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        # SECURITY: whoever can alter this traffic could publish their own keys and sign any team's tokens.
        r.problem("jwks_url", "must use https:// (plain http:// only to a loopback address)")


# --- health, metrics, rate_limiting, plugins, graphql ----------------------------------------------------


def _health(r: _Reader) -> HealthConfig:
    r.known(*HealthConfig.__slots__)
    return _all_positive(r, _build(r, HealthConfig))


def _metrics(r: _Reader) -> MetricsConfig:
    r.known(*MetricsConfig.__slots__)
    return _build(r, MetricsConfig)


def _rate_limiting(r: _Reader) -> RateLimitingConfig:
    r.known(*RateLimitingConfig.__slots__)
    return _build(r, RateLimitingConfig)


def _plugins(root: _Reader) -> tuple[str, ...]:
    plugins: tuple[str, ...] = _scalar(root, Config, "plugins")
    auth_at = plugins.index("auth") if "auth" in plugins else None
    for i, name in enumerate(plugins):
        need = PLUGIN_NEEDS_IDENTITY.get(name)
        if need is None:
            root.problem(f"plugins[{i}]", f"unknown plugin {name!r} (known: {', '.join(KNOWN_PLUGINS)})")
        elif need != "none" and auth_at is not None and i < auth_at:
            # SECURITY: before auth every caller is anonymous to it: one cache namespace for all of them
            # (one team's answers served to callers with no key), limits and budgets that bind no one.
            harm = "every caller would share one namespace" if need == "after_auth" else "it binds no one"
            root.problem(
                f"plugins[{i}]",
                f"{name} is listed before auth but needs the caller's team ({harm}): list auth before {name}",
            )
        elif need == "required" and auth_at is None:
            root.problem(
                f"plugins[{i}]", f"{name} needs the caller's team, which auth sets: list auth before it"
            )
    if len(set(plugins)) != len(plugins):
        root.problem("plugins", "lists a plugin twice")
    return plugins


def _guardrails(r: _Reader) -> GuardrailsConfig:
    r.known(*GuardrailsConfig.__slots__)
    config = _build(r, GuardrailsConfig, rules=lambda r, key: tuple(_guardrail(x) for x in r.items(key)))
    _unique(r, "rules", [rule.name for rule in config.rules])
    if config.max_scan_chars < 1:
        r.problem("max_scan_chars", "must be at least 1")
    return config


def _guardrail(r: _Reader) -> GuardrailRule:
    r.known(*GuardrailRule.__slots__)
    rule = _build(r, GuardrailRule)
    if rule.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", rule.name):
        r.problem("name", "must be 1-64 letters, digits, '.', '_' or '-' (it is a metric label)")
    if rule.action and rule.action not in GUARDRAIL_ACTIONS:
        r.problem("action", f"must be one of {', '.join(GUARDRAIL_ACTIONS)}, got {rule.action!r}")
    if rule.applies_to not in GUARDRAIL_DIRECTIONS:
        r.problem("applies_to", f"must be one of {', '.join(GUARDRAIL_DIRECTIONS)}, got {rule.applies_to!r}")
    if rule.type == "moderation":
        if rule.pattern is not None or rule.detector is not None:
            r.problem("", "a moderation rule has no pattern or detector")
        if not rule.provider:
            r.problem("provider", "is required for a moderation rule")
        if rule.applies_to != "input":
            r.problem("applies_to", "a moderation rule applies to input only")
        if rule.action == "redact":
            r.problem("action", "a moderation rule can block or flag, not redact")
        if rule.timeout_seconds <= 0:
            r.problem("timeout_seconds", "must be positive")
    elif rule.type != "match":
        r.problem("type", f"must be match or moderation, got {rule.type!r}")
    elif (rule.pattern is None) == (rule.detector is None):
        r.problem("", "needs exactly one of pattern and detector")
    if rule.detector is not None and rule.detector not in DETECTORS:
        r.problem("detector", f"must be one of {', '.join(DETECTORS)}, got {rule.detector!r}")
    if rule.pattern is not None:
        try:
            compile_pattern(rule.pattern)
        except ValueError as exc:
            r.problem("pattern", str(exc))
    return rule


def _graphql(r: _Reader) -> GraphQLConfig:
    r.known(*GraphQLConfig.__slots__)
    return _all_positive(r, _build(r, GraphQLConfig))


# --- the entry points ------------------------------------------------------------------------------------


def parse(raw: Any, env: Mapping[str, str] | None = None, source: str = "<memory>") -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    data = interpolate(raw, os.environ if env is None else env, "", problems)
    config = _config(_Reader(data, "", problems), source)
    if problems:
        raise ConfigError(problems)
    return config


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (invalid byte at offset {exc.start})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return parse(raw, env, source=str(path))


def default_path() -> Path:
    """``config/gateway.yaml`` from the working directory, else the copy shipped with the package."""
    local = Path("config/gateway.yaml")
    if local.is_file():
        return local
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "config" / "gateway.yaml", here / "_config" / "gateway.yaml"):
        if candidate.is_file():
            return candidate
    return local
