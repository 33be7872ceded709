"""DeepSeek: ``: keep-alive`` comments while queued (streams) or blank lines (non-stream bodies),
``reasoning_content`` in deltas and messages (relayed untouched), and 402 when the account's
balance is exhausted (a fallback status for every provider)."""

from gateway.providers.base import Provider


class DeepSeekProvider(Provider):
    type = "deepseek"
