"""Retries, failover, breakers and sensitivity through a real gateway and simulated upstreams.

Every upstream is a real HTTP server (:class:`FakeUpstream`) that records the
requests it gets; faults are injected there. The gateway runs on a manual
clock, so backoff sleeps and breaker recovery take no real time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from policy_rig import CHAT, completions, rig
from support import auth, chat_body
from tollway.testing.upstream import Fault
from tollway.tokens import count_tokens

# ---- retries and failover --------------------------------------------------------------------

def test_failing_first_provider_fails_over_to_the_second() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(status=503, times=None))
        resp = r.chat()
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-tollway-provider"] == "secondary"
        assert resp.headers["x-tollway-model"] == "m-secondary"
        assert completions(r.ups["primary"]) == 3  # the configured attempts
        assert completions(r.ups["secondary"]) == 1
        assert len(r.clock.slept) == 2  # two backoffs between the three attempts
        assert all(0 <= s <= 0.5 for s in r.clock.slept)
        (rec,) = r.recorder.wait(1)
        assert rec.outcome == "completed" and rec.attempts == 4
        assert rec.fallbacks == ("primary",) and rec.provider == "secondary"


def test_a_400_is_not_retried_nor_failed_over() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(status=400, times=None))
        resp = r.chat()
        assert resp.status_code == 400
        assert completions(r.ups["primary"]) == 1
        assert completions(r.ups["secondary"]) == 0
        assert r.clock.slept == []
        (rec,) = r.recorder.wait(1)
        assert rec.outcome == "failed" and rec.attempts == 1
        # A 400 proves the provider answers: its breaker saw a success.
        assert r.providers()["primary"]["breaker"]["failures_in_window"] == 0


def test_retry_succeeds_on_the_same_provider() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(status=500, times=1))
        resp = r.chat()
        assert resp.status_code == 200
        assert resp.headers["x-tollway-provider"] == "primary"
        assert completions(r.ups["primary"]) == 2 and completions(r.ups["secondary"]) == 0


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(status=429, retry_after=4, times=1))
        resp = r.chat()
        assert resp.status_code == 200 and resp.headers["x-tollway-provider"] == "primary"
        assert r.clock.slept == [4.0]  # waited what the provider asked
        r.clock.slept.clear()
        r.ups["primary"].add_fault(Fault(status=429, retry_after=120, times=1))
        resp = r.chat()
        # Two minutes is over the cap (10 s): fail over at once instead of waiting.
        assert resp.status_code == 200 and resp.headers["x-tollway-provider"] == "secondary"
        assert r.clock.slept == []


def test_connect_errors_are_retried_then_failed_over() -> None:
    with rig(dead=("primary",)) as r:
        resp = r.chat()
        assert resp.status_code == 200 and resp.headers["x-tollway-provider"] == "secondary"
        (rec,) = r.recorder.wait(1)
        assert rec.attempts == 4 and rec.fallbacks == ("primary",)


def test_timeouts_are_retried() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(kind="timeout", delay_s=3.0, times=1))
        resp = r.chat()
        assert resp.status_code == 200 and resp.headers["x-tollway-provider"] == "primary"
        assert completions(r.ups["primary"]) == 2


def test_every_candidates_error_is_in_the_final_error() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(status=503, times=None))
        r.ups["secondary"].add_fault(Fault(status=500, times=None))
        resp = r.chat()
        assert resp.status_code == 502, resp.text  # the last candidate's status
        message = resp.json()["error"]["message"]
        assert "m-primary" in message and "m-secondary" in message
        assert "HTTP 503" in message and "HTTP 500" in message
        (rec,) = r.recorder.wait(1)
        assert rec.outcome == "failed" and rec.attempts == 6


def test_a_fifth_of_calls_failing_on_the_first_provider_all_end_200() -> None:
    # The breaker would soon take the flaky provider out of the plan (the manual clock never
    # lets it recover): a threshold out of reach leaves every call to retries and failover.
    with rig(breaker={"failure_threshold": 1_000_000}) as r:
        primary, secondary = r.ups["primary"], r.ups["secondary"]
        primary.add_fault(Fault(fraction=0.2, statuses=(500, 503, 429), times=None))
        n = 1000
        statuses = Counter(r.chat().status_code for _ in range(n))
        assert statuses == {200: n}
        recs = r.recorder.wait(n)
        assert all(rec.outcome == "completed" for rec in recs)
        assert completions(primary) + completions(secondary) == sum(rec.attempts for rec in recs)
        retried = [rec for rec in recs if rec.attempts > 1]
        failed_over = [rec for rec in recs if rec.fallbacks == ("primary",)]
        # About a fifth retried, and the few that failed three times in a row went on.
        assert 0.1 * n < len(retried) < 0.3 * n
        assert all(rec.attempts == 4 and rec.provider == "secondary" for rec in failed_over)
        assert len(failed_over) == completions(secondary) < len(retried)
        assert len(r.clock.slept) == completions(primary) - n  # a backoff before each retry


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_provider_that_never_answers_is_left_after_its_first_byte_timeout(
        stream: bool) -> None:
    timeout = 0.3
    with rig(silent=("primary",), provider={"first_byte_timeout_s": timeout},
             retry={"attempts": 2}) as r:
        started = time.time()
        resp = r.chat(stream=stream)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-tollway-provider"] == "secondary"
        (rec,) = r.recorder.wait(1)
        assert rec.outcome == "completed" and rec.fallbacks == ("primary",)
        assert rec.attempts == 3  # two waits on the silent one, then the second provider
        # Not before the timeout: each attempt waited its full first-byte timeout.
        (asked,) = r.ups["secondary"].requests
        assert asked.at - started >= 2 * timeout
        assert r.providers()["primary"]["breaker"]["failures_in_window"] == 2


def test_provider_credentials_refused_fails_over_without_retrying() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(status=401, times=None))
        resp = r.chat()
        assert resp.status_code == 200 and resp.headers["x-tollway-provider"] == "secondary"
        assert completions(r.ups["primary"]) == 1


# ---- streams ---------------------------------------------------------------------------------

def sse_text(body: str) -> str:
    out = []
    for line in body.split("\n"):
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def test_stream_error_before_the_first_byte_fails_over() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(status=503, times=None))
        resp = r.chat(stream=True)
        assert resp.status_code == 200
        assert resp.headers["x-tollway-provider"] == "secondary"
        assert resp.text.rstrip().endswith("data: [DONE]")


def test_stream_cut_midway_is_not_retried_and_is_billed_for_what_was_sent() -> None:
    with rig() as r:
        r.ups["primary"].add_fault(Fault(kind="cut_stream", after_chunks=3))
        resp = r.http.post(CHAT, headers=auth(), json=chat_body(
            "alpha beta gamma delta epsilon zeta eta theta", model="auto", stream=True))
        assert resp.status_code == 200  # the headers had gone out
        assert "[DONE]" not in resp.text
        sent = sse_text(resp.text)
        assert sent and sent != "alpha beta gamma delta epsilon zeta eta theta"
        assert completions(r.ups["primary"]) == 1  # never retried after the first byte
        assert completions(r.ups["secondary"]) == 0
        (rec,) = r.recorder.wait(1)
        assert rec.outcome == "failed" and rec.attempts == 1 and rec.stream
        assert rec.completion_tokens == count_tokens(sent)
        assert rec.prompt_tokens > 0
        assert rec.actual_cost_nanousd == rec.prompt_tokens * 1000 + rec.completion_tokens * 2000
        assert r.providers()["primary"]["breaker"]["failures_in_window"] == 1


# ---- breakers --------------------------------------------------------------------------------

def test_breaker_opens_skips_the_provider_then_recovers_after_a_good_probe() -> None:
    with rig() as r:
        primary = r.ups["primary"]
        primary.add_fault(Fault(status=503, times=None))
        for _ in range(2):  # 3 attempts each: the 5th failure within 60 s opens it
            assert r.chat().headers["x-tollway-provider"] == "secondary"
        assert completions(primary) == 5  # the 6th attempt was refused by the open breaker
        info = r.providers()["primary"]
        assert info["breaker"]["state"] == "open"
        assert r.providers()["secondary"]["breaker"]["state"] == "closed"
        assert 'tollway_breaker_state{provider="primary"} 2.0' in r.metrics()
        primary.clear()
        resp = r.chat()
        assert resp.headers["x-tollway-provider"] == "secondary"
        assert completions(primary) == 0  # filtered out of the plan: not even tried
        rec = r.recorder.wait(3)[-1]
        assert "breaker open: primary" in rec.reason
        r.clock.advance(30)  # recovery elapsed: half-open, one probe goes through
        assert r.providers()["primary"]["breaker"]["state"] == "half_open"
        resp = r.chat()
        assert resp.headers["x-tollway-provider"] == "primary"
        assert r.providers()["primary"]["breaker"]["state"] == "closed"


def test_all_breakers_open_answers_503_at_once_without_calling_anyone() -> None:
    with rig() as r:
        for name in ("primary", "secondary"):
            for _ in range(5):
                r.gateway.breakers[name].record_failure(r.clock.monotonic())
        r.clock.advance(10)
        resp = r.chat()
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "20"
        assert resp.json()["error"]["code"] == "upstream_unavailable"
        assert completions(r.ups["primary"]) == completions(r.ups["secondary"]) == 0
        (rec,) = r.recorder.wait(1)
        assert rec.outcome == "rejected" and rec.attempts == 0
        assert "breakers open" in rec.reason


# ---- sensitivity -----------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["confidential", "restricted"])
def test_confidential_requests_never_reach_a_remote_provider(level: str) -> None:
    with rig(("remote", "onprem"), local=("onprem",)) as r:
        remote, onprem = r.ups["remote"], r.ups["onprem"]
        remote_only = {"X-Tollway-Sensitivity": level}
        for stream in (False, True):
            resp = r.chat(headers=remote_only, stream=stream)
            assert resp.status_code == 200
            assert resp.headers["x-tollway-provider"] == "onprem"
        # Even when the local one fails, confidential data does not fail over to remote.
        onprem.add_fault(Fault(status=503, times=None))
        resp = r.chat(headers=remote_only)
        assert resp.status_code == 503
        onprem.clear()
        # A model only the remote provider serves: 403, and nothing sent anywhere.
        resp = r.chat("m-remote", headers=remote_only)
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "policy_forbids"
        assert onprem.requests == []
        assert remote.requests == []  # the remote upstream never saw a single request
        recs = r.recorder.wait(4)
        assert recs[-1].outcome == "rejected" and recs[-1].sensitivity == level
        # the same call without the hint goes to the first candidate, the remote one
        assert r.chat().headers["x-tollway-provider"] == "remote"
        assert len(remote.requests) == 1


async def test_breaker_transitions_become_events(tmp_path: Path) -> None:
    nats = {"enabled": True, "url": "embedded", "data_dir": str(tmp_path / "data")}
    with rig(nats=nats) as r:
        svc = r.gateway.events
        assert svc is not None
        for _ in range(5):
            r.gateway.breakers["primary"].record_failure(r.clock.monotonic())
        deadline = time.monotonic() + 10
        health = svc.provider_health()
        while health.get("primary", {}).get("breaker") != "open" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            health = svc.provider_health()
        assert health["primary"]["breaker"] == "open"
