"""The gateway mounted under /svc in a host Starlette app and a host FastAPI app, served by
uvicorn on loopback, the host's lifespan running the gateway's (embedded nats-server,
publisher, projections): public paths answer without a key under the prefix, the admin
paths still need the admin key, the dashboard and the OpenAPI document work from there,
and every call through the official SDK is an event on the stream.

The SDK conformance of the OpenAI routes through the prefix is in test_sdk.py,
test_sdk_completions.py and test_sdk_responses.py (each runs at the root and mounted)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urljoin

import httpx
import openai
import pytest

from events.helpers import read_stream
from support import (
    ACME_KEY,
    ADMIN_KEY,
    PREFIX,
    UPSTREAM_KEY,
    Server,
    auth,
    eventually,
    gateway_env,
    make_config,
    mounted,
)
from tollway.app import GatewayApp, create_app
from tollway.events.broker import connect
from tollway.events.schema import CallCompleted
from tollway.testing.upstream import FakeUpstream


@pytest.fixture(scope="module", params=["starlette", "fastapi"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Server, GatewayApp]]:
    data = tmp_path_factory.mktemp("mount") / "data"
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = make_config(up.base_url, nats={"url": "embedded", "data_dir": str(data)})
        app = create_app(cfg, env=gateway_env())
        with mounted(app, request.param) as server:
            yield server, app


@pytest.fixture
def host(served: tuple[Server, GatewayApp]) -> Server:
    return served[0]


@pytest.fixture
def client(host: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=host.origin, timeout=20) as c:
        yield c


def test_health_and_ready_answer_without_a_key_under_the_prefix(client: httpx.Client) -> None:
    health = client.get(f"{PREFIX}/api/ai/health")
    assert health.status_code == 200, health.text
    assert eventually(lambda: client.get(f"{PREFIX}/api/ai/ready").status_code == 200), (
        "ready: NATS reachable and the projections caught up, started by the host's lifespan")
    # Only under the prefix: the host's own paths are the host's (its 404 here).
    assert client.get("/api/ai/health").status_code == 404


def test_the_prefix_opens_nothing_else(client: httpx.Client) -> None:
    chat = client.post(f"{PREFIX}/api/ai/v1/chat/completions", json={"model": "auto"})
    assert chat.status_code == 401 and chat.json()["error"]["code"] == "missing_api_key"
    tenant = client.get(f"{PREFIX}/api/ai/providers", headers=auth(ACME_KEY))
    assert tenant.status_code == 403 and tenant.json()["error"]["code"] == "admin_required"
    admin = client.get(f"{PREFIX}/api/ai/providers", headers=auth(ADMIN_KEY))
    assert admin.status_code == 200, admin.text


def test_dashboard_and_its_assets_load_from_under_the_prefix(client: httpx.Client) -> None:
    page_url = f"{client.base_url}{PREFIX}/api/ai/dashboard"
    page = client.get(page_url)
    assert page.status_code == 200
    links = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    assert len(links) == 2
    for link in links:  # as a browser resolves them: relative to the page
        assert client.get(urljoin(page_url, link)).status_code == 200, link
    # The page reads the API relative to itself too: the admin tail it polls is there.
    tail = client.get(urljoin(page_url, "admin/events"), headers=auth(ADMIN_KEY))
    assert tail.status_code == 200, tail.text


def test_the_openapi_document_names_the_prefix(client: httpx.Client) -> None:
    doc = client.get(f"{PREFIX}/api/ai/openapi.json").json()
    assert doc["servers"] == [{"url": PREFIX, "description": "where this gateway is mounted"}]
    assert "/api/ai/v1/chat/completions" in doc["paths"]


async def test_every_sdk_call_through_the_prefix_is_an_event(
        served: tuple[Server, GatewayApp]) -> None:
    host, app = served
    ids: dict[str, str] = {}  # request id -> endpoint
    async with openai.AsyncOpenAI(base_url=f"{host.url}/api/ai/v1", api_key=ACME_KEY,
                                  max_retries=0, timeout=20) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "through the mount"}])
        assert raw.parse().choices[0].message.content == "through the mount"
        ids[raw.headers["x-request-id"]] = "chat.completions"
        async with sdk.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}],
                stream=True) as streamed:
            ids[streamed.headers["x-request-id"]] = "chat.completions"
            text = [c.choices[0].delta.content async for c in await streamed.parse()
                    if c.choices and c.choices[0].delta.content]
        assert "".join(text) == "a b c"
        emb = await sdk.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["x"])
        ids[emb.headers["x-request-id"]] = "embeddings"
    assert app.gateway.events is not None
    embedded = app.gateway.events.embedded
    assert embedded is not None
    nc = await connect(embedded.url)
    try:
        async def found() -> dict[str, str]:
            events = await read_stream(nc, "tollway.call.>", timeout=0.5)
            return {e.request_id: e.endpoint for _, _, e in events
                    if isinstance(e, CallCompleted) and e.request_id in ids}

        seen: dict[str, str] = {}
        for _ in range(200):  # a hang detector: the events are published as calls end
            seen = await found()
            if len(seen) == len(ids):
                break
        assert seen == ids
    finally:
        await nc.close()
