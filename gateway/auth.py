"""Who is calling: team API keys (config or admin-created), JWTs, and the admin master key.

Keys are never stored or compared in plaintext: the presented key is hashed (SHA-256) once, looked
up by hash, and the stored hash compared in constant time. Runtime keys and teams are cached in
process for at most ``CACHE_TTL`` seconds, so a key revoked on one instance is refused by every
instance within that time.

JWT verification keys come from a PEM/JWKS file, or from the identity provider's JWKS URL: fetched at
start-up, refreshed in the background, and fetched again (single-flight, rate-limited) when a token
names a ``kid`` the current set lacks, so a key rotation needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import orjson
import structlog
from multidict import CIMultiDictProxy

from gateway.config import Config, ConfigError, TeamConfig, hash_key
from gateway.config_parser import parse_team
from gateway.errors import AuthenticationFailed, ServiceUnavailable
from gateway.state.base import Directory, KeyRecord, StoreUnavailable

CACHE_TTL = 1.0
JWKS_TIMEOUT = 5.0  # seconds for a whole JWKS fetch
JWKS_MAX_BYTES = 1024 * 1024

log = structlog.get_logger("gateway.auth")


@dataclass(frozen=True, slots=True)
class Identity:
    team: TeamConfig | None  # None only for the master key
    key: KeyRecord | None = None  # a runtime key's record (its own limits, budgets, allowlist)
    admin: bool = False

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    def allows(self, model: str) -> bool:
        for allow in (self.team.models if self.team else None, self.key.models if self.key else None):
            if allow is not None and model not in allow:
                return False
        return True


def tenant(identity: Identity | None) -> str:
    """Whose streams, tickets and counters these are: the caller's team, or one shared anonymous
    tenant when the gateway runs without auth (or for an admin without a team)."""
    return identity.team.id if identity is not None and identity.team is not None else "_anonymous"


def presented_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The key in ``Authorization: Bearer KEY`` or ``x-api-key: KEY``; None when there is none.

    SECURITY: a request that names its caller more than once is refused (401 ``ambiguous_credentials``),
    never settled by picking a copy: a proxy in front that checked the other copy would disagree with us
    about who is calling. Refused: either header sent twice (whatever the case of its name or its value,
    empty included), and both headers sent unless they carry the same key (``Authorization: Bearer K``
    with ``x-api-key: K``); an ``Authorization`` of another scheme with an ``x-api-key`` is refused too —
    its credential names some caller we cannot tell apart from the key's. 401, not the 400 RFC 6750 §3.1
    suggests for "more than one method": no caller was established, and every entry point (/v1, the
    native API, admin, usage, GraphQL) already answers ``AuthenticationFailed`` in its own shape.
    Messages never repeat the values."""
    authorization = _only(headers, "Authorization")
    api_key = _only(headers, "x-api-key")
    bearer = None
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            bearer = token.strip()
        if api_key is not None and api_key != bearer:
            raise AuthenticationFailed(
                "ambiguous credentials: 'Authorization' and 'x-api-key' do not carry the same key; send one",
                code="ambiguous_credentials",
            )
        return bearer
    return api_key or None


def _only(headers: CIMultiDictProxy[str], name: str) -> str | None:
    values = headers.getall(name, ())
    if len(values) > 1:
        raise AuthenticationFailed(
            f"ambiguous credentials: {len(values)} '{name}' headers; send one", code="ambiguous_credentials"
        )
    return values[0] if values else None


class Authenticator:
    def __init__(self, config: Config, store: Directory) -> None:
        self.store = store
        self.master_hash = config.master_key_hash
        self.model_names = {m.name for m in config.models}
        self.config_teams = {t.id: t for t in config.teams}
        self.config_keys = {h: t.id for t in config.teams for h in t.key_hashes}
        self.jwt = JwtVerifier(config) if config.jwt else None
        self.max_stale = config.auth_max_stale_seconds
        # digest / team id -> (when it was read from the store, what it said)
        self._keys: dict[str, tuple[float, KeyRecord | None]] = {}
        # Presented key -> its SHA-256, so a busy key is not hashed on every request. Only digests are
        # ever stored or compared; this map lives in process memory like the request headers do.
        self._digests: dict[str, str] = {}
        self._teams: dict[str, tuple[float, TeamConfig | None]] = {}

    async def start(self) -> None:
        """Fetch the JWT verification keys from a JWKS URL (if configured) and start their refresher."""
        if self.jwt is not None:
            await self.jwt.start()

    async def close(self) -> None:
        if self.jwt is not None:
            await self.jwt.close()

    async def identify(self, headers: CIMultiDictProxy[str]) -> Identity:
        token = presented_key(headers)
        if token is None:
            raise AuthenticationFailed(
                "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="missing_api_key",
            )
        if self.jwt is not None and token.count(".") == 2 and token.startswith("eyJ"):
            return await self._from_jwt(token)
        return await self._from_key(token)

    async def principal(self, headers: CIMultiDictProxy[str]) -> tuple[Identity, dict[str, Any]]:
        """Identify the caller, and describe them so ``from_principal`` can identify them again later
        (a browser's stream ticket) without keeping the credential: a key's SHA-256 (the form keys
        are stored in anyway), or a token's team and expiry."""
        token = presented_key(headers)
        identity = await self.identify(headers)
        assert token is not None
        if self.jwt is not None and token.count(".") == 2 and token.startswith("eyJ"):
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
            team = identity.team.id if identity.team else None
            return identity, {"team": team, "exp": exp if isinstance(exp, int | float) else None}
        return identity, {"digest": self._digest(token)}

    async def from_principal(self, principal: dict[str, Any]) -> Identity:
        """The identity ``principal`` described, checked again now (a key revoked since is refused)."""
        digest = principal.get("digest")
        if isinstance(digest, str):
            return await self._from_digest(digest)
        exp = principal.get("exp")
        if isinstance(exp, int | float) and exp <= time.time():
            raise AuthenticationFailed("the token has expired", code="token_expired")
        team_id = principal.get("team")
        team = await self.team(team_id) if isinstance(team_id, str) else None
        if team is None:
            raise AuthenticationFailed("the token's team is unknown", code="unknown_team")
        return Identity(team=team)

    def _digest(self, token: str) -> str:
        digest = self._digests.get(token)
        if digest is None:
            if len(self._digests) >= 10_000:
                self._digests.clear()  # bounded: a flood of random keys cannot grow it
            digest = self._digests[token] = hash_key(token)
        return digest

    async def _from_key(self, token: str) -> Identity:
        return await self._from_digest(self._digest(token))

    async def _from_digest(self, digest: str) -> Identity:
        if self.master_hash and hmac.compare_digest(digest, self.master_hash):
            return Identity(team=None, admin=True)
        team_id = self.config_keys.get(digest)
        if team_id is not None:
            return Identity(team=self.config_teams[team_id])
        record = await self._key_record(digest)
        # SECURITY: constant-time comparison of the stored hash, even after the lookup by hash.
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise AuthenticationFailed("invalid API key")
        if record.disabled:
            raise AuthenticationFailed("this API key is disabled", code="api_key_disabled")
        if record.expires_at and _parse_time(record.expires_at) <= dt.datetime.now(dt.UTC):
            raise AuthenticationFailed("this API key has expired", code="api_key_expired")
        team = await self.team(record.team)
        if team is None:
            raise AuthenticationFailed("this API key's team no longer exists")
        return Identity(team=team, key=record)

    async def _from_jwt(self, token: str) -> Identity:
        assert self.jwt is not None
        claims = await self.jwt.verify(token)
        admin = claims.get("role") == "admin"
        team_id = claims.get(self.jwt.team_claim)
        team = await self.team(team_id) if isinstance(team_id, str) else None
        if team is None and not admin:
            raise AuthenticationFailed("the token's team is unknown", code="unknown_team")
        return Identity(team=team, admin=admin)

    async def _key_record(self, digest: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._keys.get(digest)
        if hit is not None and now < hit[0] + CACHE_TTL:
            return hit[1]
        try:
            record = await self.store.get_key(digest)
        except StoreUnavailable:
            # SECURITY: while the store is away the last answer is served, but only up to
            # auth.max_stale_seconds after it was read: a key revoked just before an outage stops
            # working then, outage or not.
            if hit is not None and now < hit[0] + self.max_stale:
                return hit[1]
            raise ServiceUnavailable("the key store is unavailable", code="state_store_unavailable") from None
        if len(self._keys) > 100_000:
            self._keys.clear()  # bound memory against floods of random keys
        self._keys[digest] = (now, record)
        return record

    async def team(self, team_id: str) -> TeamConfig | None:
        """A team by id: config-defined teams win over runtime ones with the same id."""
        config_team = self.config_teams.get(team_id)
        if config_team is not None:
            return config_team
        now = time.monotonic()
        hit = self._teams.get(team_id)
        if hit is not None and now < hit[0] + CACHE_TTL:
            return hit[1]
        try:
            data = await self.store.get_team(team_id)
        except StoreUnavailable:
            if hit is not None and now < hit[0] + self.max_stale:  # as for keys, above
                return hit[1]
            raise ServiceUnavailable(
                "the team store is unavailable", code="state_store_unavailable"
            ) from None
        team = None
        if data is not None:
            try:
                team = parse_team(data, self.model_names)
            except ConfigError:
                team = None
        if len(self._teams) > 100_000:
            self._teams.clear()  # bound memory: token team claims are not a closed set
        self._teams[team_id] = (now, team)
        return team

    def forget(self, key_hash: str | None = None, team_id: str | None = None) -> None:
        """Drop cached entries on this instance at once (other instances expire within CACHE_TTL)."""
        if key_hash is not None:
            self._keys.pop(key_hash, None)
        if team_id is not None:
            self._teams.pop(team_id, None)


def _parse_time(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class JwtVerifier:
    """Verifies team tokens: an algorithm allowlist (never ``none``), required exp/aud/iss.

    Asymmetric keys come from ``public_key_file`` (read once) or ``jwks_url`` (see ``start``). With a URL,
    a token whose ``kid`` is not in the current set triggers a fetch at most once per
    ``on_demand_interval`` seconds; concurrent requests share one fetch. A failed fetch keeps the last
    good keys; with none ever obtained, such a token is answered 503 (the gateway's fault, not the client's).
    """

    on_demand_interval = 10.0  # at most one fetch for unknown kids per this many seconds

    def __init__(self, config: Config) -> None:
        settings = config.jwt
        assert settings is not None
        self.algorithms = list(settings.algorithms)
        self.audience, self.issuer, self.team_claim = settings.audience, settings.issuer, settings.team_claim
        self._secret = settings.secret
        self._keys: list[Any] = []
        if settings.public_key_file:
            self._keys = _load_public_keys(Path(settings.public_key_file))
        self._url = settings.jwks_url
        self._refresh_seconds = settings.jwks_refresh_seconds
        self._kids: frozenset[str] = frozenset()
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._fetch: asyncio.Task[bool] | None = None  # the fetch under way, shared by every waiter
        self._last_on_demand = -math.inf
        self._failing = False  # in a streak of failed fetches (logged once per streak)

    async def start(self) -> None:
        """With a JWKS URL: fetch the keys now (a failure is logged, not fatal), then keep them fresh."""
        if self._url is None or self._refresher is not None:
            return
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, self._fetch) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._refresher = self._fetch = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _refresh_loop(self) -> None:
        while True:
            # While fetches fail, retry sooner (bounded like on-demand fetches) than the regular refresh.
            delay = self._refresh_seconds
            if self._failing:
                delay = min(delay, self.on_demand_interval)
            await asyncio.sleep(delay)
            await self.refresh()

    async def refresh(self) -> bool:
        """Fetch the JWKS now, or join the fetch already under way. True when the keys were replaced."""
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.get_running_loop().create_task(self._fetch_keys())
        # shield: a waiter that goes away (client disconnect) does not cancel the fetch others share.
        return await asyncio.shield(self._fetch)

    async def _on_demand(self) -> None:
        """A token needs a key we do not have: join a fetch under way, or start one if the window allows."""
        if self._fetch is not None and not self._fetch.done():
            await asyncio.shield(self._fetch)
            return
        now = time.monotonic()
        if now - self._last_on_demand < self.on_demand_interval:
            return  # rate limit: made-up kids cannot make the gateway hammer the identity provider
        self._last_on_demand = now
        await self.refresh()

    async def _fetch_keys(self) -> bool:
        assert self._url is not None
        try:
            async with asyncio.timeout(JWKS_TIMEOUT):
                raw = await self._download(self._url)
            keys = _parse_jwks(raw)
        except Exception as exc:  # a broken or unreachable IdP must never break request handling
            if not self._failing:
                log.warning(
                    "jwks_refresh_failed",
                    url=_loggable_url(self._url),
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    keeping_keys=len(self._keys),
                )
            self._failing = True
            return False
        kids = frozenset(k.key_id for k in keys if isinstance(k.key_id, str))
        if self._failing or kids != self._kids or not self._keys:
            log.info("jwks_loaded", url=_loggable_url(self._url), keys=len(keys), recovered=self._failing)
        self._keys, self._kids, self._failing = keys, kids, False
        return True

    async def _download(self, url: str) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=JWKS_TIMEOUT),
                trust_env=False,  # no ambient proxies or .netrc credentials
                headers={"Accept": "application/jwk-set+json, application/json"},
            )
        # SECURITY: redirects are never followed; a 3xx, like any answer but 200, is a failed fetch.
        async with self._session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise _JwksError(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > JWKS_MAX_BYTES:
                raise _JwksError("the JWKS is larger than 1 MiB")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise _JwksError("the JWKS is larger than 1 MiB")
            return bytes(body)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or AuthenticationFailed (401); ServiceUnavailable (503) when a JWKS URL is
        configured but no keys could ever be fetched. Awaits only when a fetch is needed."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("invalid token", code="invalid_token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:  # SECURITY: the token never chooses an algorithm we did not allow
            raise AuthenticationFailed("token algorithm not allowed", code="invalid_token")
        if str(alg).startswith("HS"):
            return self._decode(token, alg, [self._secret])
        kid = header.get("kid")
        if self._url is not None and (not self._keys or (isinstance(kid, str) and kid not in self._kids)):
            await self._on_demand()  # key rotation: the IdP may have published this kid since
            if not self._keys:
                raise ServiceUnavailable(
                    "the identity provider's signing keys (JWKS) are unavailable", code="jwks_unavailable"
                )
        keys: list[Any] = self._keys
        if kid is not None and len(keys) > 1:
            keys = [k for k in keys if getattr(k, "key_id", None) == kid] or keys
        return self._decode(token, alg, keys)

    def _decode(self, token: str, alg: str, keys: list[Any]) -> dict[str, Any]:
        last: Exception | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key=getattr(key, "key", key),
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                    options={"require": ["exp", "aud", "iss"]},
                )
                return claims
            except jwt.ExpiredSignatureError:
                raise AuthenticationFailed("token expired", code="token_expired") from None
            except jwt.PyJWTError as exc:
                last = exc
        reason = "invalid token" if last is None else f"invalid token ({type(last).__name__})"
        raise AuthenticationFailed(reason, code="invalid_token")


class _JwksError(Exception):
    pass


def _parse_jwks(raw: bytes) -> list[Any]:
    """The usable public signing keys of a JWKS document; raises when there is none."""
    doc = orjson.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise _JwksError('not a JWKS document ({"keys": [...]})')
    # Signing keys only, never shared secrets ("oct"); PyJWKSet skips the keys pyjwt cannot use.
    candidates = [
        k
        for k in doc["keys"]
        if isinstance(k, dict) and k.get("kty") != "oct" and k.get("use", "sig") == "sig"
    ]
    return list(jwt.PyJWKSet(candidates).keys)


def _loggable_url(url: str) -> str:
    """The URL without credentials or query string, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _load_public_keys(path: Path) -> list[Any]:
    """A PEM public key, or a JWKS document ({"keys": [...]}) from a file."""
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"{"):
        return list(jwt.PyJWKSet.from_dict(orjson.loads(raw)).keys)
    return [raw]
