"""Hard money guarantees through a real gateway (issue 11, point 5): no call costs more
than its tier's per-call cap or the tenant's remaining daily budget, with or without
max_tokens, streamed or not. The provider is the fake upstream, which can reply 4,000
tokens whatever max_tokens says, and refuses max_tokens for OpenAI's reasoning models."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from policy_rig import CHAT, Rig, completions, rig
from support import auth, chat_body
from tollway.context import RequestInfo
from tollway.events.schema import event_from_record
from tollway.pipeline.call import CHAT as CHAT_ENDPOINT
from tollway.pipeline.call import Call
from tollway.pipeline.decode import decode_chat
from tollway.policy import PolicyPlan
from tollway.tokens import count_tokens

NANO = 1_000_000_000
REPLY = 4000  # words of the fake's reply: one token each
CONTENT = "one two three four five six"
LOW = {"X-Tollway-Budget-Tier": "low"}  # 0.002 USD a call: ~1,000 output tokens here


def model(upstream: str, **kw: Any) -> list[dict[str, Any]]:
    """The rig's one model, ``m-primary``, served as ``upstream`` (1 and 2 USD/M)."""
    return [{"id": "m-primary", "provider": "primary", "upstream": upstream,
             "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0, **kw}]


def probe_plan(r: Rig, body: dict[str, Any]) -> PolicyPlan:
    """The gateway's own plan for a call of ``body``, made without calling it."""
    call = Call(CHAT_ENDPOINT, RequestInfo("probe", 0.0), r.gateway.config.tenants[0],
                r.gateway.clock.time())
    call.body = json.dumps(body).encode()
    call.request = decode_chat(call.body)
    plan = r.gateway.policy.plan(call)
    assert isinstance(plan, PolicyPlan)
    return plan


def stream_text(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the content relayed, every JSON chunk) of an SSE body that ends in [DONE]."""
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or ""
                      for c in chunks if c["choices"])
    return content, chunks


@pytest.mark.parametrize(("stream", "events", "tier"), [
    (False, False, "premium"), (True, False, "low"), (True, True, "premium")])
async def test_50_calls_without_max_tokens_never_spend_over_the_budget(
        stream: bool, events: bool, tier: str, tmp_path: Path) -> None:
    # The case: replies that would run to 4,000 tokens, no max_tokens, a budget
    # worth 10 such calls; each hold used to assume 1,024 output tokens (3.8x overspent).
    # Premium's cap pays a full reply (16,384 tokens, gpt-4o-mini's limit): the budget
    # bounds the last calls. Low's cap pays ~1,000 tokens: every call is bounded by it.
    # With events on, the budget is the shared one (leases on JetStream). A stream's
    # provider here ignores max_tokens: the relay stops at the bound.
    extra: dict[str, Any] = {"real_clock": True, "nats": {
        "enabled": True, "url": "embedded", "data_dir": str(tmp_path / "data")}} if events else {}
    # 40 streams of 1,000 events at once on a shared machine: no timeout may fail them.
    slow = {"first_byte_timeout_s": 30.0, "total_timeout_s": 60.0}
    with rig(("primary",), provider=slow, **extra) as r:
        up = r.ups["primary"]
        up.reply_words = REPLY
        up.replies.honour_max_tokens = not stream
        plan = probe_plan(r, chat_body(CONTENT, model="auto"))
        per_call = r.gateway.estimator.estimate("m-primary", plan.prompt_tokens,
                                                REPLY).max_cost_nanousd
        # Set before any call, so that no budget is leased against another limit.
        r.gateway.budget_guard.daily["acme"] = budget = 10 * per_call
        up.latency_s = 0.05  # all 50 are in flight together
        headers = {**auth(), "X-Tollway-Budget-Tier": tier}
        async with httpx.AsyncClient(base_url=r.server.url, timeout=20,
                                     limits=httpx.Limits(max_connections=60)) as client:
            async def one() -> httpx.Response:
                return await client.post(CHAT, headers=headers,
                                         json=chat_body(CONTENT, model="auto", stream=stream))
            replies = await asyncio.gather(*(one() for _ in range(50)))
        answered = [x for x in replies if x.status_code == 200]
        refused = [x for x in replies if x.status_code != 200]
        assert answered and refused
        assert {x.json()["error"]["code"] for x in refused} == {"insufficient_quota"}
        recs = r.recorder.wait(50)
        spent = sum(x.actual_cost_nanousd for x in recs)
        assert 0 < spent <= budget  # 0 nano-USD over
        if not events:
            book = r.gateway.local_budget
            assert book.spent_today("acme", r.clock.time()) == spent
            assert book.reserved_today("acme", r.clock.time()) == 0
        done = [x for x in recs if x.outcome == "completed"]
        assert len(done) == len(answered)
        for rec in done:
            assert rec.actual_cost_nanousd <= rec.estimated_cost_nanousd  # what it held
            if rec.max_tokens_bound is not None:
                assert rec.completion_tokens <= rec.max_tokens_bound
                assert event_from_record(rec, "e").max_tokens_bound == rec.max_tokens_bound
        bounds = sorted(int(x.headers["x-tollway-max-tokens"]) for x in answered
                        if "x-tollway-max-tokens" in x.headers)
        assert bounds == sorted(x.max_tokens_bound for x in done if x.max_tokens_bound)
        # What the provider was asked for is what the headers said, call by call.
        sent = [q.body for q in up.requests if q.path.endswith("/chat/completions")]
        assert sorted(b["max_tokens"] for b in sent if "max_tokens" in b) == bounds
        if tier == "low":  # every call bounded by the cap, and cut at it when streamed
            assert len(bounds) == len(answered) and bounds[-1] < REPLY
            assert all(x.completion_tokens < REPLY for x in done)
        else:  # the budget bounded the call that took its last room
            assert bounds and len(bounds) < len(answered)
            assert any(x.completion_tokens == REPLY for x in done)


def test_a_stream_is_cut_at_the_bound_when_the_provider_ignores_it() -> None:
    with rig(("primary",)) as r:
        up = r.ups["primary"]
        up.reply_words = REPLY
        up.replies.honour_max_tokens = False
        resp = r.chat(stream=True, stream_options={"include_usage": True}, headers=LOW)
        assert resp.status_code == 200
        bound = int(resp.headers["x-tollway-max-tokens"])
        assert up.requests[-1].body["max_tokens"] == bound < REPLY  # asked for, and ignored
        content, chunks = stream_text(resp.text)
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # ended as providers do
        usage = chunks[-1]["usage"]
        relayed = count_tokens(content)
        assert 0 < relayed <= bound and usage["completion_tokens"] == relayed
        rec = r.recorder.wait(1)[0]
        assert rec.outcome == "completed" and rec.max_tokens_bound == bound
        assert rec.completion_tokens == relayed  # billed what was relayed
        assert rec.actual_cost_nanousd <= rec.estimated_cost_nanousd <= 0.002 * NANO


def test_with_room_for_the_full_output_the_request_is_left_as_it_is() -> None:
    with rig(("primary",)) as r:
        up = r.ups["primary"]
        for stream in (False, True):
            resp = r.chat(stream=stream)
            assert resp.status_code == 200
            assert "x-tollway-max-tokens" not in resp.headers
            sent = up.requests[-1].body
            assert "max_tokens" not in sent and "max_completion_tokens" not in sent
        # A caller's max_tokens the cap pays is sent as it is, and not announced.
        resp = r.chat(max_tokens=7, headers=LOW)
        assert resp.status_code == 200 and "x-tollway-max-tokens" not in resp.headers
        assert up.requests[-1].body["max_tokens"] == 7
        recs = r.recorder.wait(3)
        assert [x.max_tokens_bound for x in recs] == [None, None, None]
        # The hold covers the model's full output: gpt-4o-mini's 16,384 tokens.
        prompt = probe_plan(r, chat_body("one two three", model="auto")).prompt_tokens
        per_call = r.gateway.estimator.estimate("m-primary", prompt, 16_384)
        assert recs[0].estimated_cost_nanousd == per_call.max_cost_nanousd


def test_the_bound_goes_in_the_field_the_model_takes() -> None:
    # o3-mini, like OpenAI's reasoning models, refuses max_tokens (the fake does too).
    with rig(("primary",), models=model("o3-mini")) as r:
        up = r.ups["primary"]
        resp = r.chat(max_tokens=50)
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "max_tokens"  # the fake refuses it
        resp = r.chat(headers=LOW)  # no bound of the caller's: the cap needs one
        assert resp.status_code == 200
        bound = int(resp.headers["x-tollway-max-tokens"])
        sent = up.requests[-1].body
        assert sent["max_completion_tokens"] == bound and "max_tokens" not in sent
        # A caller's own field is lowered in place, and the other is not added.
        resp = r.chat(max_completion_tokens=5000, headers=LOW)
        assert resp.status_code == 200
        sent = up.requests[-1].body
        assert sent["max_completion_tokens"] == bound and "max_tokens" not in sent
    with rig(("primary",), models=model("gpt-4o-mini")) as r:
        resp = r.chat(max_completion_tokens=5000, headers=LOW)
        sent = r.ups["primary"].requests[-1].body
        assert sent["max_completion_tokens"] == int(resp.headers["x-tollway-max-tokens"])
        assert "max_tokens" not in sent
        resp = r.chat(headers=LOW)
        bound = int(resp.headers["x-tollway-max-tokens"])
        sent = r.ups["primary"].requests[-1].body
        assert sent["max_tokens"] == bound and "max_completion_tokens" not in sent
        # Both sent: the one that counts is lowered, the other is never raised.
        resp = r.chat(max_tokens=100, max_completion_tokens=5000, headers=LOW)
        sent = r.ups["primary"].requests[-1].body
        assert (sent["max_tokens"], sent["max_completion_tokens"]) == (100, bound)


def test_a_models_own_output_limit_bounds_the_hold_and_the_ask() -> None:
    # A model configured with an 8,192-token output limit (the fake, like a provider,
    # refuses a larger max_tokens): the hold is 8,192 tokens' worth, and a bound the
    # budget sets is never above it.
    with rig(("primary",), models=model("small-model", max_output_tokens=8192)) as r:
        r.ups["primary"].replies.output_limits["small-model"] = 8192
        assert r.chat().status_code == 200
        rec = r.recorder.wait(1)[0]
        prompt = probe_plan(r, chat_body("one two three", model="auto")).prompt_tokens
        full = r.gateway.estimator.estimate("m-primary", prompt, 8192)
        assert rec.estimated_cost_nanousd == full.max_cost_nanousd
        # Room for 3,000 output tokens: asked for that, within the model's limit.
        left = r.gateway.estimator.estimate("m-primary", prompt, 3000)
        r.gateway.budget_guard.daily["acme"] = rec.actual_cost_nanousd + left.max_cost_nanousd
        resp = r.chat()
        assert resp.status_code == 200
        assert int(resp.headers["x-tollway-max-tokens"]) == 3000
        assert r.ups["primary"].requests[-1].body["max_tokens"] == 3000


def test_a_call_the_budget_cannot_pay_a_minimal_reply_is_refused() -> None:
    with rig(("primary",)) as r:
        assert r.chat(max_tokens=5).status_code == 200
        rec = r.recorder.wait(1)[0]
        # What is left pays the prompt and 10 output tokens: less than a useful reply.
        prompt = probe_plan(r, chat_body("one two three", model="auto")).prompt_tokens
        ten = r.gateway.estimator.estimate("m-primary", prompt, 10)
        r.gateway.budget_guard.daily["acme"] = rec.actual_cost_nanousd + ten.max_cost_nanousd
        resp = r.chat()
        assert resp.status_code == 429
        err = resp.json()["error"]
        assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
        assert "minimal reply" in err["message"]
        assert r.chat(max_tokens=10).status_code == 200  # the caller's 10 tokens fit
        assert completions(r.ups["primary"]) == 2


def test_free_models_are_never_bounded() -> None:
    free = {"id": "free", "provider": "primary", "upstream": "llama-local"}
    with rig(("primary",), models=[*model("gpt-4o-mini"), free],
             tenant={"daily_usd": 0.0}) as r:
        up = r.ups["primary"]
        up.reply_words = REPLY
        resp = r.chat(model="free", headers=LOW)  # no budget at all, the lowest cap
        assert resp.status_code == 200
        assert "x-tollway-max-tokens" not in resp.headers
        assert "max_tokens" not in up.requests[-1].body
        assert resp.json()["usage"]["completion_tokens"] == REPLY
        assert r.chat(model="m-primary").status_code == 429  # a priced one is refused
