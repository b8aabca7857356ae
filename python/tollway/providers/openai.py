"""A provider over HTTP: OpenAI's wire format (OpenAI, OpenRouter, local servers) or
Anthropic's (``kind = "anthropic"``: Anthropic, and servers that speak its Messages API).

They differ only in base URL, key, the header that carries it (``Authorization:
Bearer`` or Anthropic's ``x-api-key``) and extra headers (OpenRouter's optional
``HTTP-Referer`` / ``X-Title`` attribution, Anthropic's ``anthropic-version``), so
one class serves all of them; which of the gateway's APIs a kind serves is the
surfaces' business (:mod:`tollway.pipeline.surface`). The key lives only inside
the prepared header dict; nothing here prints it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec
from yarl import URL

from tollway.config import ConfigError, ProviderConfig
from tollway.errors import public_message
from tollway.providers.http import HttpClient, Reply, StreamReply, Timeouts, make_client


class OpenAIProvider:
    def __init__(
        self, config: ProviderConfig, api_key: str | None, client: HttpClient | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.local = config.local
        base = config.base_url.rstrip("/")
        self.base_url = base
        self._urls = {
            "chat": URL(base + "/chat/completions"),
            "completions": URL(base + "/completions"),
            "embeddings": URL(base + "/embeddings"),
            "messages": URL(base + "/messages"),
            "responses": URL(base + "/responses"),
            "rerank": URL(base + "/rerank"),
            "models": URL(base + "/models"),
        }
        self.kind = config.kind
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update(config.headers)
        if config.http_referer:
            headers["HTTP-Referer"] = config.http_referer
        if config.x_title:
            headers["X-Title"] = config.x_title
        if config.kind == "anthropic":
            headers.setdefault("anthropic-version", config.anthropic_version)
            if api_key:
                headers["x-api-key"] = api_key
        elif api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"provider {config.name!r}: header {name!r} holds a line break")
        self.has_key = bool(api_key)
        self.client: HttpClient = client or client_for(config)

    def __repr__(self) -> str:
        return f"OpenAIProvider(name={self.name!r}, base_url={self.base_url!r})"

    def _headers_for(self, request_id: str,
                     extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = self._headers.copy()
        if extra:  # the caller's protocol headers (anthropic-version, -beta); never the key
            headers.update(extra)
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    async def post(self, endpoint: str, body: bytes, request_id: str,
                   extra: Mapping[str, str] | None = None) -> Reply:
        return await self.client.request(
            "POST", self._urls[endpoint], body, self._headers_for(request_id, extra))

    async def post_stream(self, endpoint: str, body: bytes, request_id: str,
                          extra: Mapping[str, str] | None = None) -> StreamReply:
        return await self.client.stream(
            "POST", self._urls[endpoint], body, self._headers_for(request_id, extra))

    async def test_connection(self) -> dict[str, Any]:
        """GET {base_url}/models with timing; the result never holds a secret."""
        t0 = time.perf_counter()
        out: dict[str, Any] = {"provider": self.name, "url": self.base_url + "/models"}
        try:
            reply = await self.client.request("GET", self._urls["models"], None,
                                              self._headers_for(""))
        except Exception as exc:
            out.update(ok=False, error=public_message(exc),
                       latency_ms=round((time.perf_counter() - t0) * 1000, 3))
            return out
        out.update(ok=200 <= reply.status < 300, status=reply.status,
                   latency_ms=round((time.perf_counter() - t0) * 1000, 3))
        if out["ok"]:
            try:
                data = msgspec.json.decode(reply.body)
                out["models"] = len(data.get("data", [])) if isinstance(data, dict) else None
            except Exception:
                out["models"] = None
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.config.kind,
            "configured": self.has_key or self.config.api_key_env is None,
            "local": self.local,
            "base_url_host": urlsplit(self.base_url).netloc,
        }

    async def start(self) -> None:
        await self.client.start()

    async def aclose(self) -> None:
        await self.client.aclose()


def client_for(config: ProviderConfig) -> HttpClient:
    timeouts = Timeouts(config.connect_timeout_s, config.first_byte_timeout_s,
                        config.total_timeout_s)
    try:
        return make_client(config.http_client, config.name, timeouts, config.max_connections,
                           keepalive_s=config.keepalive_s, ca_file=config.ca_file)
    except ValueError as exc:  # an unusable HTTPS_PROXY; the message never holds its password
        raise ConfigError(f"provider {config.name!r}: {exc}", source="<environment>") from None


def build_providers(
    configs: list[ProviderConfig], env: Mapping[str, str]
) -> dict[str, OpenAIProvider]:
    out: dict[str, OpenAIProvider] = {}
    for cfg in configs:
        key = env.get(cfg.api_key_env) if cfg.api_key_env else None
        out[cfg.name] = OpenAIProvider(cfg, key or None)
    return out
