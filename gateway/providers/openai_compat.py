"""Any OpenAI-compatible ``base_url`` (OpenAI itself, vLLM, Ollama, Together, ...)."""

from gateway.providers.base import Provider


class OpenAICompatProvider(Provider):
    type = "openai"
