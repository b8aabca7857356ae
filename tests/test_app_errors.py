"""Bad input gets a 4xx in OpenAI's envelope, never a 500, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from support import ListRecorder, Server, auth, chat_body, gateway_env, make_raw_config
from tollway.app import create_app
from tollway.config import parse_config
from tollway.errors import ERROR_TABLE, TollwayError, error_body, spec_for
from tollway.testing.upstream import FakeUpstream

CHAT = "/api/ai/v1/chat/completions"


def envelope(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"}
    err: dict[str, object] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


@pytest.mark.parametrize(
    ("content", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"", 400, None, None),
        (b"[1, 2]", 400, None, None),
        (b'{"model": "gpt-4o-mini"}', 400, "messages", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model", None),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "model", None),
        (b'{"model": "gpt-4o-mini", "messages": "hello"}', 400, "messages", None),
        (b'{"model": "gpt-4o-mini", "messages": []}', 400, "messages", None),
        (b'{"model": "gpt-4o-mini", "messages": [{"content": "x"}]}', 400, "messages[0].role",
         None),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],'
         b' "max_tokens": "ten"}', 400, "max_tokens", None),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],'
         b' "temperature": 9}', 400, "temperature", None),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],'
         b' "stream": "yes"}', 400, "stream", None),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
         404, "model", "model_not_found"),
    ],
)
def test_bad_chat_input_is_a_4xx_envelope(
    client: httpx.Client, recorder: ListRecorder, upstream: FakeUpstream,
    content: bytes, status: int, param: str | None, code: str | None,
) -> None:
    r = client.post(CHAT, content=content,
                    headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = envelope(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if code:
        assert err["code"] == code
    (rec,) = recorder.wait(1)
    assert rec.outcome == "rejected" and rec.status == status and rec.attempts == 0
    assert upstream.requests == []  # nothing reached the provider
    # ... and the server is still serving.
    assert client.post(CHAT, json=chat_body(), headers=auth()).status_code == 200


def test_bad_embeddings_input(client: httpx.Client) -> None:
    for body in ({"model": "text-embedding-3-small"},
                 {"model": "text-embedding-3-small", "input": []},
                 {"model": "text-embedding-3-small", "input": 12}):
        r = client.post("/api/ai/v1/embeddings", json=body, headers=auth())
        assert r.status_code == 400, body
        assert envelope(r)["param"] == "input"


def test_oversized_body_is_413_while_reading(upstream: FakeUpstream) -> None:
    raw = make_raw_config(upstream.base_url)
    raw["server"]["max_body_bytes"] = 2048
    app = create_app(parse_config(raw, env=gateway_env()), env=gateway_env())
    big = chat_body("x" * 5000)
    with Server(app) as server, httpx.Client(base_url=server.url) as c:
        r = c.post(CHAT, json=big, headers=auth())
        assert r.status_code == 413
        assert envelope(r)["code"] == "request_too_large"

        # Chunked, no Content-Length: refused while streaming the body in.
        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"x" * 1000

        r = c.post(CHAT, content=chunks(), headers=auth())
        assert r.status_code == 413
    with Server(app) as server, httpx.Client(base_url=server.url) as c:
        assert c.post(CHAT, json=chat_body(), headers=auth()).status_code == 200
        assert upstream.requests and all(len(q.raw_body) < 2048 for q in upstream.requests)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    r = client.get("/api/ai/v2/whatever", headers=auth())
    assert r.status_code == 404
    assert envelope(r)["code"] == "not_found"
    r = client.get(CHAT, headers=auth())
    assert r.status_code == 405
    assert envelope(r)["code"] == "method_not_allowed"


def test_admin_key_is_not_a_tenant(client: httpx.Client) -> None:
    from support import ADMIN_KEY

    r = client.post(CHAT, json=chat_body(), headers=auth(ADMIN_KEY))
    assert r.status_code == 403
    assert envelope(r)["type"] == "permission_error"


def test_error_table_maps_every_error_once() -> None:
    for cls in ERROR_TABLE:
        if issubclass(cls, TollwayError):
            status, body = error_body(cls("boom"))
            assert status == spec_for(cls("boom")).status
            assert 400 <= status < 600
            assert b'"message":"boom"' in body
    status, body = error_body(RuntimeError("secret internals sk-123"))
    assert status == 500 and b"sk-123" not in body and b"internal error" in body
