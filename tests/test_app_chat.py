"""Chat completions through a real server: passthrough, streaming, usage, failover, headers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec

from support import ListRecorder, Server, auth, chat_body
from tollway.testing.upstream import FakeUpstream, Fault
from tollway.tokens import count_chat_tokens, count_tokens

CHAT = "/api/ai/v1/chat/completions"


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_non_stream_passes_reply_and_unknown_fields_through(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    body = chat_body("tell me something", foo_unknown={"nested": [1, 2]}, seed=7,
                     response_format={"type": "text"})
    r = client.post(CHAT, json=body, headers=auth())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "tell me something"
    sent = upstream.requests[-1]
    assert sent.body == body  # every field, unknown ones included, untouched
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret-do-not-log-4242"
    assert r.headers["x-tollway-provider"] == "fake"
    assert r.headers["x-tollway-model"] == "gpt-4o-mini"
    (rec,) = recorder.wait(1)
    assert rec.outcome == "completed" and rec.tenant == "acme" and rec.status == 200
    assert rec.prompt_tokens == data["usage"]["prompt_tokens"]
    assert rec.completion_tokens == data["usage"]["completion_tokens"]
    # 0.15 and 0.60 USD per million tokens are 150 and 600 nano-USD per token.
    expected = rec.prompt_tokens * 150 + rec.completion_tokens * 600
    assert rec.actual_cost_nanousd == expected
    assert float(r.headers["x-tollway-cost-usd"]) == expected / 1e9
    assert rec.request_id == r.headers["x-request-id"]
    assert rec.attempts == 1 and rec.fallbacks == () and not rec.stream


def test_upstream_model_name_replaces_model(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    r = client.post(CHAT, json=chat_body(model="fast", extra_field=True), headers=auth())
    assert r.status_code == 200
    sent = upstream.requests[-1].body
    assert sent["model"] == "gpt-4o-mini" and sent["extra_field"] is True
    assert r.headers["x-tollway-model"] == "fast"
    (rec,) = recorder.wait(1)
    assert rec.model == "fast" and rec.upstream_model == "gpt-4o-mini" and rec.route == "fast"


def test_stream_relays_chunks_and_strips_usage_not_asked_for(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    r = client.post(CHAT, json=chat_body("one two three four", stream=True), headers=auth())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "one two three four"
    assert not any(c.get("usage") for c in chunks)  # the caller did not ask
    # ... but tollway asked the provider, to count exactly.
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    (rec,) = recorder.wait(1)
    assert rec.stream and rec.outcome == "completed"
    assert rec.completion_tokens == count_tokens(" ".join(["one", "two", "three", "four"]))
    assert rec.ttft_s is not None and 0 < rec.ttft_s <= rec.latency_s


def test_stream_include_usage_is_honoured(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    body = chat_body("hi there", stream=True, stream_options={"include_usage": True})
    # Spaced JSON of our own making: the provider must get these very bytes, whatever the
    # HTTP client's JSON looks like and however tollway would re-encode them.
    raw = json.dumps(body).encode()
    r = client.post(CHAT, content=raw, headers={**auth(), "content-type": "application/json"})
    events = sse_events(r.text)
    usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert len(usage) == 1
    (rec,) = recorder.wait(1)
    assert usage[0]["prompt_tokens"] == rec.prompt_tokens
    assert usage[0]["completion_tokens"] == rec.completion_tokens
    assert upstream.requests[-1].raw_body == raw


def test_stream_without_upstream_usage_is_counted_and_synthesised(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    # A provider that ignores stream_options: the gateway counts the tokens itself.
    events = [
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        for piece in ("Hello", " wide", " world")
    ]
    payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    upstream.add_fault(Fault(status=200, body=payload,
                             headers={"content-type": "text/event-stream"}))
    body = chat_body("count me please", stream=True, stream_options={"include_usage": True})
    r = client.post(CHAT, json=body, headers=auth())
    assert r.status_code == 200
    got = sse_events(r.text)
    assert got[-1] == "[DONE]"
    usage = json.loads(got[-2])["usage"]
    prompt = count_chat_tokens(body["messages"], "gpt-4o-mini")
    assert usage == {"prompt_tokens": prompt, "completion_tokens": count_tokens("Hello wide world"),
                     "total_tokens": prompt + count_tokens("Hello wide world")}
    (rec,) = recorder.wait(1)
    assert (rec.prompt_tokens, rec.completion_tokens) == (prompt, 3)


def test_non_stream_without_upstream_usage_is_counted(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    reply = {"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "four words right here"}}]}
    upstream.add_fault(Fault(status=200, body=reply))
    body = chat_body("no usage today")
    assert client.post(CHAT, json=body, headers=auth()).status_code == 200
    (rec,) = recorder.wait(1)
    assert rec.prompt_tokens == count_chat_tokens(body["messages"], "gpt-4o-mini")
    assert rec.completion_tokens == count_tokens("four words right here")


def test_tools_pass_through(client: httpx.Client, upstream: FakeUpstream) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = client.post(CHAT, json=chat_body("weather in Paris?", tools=tools,
                                         tool_choice="auto"), headers=auth())
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert upstream.requests[-1].body["tools"] == tools


def test_failover_to_next_candidate_on_5xx(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    # `auto` is [gpt-4o-mini, fast]; both live on the one fake provider, so fail the first
    # request only and the second candidate answers.
    upstream.add_fault(Fault(status=500, times=1))
    r = client.post(CHAT, json=chat_body(model="auto"), headers=auth())
    assert r.status_code == 200, r.text
    assert r.headers["x-tollway-model"] == "fast"
    (rec,) = recorder.wait(1)
    assert rec.attempts == 2 and rec.fallbacks == ("fake",) and rec.model == "fast"
    assert rec.route == "auto"


def test_every_candidate_failing_reports_each(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    upstream.add_fault(Fault(status=502, times=2))
    r = client.post(CHAT, json=chat_body(model="auto"), headers=auth())
    assert r.status_code == 502
    err = r.json()["error"]
    assert "all 2 candidates failed" in err["message"]
    assert "gpt-4o-mini" in err["message"] and "fast" in err["message"]
    (rec,) = recorder.wait(1)
    assert rec.outcome == "failed" and rec.status == 502 and rec.attempts == 2


def upstream_error(client: httpx.Client, upstream: FakeUpstream, fault: Fault) -> httpx.Response:
    upstream.add_fault(fault)
    return client.post(CHAT, json=chat_body(), headers=auth())


def test_provider_429_is_not_the_callers_429(client: httpx.Client, upstream: FakeUpstream) -> None:
    r = upstream_error(client, upstream, Fault(status=429, retry_after=7))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_rate_limited"
    assert r.headers["retry-after"] == "7"


def test_provider_400_is_passed_back_with_its_message(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    body = {"error": {"message": "max_tokens is too large for this model",
                      "type": "invalid_request_error", "param": "max_tokens",
                      "code": "invalid_value"}}
    r = upstream_error(client, upstream, Fault(status=400, body=body))
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "max_tokens is too large for this model",
                                 "type": "invalid_request_error", "param": "max_tokens",
                                 "code": "invalid_value"}
    (rec,) = recorder.wait(1)
    assert rec.outcome == "failed" and rec.attempts == 1


def test_provider_401_is_a_gateway_problem_not_the_callers(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    r = upstream_error(client, upstream, Fault(status=401))
    assert r.status_code == 502
    assert "credentials" in r.json()["error"]["message"]
    assert "sk-upstream" not in r.text


def test_upstream_timeout_is_504(upstream: FakeUpstream, recorder: ListRecorder) -> None:
    from support import gateway_env, make_raw_config
    from tollway.app import create_app
    from tollway.config import parse_config

    raw = make_raw_config(upstream.base_url)
    raw["providers"][0]["first_byte_timeout_s"] = 0.3
    app = create_app(parse_config(raw, env=gateway_env()), env=gateway_env(), recorder=recorder)
    upstream.add_fault(Fault(kind="timeout", delay_s=3.0))
    with Server(app) as server, httpx.Client(base_url=server.url) as c:
        r = c.post(CHAT, json=chat_body(), headers=auth())
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        assert c.post(CHAT, json=chat_body(), headers=auth()).status_code == 200


def test_connection_reset_is_502(client: httpx.Client, upstream: FakeUpstream) -> None:
    r = upstream_error(client, upstream, Fault(kind="reset"))
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_error"
    assert client.post(CHAT, json=chat_body(), headers=auth()).status_code == 200


def test_stream_cut_midway_ends_with_error_event(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    upstream.add_fault(Fault(kind="cut_stream", after_chunks=2))
    r = client.post(CHAT, json=chat_body("a b c d e f", stream=True), headers=auth())
    events = sse_events(r.text)
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["type"] == "upstream_error"
    (rec,) = recorder.wait(1)
    assert rec.outcome == "failed" and rec.stream and rec.status == 502
    assert rec.prompt_tokens > 0  # what was streamed is still accounted


def test_request_id_is_echoed_or_generated(client: httpx.Client, recorder: ListRecorder) -> None:
    r = client.post(CHAT, json=chat_body(), headers={**auth(), "X-Request-ID": "abc-123.x:y"})
    assert r.headers["x-request-id"] == "abc-123.x:y"
    bad = client.post(CHAT, json=chat_body(), headers={**auth(), "X-Request-ID": "a b<script>"})
    assert bad.headers["x-request-id"] != "a b<script>"
    assert len(bad.headers["x-request-id"]) == 32
    long = client.get("/api/ai/health", headers={"X-Request-ID": "x" * 500})
    assert len(long.headers["x-request-id"]) == 32
    assert [rec.request_id for rec in recorder.wait(2)] == ["abc-123.x:y",
                                                           bad.headers["x-request-id"]]


def test_every_response_has_overhead_header(client: httpx.Client) -> None:
    responses = [
        client.post(CHAT, json=chat_body(), headers=auth()),
        client.post(CHAT, content=b"{", headers=auth()),
        client.get("/api/ai/health"),
        client.get("/api/ai/metrics"),
        client.get("/api/ai/v1/models"),  # 401
        client.get("/nowhere", headers=auth()),  # 404
    ]
    for r in responses:
        overhead = float(r.headers["x-tollway-overhead-ms"])
        assert 0.0 <= overhead < 1000.0
        assert r.headers["x-request-id"]


def test_hint_headers_are_validated_and_recorded(
    client: httpx.Client, recorder: ListRecorder
) -> None:
    headers: dict[str, Any] = {**auth(), "X-Tollway-Task": "summarize",
                               "X-Tollway-Sensitivity": "internal",
                               "X-Tollway-Latency": "batch", "X-Tollway-Budget-Tier": "low"}
    assert client.post(CHAT, json=chat_body(), headers=headers).status_code == 200
    r = client.post(CHAT, json=chat_body(), headers={**auth(), "X-Tollway-Task": "poetry"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-tollway-task"
    r = client.post(CHAT, json=chat_body(), headers={**auth(), "X-Tollway-Budget-Tier": "premium"})
    assert r.status_code == 400  # may only lower the tier
    first = recorder.wait(3)[0]
    assert (first.task, first.sensitivity, first.latency_class, first.tier) == (
        "summarize", "internal", "batch", "low")


def test_embeddings(client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder) -> None:
    body = {"model": "text-embedding-3-small", "input": ["alpha beta", "gamma"],
            "dimensions": 8}
    r = client.post("/api/ai/v1/embeddings", json=body, headers=auth())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "list" and len(data["data"]) == 2
    assert upstream.requests[-1].body == body
    (rec,) = recorder.wait(1)
    assert rec.endpoint == "embeddings" and rec.prompt_tokens == data["usage"]["prompt_tokens"]
    assert rec.actual_cost_nanousd == rec.prompt_tokens * 20


def test_models_lists_what_the_tenant_may_use(client: httpx.Client) -> None:
    from support import GLOBEX_KEY

    r = client.get("/api/ai/v1/models", headers=auth())
    data = r.json()
    assert data["object"] == "list"
    ids = {m["id"]: m["owned_by"] for m in data["data"]}
    assert ids == {"gpt-4o-mini": "fake", "fast": "fake", "text-embedding-3-small": "fake",
                   "auto": "tollway"}
    assert all(m["object"] == "model" for m in data["data"])
    other = client.get("/api/ai/v1/models", headers=auth(GLOBEX_KEY)).json()
    assert [m["id"] for m in other["data"]] == ["fast"]


def test_record_is_a_valid_msgspec_struct(client: httpx.Client, recorder: ListRecorder) -> None:
    client.post(CHAT, json=chat_body(), headers=auth())
    (rec,) = recorder.wait(1)
    again = msgspec.json.decode(msgspec.json.encode(rec), type=type(rec))
    assert again == rec


def test_unreadable_provider_reply_fails_over(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    upstream.add_fault(Fault(status=200, body="<html>gateway page</html>"))
    r = client.post(CHAT, json=chat_body(model="auto"), headers=auth())
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    (rec,) = recorder.wait(1)
    assert rec.fallbacks == ("fake",) and rec.model == "fast"
    upstream.add_fault(Fault(status=200, body="not json"))
    bad = client.post(CHAT, json=chat_body(), headers=auth())
    assert bad.status_code == 502 and "unreadable" in bad.json()["error"]["message"]
