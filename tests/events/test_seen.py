"""Seen: each event id folded once, in memory bounded by the days a view keeps."""

from __future__ import annotations

import calendar
import time

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from tollway.events.publisher import EventIds
from tollway.events.seen import FOLD, PRUNE, SKIP, TAIL, Seen


def at(day: str) -> float:
    """A time during ``day`` (UTC)."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d")) + 3600.0


DAY = at("2026-01-10")


def runs_are_normal(seen: Seen) -> bool:
    """Sorted, disjoint, non-adjacent inclusive ranges: the compact form."""
    for runs in seen.runs.values():
        if len(runs) % 2 or any(runs[i] > runs[i + 1] for i in range(0, len(runs), 2)):
            return False
        if any(runs[i] + 1 >= runs[i + 1] for i in range(1, len(runs) - 1, 2)):
            return False
    return True


def test_a_process_in_order_costs_one_range_whatever_the_count() -> None:
    ids = EventIds()
    seen = Seen(keep_days=30)
    batch = [ids() for _ in range(100_000)]
    assert [seen.admit(i, DAY) for i in batch[:2]] == [PRUNE, FOLD]  # the first day cuts
    assert all(seen.admit(i, DAY) == FOLD for i in batch[2:])
    assert len(msgspec.msgpack.encode(seen)) < 14 * TAIL, "ranges and one tail, not ids"
    assert all(seen.admit(i, DAY) == SKIP for i in batch[::997])
    seen.compact()
    assert list(seen.runs.values()) == [[0, 99_999]]
    assert len(msgspec.msgpack.encode(seen)) < 150  # one prefix: about 120 bytes


alphabet = st.sampled_from(["a" * 20, "b" * 20, "0123456789abcdef0123"])


@given(st.lists(st.tuples(alphabet, st.integers(0, 60)), max_size=300))
def test_fold_verdicts_are_exactly_the_first_occurrences(ids: list[tuple[str, int]]) -> None:
    # Any order, any repeats (a batch in flight when NATS failed, then its outbox, then the
    # outbox again): an id is folded the first time only, and the ranges stay compact.
    seen = Seen(keep_days=30)
    first: set[str] = set()
    for prefix, n in ids:
        eid = f"{prefix}{n:012x}"
        verdict = seen.admit(eid, DAY)
        assert (verdict != SKIP) == (eid not in first), eid
        first.add(eid)
    seen.compact()
    assert runs_are_normal(seen)
    assert sum((r[i + 1] - r[i] + 1) for r in seen.runs.values()
               for i in range(0, len(r), 2)) == len(first)


@given(st.lists(st.tuples(alphabet, st.integers(0, 3000)), max_size=300),
       st.lists(st.tuples(alphabet, st.integers(0, 3000)), max_size=50))
def test_has_answers_for_the_ids_folded_and_only_those(
        folded: list[tuple[str, int]], others: list[tuple[str, int]]) -> None:
    # Asked between folds too: ids still in a tail, merged into runs, of any other shape.
    seen = Seen(keep_days=30)
    first: set[str] = set()
    for k, (prefix, n) in enumerate(folded):
        eid = f"{prefix}{n:012x}"
        seen.admit(eid, DAY)
        first.add(eid)
        if k % 37 == 0:
            assert all(seen.has(e) for e in first)
    seen.admit("not-one-of-ours", DAY)
    first.add("not-one-of-ours")
    for prefix, n in [*folded, *others]:
        eid = f"{prefix}{n:012x}"
        assert seen.has(eid) == (eid in first), eid
    assert seen.has("not-one-of-ours") and not seen.has("nor-this")
    seen.compact()
    assert all(seen.has(e) for e in first)


def test_ids_of_any_other_shape_are_remembered_whole() -> None:
    seen = Seen(keep_days=30)
    for eid in ("lease-7-12", "x", "z" * 32, "0123456789abcdef0123456789abcdeg"):
        assert seen.admit(eid, DAY) != SKIP
        assert seen.admit(eid, DAY) == SKIP


def test_days_before_the_retention_are_skipped_and_their_ids_forgotten() -> None:
    seen = Seen(keep_days=3)
    old, new = "a" * 20, "b" * 20
    assert seen.admit(f"{old}{1:012x}", at("2026-01-01")) == PRUNE
    assert seen.admit(f"{new}{1:012x}", at("2026-01-02")) == PRUNE  # each new day moves the cut
    assert seen.admit(f"{new}{3:012x}", at("2026-01-01")) == FOLD  # 01-01 is still kept
    assert seen.oldest == "2025-12-31"
    assert seen.admit(f"{new}{2:012x}", at("2026-01-04")) == PRUNE  # keeps 01-02 .. 01-04
    assert seen.oldest == "2026-01-02"
    assert set(seen.runs) == {new}, "the process whose last day is gone is forgotten"
    # Its resent event is of a day no longer kept: skipped all the same.
    assert seen.admit(f"{old}{1:012x}", at("2026-01-01")) == SKIP
    assert seen.admit(f"{old}{2:012x}", at("2026-01-01")) == SKIP  # never folded, but too old
    assert seen.admit(f"{new}{1:012x}", at("2026-01-02")) == SKIP


def test_a_shorter_retention_prunes_a_longer_one_brings_nothing_back() -> None:
    seen = Seen(keep_days=10)
    seen.admit(f"{'a' * 20}{1:012x}", at("2026-01-01"))
    seen.admit(f"{'b' * 20}{1:012x}", at("2026-01-10"))
    assert seen.oldest == "2026-01-01"
    assert seen.retain(2) is True
    assert (seen.oldest, set(seen.runs)) == ("2026-01-09", {"b" * 20})
    assert seen.retain(30) is False
    assert seen.oldest == "2026-01-09", "pruned days stay pruned"
    assert Seen(keep_days=5).retain(1) is False  # nothing folded: nothing to prune


def test_a_tail_that_is_not_one_stretch_is_merged_counter_by_counter() -> None:
    seen = Seen(keep_days=30)
    prefix = "d" * 20
    counters = [n for n in range(3 * TAIL) if n % 3]  # gaps everywhere, in order
    assert all(seen.admit(f"{prefix}{n:012x}", DAY) != SKIP for n in counters)
    seen.compact()
    assert runs_are_normal(seen)
    assert len(seen.runs[prefix]) == 2 * TAIL
    assert [seen.admit(f"{prefix}{n:012x}", DAY) for n in (0, 1, 2, 3 * TAIL - 1)] == [
        FOLD, SKIP, SKIP, SKIP]


def test_an_id_that_only_looks_like_ours_is_remembered_whole() -> None:
    seen = Seen(keep_days=30)
    prefix = "e" * 20
    seen.admit(f"{prefix}{1:012x}", DAY)
    odd = f"{prefix}zzzzzzzzzzzz"  # above every hex counter as a string
    assert seen.admit(odd, DAY) == FOLD
    assert seen.admit(f"{prefix}{2:012x}", DAY) == FOLD
    assert seen.admit(odd, DAY) == SKIP
    assert seen.admit(f"{prefix}{2:012x}", DAY) == SKIP


def test_it_survives_its_checkpoint() -> None:
    seen = Seen(keep_days=30)
    for n in (5, 1, 2, 9, 3):
        seen.admit(f"{'c' * 20}{n:012x}", DAY)
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(seen), type=Seen)
    assert again == seen
    assert [again.admit(f"{'c' * 20}{n:012x}", DAY) for n in (1, 4, 4, 9)] == [
        SKIP, FOLD, SKIP, SKIP]


def test_an_event_from_a_clock_far_ahead_moves_no_day_on() -> None:
    now = at("2026-01-11")
    seen = Seen(keep_days=3)
    seen.admit(f"{'a' * 20}{1:012x}", DAY, now)
    assert seen.admit(f"{'f' * 20}{1:012x}", at("2031-01-01"), now) == FOLD  # no prune
    assert (seen.newest, seen.oldest) == ("2026-01-10", "2026-01-08")
    assert seen.admit(f"{'a' * 20}{2:012x}", DAY, now) == FOLD, "today's events still count"
    assert seen.admit(f"{'f' * 20}{1:012x}", at("2031-01-01"), now) == SKIP
