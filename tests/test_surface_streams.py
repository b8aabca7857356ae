"""Streams and failures on the surfaces other than chat: a provider that breaks a stream,
failover to the next candidate, and the taps' reading of every event however the bytes
are split."""

from __future__ import annotations

import json

import httpx
import pytest

from policy_rig import Rig, rig
from support import HANG_S
from surfaces import SURFACES, SurfaceCase
from tollway.pipeline.anthropic import AnthropicTap
from tollway.pipeline.completions import CompletionsTap
from tollway.testing.replies import Replies, Stream
from tollway.testing.upstream import Fault

CASES = [pytest.param(c, id=c.name) for c in SURFACES]


def post(r: Rig, case: SurfaceCase, **body: object) -> httpx.Response:
    return r.http.post(case.path, json=case.body("one two three four five six", "auto",
                                                 **body), headers=case.headers())


@pytest.mark.parametrize("case", CASES)
def test_a_broken_stream_ends_with_the_surface_error_event_and_bills_what_was_sent(
        case: SurfaceCase) -> None:
    with rig(("primary",), provider={"kind": case.provider_kind,
                                     "responses": case.responses}) as r:
        r.ups["primary"].add_fault(Fault(kind="cut_stream", after_chunks=6))
        resp = post(r, case, stream=True)
        assert resp.status_code == 200
        last = resp.content.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        if case.name.startswith("messages"):
            assert last.startswith(b"event: error\n")
            data = json.loads(last.split(b"data: ", 1)[1])
            assert data["type"] == "error" and data["error"]["type"] == "api_error"
        else:
            assert b'"error"' in last and b"[DONE]" not in resp.content
        (rec,) = r.recorder.wait(1)
        assert rec.outcome == "failed" and rec.status == 502
        assert rec.actual_cost_nanousd > 0 and rec.completion_tokens > 0
        book = r.gateway.local_budget
        assert book.spent_today("acme", r.clock.time()) == rec.actual_cost_nanousd
        assert book.reserved_today("acme", r.clock.time()) == 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_candidate_fails_over_to_the_next(case: SurfaceCase, stream: bool) -> None:
    with rig(("primary", "secondary"), provider={"kind": case.provider_kind,
                                                 "responses": case.responses}) as r:
        r.ups["primary"].add_fault(Fault(status=500, times=None))
        resp = post(r, case, stream=stream)
        assert resp.status_code == 200
        assert resp.headers["x-tollway-provider"] == "secondary"
        (rec,) = r.recorder.wait(1)
        # retried ([retry] attempts, 3 by default), then failed over
        assert rec.fallbacks == ("primary",) and rec.attempts == 4
        assert case.calls(r.ups["primary"]) == 3
        assert rec.outcome == "completed"
        assert case.calls(r.ups["secondary"]) == 1


def test_the_anthropic_tap_reads_a_stream_split_anywhere() -> None:
    reply = Replies("fake")._messages({"model": "m", "max_tokens": 50, "stream": True,
                                       "messages": [{"role": "user", "content": "a b c"}]})
    assert isinstance(reply, Stream)
    data = b"".join(reply.events)
    whole = AnthropicTap()
    assert whole.feed(data) == data  # passed through as the provider's bytes
    assert whole.done and whole.text() == "a b c"
    assert whole.usage is not None and whole.usage.completion_tokens == 3
    for i in range(len(data) + 1):
        tap = AnthropicTap()
        assert tap.feed(data[:i]) + tap.feed(data[i:]) == data
        assert tap.done and tap.usage == whole.usage and tap.text() == "a b c"


def test_the_completions_tap_reads_a_stream_split_anywhere_and_drops_unasked_usage() -> None:
    reply = Replies("fake")._legacy({"model": "m", "prompt": "a b c", "stream": True,
                                     "stream_options": {"include_usage": True}})
    assert isinstance(reply, Stream)
    data = b"".join(reply.events)
    for keep in (True, False):
        whole = CompletionsTap(keep)
        out = whole.feed(data)
        assert whole.done and whole.text() == "a b c" and whole.usage is not None
        assert (b'"usage":{' in out) is keep and b"[DONE]" not in out
        for i in range(len(data) + 1):
            tap = CompletionsTap(keep)
            assert tap.feed(data[:i]) + tap.feed(data[i:]) == out
            assert tap.usage == whole.usage


@pytest.mark.parametrize("case", CASES)
def test_a_stream_the_client_leaves_is_billed_for_what_was_sent(case: SurfaceCase) -> None:
    with rig(("primary",), provider={"kind": case.provider_kind,
                                     "responses": case.responses}) as r:
        up = r.ups["primary"]
        up.chunk_delay_s = 0.2  # the provider is still generating when the client leaves
        up.reply_words = 40
        with r.http.stream("POST", case.path, headers=case.headers(), json=case.body(
                "ignored", "auto", stream=True)) as resp:
            assert resp.status_code == 200
            got = b""
            for piece in resp.iter_raw():
                got += piece
                if got.count(b"\n\n") >= 8:
                    break
        (rec,) = r.recorder.wait(1)
        assert rec.client_cancelled and rec.stream
        assert rec.completion_tokens > 0 and rec.actual_cost_nanousd > 0
        assert len(up.wait_for_aborted(1, HANG_S)) == 1  # the provider was told to stop
        book = r.gateway.local_budget
        assert book.spent_today("acme", r.clock.time()) == rec.actual_cost_nanousd
        assert book.reserved_today("acme", r.clock.time()) == 0
