"""The official openai SDK's Responses API (``client.responses``) against a real gateway:
translated to the simulated upstream's chat completions, plain and streamed, tools
included; the state tollway does not keep is a clear 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from support import ACME_KEY, ListRecorder, Server
from tollway.testing.upstream import FakeUpstream

TOOLS: list[Any] = [{"type": "function", "name": "lookup", "description": "look a word up",
                     "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                    "required": ["q"]}}]


@pytest.fixture
def sdk(gateway: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/api/ai/v1", api_key=ACME_KEY,
                       max_retries=0, timeout=10) as client:
        yield client


def test_plain(sdk: openai.OpenAI, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    done = sdk.responses.create(model="gpt-4o-mini", input="hello there world",
                                instructions="be brief", store=False)
    assert done.object == "response" and done.status == "completed"
    assert done.output_text == "hello there world"
    sent = upstream.requests[-1]
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
def test_tools(sdk: openai.OpenAI, upstream: FakeUpstream, stream: bool) -> None:
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
    sent = upstream.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id,
                       "content": "a small animal"}


def test_state_tollway_does_not_keep_is_a_400(sdk: openai.OpenAI,
                                              upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as prev:
        sdk.responses.create(model="gpt-4o-mini", input="hi", previous_response_id="resp_1")
    assert prev.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(model="gpt-4o-mini", input="hi", store=True)
    assert upstream.requests == []
