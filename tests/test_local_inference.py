"""Local inference extras through a real gateway: vLLM's rerank to local providers only,
and embeddings routed by sensitivity (and by model kind) as chat is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support import (
    UPSTREAM_KEY,
    ListRecorder,
    Server,
    auth,
    gateway_env,
    make_config,
    make_raw_config,
)
from tollway.app import create_app
from tollway.record import CallRecord
from tollway.testing.replies import count_tokens
from tollway.testing.upstream import FakeUpstream

RERANK = "/api/ai/v1/rerank"
EMBED = "/api/ai/v1/embeddings"
DOCS = ["the cat sat on the mat", "stock prices fell", "a cat and a dog", "cats sleep a lot"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture(scope="module")
def recorder() -> ListRecorder:
    return ListRecorder()


@pytest.fixture(scope="module")
def client(upstream: FakeUpstream, recorder: ListRecorder) -> Iterator[httpx.Client]:
    raw = make_raw_config(upstream.base_url)
    # One fake upstream behind a remote provider and a local one (local = true).
    providers = [*raw["providers"], {**raw["providers"][0], "name": "lab", "local": True}]
    models = [*raw["models"],
              {"id": "local-embed", "provider": "lab", "upstream": "bge-m3",
               "kind": "embedding", "input_usd_per_mtok": 0.01},
              {"id": "reranker", "provider": "lab", "upstream": "bge-reranker-v2-m3",
               "kind": "rerank", "input_usd_per_mtok": 0.05},
              {"id": "remote-rerank", "provider": "fake", "kind": "rerank"}]
    routes = [{"alias": "auto", "candidates": ["gpt-4o-mini", "text-embedding-3-small",
                                               "local-embed"]},
              {"alias": "embed", "candidates": ["text-embedding-3-small", "local-embed"]},
              {"alias": "rr", "candidates": ["remote-rerank", "reranker"]}]
    config = make_config(upstream.base_url, providers=providers, models=models, routes=routes)
    with Server(create_app(config, env=gateway_env(), recorder=recorder)) as server, \
            httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _post(client: httpx.Client, recorder: ListRecorder, path: str, body: dict[str, Any],
          sensitivity: str | None = None) -> tuple[httpx.Response, CallRecord]:
    before = len(recorder.records)
    headers = auth()
    if sensitivity:
        headers["X-Tollway-Sensitivity"] = sensitivity
    r = client.post(path, json=body, headers=headers)
    return r, recorder.wait(before + 1)[before]


def test_rerank_goes_to_the_local_provider_in_vllms_shape(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    body = {"model": "reranker", "query": "cat", "documents": DOCS, "top_n": 2,
            "truncate_prompt_tokens": 512}
    r, rec = _post(client, recorder, RERANK, body)
    assert r.status_code == 200, r.text
    sent = upstream.requests[-1]
    assert sent.path == "/v1/rerank"
    assert sent.body == {**body, "model": "bge-reranker-v2-m3"}  # unknown fields pass
    out = r.json()
    assert [x["index"] for x in out["results"]] == [0, 2]  # best first, top_n of them
    assert out["results"][0]["document"] == {"text": DOCS[0]}
    assert out["results"][0]["relevance_score"] >= out["results"][1]["relevance_score"]
    assert r.headers["x-tollway-provider"] == "lab" and r.headers["x-tollway-model"] == "reranker"
    tokens = out["usage"]["total_tokens"]
    assert tokens == sum(count_tokens("cat") + count_tokens(d) for d in DOCS)
    assert rec.endpoint == "rerank" and rec.outcome == "completed"
    assert rec.prompt_tokens == tokens and rec.completion_tokens == 0
    assert rec.actual_cost_nanousd == tokens * 50  # 0.05 USD per million tokens
    assert float(r.headers["x-tollway-cost-usd"]) == tokens * 50 / 1e9
    metrics = client.get("/api/ai/metrics").text
    assert any(line.startswith("tollway_requests_total{") and 'model="reranker"' in line
               and 'provider="lab"' in line for line in metrics.splitlines())


def test_rerank_never_goes_to_a_remote_provider(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    sent = len(upstream.requests)
    r, rec = _post(client, recorder, RERANK,
                   {"model": "remote-rerank", "query": "cat", "documents": DOCS})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "model_not_supported"
    assert rec.outcome == "rejected" and len(upstream.requests) == sent
    # A route keeps its local rerankers only.
    r, rec = _post(client, recorder, RERANK, {"model": "rr", "query": "cat", "documents": DOCS})
    assert r.status_code == 200 and r.headers["x-tollway-provider"] == "lab"
    assert len(r.json()["results"]) == len(DOCS)  # no top_n: every document


@pytest.mark.parametrize("body", [
    {"model": "reranker", "query": "cat", "documents": []},
    {"model": "reranker", "query": "", "documents": DOCS},
    {"model": "reranker", "query": "cat", "documents": [1, 2]},
    {"model": "reranker", "query": "cat", "documents": DOCS, "top_n": -1},
    {"model": "reranker", "documents": DOCS},
])
def test_bad_rerank_requests_are_400s(client: httpx.Client, body: dict[str, Any]) -> None:
    r = client.post(RERANK, json=body, headers=auth())
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("model", "sensitivity", "served"), [
    ("embed", None, "text-embedding-3-small"),
    ("embed", "internal", "text-embedding-3-small"),
    ("embed", "confidential", "bge-m3"),
    ("embed", "restricted", "bge-m3"),
    ("auto", None, "text-embedding-3-small"),  # the route's embedding models only
    ("auto", "confidential", "bge-m3"),
])
def test_embeddings_are_routed_by_sensitivity(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder, model: str,
        sensitivity: str | None, served: str) -> None:
    r, rec = _post(client, recorder, EMBED, {"model": model, "input": "secret plans"},
                   sensitivity)
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].path == "/v1/embeddings"
    assert upstream.requests[-1].body["model"] == served
    assert rec.sensitivity == (sensitivity or "") and rec.route == model
    assert rec.provider == ("lab" if served == "bge-m3" else "fake")


def test_confidential_embeddings_without_a_local_model_are_refused(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    sent = len(upstream.requests)
    r, rec = _post(client, recorder, EMBED,
                   {"model": "text-embedding-3-small", "input": "secret"}, "confidential")
    assert r.status_code == 403 and r.json()["error"]["code"] == "policy_forbids"
    assert rec.outcome == "rejected" and len(upstream.requests) == sent
    # A route with no embedding model cannot serve embeddings at all.
    r = client.post(EMBED, json={"model": "rr", "input": "x"}, headers=auth())
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
