"""Who is calling: team API keys (config or admin-created), JWTs, and the admin master key.

Keys are never stored or compared in plaintext: the presented key is hashed (SHA-256) once, looked
up by hash, and the stored hash compared in constant time. Runtime keys and teams are cached in
process for at most ``CACHE_TTL`` seconds, so a key revoked on one instance is refused by every
instance within that time.
"""

from __future__ import annotations

import datetime as dt
import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from multidict import CIMultiDictProxy

from gateway.config import Config, ConfigError, TeamConfig, hash_key, parse_team
from gateway.errors import AuthenticationFailed, ServiceUnavailable
from gateway.state.base import KeyRecord, Store, StoreUnavailable

CACHE_TTL = 1.0


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


def presented_key(headers: CIMultiDictProxy[str]) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("x-api-key") or None


class Authenticator:
    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.master_hash = config.master_key_hash
        self.model_names = {m.name for m in config.models}
        self.config_teams = {t.id: t for t in config.teams}
        self.config_keys = {h: t.id for t in config.teams for h in t.key_hashes}
        self.jwt = JwtVerifier(config) if config.jwt else None
        self._keys: dict[str, tuple[float, KeyRecord | None]] = {}
        # Presented key -> its SHA-256, so a busy key is not hashed on every request. Only digests are
        # ever stored or compared; this map lives in process memory like the request headers do.
        self._digests: dict[str, str] = {}
        self._teams: dict[str, tuple[float, TeamConfig | None]] = {}

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

    async def _from_key(self, token: str) -> Identity:
        digest = self._digests.get(token)
        if digest is None:
            if len(self._digests) >= 10_000:
                self._digests.clear()  # bounded: a flood of random keys cannot grow it
            digest = self._digests[token] = hash_key(token)
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
        claims = self.jwt.verify(token)
        admin = claims.get("role") == "admin"
        team_id = claims.get(self.jwt.team_claim)
        team = await self.team(team_id) if isinstance(team_id, str) else None
        if team is None and not admin:
            raise AuthenticationFailed("the token's team is unknown", code="unknown_team")
        return Identity(team=team, admin=admin)

    async def _key_record(self, digest: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._keys.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            record = await self.store.get_key(digest)
        except StoreUnavailable:
            if hit is not None:  # serve the last known answer while the store is away
                return hit[1]
            raise ServiceUnavailable("the key store is unavailable", code="state_store_unavailable") from None
        if len(self._keys) > 100_000:
            self._keys.clear()  # bound memory against floods of random keys
        self._keys[digest] = (now + CACHE_TTL, record)
        return record

    async def team(self, team_id: str) -> TeamConfig | None:
        """A team by id: config-defined teams win over runtime ones with the same id."""
        config_team = self.config_teams.get(team_id)
        if config_team is not None:
            return config_team
        now = time.monotonic()
        hit = self._teams.get(team_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            data = await self.store.get_team(team_id)
        except StoreUnavailable:
            if hit is not None:
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
        self._teams[team_id] = (now + CACHE_TTL, team)
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
    """Verifies team tokens: an algorithm allowlist (never ``none``), required exp/aud/iss."""

    def __init__(self, config: Config) -> None:
        settings = config.jwt
        assert settings is not None
        self.algorithms = list(settings.algorithms)
        self.audience, self.issuer, self.team_claim = settings.audience, settings.issuer, settings.team_claim
        self._secret = settings.secret
        self._keys: list[Any] = []
        if settings.public_key_file:
            self._keys = _load_public_keys(Path(settings.public_key_file))

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("invalid token", code="invalid_token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:  # SECURITY: the token never chooses an algorithm we did not allow
            raise AuthenticationFailed("token algorithm not allowed", code="invalid_token")
        keys: list[Any] = [self._secret] if str(alg).startswith("HS") else self._keys
        kid = header.get("kid")
        if kid is not None and len(self._keys) > 1 and not str(alg).startswith("HS"):
            keys = [k for k in self._keys if getattr(k, "key_id", None) == kid] or keys
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


def _load_public_keys(path: Path) -> list[Any]:
    """A PEM public key, or a JWKS document ({"keys": [...]}) from a file."""
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"{"):
        return list(jwt.PyJWKSet.from_dict(orjson.loads(raw)).keys)
    return [raw]
