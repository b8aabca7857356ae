"""The simulated upstream, driven over real HTTP by plain clients: httpx, sockets, the SDK."""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tollway.testing import FakeUpstream, Fault

AUTH = {"authorization": "Bearer sk-test"}


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def client(up: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.base_url, headers=AUTH, timeout=5.0) as c:
        yield c


def chat(content: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


def chunks(text: str) -> list[dict[str, Any]]:
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit", "days"],
        },
    },
}


# ---- chat, non-stream


def test_chat_echoes_the_last_user_message_with_usage(
    up: FakeUpstream, client: httpx.Client
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "second question here"}]},
        ],
    }
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "gpt-4o-mini"
    choice = data["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "second question here",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] > usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the same request gets the same content and usage: the upstream is deterministic
    again = client.post("/chat/completions", json=body).json()
    assert again["choices"] == data["choices"] and again["usage"] == usage


def test_max_tokens_truncates_with_finish_reason_length(client: httpx.Client) -> None:
    data = client.post("/chat/completions", json=chat("a b c d e f", max_tokens=2)).json()
    assert data["choices"][0]["message"]["content"] == "a b"
    assert data["choices"][0]["finish_reason"] == "length"


def test_reply_words_fixes_the_reply_length() -> None:
    with FakeUpstream(reply_words=40) as up, httpx.Client(headers=AUTH) as c:
        data = c.post(f"{up.base_url}/chat/completions", json=chat("hi")).json()
    assert len(data["choices"][0]["message"]["content"].split()) == 40


def test_response_format_json_gets_json_content(client: httpx.Client) -> None:
    body = chat("hi there", response_format={"type": "json_object"})
    content = client.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert json.loads(content) == {"echo": "hi there"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_invalid_chat_requests_get_400(client: httpx.Client, body: Any, param: str) -> None:
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_unknown_path_and_wrong_method(client: httpx.Client) -> None:
    r = client.post("/chat/completions", content=b"{not json", headers={"content-type": "x"})
    assert r.status_code == 400
    assert client.get("/nope").status_code == 404
    assert client.get("/chat/completions").status_code == 405


# ---- auth


def test_missing_authorization_is_401(up: FakeUpstream) -> None:
    r = httpx.post(f"{up.base_url}/chat/completions", json=chat())
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert up.requests[-1].headers.get("authorization") is None  # still recorded


def test_auth_can_be_turned_off_or_pinned_to_one_key() -> None:
    with FakeUpstream(require_auth=False) as up:
        assert httpx.get(f"{up.base_url}/models").status_code == 200
    with FakeUpstream(api_key="sk-right") as up:
        url = f"{up.base_url}/models"
        assert httpx.get(url, headers={"authorization": "Bearer sk-wrong"}).status_code == 401
        assert httpx.get(url, headers={"authorization": "Bearer sk-right"}).status_code == 200


# ---- streaming


def test_stream_sends_chunks_and_done(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=chat("one two three", stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    parts = chunks(r.text)
    assert all(p["object"] == "chat.completion.chunk" for p in parts)
    assert parts[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in parts)
    assert text == "one two three"
    assert len(parts) == 5  # role, three words, finish
    assert parts[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in p for p in parts)  # not asked for


def test_stream_include_usage_adds_a_final_usage_chunk(client: httpx.Client) -> None:
    body = chat("one two three", stream=True, stream_options={"include_usage": True})
    parts = chunks(client.post("/chat/completions", json=body).text)
    *rest, last = parts
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 3
    assert all(p["usage"] is None for p in rest)
    non_stream = client.post("/chat/completions", json=chat("one two three")).json()
    assert non_stream["usage"] == last["usage"]


# ---- tools


def test_tools_get_a_call_to_the_first_function(client: httpx.Client) -> None:
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    body = chat("Paris", tools=[WEATHER_TOOL, other])
    choice = client.post("/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert args == {"city": "Paris", "unit": "celsius", "days": 1}


def test_tool_choice_names_the_function_or_turns_tools_off(client: httpx.Client) -> None:
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    forced = {"type": "function", "function": {"name": "other"}}
    body = chat("x", tools=[WEATHER_TOOL, other], tool_choice=forced)
    msg = client.post("/chat/completions", json=body).json()["choices"][0]["message"]
    assert msg["tool_calls"][0]["function"]["name"] == "other"
    body = chat("plain text", tools=[WEATHER_TOOL], tool_choice="none")
    choice = client.post("/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == "plain text"
    assert choice["finish_reason"] == "stop"


def test_streamed_tool_call_reassembles(client: httpx.Client) -> None:
    body = chat("Paris", tools=[WEATHER_TOOL], stream=True)
    parts = chunks(client.post("/chat/completions", json=body).text)
    first = parts[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"]["name"] == "get_weather" and first["id"].startswith("call_")
    args = "".join(
        tc["function"].get("arguments", "")
        for p in parts
        for tc in p["choices"][0]["delta"].get("tool_calls", [])
    )
    assert json.loads(args)["city"] == "Paris"
    assert len(parts) > 3  # the arguments arrive in several deltas
    assert parts[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ---- embeddings and models


def test_embeddings_are_deterministic_unit_vectors(client: httpx.Client) -> None:
    body = {"model": "text-embedding-3-small", "input": ["alpha", "beta"]}
    data = client.post("/embeddings", json=body).json()
    assert data["object"] == "list" and data["model"] == "text-embedding-3-small"
    a, b = (d["embedding"] for d in data["data"])
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert len(a) == 1536 and a != b
    assert abs(sum(x * x for x in a) - 1.0) < 1e-4
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > 0
    again = client.post("/embeddings", json={"model": "text-embedding-3-small", "input": "alpha"})
    assert again.json()["data"][0]["embedding"] == a


def test_embeddings_dimensions_tokens_and_base64(client: httpx.Client) -> None:
    body = {"model": "text-embedding-3-large", "input": [[1, 2, 3]], "dimensions": 8}
    data = client.post("/embeddings", json=body).json()
    vec = data["data"][0]["embedding"]
    assert len(vec) == 8
    assert data["usage"]["prompt_tokens"] == 3
    large = {"model": "text-embedding-3-large", "input": "x"}
    assert len(client.post("/embeddings", json=large).json()["data"][0]["embedding"]) == 3072
    b64 = client.post("/embeddings", json={**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == vec


@pytest.mark.parametrize("bad", [None, [], [1, "a"], {"x": 1}, 3])
def test_embeddings_reject_bad_input(client: httpx.Client, bad: Any) -> None:
    r = client.post("/embeddings", json={"model": "text-embedding-3-small", "input": bad})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "input"


def test_models_list_and_lookup(client: httpx.Client) -> None:
    data = client.get("/models").json()
    assert data["object"] == "list"
    ids = [m["id"] for m in data["data"]]
    assert "gpt-4o-mini" in ids and all(m["object"] == "model" for m in data["data"])
    assert client.get("/models/gpt-4o-mini").json()["id"] == "gpt-4o-mini"
    assert client.get("/models/nope").status_code == 404


# ---- faults


def test_status_fault_with_retry_after_for_n_requests(
    up: FakeUpstream, client: httpx.Client
) -> None:
    up.add_fault(Fault(status=429, retry_after=2, times=2))
    for _ in range(2):
        r = client.post("/chat/completions", json=chat())
        assert r.status_code == 429
        assert r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.post("/chat/completions", json=chat()).status_code == 200


def test_status_fault_filters_by_model_and_path_and_takes_a_body(
    up: FakeUpstream, client: httpx.Client
) -> None:
    up.add_fault(Fault(status=500, model="gpt-4o", body={"oops": True}, headers={"x-a": "b"}))
    up.add_fault(Fault(status=503, path="/embeddings", times=None))
    assert client.post("/chat/completions", json=chat()).status_code == 200  # other model
    r = client.post("/chat/completions", json={**chat(), "model": "gpt-4o"})
    assert (r.status_code, r.json(), r.headers["x-a"]) == (500, {"oops": True}, "b")
    emb = {"model": "text-embedding-3-small", "input": "x"}
    assert [client.post("/embeddings", json=emb).status_code for _ in range(3)] == [503] * 3
    assert client.get("/models").status_code == 200


def test_timeout_fault_is_silent_then_answers(up: FakeUpstream, client: httpx.Client) -> None:
    up.add_fault(Fault(kind="timeout"))  # silent for 30 s: the client's 0.1 s runs out first
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json=chat(), timeout=0.1)
    up.add_fault(Fault(kind="timeout", delay_s=0.2))
    started = time.monotonic()
    assert client.post("/chat/completions", json=chat()).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_cut_stream_closes_mid_stream_without_done(up: FakeUpstream, client: httpx.Client) -> None:
    up.add_fault(Fault(kind="cut_stream", after_chunks=2))
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/chat/completions", json=chat("a b c d e", stream=True)) as r,
    ):
        assert r.status_code == 200
        received.extend(line for line in r.iter_lines() if line)
    assert len(received) == 2
    assert "[DONE]" not in "".join(received)
    # the next stream is whole again
    assert sse_events(client.post("/chat/completions", json=chat(stream=True)).text)[-1] == "[DONE]"


def test_cut_stream_with_chunk_delay(client: httpx.Client, up: FakeUpstream) -> None:
    up.chunk_delay_s = 0.01
    up.add_fault(Fault(kind="cut_stream", after_chunks=3))
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/chat/completions", json=chat("a b c d e", stream=True)) as r,
    ):
        lines.extend(line for line in r.iter_lines() if line)
    assert len(lines) == 3


def test_cut_fault_on_a_plain_reply_cuts_the_body(up: FakeUpstream, client: httpx.Client) -> None:
    up.add_fault(Fault(kind="cut_stream"))
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/chat/completions", json=chat())


def test_reset_fault_resets_the_connection(up: FakeUpstream, client: httpx.Client) -> None:
    up.add_fault(Fault(kind="reset"))
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        client.post("/chat/completions", json=chat())
    with socket.create_connection((up.host, up.port)) as sock:
        up.add_fault(Fault(kind="reset"))
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)
    assert client.post("/chat/completions", json=chat()).status_code == 200


def test_clear_drops_faults_and_requests(up: FakeUpstream, client: httpx.Client) -> None:
    client.get("/models")
    up.add_fault(Fault(status=500, times=None))
    up.clear()
    assert up.requests == []
    assert client.get("/models").status_code == 200
    assert len(up.requests) == 1


# ---- latency, recording, connections


def test_latency_and_chunk_delay() -> None:
    with (
        FakeUpstream(latency_s=0.1, chunk_delay_s=0.05) as up,
        httpx.Client(base_url=up.base_url, headers=AUTH) as c,
    ):
        started = time.monotonic()
        assert c.get("/models").status_code == 200
        assert time.monotonic() - started >= 0.1
        started = time.monotonic()
        arrivals = []
        with c.stream("POST", "/chat/completions", json=chat("a b c", stream=True)) as r:
            for line in r.iter_lines():
                if line:
                    arrivals.append(time.monotonic() - started)
    assert arrivals[0] >= 0.1
    assert len(arrivals) == 6  # role, 3 words, finish, [DONE]
    assert arrivals[-1] - arrivals[0] >= 5 * 0.05 * 0.9


def test_every_request_is_recorded(up: FakeUpstream, client: httpx.Client) -> None:
    up.add_fault(Fault(status=503))
    client.post("/chat/completions", json=chat("secret"), headers={"X-Custom": "Yes"})
    client.get("/models?limit=2")
    first, second = up.requests
    assert (first.method, first.path) == ("POST", "/v1/chat/completions")
    assert first.headers["x-custom"] == "Yes"
    assert first.headers["authorization"] == "Bearer sk-test"
    assert first.body["messages"][0]["content"] == "secret"
    assert (second.method, second.path, second.query, second.body) == (
        "GET",
        "/v1/models",
        "limit=2",
        None,
    )
    assert first.at <= second.at <= time.time()
    assert up.last_request == second
    assert up.wait_for_requests(2, timeout=0.1) == [first, second]
    with pytest.raises(TimeoutError):
        up.wait_for_requests(3, timeout=0.05)


def test_keep_alive_reuses_one_connection(up: FakeUpstream, client: httpx.Client) -> None:
    for _ in range(5):
        assert client.post("/chat/completions", json=chat()).status_code == 200
    assert up.connections_opened == 1


def test_pipelined_requests_are_answered_in_order(up: FakeUpstream) -> None:
    up.latency_s = 0.02  # the first answer is delayed, the second must still come after it
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
    )
    one = json.dumps(chat("first")).encode()
    two = json.dumps(chat("second")).encode()
    close = (
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n"
        b"connection: close\r\n\r\n"
    )
    with socket.create_connection((up.host, up.port)) as sock:
        sock.sendall(req % (len(one), one) + req % (len(two), two) + close)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b'"content":"first"') < data.index(b'"content":"second"')
    assert data.rstrip().endswith(b"]}")  # the models list came last, then the server closed


def test_connection_close_header_closes(up: FakeUpstream) -> None:
    with socket.create_connection((up.host, up.port)) as sock:
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n"
            b"connection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in data


def test_garbage_gets_400_and_close(up: FakeUpstream) -> None:
    with socket.create_connection((up.host, up.port)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")


async def test_async_context_and_async_client() -> None:
    async with FakeUpstream() as up, httpx.AsyncClient(base_url=up.base_url, headers=AUTH) as c:
        r = await c.post("/chat/completions", json=chat("from async"))
        assert r.json()["choices"][0]["message"]["content"] == "from async"


def test_stop_is_idempotent_and_frees_the_port() -> None:
    up = FakeUpstream().start()
    port = up.port
    up.stop()
    up.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models")


# ---- the official SDK and the command line


def test_openai_sdk_understands_every_reply(up: FakeUpstream) -> None:
    # Closed on the way out: its connection pool would otherwise be left to the garbage
    # collector (a ResourceWarning at some later test).
    with openai.OpenAI(base_url=up.base_url, api_key="sk-test", max_retries=0) as sdk:
        done = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hey you"}]
        )
        assert done.choices[0].message.content == "hey you"
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hey you"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = list(stream)
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "hey you"
        assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 2
        tool = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Oslo"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
        calls = tool.choices[0].message.tool_calls
        assert calls is not None and calls[0].function.name == "get_weather"
        emb = sdk.embeddings.create(model="text-embedding-3-small", input="x", dimensions=4)
        assert len(emb.data[0].embedding) == 4  # the SDK asks for base64 and decodes it
        assert [m.id for m in sdk.models.list()][:1] == ["gpt-4o-mini"]
        up.add_fault(Fault(status=429, retry_after=1))
        with pytest.raises(openai.RateLimitError):
            sdk.models.list()


def test_command_line_serves_in_its_own_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tollway.testing.upstream", "--port", "0", "--reply-words", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        base = line.split()[-1]
        r = httpx.post(f"{base}/chat/completions", json=chat("hi"), headers=AUTH)
        assert len(r.json()["choices"][0]["message"]["content"].split()) == 3
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Warning" not in err


# ---- paced streams (the long-stream benchmark), n > 1, refusals


def test_paced_streams_arrive_whole_in_order_and_stamped() -> None:
    with (
        FakeUpstream(chunk_interval_s=0.002, stamp=True, reply_words=5) as up,
        httpx.Client(base_url=up.base_url, headers=AUTH, timeout=5.0) as c,
    ):
        bodies = []
        for _ in range(3):  # the same connection: paced streams end with keep-alive
            r = c.post("/chat/completions", json=chat(stream=True))
            bodies.append(r.text)
    for body in bodies:
        events = [e for e in body.split("\n\n") if e]
        assert len(events) == 8  # role, 5 words, finish, [DONE]
        stamps = [int(e.split("\n", 1)[0].removeprefix(": t=")) for e in events]
        assert all(e.startswith(": t=") for e in events) and stamps == sorted(stamps)
        data = [e.split("\n", 1)[1] for e in events]
        assert data[-1] == "data: [DONE]"
        words = [json.loads(d[6:])["choices"][0]["delta"].get("content") for d in data[1:-2]]
        assert "".join(words) == "the quick brown fox jumps"
    assert up.connections_opened == 1


def test_a_client_leaving_a_paced_stream_is_noted() -> None:
    with FakeUpstream(chunk_interval_s=0.05, reply_words=40) as up:
        with httpx.Client(base_url=up.base_url, headers=AUTH, timeout=5.0) as c, \
                c.stream("POST", "/chat/completions", json=chat(stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content":"the"' in line:
                    break
        (aborted,) = up.wait_for_aborted(1)
    assert 1 <= aborted.events_sent < aborted.events_total == 43


def test_n_choices_stream_one_chunk_per_choice_and_count_every_choice(
        client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=chat(
        "a b c", n=2, stream=True, stream_options={"include_usage": True}))
    *deltas, usage = chunks(r.text)
    assert [c["choices"][0]["index"] for c in deltas] == [0, 1] * 5
    texts = ["".join(c["choices"][0]["delta"].get("content") or "" for c in deltas
                     if c["choices"][0]["index"] == i) for i in (0, 1)]
    assert texts == ["a b c", "a b c"]
    one = client.post("/chat/completions", json=chat("a b c")).json()["usage"]
    assert usage["usage"]["completion_tokens"] == 2 * one["completion_tokens"]
    plain = client.post("/chat/completions", json=chat("a b c", n=2)).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1]


def test_a_refusal_comes_in_refusal_deltas(up: FakeUpstream, client: httpx.Client) -> None:
    up.replies.refusal = "I can't help with that."
    r = client.post("/chat/completions", json=chat(stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks(r.text)]
    assert "".join(d.get("refusal") or "" for d in deltas) == "I can't help with that."
    assert not any(d.get("content") for d in deltas)
    message = client.post("/chat/completions", json=chat()).json()["choices"][0]["message"]
    assert (message["content"], message["refusal"]) == (None, "I can't help with that.")
