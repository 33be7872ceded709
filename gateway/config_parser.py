"""Configuration: YAML with ``${ENV}`` / ``${ENV:-default}`` interpolation → ``gateway.config`` objects.

This is the only module that reads the environment. Validation collects *every* problem with the
dotted path of the offending key, so ``llm-gateway check-config`` can print them all at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from gateway.config import (
    DEFAULT_PLUGINS,
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
from gateway.steering import STEERING_FIELDS

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


def _positive(r: _Reader, name: str, value: float, minimum: float = 0.0) -> None:
    if value <= minimum:
        r.problem(name, f"must be greater than {minimum:g}")


def _timeouts(r: _Reader) -> Timeouts:
    r.known("connect", "first_byte", "idle", "total")
    d = Timeouts()
    t = Timeouts(
        connect=r.get("connect", float, d.connect),
        first_byte=r.get("first_byte", float, d.first_byte),
        idle=r.get("idle", float, d.idle),
        total=r.get("total", float, d.total),
    )
    for name in ("connect", "first_byte", "idle", "total"):
        _positive(r, name, getattr(t, name))
    return t


def _provider(r: _Reader) -> ProviderConfig:
    r.known(
        "name",
        "type",
        "base_url",
        "api_key",
        "timeouts",
        "headers",
        "max_connections",
        "probe_path",
        "limits",
        "allow_fields",
    )
    name = r.get("name", str, "", required=True)
    kind = r.get("type", str, "openai", required=True)
    if kind not in PROVIDER_TYPES:
        r.problem("type", f"must be one of {', '.join(PROVIDER_TYPES)}, got {kind!r}")
    base_url = r.get("base_url", str, "").rstrip("/")
    if kind != "mock" and not base_url:
        r.problem("base_url", "is required")
    elif base_url and not base_url.startswith(("http://", "https://")):
        r.problem("base_url", "must start with http:// or https://")
    headers = r.data.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        r.problem("headers", "must be a mapping of header names to strings")
        headers = {}
    return ProviderConfig(
        name=name,
        type=kind,
        base_url=base_url,
        api_key=r.get("api_key", str, ""),
        timeouts=_timeouts(r.child("timeouts")),
        headers={str(k): v for k, v in headers.items()},
        max_connections=r.get("max_connections", int, 256),
        probe_path=(r.get("probe_path", str, "/models") or None)
        if r.data.get("probe_path") is not False
        else None,
        limits=_limits(r.child("limits")) if r.data.get("limits") is not None else None,
        allow_fields=_allow_fields(r),
    )


def _allow_fields(r: _Reader) -> tuple[str, ...]:
    """``allow_fields``: steering fields (``gateway.steering``) this provider or model passes through."""
    names = r.strings("allow_fields") or ()
    for i, name in enumerate(names):
        if name not in STEERING_FIELDS:
            r.problem(
                f"allow_fields[{i}]",
                f"{name!r} is never stripped (allowed: {', '.join(sorted(STEERING_FIELDS))})",
            )
    return names


def _model(r: _Reader, provider_names: set[str]) -> ModelConfig:
    r.known(
        "name",
        "targets",
        "pricing",
        "context_window",
        "context_window_fallback",
        "capabilities",
        "cache",
        "allow_fields",
    )
    targets = []
    for t in r.items("targets"):
        t.known("provider", "model", "limits")
        target = TargetConfig(
            t.get("provider", str, "", required=True),
            t.get("model", str, "", required=True),
            _limits(t.child("limits")) if t.data.get("limits") is not None else None,
        )
        if target.provider and target.provider not in provider_names:
            t.problem("provider", f"unknown provider {target.provider!r}")
        targets.append(target)
    if not targets:
        r.problem("targets", "needs at least one target")
    pricing = _pricing(r.child("pricing")) if r.data.get("pricing") is not None else None
    window = r.get("context_window", int, 0)
    if "context_window" in r.data and r.data["context_window"] not in (None, "") and window < 1:
        r.problem("context_window", "must be at least 1 (omit it for no limit)")
    mc = r.child("cache")
    mc.known("enabled", "ttl_seconds", "deterministic_only")
    unset_b: bool | None = None
    unset_i: int | None = None
    cache = ModelCacheConfig(
        mc.get("enabled", bool, unset_b),
        mc.get("ttl_seconds", int, unset_i),
        mc.get("deterministic_only", bool, unset_b),
    )
    return ModelConfig(
        r.get("name", str, "", required=True),
        tuple(targets),
        pricing,
        window or None,
        cache,
        context_window_fallback=r.get("context_window_fallback", str, "") or None,
        capabilities=_capabilities(r.child("capabilities")),
        allow_fields=_allow_fields(r),
    )


def _pricing(p: _Reader) -> Pricing:
    p.known("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "image_per_mtok")
    cached = p.get("cached_input_per_mtok", float, -1.0)
    image = p.get("image_per_mtok", float, -1.0)
    return Pricing(
        p.get("input_per_mtok", float, 0.0),
        p.get("output_per_mtok", float, 0.0),
        None if cached < 0 else cached,
        None if image < 0 else image,
    )


def _capabilities(r: _Reader) -> CapabilitiesConfig:
    r.known("max_output_tokens", "strengths", "use_cases", "multimodal")
    none_i: int | None = None
    none_b: bool | None = None
    caps = CapabilitiesConfig(
        max_output_tokens=r.get("max_output_tokens", int, none_i),
        strengths=r.strings("strengths"),
        use_cases=r.strings("use_cases"),
        multimodal=r.get("multimodal", bool, none_b),
    )
    if caps.max_output_tokens is not None and caps.max_output_tokens < 1:
        r.problem("max_output_tokens", "must be at least 1 (omit it to use the shipped default)")
    return caps


def _window_fallbacks(r: _Reader, models: list[ModelConfig]) -> None:
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


def _limits(r: _Reader) -> Limits:
    r.known("rpm", "tpm", "max_parallel")
    none: int | None = None
    limits = Limits(r.get("rpm", int, none), r.get("tpm", int, none), r.get("max_parallel", int, none))
    for name in ("rpm", "tpm", "max_parallel"):
        value = getattr(limits, name)
        if value is not None and value < 1:
            r.problem(name, "must be at least 1 (omit it for no limit)")
    return limits


def parse_team(data: Any, model_names: set[str], *, path: str = "", with_keys: bool = False) -> TeamConfig:
    """Validate one team (a ``teams`` entry, or an admin API body); raise ConfigError on problems."""
    problems: list[str] = []
    r = _Reader(data, path, problems)
    if not with_keys and "api_keys" in r.data:
        r.problem("api_keys", "keys are created with POST /admin/keys, not set on a team")
    team = _team(r, model_names)
    if problems:
        raise ConfigError(problems)
    return team


def _team(r: _Reader, model_names: set[str]) -> TeamConfig:
    r.known("id", "api_keys", "models", "limits", "budgets", "model_limits")
    hashes = []
    for i, key in enumerate(r.strings("api_keys") or ()):
        if key.startswith("sha256:"):
            digest = key[7:].lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                r.problem(f"api_keys[{i}]", "sha256: must be followed by 64 hex digits")
            hashes.append(digest)
        elif key:
            hashes.append(hash_key(key))
    models = r.strings("models")
    for m in models or ():
        if m not in model_names:
            r.problem("models", f"unknown model {m!r}")
    per_model = {}
    ml = r.child("model_limits")
    for m in ml.data:
        if m not in model_names:
            ml.problem(str(m), "unknown model")
        per_model[str(m)] = _limits(ml.child(str(m)))
    bud = r.child("budgets")
    bud.known("daily_usd", "monthly_usd", "daily_tokens", "monthly_tokens")
    none_i: int | None = None
    none_f: float | None = None
    team_id = r.get("id", str, "", required=True)
    if team_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", team_id):
        r.problem("id", "must be 1-64 letters, digits, '.', '_' or '-'")
    return TeamConfig(
        id=team_id,
        key_hashes=tuple(hashes),
        models=models,
        limits=_limits(r.child("limits")),
        model_limits=per_model,
        budgets=Budgets(
            bud.get("daily_usd", float, none_f),
            bud.get("monthly_usd", float, none_f),
            bud.get("daily_tokens", int, none_i),
            bud.get("monthly_tokens", int, none_i),
        ),
    )


def _routing(r: _Reader, provider_names: set[str]) -> RoutingConfig:
    r.known(
        "retries",
        "backoff_seconds",
        "max_backoff_seconds",
        "retry_after_cap_seconds",
        "circuit_breaker",
        "retry_budget",
        "unconfigured_provider",
    )
    rb = r.child("retry_budget")
    rb.known("percent", "min_concurrency")
    budget = RetryBudgetConfig(rb.get("percent", float, 20.0), rb.get("min_concurrency", int, 3))
    if budget.percent > 100:
        rb.problem("percent", "must be at most 100")
    cb = r.child("circuit_breaker")
    cb.known("failures", "cooldown_seconds")
    breaker = CircuitBreakerConfig(cb.get("failures", int, 5), cb.get("cooldown_seconds", float, 30.0))
    _positive(cb, "failures", breaker.failures)
    fallback = r.get("unconfigured_provider", str, "") or None
    if fallback and fallback not in provider_names:
        r.problem("unconfigured_provider", f"unknown provider {fallback!r}")
    return RoutingConfig(
        retries=r.get("retries", int, 1),
        backoff_seconds=r.get("backoff_seconds", float, 0.2),
        max_backoff_seconds=r.get("max_backoff_seconds", float, 5.0),
        retry_after_cap_seconds=r.get("retry_after_cap_seconds", float, 10.0),
        circuit_breaker=breaker,
        retry_budget=budget,
        unconfigured_provider=fallback,
    )


def _scalars(r: _Reader, defaults: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Each named field of a config section, read with the type and default of ``defaults``'s field:
    a key is named once, in its dataclass."""
    return {name: r.get(name, type(getattr(defaults, name)), getattr(defaults, name)) for name in names}


def _graphql(r: _Reader) -> GraphQLConfig:
    r.known(*GraphQLConfig.__slots__)
    config = GraphQLConfig(**_scalars(r, GraphQLConfig(), GraphQLConfig.__slots__))
    for name in GraphQLConfig.__slots__:
        value = getattr(config, name)
        if not isinstance(value, bool) and value <= 0:
            r.problem(name, "must be greater than 0")
    return config


def _jwt(r: _Reader) -> JwtConfig | None:
    if not r.data:
        return None
    r.known(
        "algorithms",
        "secret",
        "public_key_file",
        "jwks_url",
        "jwks_refresh_seconds",
        "audience",
        "issuer",
        "team_claim",
    )
    algorithms = r.strings("algorithms") or ()
    if not algorithms:
        r.problem("algorithms", "is required (a list such as [RS256])")
    for alg in algorithms:
        if alg.lower() == "none":
            r.problem("algorithms", '"none" is never allowed')
        elif not re.fullmatch(r"(HS|RS|ES|PS)(256|384|512)|EdDSA", alg):
            r.problem("algorithms", f"unsupported algorithm {alg!r}")
    secret = r.get("secret", str, "") or None
    key_file = r.get("public_key_file", str, "") or None
    jwks_url = r.get("jwks_url", str, "") or None
    jwks_refresh = r.get("jwks_refresh_seconds", float, 300.0)
    _positive(r, "jwks_refresh_seconds", jwks_refresh)
    if any(a.startswith("HS") for a in algorithms) and not secret:
        r.problem("secret", "is required for HS* algorithms")
    if key_file and jwks_url:
        r.problem("jwks_url", "set either public_key_file or jwks_url, not both")
    elif any(not a.startswith("HS") for a in algorithms) and not key_file and not jwks_url:
        r.problem("public_key_file", "is required for RS*/ES*/PS*/EdDSA algorithms (or set jwks_url)")
    if key_file and not Path(key_file).is_file():
        r.problem("public_key_file", f"no such file: {key_file}")
    if jwks_url:
        _jwks_url(r, jwks_url)
    return JwtConfig(
        algorithms=algorithms,
        audience=r.get("audience", str, "", required=True),
        issuer=r.get("issuer", str, "", required=True),
        team_claim=r.get("team_claim", str, "team"),
        secret=secret,
        public_key_file=key_file,
        jwks_url=jwks_url,
        jwks_refresh_seconds=jwks_refresh,
    )


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


def _target_limits_agree(r: _Reader, models: list[ModelConfig]) -> None:
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


def _unique(r: _Reader, what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n and n in seen:
            r.problem(what, f"duplicate name {n!r}")
        seen.add(n)


def _redis_url_problem(url: str) -> str | None:
    """What would make the store fail at start-up or on every connect (never echoing the URL: it may
    hold a password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number in 0-65535 raises here
    except ValueError:
        return "is not a valid URL (check the host, and the port: a number from 0 to 65535)"
    db = parts.path.strip("/") if parts.scheme != "unix" else ""
    if db and not db.isdigit():
        return "the database (the URL's path) must be a number, e.g. redis://host:6379/0"
    return None


def parse(raw: Any, env: Mapping[str, str] | None = None, source: str = "<memory>") -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    data = interpolate(raw, os.environ if env is None else env, "", problems)
    root = _Reader(data, "", problems)
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
    )

    s = root.child("server")
    s.known(*ServerConfig.__slots__)
    origins = s.strings("cors_origins") or ()
    for origin in origins:
        # SECURITY: exact origins only (scheme://host[:port]); "*" would let any site use a key a
        # browser holds, and a path or trailing slash never matches a browser's Origin header.
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?", origin):
            s.problem("cors_origins", f"{origin!r} is not an origin like https://app.example.com")
    scalars = tuple(name for name in ServerConfig.__slots__ if name != "cors_origins")
    server = ServerConfig(**_scalars(s, ServerConfig(), scalars), cors_origins=tuple(origins))
    if not 0 <= server.port <= 65535:
        s.problem("port", "must be between 0 and 65535")
    for name in ("head_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
        _positive(s, name, getattr(server, name))
    _positive(s, "max_connections", server.max_connections)

    providers = [_provider(p) for p in root.items("providers")]
    if not providers:
        root.problem("providers", "needs at least one provider")
    _unique(root, "providers", [p.name for p in providers])
    provider_names = {p.name for p in providers}

    models = [_model(m, provider_names) for m in root.items("models")]
    if not models:
        root.problem("models", "needs at least one model")
    _unique(root, "models", [m.name for m in models])
    _target_limits_agree(root, models)
    _window_fallbacks(root, models)
    model_names = {m.name for m in models}

    teams = [_team(t, model_names) for t in root.items("teams")]
    _unique(root, "teams", [t.id for t in teams])

    routing = _routing(root.child("routing"), provider_names)

    redis = None
    rc = root.child("redis")
    rc.known("url", "prefix", "timeout_seconds", "fail_open_limits", "fail_open_budgets", "cluster")
    if rc.get("url", str, ""):
        redis = RedisConfig(
            url=rc.get("url", str, ""),
            prefix=rc.get("prefix", str, "llmgw"),
            timeout_seconds=rc.get("timeout_seconds", float, 0.5),
            fail_open_limits=rc.get("fail_open_limits", bool, True),
            fail_open_budgets=rc.get("fail_open_budgets", bool, False),
            cluster=rc.get("cluster", bool, False),
        )
        if not redis.url.startswith(("redis://", "rediss://", "unix://")):
            rc.problem("url", "must start with redis://, rediss:// or unix://")
        elif (problem := _redis_url_problem(redis.url)) is not None:
            rc.problem("url", problem)
        elif redis.cluster and redis.url.startswith("unix://"):
            rc.problem("url", "a Redis Cluster is reached over TCP: use redis:// or rediss://")
        elif redis.cluster and urlsplit(redis.url).path.strip("/") not in ("", "0"):
            rc.problem("url", "a Redis Cluster has only database 0")

    c = root.child("cache")
    c.known(
        "enabled",
        "ttl_seconds",
        "max_ttl_seconds",
        "deterministic_only",
        "max_entry_bytes",
        "max_memory_bytes",
        "shared",
        "coalesce",
        "coalesce_timeout_seconds",
    )
    d = CacheConfig()
    cache = CacheConfig(
        enabled=c.get("enabled", bool, d.enabled),
        ttl_seconds=c.get("ttl_seconds", int, d.ttl_seconds),
        max_ttl_seconds=c.get("max_ttl_seconds", int, d.max_ttl_seconds),
        deterministic_only=c.get("deterministic_only", bool, d.deterministic_only),
        max_entry_bytes=c.get("max_entry_bytes", int, d.max_entry_bytes),
        max_memory_bytes=c.get("max_memory_bytes", int, d.max_memory_bytes),
        shared=c.get("shared", bool, d.shared),
        coalesce=c.get("coalesce", bool, d.coalesce),
        coalesce_timeout_seconds=c.get("coalesce_timeout_seconds", float, d.coalesce_timeout_seconds),
    )

    a = root.child("auth")
    a.known("jwt", "max_stale_seconds")
    jwt = _jwt(a.child("jwt"))
    max_stale = a.get("max_stale_seconds", float, 30.0)

    adm = root.child("admin")
    adm.known("master_key")
    master = adm.get("master_key", str, "")

    hc = root.child("health")
    hc.known("interval_seconds", "timeout_seconds")
    health = HealthConfig(hc.get("interval_seconds", float, 15.0), hc.get("timeout_seconds", float, 5.0))
    _positive(hc, "interval_seconds", health.interval_seconds)
    _positive(hc, "timeout_seconds", health.timeout_seconds)
    mc = root.child("metrics")
    mc.known("bearer_token")
    metrics = MetricsConfig(mc.get("bearer_token", str, "") or None)

    rl = root.child("rate_limiting")
    rl.known("default_max_tokens")
    rate_limiting = RateLimitingConfig(rl.get("default_max_tokens", int, 1024))

    plugins = root.strings("plugins")
    if plugins is None:
        plugins = DEFAULT_PLUGINS
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

    if problems:
        raise ConfigError(problems)
    return Config(
        server=server,
        providers=tuple(providers),
        models=tuple(models),
        teams=tuple(teams),
        routing=routing,
        redis=redis,
        cache=cache,
        jwt=jwt,
        auth_max_stale_seconds=max_stale,
        master_key_hash=hash_key(master) if master else None,
        plugins=plugins,
        rate_limiting=rate_limiting,
        health=health,
        metrics=metrics,
        graphql=_graphql(root.child("graphql")),
        source=source,
    )


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
