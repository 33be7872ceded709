"""The provider interface: one pooled ``ClientSession`` per provider and the upstream request.

Routing, retries and timeouts live in ``gateway.routing``; a provider only knows how to reach its
upstream. Adapters differ in the headers they add and in the quirks ``gateway.relay`` tolerates
(comment lines, errors inside 200 streams), so they stay small.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp
import yarl

from gateway.config import ProviderConfig

USER_AGENT = "llm-gateway/0.1"


class Provider:
    type: ClassVar[str] = "openai"
    # Statuses after which the next target is tried (other 4xx are the caller's mistake).
    # 401/403 mean *our* provider key is wrong: another provider may still serve the call.
    fallback_statuses: ClassVar[frozenset[int]] = frozenset({401, 402, 403, 408, 409, 429})

    def __init__(self, config: ProviderConfig, base_url: str | None = None) -> None:
        self.config = config
        self.name = config.name
        self.base_url = (base_url or config.base_url).rstrip("/")
        self.timeouts = config.timeouts
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, yarl.URL] = {}  # parsed once per path, not per request
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **self.default_headers(),
            **config.headers,
        }
        if config.api_key:
            headers.update(self.credentials(config.api_key))
        self.headers: Mapping[str, str] = headers

    def default_headers(self) -> dict[str, str]:
        return {}

    def credentials(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    # The wire format. An OpenAI-compatible provider is sent the client's own body (less what
    # gateway.steering strips) and its answer is relayed byte for byte; one that ``translates`` is
    # sent ``chat_body`` at ``chat_path`` and its answers come back through ``chat_answer`` and
    # ``chat_stream`` (AnthropicProvider).
    translates: ClassVar[bool] = False
    wire: ClassVar[str] = "openai"  # the API it speaks: "openai" or "anthropic"
    chat_path: ClassVar[str] = "/chat/completions"

    def chat_body(self, body: dict[str, Any], model: str, max_output_tokens: int | None) -> bytes:
        raise NotImplementedError

    def chat_answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        """An upstream answer as a ``chat.completion``."""
        raise NotImplementedError

    def chat_stream(self) -> Callable[[bytes], bytes]:
        """A new request's translator: upstream stream bytes in, OpenAI chunk events out."""
        raise NotImplementedError

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"provider {self.name} is not started")
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect),
            skip_auto_headers=("User-Agent",),
            # SECURITY: the process environment (HTTP_PROXY, .netrc) never changes where calls go.
            trust_env=False,
            # SECURITY: one session serves every team: a cookie an upstream (or the CDN in front of
            # it) sets while answering one team must not ride along on another team's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, path: str, body: bytes, *, stream: bool, headers: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """``headers``: per-request ones the relay chose to forward, from a fixed list of names
        (Anthropic's version and betas): never credentials."""
        headers = {**self.headers, **headers} if headers else self.headers
        if stream:
            headers = {**headers, "Accept": "text/event-stream"}
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = yarl.URL(self.url(path))
        # SECURITY: redirects are never followed — a 3xx is returned as an upstream failure.
        return await self.session.post(url, data=body, headers=headers, allow_redirects=False)

    async def get(self, path: str) -> aiohttp.ClientResponse:
        return await self.session.get(self.url(path), headers=self.headers, allow_redirects=False)
