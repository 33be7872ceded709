"""The configuration as frozen objects: what every other module reads.

``gateway.config_parser`` builds them from YAML (with ``${ENV}`` interpolation and validation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

PROVIDER_TYPES = ("openrouter", "deepseek", "anthropic", "openai", "mock")
# Provider types that cannot work without a key: with an empty key they count as "unconfigured".
KEYED_PROVIDER_TYPES = ("openrouter", "deepseek", "anthropic")
# What each plugin needs of the caller's identity, which only ``auth`` establishes (each plugin class
# declares the same as ``needs_identity``; the parser cannot import them, a test keeps the two equal):
#   "none"        it reads none (auth itself)
#   "after_auth"  it partitions by team when there is one (the cache): it must run after auth when auth
#                 is listed — before it, every caller is one anonymous tenant and one team's answers go
#                 to others; with no auth at all the gateway is keyless and single-tenant, which is fine
#   "required"    it acts per team and does nothing without one (limits, budgets): auth must run before it
IdentityNeed = Literal["none", "after_auth", "required"]
PLUGIN_NEEDS_IDENTITY: Mapping[str, IdentityNeed] = {
    "auth": "none",
    "rate_limit": "required",
    "quota": "required",
    "cache": "after_auth",
    "guardrails": "after_auth",  # a team's own rules (teams[].guardrails), else every rule
}
KNOWN_PLUGINS = tuple(PLUGIN_NEEDS_IDENTITY)
DEFAULT_PLUGINS = ("auth", "rate_limit", "quota", "cache")


class ConfigError(Exception):
    """Raised with the full list of problems found in a configuration."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 30.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str
    api_key: str = field(default="", repr=False)
    timeouts: Timeouts = Timeouts()
    headers: Mapping[str, str] = field(default_factory=dict)
    max_connections: int = 256
    probe_path: str | None = "/models"  # background health probe (GET base_url + path); None: off
    limits: Limits | None = None  # global, across all teams: protects the provider account
    allow_fields: tuple[str, ...] = ()  # steering fields passed through to it (gateway.steering)
    anthropic_version: str = "2023-06-01"  # type anthropic: the anthropic-version header it sends

    @property
    def configured(self) -> bool:
        return bool(self.api_key) or self.type not in KEYED_PROVIDER_TYPES


@dataclass(frozen=True, slots=True)
class TargetConfig:
    provider: str
    model: str
    limits: Limits | None = None  # global limit on this upstream (provider, model), across all teams


@dataclass(frozen=True, slots=True)
class Pricing:
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None
    image_per_mtok: float | None = None


@dataclass(frozen=True, slots=True)
class CapabilitiesConfig:
    """``models[].capabilities`` as configured; None: take the shipped default (gateway.capabilities)."""

    max_output_tokens: int | None = None
    strengths: tuple[str, ...] | None = None
    use_cases: tuple[str, ...] | None = None
    multimodal: bool | None = None


@dataclass(frozen=True, slots=True)
class ModelCacheConfig:
    """Per-model overrides of the global cache settings (None: inherit)."""

    enabled: bool | None = None
    ttl_seconds: int | None = None
    deterministic_only: bool | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    targets: tuple[TargetConfig, ...]
    # None: not configured. gateway.capabilities fills both from the shipped defaults (config wins),
    # so at run time a routed model's pricing is always set.
    pricing: Pricing | None = None
    context_window: int | None = None
    context_window_fallback: str | None = None  # a larger-window model for requests that do not fit
    capabilities: CapabilitiesConfig = CapabilitiesConfig()
    cache: ModelCacheConfig = ModelCacheConfig()
    allow_fields: tuple[str, ...] = ()  # steering fields passed through for it (gateway.steering)


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None


@dataclass(frozen=True, slots=True)
class Budgets:
    daily_usd: float | None = None
    monthly_usd: float | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class TeamConfig:
    id: str
    key_hashes: tuple[str, ...] = field(default=(), repr=False)
    models: tuple[str, ...] | None = None
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    model_limits: Mapping[str, Limits] = field(default_factory=dict)  # per team+model
    guardrails: tuple[str, ...] | None = None  # the guardrail rules for this team; None: every rule

    def public(self) -> dict[str, Any]:
        """The team as the admin API shows it: the config fields minus api_keys."""
        return {
            "id": self.id,
            "models": list(self.models) if self.models is not None else None,
            "limits": _present(self.limits),
            "budgets": _present(self.budgets),
            "model_limits": {m: _present(lim) for m, lim in self.model_limits.items()},
            "guardrails": list(self.guardrails) if self.guardrails is not None else None,
        }


def _present(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__ if getattr(obj, k) is not None}


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failures: int = 5
    cooldown_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    percent: float = 20.0  # retries in flight, as a share of requests in flight
    min_concurrency: int = 3  # retries always allowed in flight, whatever the share


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    retries: int = 1
    backoff_seconds: float = 0.2
    max_backoff_seconds: float = 5.0
    retry_after_cap_seconds: float = 10.0
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    # A model whose every target's provider lacks its API key routes here instead (the demo default).
    unconfigured_provider: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    shutdown_grace_seconds: float = 30.0
    # Slow and idle clients (gateway.protocol): a request's head must arrive within head_timeout of its
    # first byte (of the connection, for the first request), its body within body_timeout of the head;
    # an idle keep-alive connection is closed after keepalive_timeout.
    head_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    keepalive_timeout_seconds: float = 75.0
    max_connections: int = 10_000  # open client connections; more are answered 503 and closed
    # Browser front-ends on these origins may call the API (CORS); empty: no CORS headers at all.
    cors_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = field(repr=False)
    prefix: str = "llmgw"
    timeout_seconds: float = 0.5
    # While Redis is unreachable: rate limits fail open (a local per-instance limiter takes over),
    # budgets fail closed (503) unless these say otherwise.
    fail_open_limits: bool = True
    fail_open_budgets: bool = False
    # Redis Cluster: url names any node; commands go to the master of their key's slot.
    cluster: bool = False


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_seconds: float = 15.0  # background probes of providers and the state store
    timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    bearer_token: str | None = field(default=None, repr=False)  # set: /metrics requires it


@dataclass(frozen=True, slots=True)
class RateLimitingConfig:
    default_max_tokens: int = 1024  # reserved for completion when a request sets no max_tokens


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = False
    ttl_seconds: int = 3600
    max_ttl_seconds: int = 86400  # ceiling for a client's Cache-Control: max-age
    deterministic_only: bool = False  # cache only temperature 0 or seeded requests
    max_entry_bytes: int = 1024 * 1024  # larger answers are not stored
    max_memory_bytes: int = 64 * 1024 * 1024  # the in-memory LRU's bound (no Redis)
    shared: bool = False  # one namespace for all teams (off: each team only sees its own entries)
    coalesce: bool = True  # identical in-flight requests wait for the first one's answer
    coalesce_timeout_seconds: float = 30.0


GUARDRAIL_ACTIONS = ("block", "redact", "flag")
GUARDRAIL_DIRECTIONS = ("input", "output", "both")


@dataclass(frozen=True, slots=True)
class GuardrailRule:
    """One content rule (gateway.guardrails): a ``pattern`` (RE2 syntax) or a built-in ``detector``, or
    (``type: moderation``) a provider's OpenAI-style /moderations endpoint asked about the input."""

    name: str
    action: str  # block | redact | flag
    applies_to: str = "both"  # input | output | both
    pattern: str | None = None
    detector: str | None = None
    type: str = "match"  # match | moderation
    provider: str | None = None  # moderation: the provider whose /moderations endpoint is asked
    model: str | None = None  # moderation: the model to ask for (absent: the provider's default)
    timeout_seconds: float = 2.0  # moderation: how long to wait for its verdict
    fail_open: bool = True  # moderation unreachable or failing: let the request through (else 503)


@dataclass(frozen=True, slots=True)
class GuardrailsConfig:
    rules: tuple[GuardrailRule, ...] = ()
    # Text scanned per request at most: a request with more text is refused (413), never half-checked.
    max_scan_chars: int = 1_000_000


@dataclass(frozen=True, slots=True)
class GraphQLConfig:
    enabled: bool = True
    graphiql: bool = False  # the in-browser IDE at GET /graphql (it loads its assets from a CDN)
    introspection: bool = True
    legacy_protocol: bool = False  # the old graphql-ws subprotocol (auth is enforced on it too)
    max_depth: int = 10
    max_aliases: int = 15
    max_query_bytes: int = 16384
    max_tokens: int = 500  # lexical tokens per document: bounds graphql-core's quadratic validation
    max_subscriptions_per_connection: int = 10
    max_subscriptions_per_team: int = 100
    connection_init_timeout_seconds: float = 10.0
    keepalive_seconds: float = 15.0  # server pings on idle connections
    stream_subscribe_timeout_seconds: float = 30.0  # a started stream nobody subscribes to is cancelled


@dataclass(frozen=True, slots=True)
class JwtConfig:
    algorithms: tuple[str, ...]
    _: KW_ONLY  # the rest in the order the parser lists the keys of auth.jwt
    secret: str | None = field(default=None, repr=False)
    public_key_file: str | None = None
    jwks_url: str | None = None  # the IdP's JWKS endpoint (operator config), fetched and refreshed
    jwks_refresh_seconds: float = 300.0
    audience: str
    issuer: str
    team_claim: str = "team"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    providers: tuple[ProviderConfig, ...]
    models: tuple[ModelConfig, ...]
    teams: tuple[TeamConfig, ...] = ()
    routing: RoutingConfig = RoutingConfig()
    redis: RedisConfig | None = None
    cache: CacheConfig = CacheConfig()
    jwt: JwtConfig | None = None
    # auth.max_stale_seconds: how long a runtime key or team read from the store may still be served
    # while the store is unreachable (normally a lookup is at most 1 s old).
    auth_max_stale_seconds: float = 30.0
    master_key_hash: str | None = field(default=None, repr=False)
    rate_limiting: RateLimitingConfig = RateLimitingConfig()
    health: HealthConfig = HealthConfig()
    metrics: MetricsConfig = MetricsConfig()
    graphql: GraphQLConfig = GraphQLConfig()
    guardrails: GuardrailsConfig = GuardrailsConfig()
    plugins: tuple[str, ...] = DEFAULT_PLUGINS
    source: str = "<memory>"

    def provider(self, name: str) -> ProviderConfig:
        return next(p for p in self.providers if p.name == name)

    def secrets(self) -> list[str]:
        """Every secret this config holds, so tests and the log redactor can look for them."""
        found = [p.api_key for p in self.providers if p.api_key]
        if self.jwt and self.jwt.secret:
            found.append(self.jwt.secret)
        if self.jwt and self.jwt.jwks_url:
            jwks_password = urlsplit(self.jwt.jwks_url).password
            if jwks_password:
                found.append(jwks_password)
        if self.metrics.bearer_token:
            found.append(self.metrics.bearer_token)
        if self.redis is not None:
            password = urlsplit(self.redis.url).password
            if password:
                found.append(password)
        return found


def hash_key(key: str) -> str:
    """The one way an API key is stored and looked up: hex SHA-256 of the UTF-8 key."""
    return hashlib.sha256(key.encode()).hexdigest()
