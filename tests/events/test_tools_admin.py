"""The tool registry's admin API (issue 17): tools made through one gateway are folded into
every gateway's directory, requests name them, and /api/ai/usage counts calls per tool."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest

from support import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    UPSTREAM_KEY,
    Server,
    auth,
    chat_body,
    eventually,
    gateway_env,
    make_raw_config,
)
from tollway.app import create_app
from tollway.config import parse_config
from tollway.events.broker import EmbeddedNats
from tollway.events.schema import ToolChanged, ToolRemoved, decode
from tollway.testing.upstream import FakeUpstream

ADMIN = auth(ADMIN_KEY)
TOOLS = "/api/ai/admin/tools"
CHAT = "/api/ai/v1/chat/completions"
LOOKUP = {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}$"}},
          "required": ["sku"]}


@pytest.fixture
def pair(nats_server: EmbeddedNats, tmp_path: Path
         ) -> Iterator[tuple[httpx.Client, httpx.Client, FakeUpstream]]:
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(FakeUpstream(api_key=UPSTREAM_KEY))
        clients = []
        for name in "ab":
            raw = make_raw_config(up.base_url, nats={"url": nats_server.url,
                                                     "data_dir": str(tmp_path / name)},
                                  tools=[{"name": "from_config"}])
            cfg = parse_config(raw, source="<test>", env=gateway_env())
            server = stack.enter_context(Server(create_app(cfg, env=gateway_env())))
            clients.append(stack.enter_context(httpx.Client(base_url=server.url, timeout=10)))
            assert eventually(lambda c=clients[-1]: c.get("/api/ai/ready").status_code == 200)
        yield clients[0], clients[1], up


def _named(name: str) -> dict[str, Any]:
    return {"type": "registry", "name": name}


def test_a_tool_made_on_one_gateway_is_used_and_counted_on_the_other(
        pair: tuple[httpx.Client, httpx.Client, FakeUpstream], nats_server: EmbeddedNats
) -> None:
    a, b, up = pair
    r = a.put(f"{TOOLS}/lookup", headers=ADMIN,
              json={"description": "Find a product", "parameters": LOOKUP,
                    "tenants": ["acme"]})
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["source"] == "admin" and made["parameters"] == LOOKUP
    assert made["changed_by"].startswith("sha256:")

    def served_on_b() -> httpx.Response | None:
        r = b.post(CHAT, headers=auth(), json=chat_body("ABC", tools=[_named("lookup")]))
        return r if r.status_code == 200 else None

    r = eventually(served_on_b)
    assert r, "the tool never reached the other gateway"
    assert up.requests[-1].body["tools"][0]["function"]["description"] == "Find a product"
    assert r.headers["x-tollway-tool-arguments"] == "valid"  # the fake answers {"sku": "ABC"}
    up.replies.tool_arguments[:] = ['{"sku": "abc"}']
    r = b.post(CHAT, headers=auth(), json=chat_body("abc", tools=[_named("lookup")]))
    assert r.headers["x-tollway-tool-arguments"] == "invalid"
    # Another tenant may not name it.
    r = b.post(CHAT, headers=auth(GLOBEX_KEY),
               json=chat_body(model="fast", tools=[_named("lookup")]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "tool_not_found"

    def counted() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = a.get("/api/ai/usage", headers=auth(ACME_KEY)
                                           ).json()["by_tool"]
        return rows if rows and rows[0]["calls"] == 2 else None

    assert eventually(counted) == [{"key": "lookup", "calls": 2, "invalid": 1}]

    listed = {t["name"]: t["source"] for t in b.get(TOOLS, headers=ADMIN).json()["data"]}
    assert listed == {"from_config": "config", "lookup": "admin"}
    r = b.delete(f"{TOOLS}/lookup", headers=ADMIN)
    assert r.status_code == 200 and r.json()["name"] == "lookup"
    assert eventually(lambda: a.get(f"{TOOLS}/lookup", headers=ADMIN).status_code == 404)
    r = a.post(CHAT, headers=auth(), json=chat_body(tools=[_named("lookup")]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "tool_not_found"

    # The changes are admin events on the stream, naming the admin key.
    async def events() -> list[Any]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            sub = await js.subscribe("tollway.admin.tool.>", ordered_consumer=True)
            out = []
            for _ in range(2):
                msg = await sub.next_msg(timeout=5)
                out.append((msg.subject, decode(msg.data)))
            return out
        finally:
            await nc.close()

    (s1, e1), (s2, e2) = asyncio.run(events())
    assert s1 == "tollway.admin.tool.changed.lookup" and isinstance(e1, ToolChanged)
    assert e1.settings.parameters == LOOKUP and e1.admin == made["changed_by"]
    assert s2 == "tollway.admin.tool.removed.lookup" and isinstance(e2, ToolRemoved)


BAD = [
    ("bad", {"parameters": {"type": "string"}}, 400, "parameters"),
    ("bad", {"parameters": {"type": "object", "properties": {"a": {"type": 5}}}}, 400,
     "parameters"),
    ("bad", {"parameters": {"type": "object", "$ref": "https://example.com/s.json"}}, 400,
     "parameters"),
    ("bad", {"parameters": {"type": "object"}, "surprise": 1}, 400, None),
    ("bad", {"parameters": {"type": "object"}, "tenants": ["no spaces"]}, 400, "tenants[0]"),
    ("no.dots", {"parameters": {"type": "object"}}, 400, "name"),
    ("from_config", {"parameters": {"type": "object"}}, 409, None),
]


def test_bad_tools_are_refused(pair: tuple[httpx.Client, httpx.Client, FakeUpstream]) -> None:
    a, _, _ = pair
    for name, body, status, param in BAD:
        r = a.put(f"{TOOLS}/{name}", headers=ADMIN, content=json.dumps(body))
        assert r.status_code == status, (name, body, r.text)
        if param is not None:
            assert r.json()["error"]["param"] == param, (name, body)
    assert a.delete(f"{TOOLS}/from_config", headers=ADMIN).status_code == 409
    assert a.delete(f"{TOOLS}/never_made", headers=ADMIN).status_code == 404
    assert a.put(f"{TOOLS}/x", headers=auth(ACME_KEY),
                 json={"parameters": {"type": "object"}}).status_code == 403
    assert msgspec.json.decode(a.get(TOOLS, headers=ADMIN).content)["data"][0]["name"] == (
        "from_config")
