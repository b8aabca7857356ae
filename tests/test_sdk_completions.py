"""The official openai SDK's legacy completions (``client.completions.create``) against a
real gateway and the simulated upstream, plain and streamed."""

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


def test_plain_with_suffix(sdk: openai.OpenAI, upstream: FakeUpstream,
                           recorder: ListRecorder) -> None:
    done = sdk.completions.create(model="gpt-4o-mini", prompt="def add(a, b):",
                                  suffix="    return c", max_tokens=32, temperature=0)
    assert done.object == "text_completion"
    assert done.choices[0].text == "def add(a, b):"
    assert done.choices[0].finish_reason == "stop"
    sent = upstream.requests[-1]
    assert sent.path == "/v1/completions"
    assert sent.body["suffix"] == "    return c" and sent.body["temperature"] == 0
    (rec,) = recorder.wait(1)
    assert done.usage is not None
    assert (rec.prompt_tokens, rec.completion_tokens) == (
        done.usage.prompt_tokens, done.usage.completion_tokens)
    assert rec.endpoint == "completions"


def test_streamed_with_and_without_usage(sdk: openai.OpenAI, recorder: ListRecorder) -> None:
    chunks = list(sdk.completions.create(model="gpt-4o-mini", prompt="stream these words",
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "stream these words"
    assert all(c.usage is None for c in chunks)  # not asked for: stripped
    chunks = list(sdk.completions.create(model="gpt-4o-mini", prompt="and these too",
                                         stream=True, stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    first, second = recorder.wait(2)
    assert first.stream and first.completion_tokens == 3
    assert second.completion_tokens == usage[0].completion_tokens
    assert second.prompt_tokens == usage[0].prompt_tokens


def test_errors_reach_the_sdk_as_its_exceptions(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="gpt-4o-mini", prompt="")
