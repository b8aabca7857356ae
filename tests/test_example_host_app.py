"""examples/host_app.py, served by uvicorn against the simulated upstream: the three ways
in answer, on one gateway, and each call is one record."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import openai
import pytest

import tollway
from support import ACME_KEY, ListRecorder, Server, gateway_env, make_config
from tollway.auth import hash_key
from tollway.testing.upstream import FakeUpstream

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "host_app.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("host_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def served(upstream: FakeUpstream, recorder: ListRecorder) -> Iterator[Server]:
    cfg = make_config(upstream.base_url, tenants=[
        {"id": "demo", "tier": "standard", "key_sha256": [hash_key(ACME_KEY)]}])
    gw = tollway.Gateway(cfg, env=gateway_env(), recorder=recorder)
    with Server(_example().build_app(gw)) as server:
        yield server


def test_the_three_ways_in(served: Server, recorder: ListRecorder) -> None:
    with httpx.Client(base_url=served.url, timeout=20) as c:
        found = c.get("/search", params={"q": "x"}, headers={"x-user": "alice"})
        assert found.status_code == 200 and found.headers["x-ratelimit-limit-requests"]
        assert c.get("/search").status_code == 401  # no user the service knows
        asked = c.post("/ask", json={"question": "in process"}, headers={"x-user": "bob"})
        assert asked.status_code == 200 and asked.json() == {"answer": "in process"}
    with openai.OpenAI(base_url=f"{served.url}/svc/api/ai/v1", api_key=ACME_KEY,
                       max_retries=0, timeout=20) as sdk:
        done = sdk.chat.completions.create(model="auto",
                                           messages=[{"role": "user", "content": "mounted"}])
    assert done.choices[0].message.content == "mounted"
    records = recorder.wait(3)
    assert sorted((r.endpoint, r.tenant, r.outcome) for r in records) == [
        ("chat.completions", "demo", "completed"), ("chat.completions", "demo", "completed"),
        ("search", "demo", "completed")]
    (search,) = [r for r in records if r.endpoint == "search"]
    assert search.actual_cost_nanousd == 1_000_000
