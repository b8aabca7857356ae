"""Hostile request bodies and headers: each a 4xx in the OpenAI envelope with a log line,
never a 500, nothing sent to the provider, and the gateway keeps serving."""

from __future__ import annotations

import io
import json
import time

import httpx

from support import ListRecorder, Server, auth, chat_body
from tollway.testing.upstream import FakeUpstream

CHAT = "/api/ai/v1/chat/completions"
EMBED = "/api/ai/v1/embeddings"
MSGS = b'"messages": [{"role": "user", "content": "hi"}]'


def chat(extra: bytes = b"", model: bytes = b'"gpt-4o-mini"') -> bytes:
    return b'{"model": ' + model + b", " + MSGS + extra + b"}"


def embed(input_: bytes, extra: bytes = b"") -> bytes:
    return b'{"model": "text-embedding-3-small", "input": ' + input_ + extra + b"}"


DEEP = b"[" * 100_000 + b"]" * 100_000

# (what, path, body, status, the envelope's code or param)
BODIES: list[tuple[str, str, bytes, int, str]] = [
    ("empty", CHAT, b"", 400, "-"),
    ("whitespace only", CHAT, b" \r\n\t ", 400, "invalid_json"),
    ("not an object", CHAT, b"[1, 2]", 400, "-"),
    ("null", CHAT, b"null", 400, "-"),
    ("byte order mark", CHAT, b"\xef\xbb\xbf" + chat(), 400, "invalid_json"),
    ("trailing bytes", CHAT, chat() + b" x", 400, "invalid_json"),
    ("two objects", CHAT, chat() + chat(), 400, "invalid_json"),
    ("not UTF-8", CHAT, chat(b', "user": "\xff\xfe"'), 400, "invalid_json"),
    ("not UTF-8 in an unknown member", CHAT, chat(b', "x": "\xc3\x28"'), 400, "invalid_json"),
    ("lone surrogate", CHAT, chat(b', "user": "\\ud800"'), 400, "invalid_json"),
    ("raw NUL byte", CHAT, chat(model=b'"gpt-4o-mini\x00"'), 400, "invalid_json"),
    ("NaN", CHAT, chat(b', "temperature": NaN'), 400, "invalid_json"),
    ("deep nesting in content", CHAT,
     b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ' + DEEP + b"}]}",
     400, "nesting_too_deep"),
    ("deep nesting in an unknown member", CHAT, chat(b', "x": ' + DEEP), 400, "nesting_too_deep"),
    ("deep nesting in tools", CHAT, chat(b', "tools": [{"function": ' + DEEP + b"}]"), 400,
     "nesting_too_deep"),
    ("max_tokens past 32 bits", CHAT, chat(b', "max_tokens": 2147483648'), 400, "max_tokens"),
    ("max_tokens of 10**30", CHAT, chat(b', "max_tokens": 1' + b"0" * 30), 400, "max_tokens"),
    ("max_tokens of 10**5000", CHAT, chat(b', "max_tokens": 1' + b"0" * 5000), 400,
     "max_tokens"),
    ("max_completion_tokens past 64 bits", CHAT,
     chat(b', "max_completion_tokens": 18446744073709551616'), 400, "max_completion_tokens"),
    ("max_tokens a float", CHAT, chat(b', "max_tokens": 1.5'), 400, "max_tokens"),
    ("max_tokens a bool", CHAT, chat(b', "max_tokens": true'), 400, "max_tokens"),
    ("max_tokens negative", CHAT, chat(b', "max_tokens": -1'), 400, "max_tokens"),
    ("temperature 1e400", CHAT, chat(b', "temperature": 1e400'), 400, "temperature"),
    ("n huge", CHAT, chat(b', "n": 99999999999999999999'), 400, "n"),
    ("a 100 KB model name", CHAT, chat(model=b'"' + b"m" * 100_000 + b'"'), 400, "model"),
    ("NUL in the model name", CHAT, chat(model=b'"gpt-4o-mini\\u0000"'), 404,
     "model_not_found"),
    ("a header line in the model name", CHAT, chat(model=b'"gpt\\r\\nX-Injected: 1"'), 404,
     "model_not_found"),
    ("model named twice", CHAT, b'{"model": "gpt-4o-mini", "model": "fast", ' + MSGS + b"}",
     400, "duplicate_key"),
    ("stream named twice, compact", CHAT,
     b'{"model":"gpt-4o-mini","stream":false,"messages":[{"role":"user","content":"hi"}],'
     b'"stream":true}', 400, "duplicate_key"),
    ("max_tokens named twice, escaped", CHAT,
     chat(b', "max_tokens": 5, "max_tok\\u0065ns": 9000'), 400, "duplicate_key"),
    ("messages a string", CHAT, b'{"model": "gpt-4o-mini", "messages": "hi"}', 400, "messages"),
    ("messages empty", CHAT, b'{"model": "gpt-4o-mini", "messages": []}', 400, "messages"),
    ("content a number", CHAT,
     b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 5}]}', 400,
     "messages[0].content"),
    ("role missing", CHAT, b'{"model": "gpt-4o-mini", "messages": [{"content": "x"}]}', 400,
     "messages[0].role"),
    ("tools an object", CHAT, chat(b', "tools": {"a": 1}'), 400, "tools"),
    ("stream_options a list", CHAT, chat(b', "stream_options": [true]'), 400,
     "stream_options"),
    ("stream a string", CHAT, chat(b', "stream": "yes"'), 400, "stream"),
    ("over max_body_bytes", CHAT, chat(b', "x": "' + b"a" * (4 * 1024 * 1024) + b'"'), 413,
     "request_too_large"),
    ("input missing", EMBED, b'{"model": "text-embedding-3-small"}', 400, "input"),
    ("input empty", EMBED, embed(b"[]"), 400, "input"),
    ("input an object", EMBED, embed(b'{"a": 1}'), 400, "input"),
    ("input mixed", EMBED, embed(b'[1, "x", null]'), 400, "input"),
    ("token id past 32 bits", EMBED, embed(b"[1, 99999999999999999999999]"), 400, "input"),
    ("token id negative", EMBED, embed(b"[5, -1]"), 400, "input"),
    ("token id a float", EMBED, embed(b"[1.5]"), 400, "input"),
    ("token id a bool", EMBED, embed(b"[true]"), 400, "input"),
    ("empty token array", EMBED, embed(b"[[1], []]"), 400, "input"),
    ("deep input", EMBED, embed(DEEP), 400, "nesting_too_deep"),
    ("dimensions past 32 bits", EMBED, embed(b'"x"', b', "dimensions": 4294967296'), 400,
     "dimensions"),
    ("input named twice", EMBED, embed(b'"x"', b', "input": [1]'), 400, "duplicate_key"),
]


def access_lines(buf: io.StringIO, path: str) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in buf.getvalue().splitlines())
    return [r for r in lines if r.get("logger") == "tollway.access" and r.get("path") == path]


def test_hostile_bodies_get_4xx_envelopes_and_a_log_line(
        gateway: Server, upstream: FakeUpstream, recorder: ListRecorder,
        log_lines: io.StringIO) -> None:
    wrong = []
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        for n, (what, path, body, status, want) in enumerate(BODIES, 1):
            r = c.post(path, content=body, headers={**auth(), "content-type": "application/json"})
            err = r.json().get("error", {}) if r.headers.get("content-type") == (
                "application/json") else {}
            if (r.status_code != status or set(err) != {"message", "type", "param", "code"}
                    or want not in (err["code"], err["param"], "-")
                    or "x-injected" in r.headers):
                wrong.append((what, r.status_code, r.text[:200]))
            while len(access_lines(log_lines, CHAT) + access_lines(log_lines, EMBED)) < n:
                time.sleep(0.005)  # the line is written just after the reply; pytest's timeout
        assert wrong == []
        logged = access_lines(log_lines, CHAT) + access_lines(log_lines, EMBED)
        assert sorted(r["status"] for r in logged) == sorted(s for *_, s, _ in BODIES)
        assert all(isinstance(r["error"], str) and r["error"] for r in logged)
        assert upstream.requests == []  # none of it reached the provider
        assert len(recorder.wait(len(BODIES))) == len(BODIES)
        assert c.post(CHAT, json=chat_body(), headers=auth()).status_code == 200


def test_hostile_headers_are_4xx_or_ignored_never_5xx(gateway: Server) -> None:
    cases: list[tuple[dict[str, bytes], int]] = [
        ({"x-tollway-task": b"\xff\xfe"}, 400),
        ({"x-tollway-sensitivity": b"x" * 8000}, 400),
        ({"x-tollway-budget-tier": b"\xc3\x28"}, 400),
        ({"x-tollway-user": b"\xff" * 4000}, 200),
        ({"x-request-id": b"\xff" * 4000}, 200),  # not a usable id: one is made instead
        ({"authorization": b"Bearer \xff\xfe\xfd"}, 401),
        ({"authorization": b"Basic " + b"a" * 8000}, 401),
        ({"content-type": b"text/plain; charset=\xff"}, 200),  # the body is JSON all the same
        ({"content-length": b"0"}, 400),  # what httpx sends decides: here, an empty body
    ]
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        for headers, status in cases:
            base = {k.lower(): v.encode() for k, v in auth().items()}
            body = json.dumps(chat_body()).encode() if "content-length" not in headers else b""
            r = c.post(CHAT, content=body, headers={**base, **headers})
            assert r.status_code == status, (headers, r.text)
            if status >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            if "x-request-id" in headers:
                assert r.headers["x-request-id"].isalnum()
        assert c.post(CHAT, json=chat_body(), headers=auth()).status_code == 200
