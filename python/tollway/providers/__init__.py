"""Upstream providers. All speak OpenAI's wire format; see :mod:`.openai`."""

from tollway.providers.http import HttpClient, Reply, StreamReply, Timeouts, make_client
from tollway.providers.openai import OpenAIProvider, build_providers

Provider = OpenAIProvider

__all__ = [
    "HttpClient",
    "OpenAIProvider",
    "Provider",
    "Reply",
    "StreamReply",
    "Timeouts",
    "build_providers",
    "make_client",
]
