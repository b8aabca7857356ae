"""Routing policy: sensitivity, per-call cost cap, breakers and latency classes -> a plan."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tollway.auth import hash_key
from tollway.clock import ManualClock
from tollway.config import Config, ConfigError, builtin_models, parse_config
from tollway.context import RequestInfo
from tollway.errors import CostLimitExceeded, PolicyForbids, UpstreamUnavailable, spec_for
from tollway.pipeline.bound import MIN_REPLY_TOKENS
from tollway.pipeline.call import CHAT, EMBEDDINGS, Call
from tollway.pipeline.decode import decode_chat, decode_embeddings
from tollway.pipeline.plan import Catalog
from tollway.policy import Policy, PolicyPlan
from tollway.resilience import Breakers, LatencyTracker
from tollway.tokens import (
    DEFAULT_MODEL_OUTPUT_TOKENS,
    CostEstimator,
    count_chat_tokens,
    count_tokens,
)

NANO = 1_000_000_000
PROMPT_2KB = ("The quick brown fox jumps over the lazy dog near the riverbank. " * 32)[:2048]


def policy_config() -> Config:
    raw: dict[str, Any] = {
        "server": {"builtin_providers": False, "builtin_models": False},
        "nats": {"enabled": False},
        "providers": [
            {"name": "remote", "base_url": "http://127.0.0.1:9/v1"},
            {"name": "onprem", "base_url": "http://127.0.0.1:9/v1", "local": True},
            {"name": "big", "base_url": "http://127.0.0.1:9/v1"},
        ],
        "models": [
            {"id": "gpt-4o-mini", "provider": "remote", "input_usd_per_mtok": 0.15,
             "output_usd_per_mtok": 0.60},
            {"id": "llama", "provider": "onprem", "upstream": "llama-3.1-8b",
             "input_usd_per_mtok": 0.05, "output_usd_per_mtok": 0.05},
            {"id": "gpt-4o", "provider": "big", "input_usd_per_mtok": 2.5,
             "output_usd_per_mtok": 10.0},
            {"id": "embed", "provider": "remote", "upstream": "text-embedding-3-small",
             "kind": "embedding", "input_usd_per_mtok": 0.02},
        ],
        "routes": [
            {"alias": "auto", "candidates": ["gpt-4o-mini", "llama", "gpt-4o"]},
            {"alias": "drafting", "candidates": ["gpt-4o", "gpt-4o-mini"]},
        ],
        "tenants": [
            {"id": "acme", "tier": "premium", "key_sha256": [hash_key("k-acme-1234567890")]},
        ],
    }
    return parse_config(raw, source="<test>", env={})


class World:
    def __init__(self, **policy_kw: Any) -> None:
        self.config = policy_config()
        self.clock = ManualClock()
        self.catalog = Catalog(self.config)
        self.estimator = CostEstimator({
            m.id: {"input_usd_per_mtok": m.input_usd_per_mtok,
                   "output_usd_per_mtok": m.output_usd_per_mtok} for m in self.config.models})
        self.breakers = Breakers([p.name for p in self.config.providers], self.clock,
                                 {"failure_threshold": 1})
        self.latency = LatencyTracker()
        self.policy = Policy(self.config, self.catalog, self.estimator, self.breakers,
                             self.latency, self.clock, **policy_kw)

    def call(self, model: str = "auto", content: str = "hello", *, task: str = "",
             sensitivity: str = "", latency: str = "", tier: str = "",
             **body_kw: Any) -> Call:
        call = Call(CHAT, RequestInfo("req-1", 0.0), self.config.tenants[0], self.clock.time())
        body = {"model": model, "messages": [{"role": "user", "content": content}], **body_kw}
        call.body = json.dumps(body).encode()
        call.request = decode_chat(call.body)
        call.task, call.sensitivity, call.latency_class = task, sensitivity, latency
        if tier:
            call.tier = tier
        return call

    def plan(self, call: Call) -> PolicyPlan:
        return self.policy.plan(call)

    def dep(self, model: str) -> object:
        return self.catalog.models[model]


def names(plan: PolicyPlan) -> list[str]:
    return [d.model for d in plan.candidates]


def test_standard_keeps_configured_order_and_explains() -> None:
    w = World()
    plan = w.plan(w.call())
    assert names(plan) == ["gpt-4o-mini", "llama", "gpt-4o"]
    assert plan.route == "auto"
    assert plan.reason.startswith("auto:") and "-> remote/gpt-4o-mini" in plan.reason


@pytest.mark.parametrize("level", ["confidential", "restricted"])
def test_confidential_goes_only_to_local_providers(level: str) -> None:
    w = World()
    plan = w.plan(w.call(sensitivity=level))
    assert names(plan) == ["llama"]
    assert all(d.local for d in plan.candidates)
    assert f"{level}: local only (1/3)" in plan.reason


def test_confidential_without_a_local_provider_is_refused_403() -> None:
    w = World()
    call = w.call("gpt-4o", sensitivity="confidential")
    with pytest.raises(PolicyForbids) as err:
        w.plan(call)
    assert spec_for(err.value).status == 403
    assert "local provider" in err.value.message
    assert "confidential" in call.reason


@pytest.mark.parametrize("level", ["", "public", "internal"])
def test_other_sensitivities_may_go_anywhere(level: str) -> None:
    w = World()
    assert names(w.plan(w.call(sensitivity=level))) == ["gpt-4o-mini", "llama", "gpt-4o"]


def test_estimate_is_token_exact_and_the_cap_bounds_or_drops_candidates() -> None:
    w = World()
    call = w.call(content=PROMPT_2KB, tier="low", max_tokens=200)
    plan = w.plan(call)
    msgs = [{"role": "user", "content": PROMPT_2KB}]
    tokens = count_chat_tokens(msgs, "gpt-4o-mini")
    # gpt-4o: ~470 prompt tokens at 2.5 USD/M leave the low cap (0.002 USD) room for
    # fewer than the 200 output tokens asked at 10 USD/M: its max_tokens is lowered.
    assert names(plan) == ["gpt-4o-mini", "llama", "gpt-4o"]
    assert "output bound for the low cap: gpt-4o" in plan.reason
    assert plan.prompt_tokens == tokens and plan.max_output_tokens == 200
    assert plan.costs[0] == w.estimator.estimate("gpt-4o-mini", tokens, 200).max_cost_nanousd
    llama_tokens = count_chat_tokens(msgs, "llama-3.1-8b")  # counted with its own encoding
    assert plan.costs[1] == w.estimator.estimate("llama", llama_tokens, 200).max_cost_nanousd
    gpt4o = w.catalog.models["gpt-4o"]
    bound = plan.bound(gpt4o)
    assert plan.bound(w.catalog.models["gpt-4o-mini"]) == plan.bound(
        w.catalog.models["llama"]) == 0  # their 200 tokens fit: nothing changes
    assert MIN_REPLY_TOKENS <= bound < 200
    cap = round(0.002 * NANO)
    assert plan.costs[2] == w.estimator.estimate("gpt-4o", tokens, bound).max_cost_nanousd <= cap
    assert w.estimator.estimate("gpt-4o", tokens, bound + 1).max_cost_nanousd > cap  # the most
    assert plan.relay_limit(gpt4o) == bound
    assert plan.max_cost_nanousd == max(plan.costs) == call.estimated_cost_nanousd
    # Twice the prompt leaves gpt-4o no room for even a minimal reply: it is dropped.
    plan = w.plan(w.call(content=PROMPT_2KB * 2, tier="low", max_tokens=200))
    assert names(plan) == ["gpt-4o-mini", "llama"]
    assert "over low cap: gpt-4o" in plan.reason


def test_no_candidate_under_the_cap_is_400_cost_limit_exceeded() -> None:
    w = World()
    call = w.call("gpt-4o", content=PROMPT_2KB * 2, tier="low")
    with pytest.raises(CostLimitExceeded) as err:
        w.plan(call)
    spec = spec_for(err.value)
    assert (spec.status, spec.code, err.value.param) == (400, "cost_limit_exceeded", "messages")
    assert "0.002 USD" in err.value.message
    # Half the prompt leaves room for a reply: the call gets the most output the cap pays.
    plan = w.plan(w.call("gpt-4o", content=PROMPT_2KB, tier="low"))
    assert names(plan) == ["gpt-4o"]
    assert MIN_REPLY_TOKENS <= plan.bound(plan.candidates[0]) < 1024
    assert plan.max_cost_nanousd <= 0.002 * NANO


def test_the_hold_covers_the_callers_bound_or_the_models_full_output() -> None:
    w = World()
    mini = w.catalog.models["gpt-4o-mini"]
    plan = w.plan(w.call("gpt-4o-mini", max_tokens=100, max_completion_tokens=300, n=3))
    assert plan.max_output_tokens == 900  # max_completion_tokens wins, times n
    tokens = plan.prompt_tokens
    assert plan.costs[0] == w.estimator.estimate("gpt-4o-mini", tokens, 900).max_cost_nanousd
    assert plan.bound(mini) == 0 and plan.relay_limit(mini) == 900
    # No max_tokens: the rate limiter counts a typical reply, the budget holds the most
    # the model can output (the built-in table's 16,384 for gpt-4o-mini), and the
    # premium cap pays it: the request is left as it is.
    plan = w.plan(w.call("gpt-4o-mini"))
    assert plan.max_output_tokens == w.estimator.default_max_output_tokens
    assert mini.max_output_tokens == 16_384 and mini.max_tokens_field == "max_tokens"
    assert plan.costs[0] == w.estimator.estimate(
        "gpt-4o-mini", tokens, 16_384).max_cost_nanousd
    assert plan.bound(mini) == 0 and plan.relay_limit(mini) == 0
    # A max_tokens past the model's limit holds only what the model can output.
    plan = w.plan(w.call("gpt-4o-mini", max_tokens=100_000))
    assert plan.costs[0] == w.estimator.estimate(
        "gpt-4o-mini", tokens, 16_384).max_cost_nanousd


def test_output_limits_come_from_the_config_the_table_or_the_default() -> None:
    raw = policy_config()
    by_id = {m.id: m for m in raw.models}
    assert by_id["gpt-4o"].max_output_tokens is None  # left to the table
    w = World()
    models = w.catalog.models
    assert models["gpt-4o"].max_output_tokens == 16_384
    # "llama" is in no table, nor is its upstream name: the documented default.
    assert models["llama"].max_output_tokens == DEFAULT_MODEL_OUTPUT_TOKENS
    assert models["llama"].max_tokens_field == "max_tokens"
    cfg = parse_config({
        "server": {"builtin_providers": False, "builtin_models": False},
        "providers": [{"name": "openai", "base_url": "http://127.0.0.1:9/v1"}],
        "models": [
            {"id": "reasoner", "provider": "openai", "upstream": "o3-mini",
             "input_usd_per_mtok": 1.1, "output_usd_per_mtok": 4.4},
            {"id": "small", "provider": "openai", "max_output_tokens": 2048,
             "max_tokens_field": "max_completion_tokens"},
        ]}, source="<test>", env={})
    catalog = Catalog(cfg)
    # By upstream name: o3-mini's published limit, and the field it takes.
    assert catalog.models["reasoner"].max_output_tokens == 100_000
    assert catalog.models["reasoner"].max_tokens_field == "max_completion_tokens"
    assert catalog.models["small"].max_output_tokens == 2048
    assert catalog.models["small"].max_tokens_field == "max_completion_tokens"
    builtin = {m.id: m for m in builtin_models()}
    assert builtin["o1"].max_tokens_field == "max_completion_tokens"
    assert builtin["gpt-4-turbo"].max_output_tokens == 4096
    assert builtin["openai/o3"].max_tokens_field is None  # OpenRouter takes max_tokens


def test_open_breakers_are_filtered_out() -> None:
    w = World()
    w.breakers["remote"].record_failure(w.clock.monotonic())
    plan = w.plan(w.call())
    assert names(plan) == ["llama", "gpt-4o"]
    assert "breaker open: remote" in plan.reason
    w.clock.advance(30)  # half-open: back in the plan, to be probed
    assert names(w.plan(w.call())) == ["gpt-4o-mini", "llama", "gpt-4o"]


def test_all_breakers_open_is_503_with_retry_after() -> None:
    w = World()
    for p in ("remote", "big"):
        w.breakers[p].record_failure(w.clock.monotonic())
    w.clock.advance(12.5)
    call = w.call("drafting")
    with pytest.raises(UpstreamUnavailable) as err:
        w.plan(call)
    assert spec_for(err.value).status == 503
    assert err.value.headers == {"Retry-After": "18"}  # 30 s recovery - 12.5 s, rounded up
    assert "breakers open: big,remote" in call.reason


def test_interactive_orders_by_observed_latency() -> None:
    w = World()
    lat = w.latency
    lat.observe(w.dep("gpt-4o-mini"), "remote", 0.9)
    lat.observe(w.dep("gpt-4o"), "big", 0.3)
    # llama was never measured: it goes first, once, to be measured.
    assert names(w.plan(w.call(latency="interactive"))) == ["llama", "gpt-4o", "gpt-4o-mini"]
    lat.observe(w.dep("llama"), "onprem", 0.5)
    plan = w.plan(w.call(latency="interactive"))
    assert names(plan) == ["gpt-4o", "llama", "gpt-4o-mini"]
    assert "interactive order" in plan.reason
    # standard ignores the EWMA
    assert names(w.plan(w.call(latency="standard"))) == ["gpt-4o-mini", "llama", "gpt-4o"]


def test_batch_orders_by_price() -> None:
    w = World()
    plan = w.plan(w.call(latency="batch"))
    assert names(plan) == ["llama", "gpt-4o-mini", "gpt-4o"]
    assert list(plan.costs) == sorted(plan.costs)


def test_latency_objective_deprioritises_slow_deployments_per_task() -> None:
    w = World()
    for _ in range(10):
        w.latency.observe(w.dep("gpt-4o-mini"), "remote", 4.0)  # p95 4 s
    # chat: 4 s breaks the 3.5 s objective, so it goes last (standard order otherwise)
    plan = w.plan(w.call(task="chat"))
    assert names(plan) == ["llama", "gpt-4o", "gpt-4o-mini"]
    assert names(w.plan(w.call())) == ["llama", "gpt-4o", "gpt-4o-mini"]  # chat by default
    # drafting allows 6 s: the configured order stands
    assert names(w.plan(w.call(task="draft"))) == ["gpt-4o-mini", "llama", "gpt-4o"]
    # interactive: slow-for-the-objective last even though unmeasured ones go first
    assert names(w.plan(w.call(latency="interactive")))[-1] == "gpt-4o-mini"


def test_task_routes_pick_a_route_for_auto() -> None:
    w = World(task_routes={"draft": "drafting"})
    plan = w.plan(w.call(task="draft"))
    assert plan.route == "drafting" and names(plan) == ["gpt-4o", "gpt-4o-mini"]
    assert "task draft -> route drafting" in plan.reason
    assert names(w.plan(w.call(task="chat"))) == ["gpt-4o-mini", "llama", "gpt-4o"]
    # a concrete model is never rerouted
    assert names(w.plan(w.call("llama", task="draft"))) == ["llama"]
    with pytest.raises(ConfigError, match=r"task_routes\.code"):
        World(task_routes={"code": "nope"})


def test_expensive_by_model_list_or_cost_threshold() -> None:
    w = World(expensive_models=["gpt-4o"])
    assert w.plan(w.call("gpt-4o", max_tokens=10)).expensive
    assert not w.plan(w.call("gpt-4o-mini")).expensive
    w = World(expensive_min_cost_usd=0.001)
    # gpt-4o-mini: 1024 output tokens * 0.6 USD/M = 0.0006 USD, under the threshold
    assert not w.plan(w.call("gpt-4o-mini")).expensive
    assert w.plan(w.call("gpt-4o-mini", max_tokens=2000)).expensive


def test_embeddings_estimate_counts_the_input() -> None:
    w = World()
    call = Call(EMBEDDINGS, RequestInfo("r", 0.0), w.config.tenants[0], w.clock.time())
    call.body = json.dumps({"model": "embed", "input": ["one two", "three"]}).encode()
    call.request = decode_embeddings(call.body)
    plan = w.plan(call)
    tokens = count_tokens("one two") + count_tokens("three")
    assert plan.prompt_tokens == tokens and plan.max_output_tokens == 0
    assert plan.costs == (w.estimator.estimate("embed", tokens, 0).max_cost_nanousd,)


def test_config_sections_reach_the_gateway() -> None:
    from tollway.gateway import Gateway

    raw: dict[str, Any] = {
        "server": {"builtin_providers": False, "builtin_models": False},
        "nats": {"enabled": False},
        "providers": [{"name": "p", "base_url": "http://127.0.0.1:9/v1"}],
        "models": [{"id": "m", "provider": "p"}],
        "guards": {"expensive_models": ["m"], "budget": False,
                   "default_limits": {"per_minute": 7}},
        "retry": {"attempts": 5, "max_retry_after_s": 2.5},
        "breaker": {"failure_threshold": 2, "recovery_s": 4.0},
        "policy": {"local_only": ["restricted"], "task_routes": {"code": "m"},
                   "latency_objectives_s": {"chat": 1.0}, "default_latency": "batch"},
    }
    gw = Gateway(parse_config(raw, source="<test>", env={}), env={})
    assert gw.retry.attempts == 5 and gw.retry.max_retry_after_s == 2.5
    assert gw.breakers["p"].options["failure_threshold"] == 2
    assert gw.breakers["p"].options["recovery_s"] == 4.0
    assert gw.policy.local_only == frozenset({"restricted"})
    assert gw.policy.task_routes == {"code": "m"}
    assert gw.policy.objectives == {"chat": 1.0} and gw.policy.default_latency == "batch"
    assert gw.policy.expensive_models == frozenset({"m"})
    assert gw.rate_guard is not None and gw.budget_guard is None
    assert gw.rate_guard.limiter.limits("anyone").per_minute == 7
    assert gw.pipeline.guards == [gw.rate_guard] and gw.pipeline.finishers == []
    off = Gateway(parse_config({**raw, "guards": {"enabled": False}}, source="<t>", env={}),
                  env={})
    assert off.pipeline.guards == [] and not off.policy.estimate
    for bad in ({"retry": {"attempts": 0}}, {"breaker": {"failure_threshold": 0}},
                {"policy": {"default_latency": "fast"}}, {"guards": {"nope": 1}}):
        with pytest.raises(ConfigError):
            parse_config({**raw, **bad}, source="<t>", env={})
    with pytest.raises(ConfigError, match="task_routes"):
        Gateway(parse_config({**raw, "policy": {"task_routes": {"code": "x"}}},
                             source="<t>", env={}), env={})
