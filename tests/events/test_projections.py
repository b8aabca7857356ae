"""The folds, on the fixture sequence: totals, idempotence by sequence, holds, checkpoints."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from tollway.events import synthetic
from tollway.events.projections import (
    budget,
    default_projections,
    fold_events,
    health,
    usage,
    usage_projection,
)
from tollway.events.schema import (
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    CallCompleted,
    CallEvent,
    CallFailed,
    CallRejected,
    Event,
    day_of,
    decode,
)

from .conftest import FIXTURES, contents


def fixture_events() -> list[Event]:
    lines = (FIXTURES / "calls.jsonl").read_bytes().splitlines()
    out = []
    for line in lines:
        e = decode(line)
        assert e is not None
        out.append(e)
    return out


def fold_all(events: list[Event]) -> list[Any]:
    projs = default_projections()
    for seq, e in enumerate(events, 1):
        for p in projs:
            p.apply(seq, e)
    return projs


def test_fixture_is_a_realistic_mix() -> None:
    events = fixture_events()
    kinds = {type(e) for e in events}
    assert {CallCompleted, CallFailed, CallRejected, BudgetReserved, BudgetReleased} <= kinds
    assert any(isinstance(e, CallEvent) and e.reservation_id for e in events)
    assert len({e.tenant for e in events if isinstance(e, CallEvent)}) == 3
    assert len({day_of(e.occurred_at) for e in events}) >= 2


def test_usage_matches_an_independent_count() -> None:
    events = fixture_events()
    projs = fold_all(events)
    view: usage.UsageView = projs[0].view
    want: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for e in events:
        if isinstance(e, CallEvent):
            w = want[(e.tenant, e.model)]
            w[0] += 1
            w[1] += e.prompt_tokens + e.completion_tokens
            w[2] += e.actual_cost_nanousd
            w[3] += isinstance(e, CallFailed)
    for tenant in ("acme", "globex", "initech"):
        got = usage.query(view, tenant=tenant)
        for m in got["by_model"]:
            w = want[(tenant, m["key"])]
            assert [m["requests"], m["prompt_tokens"] + m["completion_tokens"],
                    m["cost_nanousd"], m["failed"]] == w
        assert all(r["tenant"] == tenant for r in got["rows"])
    everyone = usage.query(view)["total"]
    assert everyone["requests"] == sum(isinstance(e, CallEvent) for e in events)
    assert everyone["cost_usd"] == pytest.approx(everyone["cost_nanousd"] / 1e9)
    one_day = usage.query(view, since="2026-01-02", until="2026-01-02")
    assert [d["key"] for d in one_day["by_day"]] == ["2026-01-02"]


def test_folds_are_idempotent_by_sequence() -> None:
    events = fixture_events()
    projs = fold_all(events)
    before = [p.dump(p.view) for p in projs]
    for seq, e in enumerate(events, 1):  # the whole stream again: every seq <= last_seq
        for p in projs:
            p.apply(seq, e)
    assert [p.dump(p.view) for p in projs] == before
    # A message applied twice in a row (redelivery) counts once.
    view = usage.UsageView()
    call = next(e for e in events if isinstance(e, CallCompleted))
    usage.apply(view, 5, call)
    usage.apply(view, 5, call)
    assert usage.query(view)["total"]["requests"] == 1


def test_checkpoints_round_trip() -> None:
    projs = fold_all(fixture_events())
    for p in projs:
        again = p.load(p.dump(p.view))
        assert again == p.view
        assert again.last_seq == len(fixture_events())


def test_budget_spend_and_holds_over_the_fixture() -> None:
    events = fixture_events()
    state: budget.BudgetState = fold_all(events)[1].view
    want: dict[tuple[str, str], int] = defaultdict(int)
    for e in events:
        if isinstance(e, CallEvent):
            want[(e.tenant, day_of(e.occurred_at))] += e.actual_cost_nanousd
    for (tenant, day), cost in want.items():
        assert budget.spent(state, tenant, day) == cost
    assert state.holds == {}, "every hold was closed by its call event or released"
    assert state.by_request == {}


def test_a_hold_shrinks_on_settle_and_becomes_spend_with_its_call_event() -> None:
    t = 1_767_225_600.0
    day = day_of(t)
    s = budget.BudgetState()
    budget.apply(s, 1, BudgetReserved(event_id="r", occurred_at=t, tenant="acme",
                                      request_id="q1", reservation_id="res1", day=day,
                                      amount_nanousd=500, expires_at=t + 900))
    assert budget.held(s, "acme", day, t) == 500
    assert s.reserved_seq == {"acme": 1}
    budget.apply(s, 2, BudgetSettled(event_id="s", occurred_at=t + 1, tenant="acme",
                                     request_id="q1", reservation_id="res1", day=day,
                                     actual_nanousd=120))
    assert budget.held(s, "acme", day, t) == 120
    assert budget.spent(s, "acme", day) == 0
    budget.apply(s, 3, CallCompleted(event_id="c", occurred_at=t, tenant="acme",
                                     request_id="q1", actual_cost_nanousd=120))
    assert budget.held(s, "acme", day, t) == 0
    assert budget.spent(s, "acme", day) == 120
    # Another tenant's call with the same request id does not close acme's hold.
    budget.apply(s, 4, BudgetReserved(event_id="r2", occurred_at=t, tenant="acme",
                                      request_id="q2", reservation_id="res2", day=day,
                                      amount_nanousd=300, expires_at=t + 900))
    budget.apply(s, 5, CallCompleted(event_id="c2", occurred_at=t, tenant="globex",
                                     request_id="q2", actual_cost_nanousd=7))
    assert budget.held(s, "acme", day, t) == 300
    # Readers do not count a lapsed hold; a later event prunes it from the state.
    assert budget.held(s, "acme", day, t + 901) == 0
    budget.apply(s, 6, CallRejected(event_id="x", occurred_at=t + 1000, tenant="acme"))
    assert "res2" not in s.holds


T0 = 1_767_225_600.0


def _lease_rig() -> tuple[budget.BudgetState, Callable[[Event], None], Callable[[], int]]:
    """A budget view, an ``apply`` numbering events 1, 2, ... and acme's spend + holds."""
    s = budget.BudgetState()
    seq = iter(range(1, 100))
    day = day_of(T0)

    def apply(e: Event) -> None:
        budget.apply(s, next(seq), e)

    def total() -> int:
        return budget.spent(s, "acme", day) + budget.held(s, "acme", day, T0)

    return s, apply, total


def test_a_lease_moves_to_spend_as_the_call_events_naming_it_land() -> None:
    t, day = T0, day_of(T0)
    s, apply, total = _lease_rig()
    apply(BudgetReserved(event_id="l", occurred_at=t, tenant="acme", reservation_id="L",
                         day=day, amount_nanousd=1000, expires_at=t + 900))
    apply(CallCompleted(event_id="c0", occurred_at=t, tenant="acme", request_id="c0",
                        reservation_id="L", actual_cost_nanousd=100))
    assert budget.spent(s, "acme", day) == 100 and total() == 1000
    # Another tenant's call naming acme's lease is that tenant's spend, not acme's lease.
    apply(CallCompleted(event_id="g", occurred_at=t, tenant="globex", request_id="g",
                        reservation_id="L", actual_cost_nanousd=40))
    assert total() == 1000 and budget.spent(s, "globex", day) == 40
    # Given back while the call c1 (cost 250) is settled but its event has not landed:
    # the lease keeps holding exactly that.
    apply(BudgetReleased(event_id="r", occurred_at=t, tenant="acme", reservation_id="L",
                         day=day, settled_nanousd=350))
    assert total() == 100 + 250
    apply(CallCompleted(event_id="c1", occurred_at=t, tenant="acme", request_id="c1",
                        reservation_id="L", actual_cost_nanousd=250))
    assert total() == 350 and budget.spent(s, "acme", day) == 350
    assert s.holds == {}, "closed once everything it owed has landed"
    # Released after all its calls landed: closed at once.
    apply(BudgetReserved(event_id="l2", occurred_at=t, tenant="acme", reservation_id="L2",
                         day=day, amount_nanousd=500, expires_at=t + 900))
    apply(CallFailed(event_id="f", occurred_at=t, tenant="acme", request_id="f",
                     reservation_id="L2"))
    apply(BudgetReleased(event_id="r2", occurred_at=t, tenant="acme", reservation_id="L2",
                         day=day, settled_nanousd=0))
    assert s.holds == {} and total() == 350


def test_a_key_s_own_budget_account_spends_beside_its_tenant() -> None:
    """A call of a key with a budget of its own is spend of both accounts, each out of the
    lease it names, or closing its hold of the same request id; batch folds agree."""
    t, day, scope = T0, day_of(T0), "acme/key_1"
    events: list[Event] = [
        BudgetReserved(event_id="l", occurred_at=t, tenant="acme", reservation_id="L",
                       day=day, amount_nanousd=1000, expires_at=t + 900),
        BudgetReserved(event_id="k", occurred_at=t, tenant=scope, reservation_id="K",
                       day=day, amount_nanousd=300, expires_at=t + 900),
        CallCompleted(event_id="c0", occurred_at=t, tenant="acme", request_id="c0",
                      reservation_id="L", key_id="key_1", budget_scope=scope,
                      key_reservation_id="K", actual_cost_nanousd=100),
        # A call hold of the key's account (no lease), closed by its call event.
        BudgetReserved(event_id="h", occurred_at=t, tenant=scope, reservation_id="H",
                       day=day, amount_nanousd=80, expires_at=t + 900, request_id="c1"),
        CallCompleted(event_id="c1", occurred_at=t, tenant="acme", request_id="c1",
                      reservation_id="L", key_id="key_1", budget_scope=scope,
                      actual_cost_nanousd=50),
        # The same key without a budget of its own: the tenant's spend only.
        CallCompleted(event_id="c2", occurred_at=t, tenant="acme", request_id="c2",
                      reservation_id="L", key_id="key_2", actual_cost_nanousd=7),
    ]
    one, batch = budget.BudgetState(), budget.BudgetState()
    for seq, e in enumerate(events, 1):
        budget.apply(one, seq, e)
    budget.apply_batch(batch, list(range(1, len(events) + 1)), events)
    for s in (one, batch):
        assert budget.spent(s, "acme", day) == 157
        assert budget.spent(s, scope, day) == 150
        assert budget.held(s, scope, day, t) == 300 - 100, "the lease less its call; H closed"
        assert budget.held(s, "acme", day, t) == 1000 - 157
    assert one == batch


def test_a_lease_of_an_older_stream_settles_call_by_call() -> None:
    """Streams written before call events named their lease: a budget.settled per call."""
    t, day = T0, day_of(T0)
    s, apply, total = _lease_rig()
    apply(BudgetReserved(event_id="l", occurred_at=t, tenant="acme", reservation_id="L",
                         day=day, amount_nanousd=1000, expires_at=t + 900))
    assert total() == 1000
    for i, cost in enumerate((100, 250)):
        apply(BudgetSettled(event_id=f"s{i}", occurred_at=t, tenant="acme",
                            request_id=f"c{i}", reservation_id="L", day=day,
                            actual_nanousd=cost))
        assert total() == 1000, "a settled call stays inside the lease until its event lands"
    apply(CallCompleted(event_id="c0", occurred_at=t, tenant="acme", request_id="c0",
                        actual_cost_nanousd=100))
    assert budget.spent(s, "acme", day) == 100 and total() == 1000
    apply(BudgetReleased(event_id="r", occurred_at=t, tenant="acme", reservation_id="L",
                         day=day))
    assert total() == 100 + 250, "given back, except what the settled call c1 still owes"
    apply(CallCompleted(event_id="c1", occurred_at=t, tenant="acme", request_id="c1",
                        actual_cost_nanousd=250))
    assert total() == 350 and budget.spent(s, "acme", day) == 350
    assert s.holds == {} and s.links == {}


def test_provider_health() -> None:
    events = fixture_events()
    view: health.HealthView = fold_all(events)[2].view
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if isinstance(e, CallCompleted | CallFailed):
            for name in e.fallbacks:
                calls[name] += 1
            if e.provider and e.provider not in (e.fallbacks if isinstance(e, CallFailed)
                                                 else ()):
                calls[e.provider] += 1
    assert {n: p.calls for n, p in view.providers.items()} == dict(calls)
    for p in view.providers.values():
        assert 0.0 <= p.error_rate <= 1.0
        assert p.errors <= p.calls
    assert any(p.latency_ewma_s > 0 for p in view.providers.values())
    assert any(p.breaker != "closed" or p.errors for p in view.providers.values())


def test_unknown_event_types_are_skipped_not_fatal() -> None:
    future = b'{"type":"model.retired","event_id":"x","occurred_at":1.0,"score":0.9}'
    assert decode(future) is None
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"type":"call.completed","occurred_at":1.0}')  # a known type, but broken


@pytest.mark.parametrize("retention_days", [90, 3])
def test_batch_folds_equal_the_fold_event_by_event(retention_days: int) -> None:
    # Several days of calls (prunes, day changes, leases given back), fed in uneven
    # batches, every other one fed twice: a batch fold must skip what it has. Each view's
    # own batch fold, and the projections' (ids and days decided once per event) alike.
    events = list(synthetic.events(5000, days=9.0))
    seqs = list(range(1, len(events) + 1))
    for p, one, mode in [(p, q, mode) for mode in ("fold", "projection")
                         for p, q in zip(default_projections(retention_days),
                                         default_projections(retention_days), strict=True)]:
        if mode == "fold" and p.fold_batch is None:
            continue
        for seq, e in zip(seqs, events, strict=True):
            if mode == "fold":
                one.view = one.fold(one.view, seq, e)
            else:
                one.apply(seq, e)
        start, size = 0, 1
        while start < len(events):
            chunk = slice(start, start + size)
            for _ in range(1 + size % 2):
                if p.fold_batch is not None and mode == "fold":
                    p.view = p.fold_batch(p.view, seqs[chunk], events[chunk])
                else:
                    fold_events([p], seqs[chunk], events[chunk])
            start, size = start + size, size * 3 % 401 + 1
        assert p.view == one.view, (p.name, mode)
        assert p.view.last_seq == len(events)


def test_every_view_folds_an_event_id_once_under_any_sequence() -> None:
    # An outbox resent after the duplicate window: the same events under new sequences,
    # the tail of the stream first, then all of it.
    events = fixture_events()
    want = fold_all(events)
    projs = fold_all(events)
    resent = events[len(events) // 2:] + events
    for seq, e in enumerate(resent, len(events) + 1):
        for p in projs:
            p.apply(seq, e)
    assert [contents(p) for p in projs] == [contents(p) for p in want]
    assert all(p.view.last_seq == len(events) + len(resent) for p in projs)
    # ... and after a checkpoint: the ids are part of it.
    again = [p.load(p.dump(p.view)) for p in projs]
    for p, view in zip(projs, again, strict=True):
        p.view = view
        p.apply(10**6, events[-1])
    assert [contents(p) for p in projs] == [contents(p) for p in want]


def test_a_duplicate_reservation_still_moves_the_compare_and_set_mark() -> None:
    t = 1_767_225_600.0
    lease = BudgetReserved(event_id="lease-1", occurred_at=t, tenant="acme",
                           reservation_id="lease-1", day=day_of(t), amount_nanousd=500,
                           expires_at=t + 900)
    s = budget.BudgetState()
    budget.apply(s, 1, lease)
    budget.apply(s, 9, lease)  # resent: the stream's last reservation of acme is now 9
    assert s.reserved_seq == {"acme": 9}
    assert budget.held(s, "acme", day_of(t), t) == 500


def test_usage_keeps_the_newest_retention_days() -> None:
    events = list(synthetic.events(3000, days=9.0))
    proj = usage_projection(3)
    for seq, e in enumerate(events, 1):
        proj.apply(seq, e)
    days = sorted({day_of(e.occurred_at) for e in events})
    kept = days[-3:]
    got = usage.query(proj.view)
    assert [d["key"] for d in got["by_day"]] == kept
    calls = [e for e in events if isinstance(e, CallEvent) and day_of(e.occurred_at) in kept]
    assert got["total"]["requests"] == len(calls)
    assert got["total"]["cost_nanousd"] == sum(e.actual_cost_nanousd for e in calls)
    # A late event of a day no longer kept is skipped, not a new row that lives on.
    late = next(e for e in events if isinstance(e, CallCompleted))
    proj.apply(len(events) + 1, msgspec.structs.replace(late, event_id="late"))
    assert usage.query(proj.view)["total"] == got["total"]
    # A shorter retention when the checkpoint is loaded prunes at once.
    shorter = usage_projection(1)
    shorter.view = shorter.load(proj.dump(proj.view))
    assert [d["key"] for d in usage.query(shorter.view)["by_day"]] == kept[-1:]
