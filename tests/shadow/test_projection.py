"""The shadow fold: idempotent by sequence, checkpointable, and the report matches the events."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.events.projections import shadow_projection
from tollway.events.schema import CallCompleted, CallFailed, CallRejected
from tollway.shadow import projection
from tollway.shadow.event import ShadowCompared
from tollway.shadow.projection import ShadowView, apply, bucket_value, percentile
from tollway.shadow.report import format_ab_table, format_table, query, query_ab
from tollway.shadow.sink import MemorySink

DAY0 = 1_767_225_600.0  # 2026-01-01


def event(i: int, *, route: str = "auto", cand: str = "cheap", err: str | None = None,
          agreement: float | None = 1.0, day: int = 0, instance: str = "gw1",
          p_lat: float = 0.2, c_lat: float = 0.1, p_cost: int = 1000,
          c_cost: int = 100) -> ShadowCompared:
    return ShadowCompared(
        event_id=f"e{i}", occurred_at=DAY0 + day * 86400 + i, tenant="acme", request_id=f"r{i}",
        instance=instance, route=route, primary_provider="big", primary_model="gpt",
        candidate_provider="small", candidate_model=cand, primary_latency_s=p_lat,
        primary_ttft_s=p_lat / 4, candidate_latency_s=c_lat, primary_prompt_tokens=10,
        primary_completion_tokens=5, candidate_prompt_tokens=10, candidate_completion_tokens=6,
        primary_cost_nanousd=p_cost, candidate_cost_nanousd=c_cost,
        candidate_error=err, agreement=None if err else agreement,
        agreement_method="" if err else "similarity", agreement_threshold=0.8,
        agreed=err is None and agreement is not None and agreement >= 0.8)


def fold(events: list[ShadowCompared]) -> ShadowView:
    view = ShadowView()
    for seq, e in enumerate(events, 1):
        apply(view, seq, e)
    return view


def test_fold_is_idempotent_and_ignores_other_events() -> None:
    evs = [event(i) for i in range(5)]
    view = fold(evs)
    before = projection.dump(view)
    for seq, e in enumerate(evs, 1):  # redelivery
        apply(view, seq, e)
    assert projection.dump(view) == before
    other = CallCompleted(event_id="c", occurred_at=DAY0, tenant="acme", reason="auto: -> x")
    apply(view, 6, other)
    assert view.last_seq == 6
    assert query(view)[0]["samples"] == 5


def test_checkpoint_round_trip() -> None:
    evs = [event(i, err="upstream_timeout" if i % 3 == 0 else None, day=i % 2)
           for i in range(30)]
    view = fold(evs)
    apply(view, 31, CallCompleted(event_id="a", occurred_at=DAY0, model="m2", latency_s=0.3,
                                  reason="auto: x; ab[auto]=candidate -> m2"))
    back = projection.load(projection.dump(view))
    assert back == view
    assert query(back) == query(view)
    assert query_ab(back) == query_ab(view)


def test_percentile_within_two_percent() -> None:
    rng = random.Random(5)
    values = [rng.lognormvariate(-1.5, 1.0) for _ in range(5000)]
    hist: dict[int, int] = {}
    for v in values:
        b = projection.bucket(v)
        hist[b] = hist.get(b, 0) + 1
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[math.ceil(q * len(ordered)) - 1]
        got = percentile(hist, q)
        assert got is not None
        assert abs(got - exact) / exact <= 0.0201, (q, got, exact)
    assert percentile({}, 0.5) is None
    assert bucket_value(projection.bucket(0.0)) < 0.00011  # below the first bucket: bucket 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["auto", "chat"]), st.sampled_from(["c1", "c2"]),
    st.none() | st.sampled_from(["upstream_timeout", "upstream_error"]),
    st.floats(0.0, 1.0), st.floats(0.001, 30.0), st.floats(0.001, 30.0),
    st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 2)), max_size=60))
def test_report_figures_match_the_events(rows: list[tuple]) -> None:  # type: ignore[type-arg]
    evs = [event(i, route=r, cand=c, err=err, agreement=a, p_lat=pl, c_lat=cl, p_cost=pc,
                 c_cost=cc, day=d) for i, (r, c, err, a, pl, cl, pc, cc, d) in enumerate(rows)]
    report = {(x["route"], x["candidate"]): x for x in query(fold(evs))}
    groups: dict[tuple[str, str], list[ShadowCompared]] = {}
    for e in evs:
        groups.setdefault((e.route, e.candidate_model), []).append(e)
    assert set(report) == set(groups)
    for key, es in groups.items():
        r = report[key]
        ok = [e for e in es if e.candidate_error is None]
        assert r["samples"] == len(es)
        assert r["errors"] == len(es) - len(ok)
        assert math.isclose(r["error_rate"], (len(es) - len(ok)) / len(es))
        if ok:
            assert math.isclose(r["agreement_mean"],
                                sum(e.agreement or 0 for e in ok) / len(ok), abs_tol=1e-9)
            assert r["agreement_rate"] == sum(e.agreed for e in ok) / len(ok)
            p = sum(e.primary_cost_nanousd for e in ok)
            c = sum(e.candidate_cost_nanousd for e in ok)
            assert r["cost_ratio"] == (c / p if p else None)
            lat = sorted(e.candidate_latency_s for e in ok)
            exact = lat[math.ceil(0.95 * len(lat)) - 1]
            assert abs(r["candidate_latency_p95_ms"] / 1000 - exact) <= 0.0201 * exact
        else:
            assert r["agreement_mean"] is None and r["candidate_latency_p50_ms"] is None
        lat = sorted(e.primary_latency_s for e in es)
        exact = lat[math.ceil(0.5 * len(lat)) - 1]
        assert abs(r["primary_latency_p50_ms"] / 1000 - exact) <= 0.0201 * exact
        assert math.isclose(r["shadow_spend_usd"],
                            sum(e.candidate_cost_nanousd for e in es) / 1e9)


def test_days_filter_and_spend_by_instance() -> None:
    evs = [event(0, day=0, instance="a", c_cost=10), event(1, day=1, instance="a", c_cost=20),
           event(2, day=1, instance="b", c_cost=40)]
    view = fold(evs)
    assert [r["samples"] for r in query(view, since="2026-01-02")] == [2]
    assert projection.spend_by(view, "auto", "2026-01-02") == 60
    assert projection.spend_by(view, "auto", "2026-01-02", excluding="a") == 40
    assert projection.spend_by(view, "chat", "2026-01-02") == 0


def test_ab_arms_from_call_events() -> None:
    view = ShadowView()
    seq = 0

    def add(e: CallCompleted | CallFailed | CallRejected) -> None:
        nonlocal seq
        seq += 1
        apply(view, seq, e)

    for i in range(8):
        add(CallCompleted(event_id=f"p{i}", occurred_at=DAY0, model="big", latency_s=0.4,
                          actual_cost_nanousd=1000, reason="auto: -> p/big; ab[auto]=primary"))
    for i in range(3):
        add(CallCompleted(event_id=f"c{i}", occurred_at=DAY0, model="small", latency_s=0.1,
                          actual_cost_nanousd=250,
                          reason="auto: -> p/big; ab[auto]=candidate -> small"))
    add(CallFailed(event_id="f", occurred_at=DAY0, model="small",
                   reason="auto: -> p/big; ab[auto]=candidate -> small"))
    add(CallRejected(event_id="x", occurred_at=DAY0, model="",
                     reason="auto: -> p/big; ab[auto]=primary; refused: rate limit (minute)"))
    add(CallCompleted(event_id="n", occurred_at=DAY0, model="big", reason="auto: -> p/big"))
    rows = {(r["arm"], r["model"]): r for r in query_ab(view)}
    cand = rows[("candidate", "small")]
    assert (cand["calls"], cand["completed"], cand["failed"]) == (4, 3, 1)
    assert cand["error_rate"] == 0.25
    assert cand["cost_ratio"] == 0.25
    assert rows[("primary", "big")]["calls"] == 8
    assert rows[("primary", "")]["rejected"] == 1
    assert "candidate" in format_ab_table(query_ab(view))


def test_table_renders() -> None:
    text = format_table(query(fold([event(i) for i in range(3)])))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["route", "candidate", "n"]
    assert lines[2].split()[:3] == ["auto", "cheap", "3"]
    assert format_table([]) == "no shadow samples yet"


def test_a_resent_comparison_counts_once_and_old_days_are_pruned() -> None:
    proj = shadow_projection(retention_days=2)
    evs = [event(i, day=i) for i in range(4)]  # one a day, 2026-01-01 .. 01-04
    for seq, e in enumerate(evs + evs, 1):  # resent after the duplicate window: new seqs
        proj.apply(seq, e)
    view = proj.view
    assert {d: row.samples for (_, _, d), row in view.rows.items()} == {
        "2026-01-03": 1, "2026-01-04": 1}
    assert {d for _, d in view.spend} == {"2026-01-03", "2026-01-04"}


def test_the_in_memory_sink_keeps_the_retention_too() -> None:
    sink = MemorySink()
    for i in range(100):  # a comparison a day for 100 days, one of them twice
        sink.publish(event(i, day=i))
    sink.observe(event(99, day=99))
    days = sorted({d for _, _, d in sink.view.rows})
    assert len(days) == 90 and days[-1] == "2026-04-10"
    assert sink.view.rows[("auto", "cheap", "2026-04-10")].samples == 1
