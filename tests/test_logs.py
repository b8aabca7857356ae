"""One JSON log line per request, with the fields an operator needs and no secret."""

from __future__ import annotations

import io
import json
import logging
import time

import httpx
import pytest

from support import ACME_KEY, ADMIN_KEY, HANG_S, UPSTREAM_KEY, auth, chat_body
from tollway.context import request_id_var
from tollway.logs import JsonFormatter
from tollway.testing.upstream import FakeUpstream, Fault

CHAT = "/api/ai/v1/chat/completions"


def access(buf: io.StringIO, want: int = 0) -> list[dict[str, object]]:
    """The access lines; waits (up to HANG_S) until there are ``want``: a request's line
    is written after its last bytes went out, so the client may already have them."""
    deadline = time.monotonic() + HANG_S
    while True:
        lines = [json.loads(line) for line in buf.getvalue().splitlines()]
        out = [x for x in lines if x["logger"] == "tollway.access"]
        if len(out) >= want or time.monotonic() > deadline:
            return out
        time.sleep(0.01)


def test_one_line_per_request_with_fields(
    client: httpx.Client, upstream: FakeUpstream, log_lines: io.StringIO
) -> None:
    ok = client.post(CHAT, json=chat_body(), headers={**auth(), "X-Request-ID": "req-1"})
    client.post(CHAT, json=chat_body(stream=True), headers={**auth(), "X-Request-ID": "req-2"})
    client.post(CHAT, json=chat_body(model="nope"), headers={**auth(), "X-Request-ID": "req-3"})
    upstream.add_fault(Fault(status=500, times=2))
    client.post(CHAT, json=chat_body(model="auto"), headers={**auth(), "X-Request-ID": "req-4"})
    client.get("/api/ai/health", headers={"X-Request-ID": "req-5"})
    got = access(log_lines, 5)
    assert len(got) == 5
    # In request order: lines may be written in another (see access()).
    by_id = {x["request_id"]: x for x in got}
    lines = [by_id[f"req-{i}"] for i in range(1, 6)]
    first = lines[0]
    assert first["request_id"] == "req-1" == ok.headers["x-request-id"]
    assert first["tenant"] == "acme" and first["status"] == 200
    assert first["model"] == "gpt-4o-mini" and first["provider"] == "fake"
    assert first["route"] == "gpt-4o-mini"
    assert first["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"]
    assert first["completion_tokens"] == ok.json()["usage"]["completion_tokens"]
    assert first["cost_usd"] == pytest.approx(float(ok.headers["x-tollway-cost-usd"]))
    assert first["latency_ms"] >= first["overhead_ms"] >= 0  # type: ignore[operator]
    assert first["method"] == "POST" and first["path"] == CHAT
    assert lines[1]["stream"] is True
    assert lines[2]["status"] == 404 and "model_not_found" in str(lines[2]["error"])
    assert lines[3]["status"] == 502 and lines[3]["level"] == "warning"
    assert "upstream_error" in str(lines[3]["error"])
    assert lines[4]["path"] == "/api/ai/health" and lines[4]["tenant"] == ""


def test_no_secret_is_ever_logged(
    client: httpx.Client, upstream: FakeUpstream, log_lines: io.StringIO
) -> None:
    client.post(CHAT, json=chat_body(), headers=auth())
    client.post(CHAT, json=chat_body(), headers=auth("tw-wrong-key-guess"))
    client.get("/api/ai/providers", headers=auth(ADMIN_KEY))
    client.post("/api/ai/providers/fake/test", headers=auth(ADMIN_KEY))
    upstream.add_fault(Fault(status=401))
    client.post(CHAT, json=chat_body(), headers=auth())
    assert len(access(log_lines, 5)) == 5
    text = log_lines.getvalue()
    for secret in (ACME_KEY, ADMIN_KEY, UPSTREAM_KEY, "tw-wrong-key-guess", "Bearer"):
        assert secret not in text


def test_formatter_adds_request_id_from_context() -> None:
    token = request_id_var.set("ctx-42")
    try:
        record = logging.LogRecord("tollway.x", logging.ERROR, __file__, 1, "oops %s", ("a",),
                                   None)
        record.extra_field = 5
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "ctx-42" and line["msg"] == "oops a"
    assert line["extra_field"] == 5 and line["level"] == "error"
