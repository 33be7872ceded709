"""Authentication and the model allowlist: every request names a team (API key or JWT)."""

from __future__ import annotations

from typing import ClassVar

from aiohttp import web

from gateway.config import IdentityNeed, ModelConfig
from gateway.context import RequestContext
from gateway.errors import NotFound, PermissionDenied
from gateway.pipeline import Services


class AuthPlugin:
    name: ClassVar[str] = "auth"
    declares_checks_only: ClassVar[bool] = False
    needs_identity: ClassVar[IdentityNeed] = "none"

    def __init__(self, services: Services) -> None:
        self.auth = services.auth

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        identity = ctx.presented or await self.auth.identify(ctx.headers)
        if identity.team is None:
            raise PermissionDenied(
                "the master key is for the admin API; use a team key for model calls",
                code="admin_key_not_allowed",
            )
        ctx.team, ctx.key_id = identity.team.id, identity.key_id
        # Refused requests stop here, before the limit plugins: they take no rate-limit tokens and
        # never appear in the usage report (ctx.identity stays None until the caller is admitted).
        if not ctx.model.targets:
            raise NotFound(
                f"the model {ctx.model_name!r} does not exist", param="model", code="model_not_found"
            )
        if not identity.allows(ctx.model.name):
            raise PermissionDenied(
                f"your team may not use the model {ctx.model.name!r}", param="model", code="model_not_allowed"
            )
        ctx.identity = identity
        return None

    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        return None  # nothing of this plugin depends on the model

    def finish(self, ctx: RequestContext) -> None:
        return None
