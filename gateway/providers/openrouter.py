"""OpenRouter: Claude, Gemini and others behind one OpenAI-compatible API.

Quirks handled by the relay: ``: OPENROUTER PROCESSING`` comment lines while a request is queued
(they do not count as data for the idle timeout), errors delivered as a ``data:`` event inside a
200 stream (fallback while nothing reached the client, an SSE error after), and ``usage.cost``
(the gateway's cost accounting prefers it to its own price table).
"""

from gateway.providers.base import Provider


class OpenRouterProvider(Provider):
    type = "openrouter"

    def default_headers(self) -> dict[str, str]:
        # Attribution headers are optional; set them in config as
        # headers: {HTTP-Referer: https://your.app, X-Title: Your App}
        return {}
