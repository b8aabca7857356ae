"""The cache's key and entries, without a server."""

from __future__ import annotations

import json

from tollway.cache.entry import as_sse, from_stream, storable
from tollway.cache.key import cache_control, cache_key, canonical


def _body(**kw: object) -> bytes:
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}],
                       "temperature": 0, **kw}).encode()


def test_key_separates_tenants_models_and_requests() -> None:
    k = cache_key("acme", "gpt-4o-mini", _body())
    assert k == cache_key("acme", "gpt-4o-mini", _body())
    assert k != cache_key("globex", "gpt-4o-mini", _body())
    assert k != cache_key("acme", "fast", _body())
    assert k != cache_key("acme", "gpt-4o-mini", _body(top_p=0.5))
    assert k != cache_key("acme", "gpt-4o-mini", _body(tools=[{"type": "function"}]))
    assert k != cache_key("acme", "gpt-4o-mini", _body(response_format={"type": "json_object"}))
    # How it is delivered, and the alias asked for, do not change the answer.
    assert k == cache_key("acme", "gpt-4o-mini", _body(stream=True, model="other",
                                                       stream_options={"include_usage": True},
                                                       user="u1"))
    # Field order does not matter; a tenant id cannot run into the model's name.
    swapped = b'{"temperature":0,"messages":[{"content":"hi","role":"user"}],"model":"auto"}'
    assert canonical(swapped) == canonical(_body())
    assert cache_key("ab", "c", _body()) != cache_key("a", "bc", _body())


def test_cache_control_directives() -> None:
    assert cache_control("no-cache") == (True, False)
    assert cache_control("No-Store") == (True, True)
    assert cache_control("max-age=0, no-store") == (True, True)
    assert cache_control("max-age=60") == (False, False)


def _completion(message: dict[str, object], finish: str = "stop") -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "created": 7, "model": "m",
                       "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                 "total_tokens": 5}}).encode()


def test_storable_refuses_refusals_filters_and_empties() -> None:
    assert storable(_completion({"role": "assistant", "content": "ok"}))
    assert not storable(_completion({"role": "assistant", "content": None, "refusal": "no"}))
    assert not storable(_completion({"role": "assistant", "content": "x"}, "content_filter"))
    assert not storable(_completion({"role": "assistant", "content": ""}))
    assert not storable(b'{"error": {"message": "boom"}}')
    assert not storable(b"not json")


def test_sse_round_trip_keeps_text_and_tool_calls() -> None:
    tool = {"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{\"a\": 1}"}}
    for message, finish in (({"role": "assistant", "content": "hello world"}, "stop"),
                            ({"role": "assistant", "content": None, "tool_calls": [tool]},
                             "tool_calls")):
        body = _completion(message, finish)
        sse = as_sse(body, include_usage=True)
        assert sse.endswith(b"data: [DONE]\n\n")
        back = json.loads(from_stream(sse, 3, 2) or b"null")
        got = back["choices"][0]
        assert got["finish_reason"] == finish
        assert got["message"]["content"] == message["content"]
        assert got["message"].get("tool_calls") == message.get("tool_calls")
        assert back["usage"]["total_tokens"] == 5
        assert b'"usage"' not in as_sse(body, include_usage=False)


def test_a_stream_without_its_finish_or_with_an_error_is_not_a_completion() -> None:
    sse = as_sse(_completion({"role": "assistant", "content": "hi"}), False)
    first = sse.split(b"\n\n")[0] + b"\n\n"
    assert from_stream(first, 1, 1) is None  # cut before the finish reason
    assert from_stream(sse + b'data: {"error": {"message": "x"}}\n\n', 1, 1) is None
    refused = (b'data: {"id":"c","created":1,"model":"m","choices":[{"index":0,'
               b'"delta":{"refusal":"no"},"finish_reason":"stop"}]}\n\n')
    assert from_stream(refused, 1, 1) is None
