"""Provider adapters behind one small interface (``gateway.providers.base.Provider``)."""

from gateway.config import ProviderConfig
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Provider
from gateway.providers.deepseek import DeepSeekProvider
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.providers.openrouter import OpenRouterProvider

ADAPTERS: dict[str, type[Provider]] = {
    "openai": OpenAICompatProvider,
    "openrouter": OpenRouterProvider,
    "deepseek": DeepSeekProvider,
    "anthropic": AnthropicProvider,
    "mock": OpenAICompatProvider,  # the built-in mock speaks plain OpenAI
}


def create(config: ProviderConfig, base_url: str | None = None) -> Provider:
    return ADAPTERS[config.type](config, base_url)


__all__ = ["ADAPTERS", "Provider", "create"]
