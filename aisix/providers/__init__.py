"""Providers by name: each turns OpenAI-shaped requests into its upstream's calls and back
(translation only: the calls go out through :mod:`aisix.upstream`)."""
from __future__ import annotations

from aisix.providers.anthropic import AnthropicProvider
from aisix.providers.base import ChatResult, Provider, StreamDecoder, Usage
from aisix.providers.gemini import GeminiProvider
from aisix.providers.openai import DeepSeekProvider, MockProvider, OpenAIProvider

PROVIDERS: dict[str, Provider] = {p.name: p for p in (OpenAIProvider(), DeepSeekProvider(), MockProvider(),
                                                      AnthropicProvider(), GeminiProvider())}


def get_provider(name: str) -> Provider:
    """The provider called ``name``. Raises KeyError."""
    return PROVIDERS[name]


__all__ = ["PROVIDERS", "get_provider", "Provider", "StreamDecoder", "ChatResult", "Usage"]
