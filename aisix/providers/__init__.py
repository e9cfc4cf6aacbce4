"""Providers by name: each turns OpenAI-shaped requests into its upstream's calls and back."""
from __future__ import annotations

from aisix.providers.base import ChatResult, Provider, StreamDecoder, Usage
from aisix.providers.mock import MockProvider
from aisix.providers.openai import DeepSeekProvider, OpenAIProvider

PROVIDERS: dict[str, Provider] = {p.name: p for p in (OpenAIProvider(), DeepSeekProvider(), MockProvider())}

try:  # translated providers (added alongside)
    from aisix.providers.anthropic import AnthropicProvider
    PROVIDERS["anthropic"] = AnthropicProvider()
except ImportError:  # pragma: no cover
    pass
try:
    from aisix.providers.gemini import GeminiProvider
    PROVIDERS["gemini"] = GeminiProvider()
except ImportError:  # pragma: no cover
    pass


def get_provider(name: str) -> Provider:
    """The provider called ``name``. Raises KeyError."""
    return PROVIDERS[name]


__all__ = ["PROVIDERS", "get_provider", "Provider", "StreamDecoder", "ChatResult", "Usage"]
