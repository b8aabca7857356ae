"""Shadow mode through a real gateway: two simulated upstreams, a real uvicorn server.

The primary upstream serves the live calls; the candidate upstream gets the
shadow calls. Nothing of tollway is replaced: events are off, so the
``ShadowCompared`` events land in the gateway's in-memory sink and view.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from typing import Any

import msgspec
import pytest

from support import ADMIN_KEY, auth, spy_counts
from tollway.pipeline.prompt import THREAD_MIN_BYTES
from tollway.shadow.sampling import Sampler
from tollway.testing.upstream import Fault
from tollway.tokens import count_chat_tokens

from .rig import Rig, rig

# Room for every shadow call a test makes. A call that ends while max_in_flight shadow calls
# still run is skipped (by design: test_in_flight_cap), and on a loaded machine the shadow
# calls of the last few calls may well still run: with the default of 4, a test counting
# events saw 19 of 24 (the others skipped as "in_flight").
ONE = {"route": "auto", "candidates": ["small"], "fraction": 1.0, "max_in_flight": 1000}


def completion(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fixed", "object": "chat.completion", "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}


def sse(text: str) -> str:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-4o-mini"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        *({**base, "choices": [{"index": 0, "delta": {"content": w}}]} for w in text.split(" ")),
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3,
                                          "total_tokens": 14}},
    ]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def responses(r: Rig, n: int, stream: bool) -> list[tuple[int, bytes, dict[str, str]]]:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} \
            if stream else {}
        resp = r.chat(f"question {i}", **body)
        kept = {k: resp.headers[k] for k in ("content-type", "x-tollway-model",
                                             "x-tollway-provider", "x-tollway-cost-usd")
                if k in resp.headers}
        out.append((resp.status_code, resp.content, kept))
    return out


def test_shadow_never_changes_the_primary_response() -> None:
    runs = {}
    for name, shadow in (("off", []), ("on", [ONE])):
        with rig(shadow) as r:
            # Fixed upstream bytes, so the two runs are comparable byte for byte.
            r.primary.add_fault(Fault(status=200, body=completion("alpha beta"), times=3))
            plain = responses(r, 3, stream=False)
            r.primary.add_fault(Fault(status=200, body=sse("alpha beta"), times=3))
            streamed = responses(r, 3, stream=True)
            if shadow:
                r.sink.wait(6)
                assert len(r.candidate.requests) == 6  # the shadow calls did happen
            runs[name] = plain + streamed
    assert runs["on"] == runs["off"]
    assert all(status == 200 for status, _, _ in runs["on"])
    assert runs["on"][3][1].endswith(b"data: [DONE]\n\n")


def test_slow_candidate_does_not_slow_the_primary() -> None:
    with rig([ONE]) as r:
        # The candidate answers nothing until the test says so: a primary that waited for
        # its shadow call would never be answered (no race with a delay on a loaded machine).
        r.candidate.release = answer = threading.Event()
        for i in range(7):
            resp = r.chat(f"q{i}", **({"stream": True} if i % 2 else {}))
            assert resp.status_code == 200
        r.candidate.wait_for_requests(7)  # every shadow call is running ...
        assert r.settled(7, wait_for_shadows=False)["in_flight"] == 7
        assert not r.sink.events  # ... and none has come back: they all still wait
        answer.set()
        events = r.sink.wait(7)
    assert all(e.candidate_error is None for e in events)
    assert len({e.request_id for e in events}) == 7


def test_candidate_gets_a_non_streamed_copy_of_the_request() -> None:
    with rig([ONE]) as r:
        resp = r.chat("alpha beta gamma", stream=True, stream_options={"include_usage": True},
                      temperature=0.3, user="u-1", seed=7)
        assert resp.status_code == 200
        (ev,) = r.sink.wait(1)
        (req,) = r.candidate.wait_for_requests(1)
    body = req.body
    assert "stream" not in body and "stream_options" not in body
    assert body["model"] == "gpt-4o-mini"
    assert (body["temperature"], body["user"], body["seed"]) == (0.3, "u-1", 7)
    assert body["messages"] == [{"role": "user", "content": "alpha beta gamma"}]
    assert req.headers["x-request-id"] == resp.headers["x-request-id"] + "-shadow"
    assert ev.primary_stream and ev.primary_ttft_s is not None and ev.primary_ttft_s > 0
    assert ev.request_id == resp.headers["x-request-id"]
    # Both upstreams echo the prompt: the same answer, so full agreement.
    assert (ev.agreement, ev.agreement_method, ev.agreed) == (1.0, "exact", True)
    assert ev.candidate_finish_reason == "stop"
    rec = r.recorder.wait(1)[0]
    assert (ev.primary_prompt_tokens, ev.primary_completion_tokens) == (
        rec.prompt_tokens, rec.completion_tokens)
    assert ev.primary_cost_nanousd == rec.actual_cost_nanousd > 0
    assert ev.candidate_cost_nanousd == r.gateway.estimator.cost(
        "small", ev.candidate_prompt_tokens, ev.candidate_completion_tokens)


def test_in_flight_cap() -> None:
    with rig([{**ONE, "max_in_flight": 2}]) as r:
        r.candidate.release = answer = threading.Event()  # the first two hold their slots
        for i in range(6):
            assert r.chat(f"q{i}").status_code == 200
        # Every call's finisher ran: each sampled call was started or skipped by now.
        status = r.settled(6, wait_for_shadows=False)
        assert status["in_flight"] == 2
        assert status["skipped"] == {"in_flight": 4}
        r.candidate.wait_for_requests(2)
        answer.set()
        assert r.settled(6)["in_flight"] == 0  # the tasks' finally blocks freed their slots
        assert len(r.sink.events) == len(r.candidate.requests) == 2
        assert r.chat("after").status_code == 200  # a free slot again
        r.sink.wait(3)
        assert len(r.candidate.requests) == 3


def test_daily_spend_cap_is_the_shadows_own() -> None:
    # The candidate is expensive: each shadow call holds about 0.0101 USD (100 output tokens
    # at 100 USD/Mtok) and actually costs a little less.
    pricey = {"id": "small", "provider": "cand", "upstream": "gpt-4o-mini",
              "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 100.0}
    with rig([{**ONE, "daily_usd": 0.03}], models=_models_with(pricey)) as r:
        n = 8
        for i in range(n):
            assert r.chat(" ".join(["word"] * 40) + f" {i}", max_tokens=100).status_code == 200
            r.settled(i + 1)  # one at a time: each hold settles before the next
        status = r.settled(n)
        events = r.sink.events
        spent = sum(e.candidate_cost_nanousd for e in events)
        assert 0 < spent <= 30_000_000
        assert status["skipped"].get("spend_cap", 0) == n - len(events) > 0
        assert math.isclose(status["spend"]["spent_usd"], spent / 1e9)
        # The tenant's budget saw only its own (primary) calls.
        primary = sum(rec.actual_cost_nanousd for rec in r.recorder.records)
        assert r.gateway.budget_book().spent_today("acme") == primary
        assert len(r.recorder.records) == n  # no call records for shadow calls


def _models_with(replacement: dict[str, Any]) -> list[dict[str, Any]]:
    from .rig import raw_config

    base = raw_config("http://x", "http://y", [])["models"]
    return [replacement if m["id"] == replacement["id"] else m for m in base]


def test_sampled_fraction_is_the_seeded_draw() -> None:
    n, fraction, seed = 60, 0.3, 42
    with rig([{**ONE, "fraction": fraction, "seed": seed}]) as r:
        for i in range(n):
            assert r.chat(f"q{i}").status_code == 200
        draw = Sampler(fraction, seed)
        expected = sum(draw() for _ in range(n))
        status = r.settled(n)
        assert status["sampled"] == expected and status["skipped"] == {}
        assert len(r.sink.events) == expected
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(expected - n * fraction) < 4 * sd


def test_failing_candidate_only_shows_in_the_report() -> None:
    # 2 s: far more than an answer takes, even on a loaded machine; the silent one never answers.
    shadow = [{**ONE, "timeout_s": 2.0}]
    with rig(shadow) as r:
        r.candidate.add_fault(Fault(status=500, times=2))
        r.candidate.add_fault(Fault(kind="timeout", times=1))
        r.candidate.add_fault(Fault(kind="reset", times=1))
        codes = [r.chat(f"q{i}").status_code for i in range(5)]
        assert codes == [200] * 5
        events = r.sink.wait(5)
        errors = sorted(e.candidate_error or "" for e in events)
        # The reset closes the connection before any reply byte: upstream_connect_failed,
        # on a new connection or a reused one alike (the client never sends a request
        # twice on its own; providers/http/raw/README.md).
        failing = ["upstream_error", "upstream_error", "upstream_timeout"]
        assert errors == sorted([*failing, "upstream_connect_failed", ""]), errors
        assert r.candidate.pending_faults == 0, "every fault was met, the reset included"
        failed = [e for e in events if e.candidate_error]
        assert all(e.agreement is None and e.candidate_cost_nanousd == 0 for e in failed)
        assert {e.candidate_status for e in failed} == {500, 0}
        assert [e.candidate_status for e in events].count(500) == 2
        # The candidate's provider breaker and the live error metrics are untouched.
        assert r.gateway.breakers.state("cand") == "closed"
        assert r.gateway.metrics.upstream_errors.values == {}
        (row,) = r.report()["data"]
    n = len(failed)  # 4, or 3 when the reset was sent again and answered
    assert row["samples"] == 5 and row["errors"] == n and row["error_rate"] == n / 5
    assert row["errors_by_code"] == dict(Counter(e.candidate_error for e in failed))
    assert row["agreement_mean"] == 1.0 and row["scored"] == 5 - n


def test_report_figures_match_the_events() -> None:
    shadow = [{**ONE, "candidates": ["small", "local-small"], "agreement_threshold": 0.9}]
    with rig(shadow) as r:
        r.candidate.reply_words = 6  # the candidate says something else than the echo
        for i in range(4):
            assert r.chat(f"a b c d e f g h i j {i}").status_code == 200
        r.sink.wait(8)  # their shadow calls answered before the candidate changes its reply
        r.candidate.reply_words = None
        for i in range(3):
            assert r.chat(f"k l m {i}", stream=True).status_code == 200
        r.candidate.add_fault(Fault(status=503, times=1))
        assert r.chat("failing").status_code == 200
        events = r.sink.wait(16)
        doc = r.report()
        denied = r.http.get("/api/ai/shadow", headers=auth())
    assert denied.status_code == 403
    assert doc["source"] == "local" and doc["as_of_sequence"] == 16
    rows = {row["candidate"]: row for row in doc["data"]}
    assert set(rows) == {"small", "local-small"}
    for cand, row in rows.items():
        es = [e for e in events if e.candidate_model == cand]
        ok = [e for e in es if e.candidate_error is None]
        assert row["route"] == "auto" and row["samples"] == len(es) == 8
        assert row["errors"] == len(es) - len(ok)
        assert math.isclose(row["agreement_mean"], sum(e.agreement or 0 for e in ok) / len(ok))
        assert row["agreement_rate"] == sum(e.agreed for e in ok) / len(ok)
        assert math.isclose(row["cost_ratio"] or 0.0,
                            sum(e.candidate_cost_nanousd for e in ok)
                            / sum(e.primary_cost_nanousd for e in ok))
        assert row["primary_models"] == {"big": 8}
        lat = sorted(e.primary_latency_s for e in es)
        exact = lat[math.ceil(0.95 * len(lat)) - 1]
        assert abs(row["primary_latency_p95_ms"] / 1000 - exact) <= 0.0201 * exact
    assert rows["local-small"]["cost_ratio"] == 0.0  # a free local model
    assert 0 < rows["small"]["cost_ratio"] < 1
    assert 0.0 < rows["small"]["agreement_mean"] < 1.0  # 4 disagreeing, 3 agreeing


def test_sensitive_requests_are_shadowed_only_to_local_candidates() -> None:
    shadow = [{**ONE, "candidates": ["small", "local-small"]}]
    with rig(shadow) as r:
        for level in ("confidential", "restricted"):
            resp = r.chat("secret", headers={"X-Tollway-Sensitivity": level})
            assert resp.status_code == 200
        assert r.chat("public", headers={"X-Tollway-Sensitivity": "public"}).status_code == 200
        status = r.settled(3)
        events = r.sink.events
        assert len(events) == 4
    by = {(e.sensitivity, e.candidate_model) for e in events}
    assert by == {("confidential", "local-small"), ("restricted", "local-small"),
                  ("public", "small"), ("public", "local-small")}
    assert status["skipped"] == {"sensitivity": 2}


def test_only_matching_routes_and_successful_calls_are_shadowed() -> None:
    with rig([ONE]) as r:
        assert r.chat(model="chat").status_code == 200  # another route
        assert r.chat(model="big").status_code == 200  # the model itself, not the route
        r.primary.add_fault(Fault(status=400, times=1))
        assert r.chat().status_code == 400  # the primary failed: nothing to compare
        bad = r.http.post("/api/ai/v1/chat/completions", json={"model": "auto"},
                          headers=auth())
        assert bad.status_code == 400
        r.settled(4)
        assert r.sink.events == [] and r.candidate.requests == []
        assert r.chat().status_code == 200
        r.sink.wait(1)


def test_shutdown_cancels_running_shadow_calls() -> None:
    with rig([{**ONE, "max_in_flight": 8}], candidate_latency=30.0) as r:
        for i in range(3):
            assert r.chat(f"q{i}").status_code == 200
        r.candidate.wait_for_requests(3)
        runner, sink = r.shadow.runner, r.sink
        assert len(runner.tasks) == 3
        t = time.perf_counter()
        r.server.__exit__(None, None, None)  # the lifespan stops the runner
        assert time.perf_counter() - t < 20  # a hang detector: the candidate takes 30 s
        assert not r.server.thread.is_alive()
        assert runner.tasks == set() and runner.stopping
        assert all(route.in_flight == 0 for route in runner.routes.values())
        assert sink.events == []  # a cancelled comparison publishes nothing


def test_report_cli_against_the_gateway(tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    from tollway.cli import main

    cfg = tmp_path / "tollway.toml"
    cfg.write_text('[server]\nadmin_key_env = "SHADOW_ADMIN"\nbuiltin_providers = false\n'
                   "builtin_models = false\n")
    monkeypatch.setenv("SHADOW_ADMIN", ADMIN_KEY)
    with rig([ONE]) as r:
        for i in range(3):
            r.chat(f"q{i}")
        r.sink.wait(3)
        assert main(["shadow", "report", "--config", str(cfg), "--gateway", r.server.url]) == 0
        table = capsys.readouterr().out
        assert main(["shadow", "report", "--config", str(cfg), "--gateway", r.server.url,
                     "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        monkeypatch.setenv("SHADOW_ADMIN", "wrong")
        assert main(["shadow", "report", "--config", str(cfg), "--gateway", r.server.url]) == 1
    header, _, row = table.splitlines()[:3]
    assert header.split()[:3] == ["route", "candidate", "n"]
    assert row.split()[:3] == ["auto", "small", "3"]
    assert doc["data"][0]["samples"] == 3
    assert msgspec.json.decode(msgspec.json.encode(doc))["object"] == "shadow.report"


def test_tool_calls_and_json_are_compared_structurally() -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}, "required": ["city"]}}}]
    with rig([ONE]) as r:
        assert r.chat("weather in Paris", tools=tools, stream=True).status_code == 200
        assert r.chat("weather in Paris", tools=tools).status_code == 200
        assert r.chat("give json", response_format={"type": "json_object"}).status_code == 200
        events = r.sink.wait(3)
    calls = [e for e in events if e.agreement_method == "tool_calls"]
    assert sorted(e.primary_stream for e in calls) == [False, True]
    for ev in calls:
        assert (ev.primary_finish_reason, ev.candidate_finish_reason) == ("tool_calls",
                                                                         "tool_calls")
        assert ev.agreement == 1.0
    (js,) = [e for e in events if e.agreement_method == "json"]
    assert js.agreement == 1.0


def test_a_large_prompt_is_counted_once_for_the_call_and_its_shadow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with rig([ONE]) as r:
        counts = spy_counts(monkeypatch)
        r.candidate.add_fault(Fault(status=200, body={  # no usage: the shadow needs the count
            "id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]}))
        content = "lorem ipsum dolor sit amet " * (THREAD_MIN_BYTES // 27 + 40)
        assert r.chat(content).status_code == 200
        (event,) = r.sink.wait(1)
        assert event.candidate_error is None
        messages = [{"role": "user", "content": content}]
        assert event.candidate_prompt_tokens == count_chat_tokens(messages, "gpt-4o-mini")
        assert counts == [False]  # once, in a worker thread; the shadow reused it
