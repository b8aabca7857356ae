"""The official openai SDK against a real gateway on uvicorn and the simulated upstream."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from support import ACME_KEY, ListRecorder, Server
from tollway.testing.upstream import FakeUpstream


@pytest.fixture
def gateway(mounted_gateway: Server) -> Server:
    """These tests run at the root and through a mount prefix (Starlette, FastAPI)."""
    return mounted_gateway


@pytest.fixture
def sdk(gateway: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/api/ai/v1", api_key=ACME_KEY,
                       max_retries=0, timeout=10) as client:
        yield client


def test_chat(sdk: openai.OpenAI, recorder: ListRecorder) -> None:
    done = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello sdk"}])
    assert done.choices[0].message.content == "hello sdk"
    assert done.usage is not None and done.usage.total_tokens > 0
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tollway-provider"] == "fake"
    assert float(raw.headers["x-tollway-cost-usd"]) > 0
    assert len(recorder.wait(2)) == 2


def test_streaming(sdk: openai.OpenAI, recorder: ListRecorder) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream these words"}],
        stream=True, stream_options={"include_usage": True})
    text, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text) == "stream these words"
    (rec,) = recorder.wait(1)
    assert usage is not None and usage.completion_tokens == rec.completion_tokens


def test_tools_pass_through(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    tools = [{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object",
                                         "properties": {"q": {"type": "string"}}}}}]
    done = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "look it up"}],
        tools=tools, tool_choice="auto")  # type: ignore[arg-type]
    call = done.choices[0].message.tool_calls
    assert call and call[0].function.name == "lookup"  # type: ignore[union-attr]
    assert done.choices[0].finish_reason == "tool_calls"
    assert upstream.requests[-1].body["tools"] == tools


def test_embeddings(sdk: openai.OpenAI) -> None:
    out = sdk.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    assert len(out.data) == 2 and len(out.data[0].embedding) > 0
    assert out.usage.prompt_tokens > 0


def test_models(sdk: openai.OpenAI) -> None:
    ids = {m.id for m in sdk.models.list()}
    assert ids == {"gpt-4o-mini", "fast", "text-embedding-3-small", "auto"}


def test_bad_key_raises_authentication_error(gateway: Server) -> None:
    with openai.OpenAI(base_url=f"{gateway.url}/api/ai/v1", api_key="tw-nope",
                       max_retries=0) as bad, pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="gpt-4o-mini",
                                    messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401


def test_bad_request_raises_bad_request_error(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert err.value.status_code == 400
    assert err.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user"}],
                                    temperature=7)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
