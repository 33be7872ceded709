"""Claude, directly: Anthropic's Messages API (``POST {base_url}/v1/messages``).

The key goes in ``x-api-key`` with ``anthropic-version`` (``providers[].anthropic_version``);
``/v1/chat/completions`` and the native API are translated both ways by ``gateway.formats.anthropic``.
Anthropic's 529 "overloaded" is a 5xx: retried and fallen back from like a 503.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.formats import anthropic
from gateway.providers.base import Provider


class AnthropicProvider(Provider):
    type = "anthropic"
    translates = True
    wire = "anthropic"
    chat_path = "/v1/messages"

    def credentials(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def default_headers(self) -> dict[str, str]:
        return {"anthropic-version": self.config.anthropic_version}

    def chat_body(self, body: dict[str, Any], model: str, max_output_tokens: int | None) -> bytes:
        return orjson.dumps(anthropic.chat_to_messages(body, model, max_output_tokens))

    def chat_answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        return anthropic.message_to_chat(answer)

    def chat_stream(self) -> Callable[[bytes], bytes]:
        return anthropic.ChatStream().feed
