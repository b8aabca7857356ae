"""The evidence fold: promotion, demotion, the measure per task, replay."""

from __future__ import annotations

import itertools

import pytest

from support import make_raw_config
from tollway.config import ConfigError, parse_config
from tollway.events.schema import ShadowCompared
from tollway.learn.evidence import Learning, LearnRules, replay

_ids = itertools.count()


def sample(task: str, candidate: str, agreement: float | None, *, latency: float = 0.1,
           verify: bool = False, route: str = "auto") -> ShadowCompared:
    return ShadowCompared(
        event_id=f"e{next(_ids)}", occurred_at=1.0, route=route, task=task,
        primary_model="big", candidate_model=candidate, candidate_latency_s=latency,
        agreement=agreement, candidate_error=None if agreement is not None else "timeout",
        verify=verify)


def learning(**kw: object) -> Learning:
    rules = LearnRules(**{"min_samples": 10, "window": 20, "min_agreement": 0.9,
                          "hysteresis": 0.05, **kw})  # type: ignore[arg-type]
    return Learning(rules, {"big": 10.0, "mid": 3.0, "small": 1.0},
                    {"auto": ("mid", "small")})


def test_the_cheapest_qualifying_candidate_is_promoted_after_min_samples() -> None:
    lg = learning()
    decisions = []
    for _ in range(9):
        assert lg.observe(sample("summarize", "mid", 1.0)) is None
        assert lg.observe(sample("summarize", "small", 1.0)) is None
    decisions.append(lg.observe(sample("summarize", "mid", 1.0)))
    assert decisions[0] is not None and decisions[0].model == "mid"
    d = lg.observe(sample("summarize", "small", 1.0))
    assert d is not None and (d.model, d.previous, d.action) == ("small", "mid", "promoted")
    assert lg.choice("auto", "summarize") == "small"
    assert lg.choice("auto", "classify") is None  # per task


def test_exact_tasks_need_equal_answers_free_text_a_similarity() -> None:
    lg = learning()
    for _ in range(12):
        lg.observe(sample("classify", "small", 0.9))  # near, but not the same label
        lg.observe(sample("draft", "small", 0.9))  # similar enough text
    assert lg.choice("auto", "classify") is None
    assert lg.choice("auto", "draft") == "small"


def test_a_drop_in_quality_demotes_within_the_window_and_hysteresis_holds() -> None:
    lg = learning()
    for _ in range(20):
        lg.observe(sample("extract", "small", 1.0))
    assert lg.choice("auto", "extract") == "small"
    # 2 of 20 wrong: 90 % is under the promotion bar but over the demotion floor (85 %)
    lg.observe(sample("extract", "small", 0.0, verify=True))
    lg.observe(sample("extract", "small", 0.0, verify=True))
    assert lg.choice("auto", "extract") == "small"
    n = 0
    while lg.choice("auto", "extract") == "small":
        lg.observe(sample("extract", "small", 0.0, verify=True))
        n += 1
    assert n == 2  # the 4th wrong answer in 20 (80 %) demotes it
    assert lg.choice("auto", "extract") is None


def test_a_slow_candidate_or_a_failing_one_does_not_qualify() -> None:
    lg = learning(objective=lambda task: 1.0)
    for _ in range(15):
        lg.observe(sample("chat", "small", 1.0, latency=2.0))
        lg.observe(sample("chat", "mid", None))  # every call failed
    assert lg.choice("auto", "chat") is None
    # a failed check of the primary says nothing of the candidate
    assert lg.observe(sample("chat", "small", None, verify=True)) is None


def test_replaying_the_same_samples_makes_the_same_decisions() -> None:
    events = []
    for i in range(60):
        events.append(sample("classify", "small", 1.0 if i < 30 or i % 2 else 0.0))
        events.append(sample("summarize", "mid", 0.95))
    first = replay(learning(), events)
    second = replay(learning(), events)
    assert [(d.route, d.task, d.model, d.action) for d in first] == [
        (d.route, d.task, d.model, d.action) for d in second]
    assert {d.action for d in first} == {"promoted", "demoted"}
    assert all(d.event_id.startswith("learn-") for d in first)


def test_a_learning_route_needs_its_shadow_table() -> None:
    raw = make_raw_config("http://127.0.0.1:9", learn={"enabled": True, "routes": ["auto"]})
    with pytest.raises(ConfigError, match="no \\[\\[shadow\\]\\] table"):
        parse_config(raw, source="<test>", env={"FAKE_API_KEY": "k"})
    raw["shadow"] = [{"route": "auto", "candidates": ["fast"]}]
    assert parse_config(raw, source="<test>", env={"FAKE_API_KEY": "k"}).learn.enabled
