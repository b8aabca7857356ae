"""The response cache end to end: two gateways on one nats-server, the simulated upstream.

One module-wide rig (NATS, upstream, gateways A and B with ``[cache] routes = ["*"]``);
each test uses its own prompt, so entries of one test cannot answer another's calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shadow.rig import rig as shadow_rig
from support import (
    ACME_KEY,
    GLOBEX_KEY,
    UPSTREAM_KEY,
    Server,
    auth,
    eventually,
    gateway_env,
    make_config,
)
from tollway.app import create_app
from tollway.events.broker import EmbeddedNats
from tollway.testing.upstream import FakeUpstream, Fault

CHAT = "/api/ai/v1/chat/completions"


class Rig:
    def __init__(self, up: FakeUpstream, a: Server, b: Server) -> None:
        self.up, self.a, self.b = up, a, b

    def chat(self, server: Server, content: str, key: str = ACME_KEY,
             headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        body = {"model": "fast", "messages": [{"role": "user", "content": content}],
                "temperature": 0, **kw}
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post(CHAT, json=body, headers={**auth(key), **(headers or {})})

    def upstream_calls(self, content: str) -> int:
        return sum(1 for r in self.up.requests if isinstance(r.body, dict)
                   and r.body.get("messages", [{}])[-1].get("content") == content)

    @staticmethod
    def held(server: Server) -> int:
        store = server.app.state.gateway.cache
        return len(store) if store is not None else 0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp: Path = tmp_path_factory.mktemp("cache")
    nats = EmbeddedNats(tmp / "nats")
    nats.start()
    try:
        with FakeUpstream(api_key=UPSTREAM_KEY) as up:
            servers = []
            for name in ("a", "b"):
                cfg = make_config(up.base_url,
                                  nats={"url": nats.url, "data_dir": str(tmp / name)},
                                  cache={"routes": ["*"]})
                servers.append(Server(create_app(cfg, env=gateway_env())))
            with servers[0] as a, servers[1] as b:
                for s in (a, b):
                    assert eventually(lambda s=s: s.app.state.gateway.cache is not None
                                      and s.app.state.gateway.cache.kv is not None)
                yield Rig(up, a, b)
    finally:
        nats.stop()


def _text(r: httpx.Response) -> str:
    return str(r.json()["choices"][0]["message"]["content"])


def test_a_fleet_serves_one_gateways_entry_from_the_other(rig: Rig) -> None:
    before = rig.held(rig.b)
    first = rig.chat(rig.a, "fleet shared answer")
    assert first.status_code == 200, first.text
    assert first.headers["x-tollway-cache"] == "miss"
    assert rig.upstream_calls("fleet shared answer") == 1
    # B learns of A's entry through the bucket, without a call of its own.
    assert eventually(lambda: rig.held(rig.b) > before)
    second = rig.chat(rig.b, "fleet shared answer")
    assert second.status_code == 200
    assert second.headers["x-tollway-cache"] == "hit"
    assert second.headers["x-tollway-cost-usd"] == "0.000000000"
    assert second.headers["x-tollway-model"] == "fast"
    assert second.json() == first.json()
    assert rig.upstream_calls("fleet shared answer") == 1


def test_tenants_never_share_an_entry(rig: Rig) -> None:
    r = rig.chat(rig.a, "tenant private answer", ACME_KEY)
    assert r.headers["x-tollway-cache"] == "miss"
    assert rig.chat(rig.a, "tenant private answer", ACME_KEY).headers["x-tollway-cache"] == "hit"
    other = rig.chat(rig.a, "tenant private answer", GLOBEX_KEY)
    assert other.status_code == 200, other.text
    assert other.headers["x-tollway-cache"] == "miss"
    assert rig.upstream_calls("tenant private answer") == 2


def test_a_streamed_call_is_answered_from_the_cache_as_sse(rig: Rig) -> None:
    plain = rig.chat(rig.a, "streamed from cache")
    assert plain.headers["x-tollway-cache"] == "miss"
    streamed = rig.chat(rig.a, "streamed from cache", stream=True,
                        stream_options={"include_usage": True})
    assert streamed.headers["x-tollway-cache"] == "hit"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in streamed.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])
    assert text == _text(plain)
    assert chunks[-1]["usage"] == plain.json()["usage"]
    assert rig.upstream_calls("streamed from cache") == 1


def test_a_streamed_miss_is_stored_and_answers_a_plain_call(rig: Rig) -> None:
    streamed = rig.chat(rig.a, "stored from a stream", stream=True)
    assert streamed.headers["x-tollway-cache"] == "miss"
    assert streamed.text.endswith("data: [DONE]\n\n")
    plain = rig.chat(rig.a, "stored from a stream")
    assert plain.headers["x-tollway-cache"] == "hit"
    assert _text(plain) == "stored from a stream"
    assert rig.upstream_calls("stored from a stream") == 1


def test_temperature_and_cache_control_bypass(rig: Rig) -> None:
    for kw in ({"temperature": 0.7}, {"temperature": None}):
        for _ in range(2):
            r = rig.chat(rig.a, "warm answer", **kw)
            assert r.headers["x-tollway-cache"] == "bypass"
    assert rig.upstream_calls("warm answer") == 4
    # no-store: neither read nor stored
    for _ in range(2):
        r = rig.chat(rig.a, "not to keep", headers={"cache-control": "no-store"})
        assert r.headers["x-tollway-cache"] == "bypass"
    assert rig.chat(rig.a, "not to keep").headers["x-tollway-cache"] == "miss"
    # no-cache: read past the entry, the fresh answer stored
    assert rig.chat(rig.a, "fresh please").headers["x-tollway-cache"] == "miss"
    again = rig.chat(rig.a, "fresh please", headers={"cache-control": "no-cache"})
    assert again.headers["x-tollway-cache"] == "miss"
    assert rig.upstream_calls("fresh please") == 2
    assert rig.chat(rig.a, "fresh please").headers["x-tollway-cache"] == "hit"


def test_errors_refusals_and_cut_streams_are_never_stored(rig: Rig) -> None:
    rig.up.add_fault(Fault(status=500, times=1, model="gpt-4o-mini"))
    failed = rig.chat(rig.a, "after an error")
    assert failed.status_code >= 500
    assert rig.chat(rig.a, "after an error").headers["x-tollway-cache"] == "miss"

    rig.up.replies.refusal = "I cannot help with that"
    try:
        assert rig.chat(rig.a, "refused once").status_code == 200
    finally:
        rig.up.replies.refusal = None
    assert rig.chat(rig.a, "refused once").headers["x-tollway-cache"] == "miss"

    rig.up.add_fault(Fault(kind="cut_stream", times=1, after_chunks=1, model="gpt-4o-mini"))
    cut = rig.chat(rig.a, "cut stream words here", stream=True)
    assert "[DONE]" not in cut.text
    assert rig.chat(rig.a, "cut stream words here").headers["x-tollway-cache"] == "miss"
    assert rig.upstream_calls("cut stream words here") == 2


def test_a_hit_is_a_call_event_with_its_saving_in_usage(rig: Rig) -> None:
    rig.chat(rig.a, "counted saving")
    hit = rig.chat(rig.a, "counted saving")
    assert hit.headers["x-tollway-cache"] == "hit"
    with httpx.Client(base_url=rig.a.url, timeout=30) as c:
        def acme() -> dict[str, Any] | None:
            body: dict[str, Any] = c.get("/api/ai/usage", headers=auth(ACME_KEY)).json()
            return body if body["total"]["cache_hits"] >= 1 else None

        body = eventually(acme)
        assert body, "the hit never reached the usage view"
        assert body["total"]["saved_usd"] > 0
        assert body["total"]["saved_nanousd"] > 0
        assert body["total"]["cost_usd"] > 0  # the misses were paid for
        # globex had no hit: its view shows none
        assert c.get("/api/ai/usage", headers=auth(GLOBEX_KEY)).json()["total"][
            "cache_hits"] == 0


def test_a_hit_is_not_shadowed() -> None:
    shadow = [{"route": "auto", "candidates": ["small"], "fraction": 1.0, "seed": 1}]
    with shadow_rig(shadow, cache={"routes": ["auto"]}) as r:
        first = r.chat("shadow me once", temperature=0)
        assert first.headers["x-tollway-cache"] == "miss"
        assert r.sink.wait(1)
        hit = r.chat("shadow me once", temperature=0)
        assert hit.headers["x-tollway-cache"] == "hit"
        r.settled(2)
        assert r.shadow.runner.sampled.value("auto") == 1
        assert r.recorder.records[-1].cache == "hit"
        assert r.recorder.records[-1].saved_nanousd == r.recorder.records[0].actual_cost_nanousd
