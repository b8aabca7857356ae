"""The tool registry through a real gateway (config tools; the admin API's are in
tests/events/test_tools_admin.py): inlining, argument checks on whole replies and streams,
the one retry, refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support import (
    GLOBEX_KEY,
    UPSTREAM_KEY,
    ListRecorder,
    Server,
    auth,
    chat_body,
    gateway_env,
    make_config,
)
from tollway.app import create_app
from tollway.record import CallRecord
from tollway.testing.replies import count_tokens
from tollway.testing.upstream import FakeUpstream

CHAT = "/api/ai/v1/chat/completions"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1},
                   "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    {"name": "globex_only", "parameters": {"type": "object"}, "tenants": ["globex"]},
]
REGISTRY = {"type": "registry", "name": "get_weather"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture(scope="module")
def recorder() -> ListRecorder:
    return ListRecorder()


@pytest.fixture(scope="module")
def client(upstream: FakeUpstream, recorder: ListRecorder) -> Iterator[httpx.Client]:
    config = make_config(upstream.base_url, tools=TOOLS,
                         tool_calls={"retry_invalid": True})
    with Server(create_app(config, env=gateway_env(), recorder=recorder)) as server, \
            httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _post(client: httpx.Client, recorder: ListRecorder, body: dict[str, Any],
          key: str | None = None) -> tuple[httpx.Response, CallRecord]:
    before = len(recorder.records)
    r = client.post(CHAT, json=body, headers=auth(key) if key else auth())
    return r, recorder.wait(before + 1)[before]


def test_registry_tool_is_inlined_and_valid_arguments_pass(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    own = {"type": "function", "function": {"name": "mine", "parameters": {"type": "object"}}}
    r, rec = _post(client, recorder, chat_body("Paris", tools=[REGISTRY, own],
                                               tool_choice={"type": "function",
                                                            "function": {"name": "get_weather"}}))
    assert r.status_code == 200, r.text
    sent = upstream.requests[-1].body["tools"]
    assert sent == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER, "description": "The weather in a city"}},
        own]
    call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert r.headers["x-tollway-tool-arguments"] == "valid"
    assert "x-tollway-tool-invalid" not in r.headers
    assert rec.tool_calls == ("get_weather",) and rec.tool_calls_invalid == ()
    assert not rec.tool_retried and rec.attempts == 1
    # The prompt counted is the inlined one (the provider's count of the same tools).
    assert rec.prompt_tokens == r.json()["usage"]["prompt_tokens"]


def test_invalid_arguments_are_retried_once_and_flagged(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    # A stream is never asked for again: the budget holds one reply for it ...
    one = _post(client, recorder, chat_body("Oslo", tools=[REGISTRY], stream=True))[1]
    upstream.replies.tool_arguments[:] = ['{"city": ""}', '{"city": "Oslo", "wind": 3}']
    r, rec = _post(client, recorder, chat_body("Oslo", tools=[REGISTRY]))
    assert r.status_code == 200
    # ... and two for a whole reply that may be asked for once more: the retry is paid for.
    assert rec.estimated_cost_nanousd == 2 * one.estimated_cost_nanousd > 0
    assert rec.actual_cost_nanousd <= rec.estimated_cost_nanousd
    assert r.headers["x-tollway-tool-arguments"] == "invalid"
    assert r.headers["x-tollway-tool-invalid"] == "get_weather"
    # The client gets the second reply; the call costs both.
    assert json.loads(r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
                      ["arguments"]) == {"city": "Oslo", "wind": 3}
    assert rec.tool_retried and rec.attempts == 2
    assert rec.tool_calls == ("get_weather",) and rec.tool_calls_invalid == ("get_weather",)
    assert rec.prompt_tokens == 2 * r.json()["usage"]["prompt_tokens"]
    first = count_tokens("get_weather") + count_tokens('{"city": ""}')  # as the fake counts
    assert rec.completion_tokens == first + r.json()["usage"]["completion_tokens"]


def test_a_retry_that_fixes_the_arguments_answers_valid(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    upstream.replies.tool_arguments[:] = ["not json"]
    r, rec = _post(client, recorder, chat_body("Rome", tools=[REGISTRY]))
    assert r.status_code == 200
    assert r.headers["x-tollway-tool-arguments"] == "valid"
    assert rec.tool_retried and rec.tool_calls_invalid == () and rec.attempts == 2


def test_stream_is_checked_at_its_end(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    upstream.replies.tool_arguments[:] = ['{"city": "Lima", "unit": "kelvin"}']
    r, rec = _post(client, recorder, chat_body("Lima", tools=[REGISTRY], stream=True))
    assert r.status_code == 200
    assert "x-tollway-tool-arguments" not in r.headers  # the headers left first
    assert r.text.endswith(": tollway tool-arguments invalid get_weather\n\n"
                           "data: [DONE]\n\n")
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.text.split("\n")
              if line.startswith("data: {")]
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in deltas
                   if d.get("tool_calls"))
    assert json.loads(args) == {"city": "Lima", "unit": "kelvin"}
    assert rec.stream and not rec.tool_retried  # a stream cannot be asked again
    assert rec.tool_calls == ("get_weather",) and rec.tool_calls_invalid == ("get_weather",)

    r, rec = _post(client, recorder, chat_body("Lima", tools=[REGISTRY], stream=True))
    assert ": tollway tool-arguments valid\n\n" in r.text
    assert rec.tool_calls == ("get_weather",) and rec.tool_calls_invalid == ()


def test_metrics_count_tool_calls_by_verdict(client: httpx.Client) -> None:
    # After the tests above (the module shares one gateway): their calls, as the records.
    lines = client.get("/api/ai/metrics").text.splitlines()

    def value(arguments: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith("tollway_tool_calls_total{")
                   and 'tool="get_weather"' in line and f'arguments="{arguments}"' in line)

    assert value("invalid") == 2  # the retried reply, still invalid, and the stream
    assert value("valid") == 4  # with the stream the retry test compares its hold with


def test_calls_without_registry_tools_are_untouched(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    own = {"type": "function", "function": {"name": "get_weather",
                                            "parameters": {"type": "object"}}}
    upstream.replies.tool_arguments[:] = ['{"anything": 1}']
    body = chat_body("x", tools=[own])
    r, rec = _post(client, recorder, body)
    assert r.status_code == 200 and upstream.requests[-1].body == body
    assert "x-tollway-tool-arguments" not in r.headers
    assert rec.tool_calls == () and not rec.tool_retried


@pytest.mark.parametrize(("entry", "key"), [
    ({"type": "registry", "name": "no_such_tool"}, None),
    ({"type": "registry", "name": "globex_only"}, None),  # another tenant's
    ({"type": "registry"}, None),
])
def test_unknown_or_forbidden_tools_are_refused(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder,
        entry: dict[str, Any], key: str | None) -> None:
    sent = len(upstream.requests)
    r, rec = _post(client, recorder, chat_body(tools=[entry]), key)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "tool_not_found"
    assert r.json()["error"]["param"] == "tools[0]"
    assert rec.outcome == "rejected" and len(upstream.requests) == sent


def test_a_tenant_listed_may_use_its_tool(
        client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    body = chat_body(model="fast", tools=[{"type": "registry", "name": "globex_only"}])
    r, rec = _post(client, recorder, body, GLOBEX_KEY)
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].body["tools"][0]["function"]["name"] == "globex_only"
    assert rec.tool_calls == ("globex_only",) and rec.tool_calls_invalid == ()
