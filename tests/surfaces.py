"""The APIs other than chat completions, as the guard tests call them (one contract suite
runs over every surface: tests/test_surfaces_guards.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from support import ACME_KEY
from tollway.testing.upstream import FakeUpstream


@dataclass(frozen=True)
class SurfaceCase:
    name: str
    path: str  # the gateway's
    upstream_path: str  # what the provider is asked on
    provider_kind: str  # the provider kind the case's upstreams are configured as
    responses: bool = False  # the upstreams serve the Responses API themselves

    def body(self, content: str, model: str, **kw: Any) -> dict[str, Any]:
        if self.name == "completions":
            return {"model": model, "prompt": content, **kw}
        if self.name.startswith("responses"):
            if "max_tokens" in kw:
                kw["max_output_tokens"] = kw.pop("max_tokens")
            return {"model": model, "input": content, **kw}
        kw.setdefault("max_tokens", 64)
        return {"model": model, "messages": [{"role": "user", "content": content}], **kw}

    def headers(self, key: str = ACME_KEY) -> dict[str, str]:
        if self.name.startswith("messages"):
            return {"x-api-key": key, "anthropic-version": "2023-06-01"}
        return {"Authorization": f"Bearer {key}"}

    def error(self, resp: httpx.Response) -> dict[str, Any]:
        """The error's type/code as this surface shapes it."""
        body = resp.json()
        if self.name.startswith("messages"):
            assert body["type"] == "error"
            return dict(body["error"])
        return dict(body["error"])

    def calls(self, up: FakeUpstream) -> int:
        return sum(1 for r in up.requests if r.path.endswith(self.upstream_path))


COMPLETIONS = SurfaceCase("completions", "/api/ai/v1/completions", "/v1/completions", "openai")
MESSAGES = SurfaceCase("messages", "/api/ai/v1/messages", "/v1/messages", "anthropic")
# The Messages API to an OpenAI-compatible provider: translated to chat completions.
MESSAGES_TRANSLATED = SurfaceCase("messages-translated", "/api/ai/v1/messages",
                                  "/v1/chat/completions", "openai")
RESPONSES = SurfaceCase("responses", "/api/ai/v1/responses", "/v1/chat/completions", "openai")
RESPONSES_PASSED = SurfaceCase("responses-passed", "/api/ai/v1/responses", "/v1/responses",
                               "openai", responses=True)
SURFACES = [COMPLETIONS, MESSAGES, MESSAGES_TRANSLATED, RESPONSES, RESPONSES_PASSED]
