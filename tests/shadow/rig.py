"""A gateway on a real uvicorn server with two simulated upstreams: primary and candidate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from support import (
    ACME_KEY,
    ADMIN_KEY,
    UPSTREAM_KEY,
    ListRecorder,
    Server,
    auth,
    eventually,
    gateway_env,
)
from tollway.app import create_app
from tollway.auth import hash_key
from tollway.config import parse_config
from tollway.shadow.service import ShadowService
from tollway.shadow.sink import MemorySink
from tollway.testing.upstream import FakeUpstream

CHAT = "/api/ai/v1/chat/completions"
GLOBEX_KEY = "tw-test-globex-shadow-1"


def raw_config(primary: str, candidate: str, shadow: list[dict[str, Any]],
               **extra: Any) -> dict[str, Any]:
    def provider(name: str, url: str, local: bool) -> dict[str, Any]:
        return {"name": name, "base_url": url, "api_key_env": "FAKE_API_KEY", "local": local,
                "first_byte_timeout_s": 5.0, "total_timeout_s": 10.0, "connect_timeout_s": 1.0}

    unlimited = {"per_minute": 100_000, "per_hour": 1_000_000, "per_day": 10_000_000,
                 "expensive_per_hour": 100_000}
    raw: dict[str, Any] = {
        "server": {"builtin_providers": False, "builtin_models": False},
        "nats": {"enabled": False},
        "providers": [provider("prim", primary, True), provider("cand", candidate, False),
                      provider("loc", candidate, True)],
        "models": [
            {"id": "big", "provider": "prim", "upstream": "gpt-4o-mini",
             "input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0},
            {"id": "small", "provider": "cand", "upstream": "gpt-4o-mini",
             "input_usd_per_mtok": 0.5, "output_usd_per_mtok": 2.0},
            {"id": "local-small", "provider": "loc", "upstream": "gpt-4o-mini"},
        ],
        "routes": [{"alias": "auto", "candidates": ["big"]},
                   {"alias": "chat", "candidates": ["big"]}],
        "tenants": [
            {"id": "acme", "tier": "premium", "key_sha256": [hash_key(ACME_KEY)],
             "limits": unlimited},
            {"id": "globex", "tier": "premium", "key_sha256": [hash_key(GLOBEX_KEY)],
             "limits": unlimited},
        ],
        "shadow": shadow,
    }
    raw.update(extra)
    return raw


class Rig:
    def __init__(self, server: Server, primary: FakeUpstream, candidate: FakeUpstream,
                 recorder: ListRecorder) -> None:
        self.server = server
        self.primary = primary
        self.candidate = candidate
        self.recorder = recorder
        self.http = httpx.Client(base_url=server.url, timeout=20)

    @property
    def gateway(self) -> Any:
        return self.server.app.state.gateway

    @property
    def shadow(self) -> ShadowService:
        svc: ShadowService = self.gateway.shadow
        return svc

    @property
    def sink(self) -> MemorySink:
        sink = self.shadow.sink
        assert isinstance(sink, MemorySink)
        return sink

    def chat(self, content: str = "one two three", model: str = "auto",
             headers: dict[str, str] | None = None, key: str = ACME_KEY,
             **body: Any) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": content}], **body}
        return self.http.post(CHAT, json=payload, headers={**auth(key), **(headers or {})})

    def settled(self, calls: int, route: str = "auto", *,
                wait_for_shadows: bool = True) -> dict[str, Any]:
        """The route's runner status once ``calls`` calls have ended (their finishers ran, so
        every shadow call was started or skipped) and, unless told not to wait for them, no
        shadow call runs any more."""
        self.recorder.wait(calls)
        runner = self.shadow.runner
        if wait_for_shadows:
            assert eventually(lambda: not runner.tasks), f"{len(runner.tasks)} shadows run on"
        status: dict[str, Any] = runner.status()[route]
        return status

    def report(self, **params: Any) -> dict[str, Any]:
        r = self.http.get("/api/ai/shadow", params=params, headers=auth(ADMIN_KEY))
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc


@contextmanager
def rig(shadow: list[dict[str, Any]], *, candidate_latency: float = 0.0,
        primary_latency: float = 0.0, **extra: Any) -> Iterator[Rig]:
    with FakeUpstream(name="primary", api_key=UPSTREAM_KEY, latency_s=primary_latency) as prim, \
            FakeUpstream(name="candidate", api_key=UPSTREAM_KEY,
                         latency_s=candidate_latency) as cand:
        raw = raw_config(prim.base_url, cand.base_url, shadow, **extra)
        recorder = ListRecorder()
        app = create_app(parse_config(raw, source="<test>", env=gateway_env()),
                         env=gateway_env(), recorder=recorder)
        with Server(app) as server:
            r = Rig(server, prim, cand, recorder)
            try:
                yield r
            finally:
                r.http.close()
