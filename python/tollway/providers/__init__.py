"""Upstream providers. All speak OpenAI's wire format; see :mod:`.openai`."""

from tollway.providers.http import AiohttpClient, HttpClient, Reply, StreamReply, Timeouts
from tollway.providers.openai import OpenAIProvider, build_providers

Provider = OpenAIProvider

__all__ = [
    "AiohttpClient",
    "HttpClient",
    "OpenAIProvider",
    "Provider",
    "Reply",
    "StreamReply",
    "Timeouts",
    "build_providers",
]
