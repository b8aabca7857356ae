"""A gateway on a manual clock in front of named simulated upstreams (tests of issue 4)."""

from __future__ import annotations

import socket
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
    chat_body,
    gateway_env,
)
from tollway.app import create_app
from tollway.auth import hash_key
from tollway.clock import Clock, ManualClock, SystemClock
from tollway.config import parse_config
from tollway.testing.upstream import FakeUpstream

CHAT = "/api/ai/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_config(urls: dict[str, str], local: tuple[str, ...] = (),
               routes: list[dict[str, Any]] | None = None, tenant: dict[str, Any] | None = None,
               provider: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    providers = [
        {"name": name, "base_url": url, "api_key_env": "FAKE_API_KEY", "local": name in local,
         "first_byte_timeout_s": 1.0, "total_timeout_s": 5.0, "connect_timeout_s": 1.0,
         **(provider or {})}
        for name, url in urls.items()
    ]
    models = [
        {"id": f"m-{name}", "provider": name, "upstream": "gpt-4o-mini",
         "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}
        for name in urls
    ]
    raw: dict[str, Any] = {
        "server": {"builtin_providers": False, "builtin_models": False},
        "nats": {"enabled": False},
        "providers": providers,
        "models": models,
        "routes": routes or [{"alias": "auto", "candidates": [m["id"] for m in models]}],
        "tenants": [{"id": "acme", "tier": "premium",
                     "key_sha256": [hash_key(ACME_KEY)],
                     "limits": {"per_minute": 10_000, "per_hour": 100_000, "per_day": 1_000_000,
                                "expensive_per_hour": 10_000}, **(tenant or {})}],
    }
    raw.update(extra)
    return raw


class Rig:
    def __init__(self, server: Server, clock: Clock, recorder: ListRecorder,
                 ups: dict[str, FakeUpstream]) -> None:
        self.server = server
        self.clock = clock
        self.recorder = recorder
        self.ups = ups
        self.http = httpx.Client(base_url=server.url, timeout=20)

    @property
    def gateway(self) -> Any:
        return self.server.app.state.gateway

    def chat(self, model: str = "auto", headers: dict[str, str] | None = None,
             **body: Any) -> httpx.Response:
        return self.http.post(CHAT, json=chat_body("one two three", model=model, **body),
                              headers={**auth(), **(headers or {})})

    def metrics(self) -> str:
        return self.http.get("/api/ai/metrics", headers=auth(ADMIN_KEY)).text

    def providers(self) -> dict[str, Any]:
        r = self.http.get("/api/ai/providers",
                          headers=auth(ADMIN_KEY))
        assert r.status_code == 200, r.text
        return {p["name"]: p for p in r.json()["data"]}


def silent_listener() -> socket.socket:
    """A port that takes connections (the kernel completes the handshake) and never reads
    nor answers: a provider hung before its first byte."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


@contextmanager
def rig(names: tuple[str, ...] = ("primary", "secondary"), local: tuple[str, ...] = (),
        dead: tuple[str, ...] = (), silent: tuple[str, ...] = (), real_clock: bool = False,
        **extra: Any) -> Iterator[Rig]:
    """Upstreams named ``names`` (``dead`` ones: a closed port; ``silent`` ones: a
    :func:`silent_listener`), model ``m-<name>`` on each, route ``auto`` over all of them,
    tenant ``acme`` (premium, generous rate limits)."""
    ups = {n: FakeUpstream(name=n, api_key=UPSTREAM_KEY) for n in names
           if n not in dead and n not in silent}
    hung = {n: silent_listener() for n in silent}
    for up in ups.values():
        up.start()
    try:
        urls = {n: ups[n].base_url if n in ups else
                f"http://127.0.0.1:{hung[n].getsockname()[1]}/v1" if n in hung else
                f"http://127.0.0.1:{free_port()}/v1"
                for n in names}
        clock: Clock = SystemClock() if real_clock else ManualClock()
        recorder = ListRecorder()
        config = parse_config(raw_config(urls, local, **extra), source="<test>",
                              env=gateway_env())
        app = create_app(config, env=gateway_env(), recorder=recorder, clock=clock)
        with Server(app) as server:
            r = Rig(server, clock, recorder, ups)
            try:
                yield r
            finally:
                r.http.close()
    finally:
        for up in ups.values():
            up.stop()
        for s in hung.values():
            s.close()


def completions(up: FakeUpstream) -> int:
    return sum(1 for r in up.requests if r.path.endswith("/chat/completions"))
