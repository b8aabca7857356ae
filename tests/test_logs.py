"""One JSON log line per request, with the fields an operator needs and no secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from support import ACME_KEY, ADMIN_KEY, UPSTREAM_KEY, auth, chat_body
from tollway.context import request_id_var
from tollway.logs import JsonFormatter
from tollway.testing.upstream import FakeUpstream, Fault

CHAT = "/api/ai/v1/chat/completions"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tollway")
    old_level, old_handlers = log.level, log.handlers[:]
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        log.handlers[:] = old_handlers
        log.setLevel(old_level)


def access(buf: io.StringIO) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    return [x for x in lines if x["logger"] == "tollway.access"]


def test_one_line_per_request_with_fields(
    client: httpx.Client, upstream: FakeUpstream, log_lines: io.StringIO
) -> None:
    ok = client.post(CHAT, json=chat_body(), headers={**auth(), "X-Request-ID": "req-1"})
    client.post(CHAT, json=chat_body(stream=True), headers=auth())
    client.post(CHAT, json=chat_body(model="nope"), headers=auth())
    upstream.add_fault(Fault(status=500, times=2))
    client.post(CHAT, json=chat_body(model="auto"), headers=auth())
    client.get("/api/ai/health")
    lines = access(log_lines)
    assert len(lines) == 5
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
    text = log_lines.getvalue()
    assert len(access(log_lines)) == 5
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
