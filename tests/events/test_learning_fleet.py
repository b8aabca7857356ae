"""Learning routing across gateways on one stream: the samples one gateway makes decide
what every gateway serves, each decision is one event, and a gateway started later
serves the fleet's choice at once; the view's fold and checkpoint on their own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from events.helpers import read_stream
from shadow.rig import raw_config
from support import ACME_KEY, ADMIN_KEY, UPSTREAM_KEY, Server, auth, eventually, gateway_env
from tollway.app import create_app
from tollway.config import parse_config
from tollway.events.broker import EmbeddedNats, connect
from tollway.events.schema import RouteLearned
from tollway.learn.evidence import Learning, LearnRules
from tollway.learn.view import LIVE_S, learning_projection
from tollway.shadow.event import ShadowCompared
from tollway.testing.upstream import FakeUpstream

SHADOW = [{"route": "auto", "candidates": ["small"], "fraction": 1.0, "seed": 1,
           "max_in_flight": 100}]
LEARN = {"enabled": True, "min_samples": 4, "window": 6, "min_agreement": 0.95,
         "hysteresis": 0.0, "verify_fraction": 1.0}
CHAT = "/api/ai/v1/chat/completions"


def _classify(client: httpx.Client, i: int) -> httpx.Response:
    return client.post(CHAT, headers={**auth(ACME_KEY), "x-tollway-task": "classify"}, json={
        "model": "auto", "max_tokens": 20,
        "messages": [{"role": "system", "content": "task: classify"},
                     {"role": "user", "content": f"label {i}"}]})


class Fleet:
    def __init__(self, nats_url: str, data: Path, primary: str, candidate: str) -> None:
        self.nats_url, self.data = nats_url, data
        self.primary, self.candidate = primary, candidate
        self.stack = contextlib.ExitStack()

    def start(self, name: str) -> tuple[Server, httpx.Client]:
        raw = raw_config(self.primary, self.candidate, SHADOW, learn=LEARN,
                         nats={"url": self.nats_url, "data_dir": str(self.data / name)})
        app = create_app(parse_config(raw, source="<test>", env=gateway_env()),
                         env=gateway_env())
        server = self.stack.enter_context(Server(app))
        return server, self.stack.enter_context(httpx.Client(base_url=server.url, timeout=20))


@pytest.fixture
def fleet(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[Fleet]:
    with FakeUpstream(name="primary", api_key=UPSTREAM_KEY) as prim, \
            FakeUpstream(name="candidate", api_key=UPSTREAM_KEY) as cand:
        f = Fleet(nats_server.url, tmp_path, prim.base_url, cand.base_url)
        with f.stack:
            yield f


def _learner(server: Server) -> Any:
    return server.app.state.gateway.shadow.learner


def _idle(*servers: Server) -> bool:
    return all(s.app.state.gateway.events.publisher.queued == 0
               and not s.app.state.gateway.events.outbox.pending for s in servers)


def _learned(nats_url: str) -> list[RouteLearned]:
    async def read() -> list[RouteLearned]:
        nc = await connect(nats_url)
        try:
            return [e for _, _, e in await read_stream(nc, "tollway.route.learned.>")
                    if isinstance(e, RouteLearned)]
        finally:
            await nc.close()
    return asyncio.run(read())


def test_samples_made_on_one_gateway_decide_what_every_gateway_serves(fleet: Fleet) -> None:
    a, client_a = fleet.start("a")
    b, client_b = fleet.start("b")
    for i in range(4):  # a serves them with the primary; each is shadowed to "small"
        resp = _classify(client_a, i)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-tollway-model"] == "big"
    assert eventually(lambda: all(_learner(s).learning.choice("auto", "classify") == "small"
                                  for s in (a, b)), timeout=20)
    assert b.app.state.gateway.shadow.runner.status()["auto"]["sampled"] == 0
    resp = _classify(client_b, 10)  # b made no sample, and serves the fleet's choice
    assert resp.headers["x-tollway-model"] == "small"
    # Both gateways folded the fourth sample live and published the promotion: one event.
    assert eventually(lambda: _idle(a, b), timeout=20)
    learned = _learned(fleet.nats_url)
    assert [(e.action, e.model) for e in learned] == [("promoted", "small")]
    # b's report shows the fleet's choice.
    here = client_b.get("/api/ai/shadow", headers=auth(ADMIN_KEY)).json()
    assert here["learning"]["here"]["serving"] == [
        {"route": "auto", "task": "classify", "model": "small"}]


def test_a_gateway_started_later_serves_the_fleet_s_choice_at_once(fleet: Fleet) -> None:
    a, client_a = fleet.start("a")
    for i in range(4):
        assert _classify(client_a, i).status_code == 200
    assert eventually(lambda: _learner(a).learning.choice("auto", "classify") == "small",
                      timeout=20)
    # A gateway started now folds the samples from the stream (or a's checkpoint).
    c, client_c = fleet.start("c")
    assert eventually(lambda: _learner(c).learning.choice("auto", "classify") == "small",
                      timeout=20)
    assert _classify(client_c, 20).headers["x-tollway-model"] == "small"
    assert eventually(lambda: _idle(a, c), timeout=20)
    # c folded the samples that made the decision again: the stream still has one.
    assert len(_learned(fleet.nats_url)) == 1


def _sample(i: int, at: float, agreement: float = 1.0) -> ShadowCompared:
    return ShadowCompared(
        event_id=f"s{i}", occurred_at=at, tenant="acme", request_id=f"q{i}", route="auto",
        task="classify", primary_model="big", candidate_model="small", agreement=agreement,
        candidate_latency_s=0.01)


def test_the_view_publishes_only_live_decisions_and_its_checkpoint_keeps_the_choice() -> None:
    now = 1_800_000_000.0
    published: list[RouteLearned] = []

    def make(window: int = 4, candidates: tuple[str, ...] = ("small",)) -> Learning:
        return Learning(LearnRules(min_samples=3, window=window),
                        {"big": 10.0, "small": 1.0}, {"auto": candidates})

    proj = learning_projection(make, published.append, clock=lambda: now)
    for i in range(3):  # old samples (a replay): the choice moves, nothing is published
        proj.apply(i + 1, _sample(i, now - LIVE_S - 5))
    assert proj.view.learning.choice("auto", "classify") == "small" and published == []
    for i in range(3, 7):  # fresh ones, disagreeing: the demotion is published
        proj.apply(i + 1, _sample(i, now - 1, agreement=0.0))
    assert proj.view.learning.choice("auto", "classify") is None
    assert [(d.action, d.event_id) for d in published] == [("demoted", "learn-s3")]
    for i in range(7, 11):  # a whole window agreeing again: promoted, published
        proj.apply(i + 1, _sample(i, now - 1, agreement=1.0 if i > 7 else 0.0))
    proj.apply(12, _sample(11, now - 1))
    assert [d.action for d in published] == ["demoted", "promoted"]
    proj.apply(12, _sample(99, now, agreement=0.0))  # a sequence already folded: skipped
    assert list(proj.view.learning.evidence[("auto", "classify", "small")].agreed) == [
        True, True, True, True]

    saved = proj.dump(proj.view)
    loaded = proj.load(saved)
    assert loaded.last_seq == 12 and loaded.learning.choice("auto", "classify") == "small"
    assert loaded.learning.evidence == proj.view.learning.evidence
    # Loaded under a config with a shorter window: the window's last samples; under one
    # where "small" is no candidate any more: neither its evidence nor the choice.
    shorter = learning_projection(lambda: make(window=2), published.append).load(saved)
    assert list(shorter.learning.evidence[("auto", "classify", "small")].agreed) == [True] * 2
    gone = learning_projection(lambda: make(candidates=("mid",)), published.append).load(saved)
    assert gone.learning.evidence == {} and gone.learning.choice("auto", "classify") is None
