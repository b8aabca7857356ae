"""One JSON log line per request, with the fields an operator needs and no secret."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import ACME_KEY, ADMIN_KEY, HANG_S, UPSTREAM_KEY, auth, chat_body
from tollway.context import RequestInfo, request_id_var
from tollway.logs import JsonFormatter, _direct_handler, configure_logging, log_request
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


# ---- the access line written straight to the stream (tollway.logs.JsonLinesHandler) ------
@pytest.fixture
def restore_logging() -> Iterator[None]:
    names = ("tollway", "uvicorn", "uvicorn.error")
    saved = [(log, log.handlers[:], log.filters[:], log.level, log.propagate)
             for log in map(logging.getLogger, names)]
    yield
    for log, handlers, filters, level, propagate in saved:
        log.handlers[:] = handlers
        log.filters[:] = filters
        log.setLevel(level)
        log.propagate = propagate


def _served_info() -> RequestInfo:
    info = RequestInfo("req-9", time.perf_counter() - 0.0123)
    info.upstream_s = 0.01
    info.status = 200
    info.route, info.model, info.provider = "auto", "gpt-4o-mini", "openai"
    info.prompt_tokens, info.completion_tokens, info.cost_usd = 12, 7, 0.000123
    info.reason = "auto: -> openai/gpt-4o-mini"
    return info


@pytest.mark.usefixtures("restore_logging")
def test_the_direct_access_line_is_the_one_logging_writes(tmp_path: Path) -> None:
    info = _served_info()
    path = tmp_path / "log"
    with path.open("w") as stream:
        configure_logging("info", stream, worker=3)
        assert _direct_handler() is not None
        token = request_id_var.set("req-9")
        try:
            log_request(info, "POST", CHAT, time.perf_counter())
            # The same record through logging: a filter on the logger takes the direct
            # path away (an operator's filter must see every line).
            logging.getLogger("tollway").addFilter(lambda record: True)
            assert _direct_handler() is None
            log_request(info, "POST", CHAT, time.perf_counter())
        finally:
            request_id_var.reset(token)
        stream.flush()
    direct, logged = (json.loads(line) for line in path.read_text().splitlines())
    for line in (direct, logged):
        assert abs(line.pop("ts") - time.time()) < HANG_S
        assert abs(line.pop("latency_ms") - 12.3) < HANG_S * 1000
        line.pop("overhead_ms")
    assert direct == logged
    assert list(direct) == list(logged)  # and in the same order
    assert direct["worker"] == 3 and direct["request_id"] == "req-9"
    assert direct["logger"] == "tollway.access" and direct["cost_usd"] == 0.000123


class _BrokenPipe(io.TextIOBase):
    """A stream whose reader went away: every write and flush fails."""

    class _Buffer(io.RawIOBase):
        def write(self, data: object) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    buffer = _Buffer()

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.usefixtures("restore_logging")
def test_a_log_stream_that_cannot_be_written_never_fails_the_request() -> None:
    """A gateway whose stderr pipe was closed (its reader gone) keeps serving: the access
    line is dropped, as logging drops a record its handler cannot write."""
    configure_logging("info", _BrokenPipe())
    assert _direct_handler() is not None
    info = _served_info()
    for _ in range(3):
        log_request(info, "POST", CHAT, time.perf_counter())  # no loop: flushed at once

    async def on_the_loop() -> None:
        for _ in range(3):
            log_request(info, "POST", CHAT, time.perf_counter())
        await asyncio.sleep(0)  # the flush at the end of the turn fails too
        await asyncio.sleep(0)

    asyncio.run(on_the_loop())


def test_request_ids_are_unique_and_a_forked_worker_draws_its_own() -> None:
    from tollway.context import new_request_id

    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns of fork() in a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: a worker forked after the parent served requests
        try:
            os.write(write, ",".join(new_request_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode().split(",")
    os.waitpid(pid, 0)
    assert len(child) == 100
    assert not set(child) & {*ids, *(new_request_id() for _ in range(100))}
    assert {c[:16] for c in child} != {i[:16] for i in ids}
