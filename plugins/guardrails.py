"""Content guardrails on what a request sends (``guardrails.rules`` with ``applies_to`` input or both):
block, redact or flag, before anything goes upstream. ``gateway.guardrails`` holds the rules and the
detectors; this plugin only applies them to each request, with the caller's team's own list. The
output rules run where the answer comes back (``gateway.completion``), with the same ``Guard``."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from aiohttp import web

from gateway.config import IdentityNeed, ModelConfig
from gateway.context import RequestContext
from gateway.errors import InvalidRequest
from gateway.guardrails.engine import INLINE_BYTES, Guard
from gateway.pipeline import Services


class GuardrailsPlugin:
    name: ClassVar[str] = "guardrails"
    declares_checks_only: ClassVar[bool] = False
    needs_identity: ClassVar[IdentityNeed] = "after_auth"

    def __init__(self, services: Services) -> None:
        self.guard = services.guard if services.guard is not None else Guard(services.config)

    async def admit(self, ctx: RequestContext) -> web.StreamResponse | None:
        n = ctx.body.get("n")
        if isinstance(n, int) and n > 1 and self.guard.output_rules(ctx.identity):
            raise InvalidRequest(
                "n > 1 cannot be combined with the output guardrails that apply to this key", param="n"
            )
        rules = self.guard.input_rules(ctx.identity)
        if not rules:
            return None
        if ctx.body_size <= INLINE_BYTES:  # the usual request: checked in microseconds, right here
            self.guard.check_input(ctx.body, ctx.endpoint, rules, ctx.request_id)
        else:  # a long text takes milliseconds (linear, but long): never on the event loop
            await asyncio.to_thread(self.guard.check_input, ctx.body, ctx.endpoint, rules, ctx.request_id)
        if any(r.moderation is not None for r in rules):  # last: it sees the redacted text
            await self.guard.moderate(ctx.body, ctx.endpoint, rules, ctx.request_id)
        return None

    def switch_model(self, ctx: RequestContext, old: ModelConfig) -> None:
        return None

    def finish(self, ctx: RequestContext) -> None:
        return None
