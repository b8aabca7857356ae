"""The official anthropic SDK against a real gateway: the Messages API passed through to
an Anthropic provider and translated for an OpenAI-compatible one, plain and streamed,
tools included; beta headers, unknown fields and cache_control intact; prompt-cache
usage priced at its own prices; errors in Anthropic's shape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from support import ACME_KEY, UPSTREAM_KEY, ListRecorder, Server, gateway_env, make_raw_config
from tollway.app import create_app
from tollway.config import parse_config
from tollway.testing.upstream import FakeUpstream

TOOLS: list[Any] = [{"name": "lookup", "description": "look a word up",
                     "input_schema": {"type": "object", "properties": {"q": {"type": "string"}},
                                      "required": ["q"]}}]


class Rig:
    def __init__(self, url: str, upstream: FakeUpstream, recorder: ListRecorder,
                 kind: str) -> None:
        self.url = url
        self.upstream = upstream
        self.recorder = recorder
        self.kind = kind


@pytest.fixture(params=["anthropic", "openai"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    kind = request.param
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        raw = make_raw_config(up.base_url)
        raw["providers"][0]["kind"] = kind
        raw["models"].append({
            "id": "claude", "provider": "fake", "upstream": "gpt-4o-mini",
            "input_usd_per_mtok": 3.0, "output_usd_per_mtok": 15.0,
            "cache_read_usd_per_mtok": 0.3, "cache_write_usd_per_mtok": 3.75})
        recorder = ListRecorder()
        config = parse_config(raw, source="<test>", env=gateway_env())
        with Server(create_app(config, env=gateway_env(), recorder=recorder)) as server:
            yield Rig(server.url, up, recorder, kind)


@pytest.fixture
def sdk(rig: Rig) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=f"{rig.url}/api/ai", api_key=ACME_KEY,
                             max_retries=0, timeout=10) as client:
        yield client


def ask(text: str = "hello there world") -> list[Any]:
    return [{"role": "user", "content": text}]


def test_plain(sdk: anthropic.Anthropic, rig: Rig) -> None:
    msg = sdk.messages.create(model="claude", max_tokens=64, messages=ask(),
                              system="be brief")
    assert msg.type == "message" and msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "hello there world"  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    (rec,) = rig.recorder.wait(1)
    assert rec.endpoint == "messages" and rec.outcome == "completed"
    assert rec.prompt_tokens == msg.usage.input_tokens
    assert rec.completion_tokens == msg.usage.output_tokens
    sent = rig.upstream.requests[-1]
    if rig.kind == "anthropic":
        assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == UPSTREAM_KEY
        assert sent.body["system"] == "be brief" and sent.body["model"] == "gpt-4o-mini"
    else:
        assert sent.path == "/v1/chat/completions"
        assert sent.body["messages"][0] == {"role": "system", "content": "be brief"}


def test_max_tokens_stops_with_its_reason(sdk: anthropic.Anthropic) -> None:
    msg = sdk.messages.create(model="claude", max_tokens=2, messages=ask("one two three four"))
    assert msg.stop_reason == "max_tokens"
    assert msg.content[0].text == "one two"  # type: ignore[union-attr]


def test_streamed(sdk: anthropic.Anthropic, rig: Rig) -> None:
    with sdk.messages.stream(model="claude", max_tokens=64,
                             messages=ask("stream these words")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "stream these words"
    assert final.stop_reason == "end_turn"
    (rec,) = rig.recorder.wait(1)
    assert rec.stream and rec.outcome == "completed"
    assert rec.completion_tokens == final.usage.output_tokens == 3
    assert rec.prompt_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_tools(sdk: anthropic.Anthropic, rig: Rig, stream: bool) -> None:
    turn = ask("find cats")
    if stream:
        with sdk.messages.stream(model="claude", max_tokens=64, messages=turn,
                                 tools=TOOLS) as s:
            msg = s.get_final_message()
    else:
        msg = sdk.messages.create(model="claude", max_tokens=64, messages=turn, tools=TOOLS)
    assert msg.stop_reason == "tool_use"
    (use,) = msg.content
    assert use.type == "tool_use" and use.name == "lookup"
    assert use.input == {"q": "find cats"}
    # The tool's result goes back, and the conversation goes on.
    follow = sdk.messages.create(model="claude", max_tokens=64, tools=TOOLS, messages=[
        *turn, {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "a small animal"}]}],
        tool_choice={"type": "none"})
    assert follow.stop_reason == "end_turn"
    sent = rig.upstream.requests[-1].body
    if rig.kind == "openai":
        assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup"
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": use.id,
                                       "content": "a small animal"}
        assert sent["tool_choice"] == "none"
    else:
        assert sent["messages"][2]["content"][0]["tool_use_id"] == use.id


def test_beta_headers_unknown_fields_and_cache_control_pass_and_cache_is_priced(
        rig: Rig) -> None:
    with anthropic.Anthropic(base_url=f"{rig.url}/api/ai", api_key=ACME_KEY,
                             max_retries=0, timeout=10) as sdk:
        system: Any = [{"type": "text", "text": "a long shared instruction " * 20,
                        "cache_control": {"type": "ephemeral"}}]
        kw: dict[str, Any] = {"model": "claude", "max_tokens": 64, "system": system,
                              "messages": ask(), "extra_headers": {
                                  "anthropic-beta": "prompt-caching-2024-07-31",
                                  "anthropic-version": "2023-06-01"},
                              "extra_body": {"x_private": {"keep": True}}}
        first = sdk.messages.create(**kw)
        second = sdk.messages.create(**kw)
    recs = rig.recorder.wait(2)
    if rig.kind == "openai":
        # Chat completions has no cache_control: translated, the prompt is plain input.
        assert recs[0].prompt_tokens == first.usage.input_tokens
        return
    sent = rig.upstream.requests[-1]
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body["x_private"] == {"keep": True}
    assert sent.body["system"] == system  # cache_control intact
    written = first.usage.cache_creation_input_tokens
    read = second.usage.cache_read_input_tokens
    assert written and written == read and not second.usage.cache_creation_input_tokens
    for rec, usage, cache_pico in ((recs[0], first.usage, 3_750_000 * written),
                                   (recs[1], second.usage, 300_000 * read)):
        assert rec.prompt_tokens == usage.input_tokens + written
        assert (rec.cache_read_tokens, rec.cache_write_tokens) == (
            usage.cache_read_input_tokens, usage.cache_creation_input_tokens)
        pico = usage.input_tokens * 3_000_000 + usage.output_tokens * 15_000_000 + cache_pico
        assert rec.actual_cost_nanousd == -(-pico // 1000)
    assert recs[1].actual_cost_nanousd < recs[0].actual_cost_nanousd


def test_errors_in_anthropic_shape(rig: Rig) -> None:
    url = f"{rig.url}/api/ai"
    with anthropic.Anthropic(base_url=url, api_key="tw-wrong", max_retries=0) as bad, \
            pytest.raises(anthropic.AuthenticationError) as denied:
        bad.messages.create(model="claude", max_tokens=8, messages=ask())
    assert denied.value.body["type"] == "error"  # type: ignore[index]
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # A bearer key works as well as x-api-key.
    with anthropic.Anthropic(base_url=url, auth_token=ACME_KEY, api_key=None,
                             max_retries=0) as sdk:
        assert sdk.messages.create(model="claude", max_tokens=8, messages=ask()).content
        with pytest.raises(anthropic.NotFoundError) as missing:
            sdk.messages.create(model="no-such-model", max_tokens=8, messages=ask())
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError):
            sdk.messages.create(model="claude", max_tokens=8, messages=[])


def test_models_answer_in_anthropic_shape_to_anthropic_clients(sdk: anthropic.Anthropic) -> None:
    models = list(sdk.models.list())
    assert {m.id for m in models} >= {"claude", "gpt-4o-mini", "auto"}
    assert all(m.type == "model" and m.display_name == m.id for m in models)
    assert all(m.created_at.year >= 2026 for m in models)
