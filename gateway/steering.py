"""Request fields that let a client steer routing or billing upstream: stripped unless config allows them.

The client's body goes upstream as sent, except for ``model`` (always the target's, from config — so an
OpenRouter suffix such as ``:online`` is config too) and the fields below. Each one, read by some
upstream, picks the model, the provider or the endpoint, or turns on something billed beyond the tokens
the gateway prices — all on the gateway's account, at the allowed model's price:

- OpenRouter: ``models`` (its own fallback list: a model outside the team's allowlist, reached on
  purpose with a context-length error), ``provider`` and ``route`` (provider choice), ``preset`` (a saved
  routing preset of the account), ``plugins`` (``{"id": "web"}``: web search at $4 per 1,000 results),
  ``transforms``.
- OpenAI: ``web_search_options`` (the search fee of a search model grows with ``search_context_size``;
  OpenRouter charges it for native search too), ``service_tier`` (``priority`` is billed above the price
  table's rate).
- Anthropic, on ``/v1/messages`` passed through to an ``anthropic`` target: ``mcp_servers`` (Anthropic
  calls URLs the client names), ``container``; and two allowances checked apart: ``server_tools``
  (``tools`` of Anthropic's server types — web search, web fetch, code execution — are refused with a 400
  unless allowed) and ``context_1m`` (the ``context-1m-…`` value of ``anthropic-beta`` is dropped unless
  allowed).
- LiteLLM-style proxies and SDK kwargs: ``api_base``, ``base_url``, ``api_key``, ``api_version``,
  ``organization``, ``custom_llm_provider``, ``extra_headers``, ``extra_body``, ``extra_query``,
  ``litellm_params``, ``fallbacks``, ``context_window_fallback_dict``, ``user_config``.

``providers[].allow_fields`` and ``models[].allow_fields`` pass named fields through for one provider or
model. Inside the containers in ``NESTED`` that go upstream (``metadata``; ``extra_body`` when allowed)
the same names are removed too, also in such containers nested in them (up to ``MAX_NESTING``).

Cost: ``Router`` computes each target's sets once. Per request the common body (none of these fields,
no ``metadata``) pays one ``isdisjoint`` over its few keys: ``upstream_payload`` of a typical chat body
went from ~0.38 to ~0.49 µs (timeit, min of 60 runs, a loaded 2-core machine); a body with fields
to strip pays ~1 µs more. For scale: a bare aiohttp proxy request is ~230-340 µs of CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

STEERING_FIELDS = frozenset(
    {
        # OpenRouter
        "models",
        "provider",
        "route",
        "preset",
        "plugins",
        "transforms",
        # OpenAI parameters billed beyond the price table
        "web_search_options",
        "service_tier",
        # LiteLLM-style endpoint, credential and routing overrides
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "organization",
        "custom_llm_provider",
        "extra_headers",
        "extra_body",
        "extra_query",
        "litellm_params",
        "fallbacks",
        "context_window_fallback_dict",
        "user_config",
        "tags",  # LiteLLM tag-based routing picks between deployments (a free or a paid tier)
        # Anthropic (/v1/messages passed through): the MCP connector calls URLs the client names, a
        # code-execution container is billed by the hour; and two names that are not fields but allow
        # what is checked apart (gateway.relay): server tools in ``tools`` (web search and fetch, code
        # execution: billed per use) and the ``context-1m`` beta (long prompts billed above the table)
        "mcp_servers",
        "container",
        "server_tools",
        "context_1m",
    }
)
# Anthropic tool types run (and billed) by Anthropic itself: refused unless "server_tools" is allowed.
SERVER_TOOL_TYPES = ("web_search", "web_fetch", "code_execution")
# Containers that may go upstream (metadata is OpenAI's own field) and are searched for the names above.
NESTED = frozenset({"extra_body", "metadata", "litellm_metadata"})
MAX_NESTING = 8  # containers inside containers searched; deeper ones are dropped (no RecursionError)


def to_strip(*allowed: Iterable[str]) -> frozenset[str]:
    """The steering fields a target strips, given the names its provider and model allow."""
    return STEERING_FIELDS.difference(*allowed)


def watched(strip: frozenset[str]) -> frozenset[str]:
    """Top-level keys whose presence means ``stripped`` has work to do."""
    return strip | NESTED


def stripped(body: dict[str, Any], strip: frozenset[str], depth: int = 0) -> dict[str, Any]:
    """``body`` without the names in ``strip``, also inside its ``NESTED`` containers.

    Returns ``body`` itself when nothing had to go, else a new dict: the client's own dicts are never
    changed (the cache key and later attempts to other targets read them)."""
    kept: dict[str, Any] = {}
    for name, value in body.items():
        if name in strip:
            continue
        if name in NESTED and isinstance(value, dict):
            if depth == MAX_NESTING:
                continue  # a chain of containers this deep is nobody's metadata: dropped, not searched
            value = stripped(value, strip, depth + 1)
        kept[name] = value
    return body if kept == body else kept  # values compare by identity first: no deep comparison
