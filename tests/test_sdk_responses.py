"""The official openai SDK's Responses API (``client.responses``) against a real gateway:
passed through to a provider that serves it (``responses = true``) and translated to
the chat completions of one that does not, plain and streamed, tools included; the
state only the first kind keeps is a clear 400 on the second."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from support import (
    ACME_KEY,
    MOUNTS,
    UPSTREAM_KEY,
    ListRecorder,
    Server,
    gateway_env,
    make_raw_config,
    mounted,
)
from tollway.app import create_app
from tollway.config import parse_config
from tollway.testing.upstream import FakeUpstream

TOOLS: list[Any] = [{"type": "function", "name": "lookup", "description": "look a word up",
                     "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                    "required": ["q"]}}]


@pytest.fixture(params=[False, True], ids=["translated", "passed"])
def native(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=[m for m in MOUNTS if m != "starlette"])
def gateway(request: pytest.FixtureRequest, upstream: FakeUpstream, recorder: ListRecorder,
            native: bool) -> Iterator[Server]:
    """At the root and through a mount prefix (FastAPI's, which is Starlette's Mount; the
    Starlette host runs test_sdk.py and test_sdk_completions.py)."""
    raw = make_raw_config(upstream.base_url)
    raw["providers"][0]["responses"] = native
    config = parse_config(raw, source="<test>", env=gateway_env())
    with mounted(create_app(config, env=gateway_env(), recorder=recorder),
                 request.param) as server:
        yield server


@pytest.fixture
def sdk(gateway: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/api/ai/v1", api_key=ACME_KEY,
                       max_retries=0, timeout=10) as client:
        yield client


def test_plain(sdk: openai.OpenAI, upstream: FakeUpstream, recorder: ListRecorder,
               native: bool) -> None:
    done = sdk.responses.create(model="gpt-4o-mini", input="hello there world",
                                instructions="be brief", store=False,
                                extra_body={"x_private": 1})
    assert done.object == "response" and done.status == "completed"
    assert done.output_text == "hello there world"
    sent = upstream.requests[-1]
    if native:  # the caller's body, unknown fields and all
        assert sent.path == "/v1/responses" and sent.body["x_private"] == 1
        assert sent.body["instructions"] == "be brief"
        assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    else:
        assert sent.path == "/v1/chat/completions"
        assert sent.body["messages"] == [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "hello there world"}]
    (rec,) = recorder.wait(1)
    assert rec.endpoint == "responses" and rec.outcome == "completed"
    assert done.usage is not None
    assert (rec.prompt_tokens, rec.completion_tokens) == (
        done.usage.input_tokens, done.usage.output_tokens)


def test_cut_output_is_incomplete(sdk: openai.OpenAI) -> None:
    done = sdk.responses.create(model="gpt-4o-mini", input="one two three four",
                                max_output_tokens=16)
    assert done.status == "completed"
    cut = sdk.responses.create(model="gpt-4o-mini", input=" ".join(["w"] * 40),
                               max_output_tokens=16)
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"


def test_streamed(sdk: openai.OpenAI, recorder: ListRecorder) -> None:
    with sdk.responses.stream(model="gpt-4o-mini", input="stream these words") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "stream these words" == final.output_text
    assert final.status == "completed" and final.usage is not None
    (rec,) = recorder.wait(1)
    assert rec.stream and rec.completion_tokens == final.usage.output_tokens == 3
    assert rec.prompt_tokens == final.usage.input_tokens
    events = list(sdk.responses.create(model="gpt-4o-mini", input="a b", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"


@pytest.mark.parametrize("stream", [False, True])
def test_tools(sdk: openai.OpenAI, upstream: FakeUpstream, stream: bool, native: bool) -> None:
    if stream:
        with sdk.responses.stream(model="gpt-4o-mini", input="find cats", tools=TOOLS) as s:
            done = s.get_final_response()
    else:
        done = sdk.responses.create(model="gpt-4o-mini", input="find cats", tools=TOOLS)
    (call,) = done.output
    assert call.type == "function_call" and call.name == "lookup"
    assert json.loads(call.arguments) == {"q": "find cats"}
    follow = sdk.responses.create(model="gpt-4o-mini", tools=TOOLS, tool_choice="none", input=[
        {"role": "user", "content": "find cats"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "a small animal"}])
    assert follow.status == "completed"
    if native:
        assert upstream.requests[-1].body["input"][2]["call_id"] == call.call_id
        return
    sent = upstream.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id,
                       "content": "a small animal"}


def test_state_goes_where_it_is_kept_and_is_a_400_elsewhere(
        sdk: openai.OpenAI, upstream: FakeUpstream, native: bool) -> None:
    if native:  # the provider keeps it: both pass, and the provider reads them
        first = sdk.responses.create(model="gpt-4o-mini", input="hi", store=True)
        again = sdk.responses.create(model="gpt-4o-mini", input="and then",
                                     previous_response_id=first.id)
        assert again.status == "completed"
        assert upstream.requests[-1].body["previous_response_id"] == first.id
        with pytest.raises(openai.BadRequestError):  # the provider's own 400, passed back
            sdk.responses.create(model="gpt-4o-mini", input="hi",
                                 previous_response_id="resp_unknown")
        return
    with pytest.raises(openai.BadRequestError) as prev:
        sdk.responses.create(model="gpt-4o-mini", input="hi", previous_response_id="resp_1")
    assert prev.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert "keeps response state" in prev.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(model="gpt-4o-mini", input="hi", store=True)
    assert upstream.requests == []


def test_structured_output(sdk: openai.OpenAI, upstream: FakeUpstream, native: bool) -> None:
    schema = {"type": "object", "properties": {"echo": {"type": "string"}},
              "required": ["echo"], "additionalProperties": False}
    fmt: Any = {"format": {"type": "json_schema", "name": "echo", "schema": schema,
                           "strict": True}}
    done = sdk.responses.create(model="gpt-4o-mini", input="say this", text=fmt)
    assert json.loads(done.output_text) == {"echo": "say this"}
    assert done.text is not None and done.text.format.type == "json_schema"
    if not native:
        sent = upstream.requests[-1].body
        assert sent["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "echo", "schema": schema, "strict": True}}
