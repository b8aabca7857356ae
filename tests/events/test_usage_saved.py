"""The usage view's cache columns: hits and savings fold, and checkpoints made before the
columns existed still load."""

from __future__ import annotations

import msgspec

from tollway.events.projections import usage
from tollway.events.schema import CallCompleted, decode, encode


def _call(i: int, **kw: object) -> CallCompleted:
    fields: dict[str, object] = {"actual_cost_nanousd": 100, **kw}
    return CallCompleted(event_id=f"e{i}", occurred_at=1_767_225_600.0 + i, tenant="acme",
                         model="m", provider="p", **fields)  # type: ignore[arg-type]


def test_hits_and_savings_fold_one_by_one_and_in_batches() -> None:
    events = [_call(1), _call(2, cache="miss"), _call(3, cache="hit", actual_cost_nanousd=0,
                                                       saved_nanousd=100)]
    one = usage.new()
    for seq, e in enumerate(events, 1):
        usage.apply(one, seq, e)
    batch = usage.apply_batch(usage.new(), [1, 2, 3], events)
    for view in (one, batch):
        total = usage.query(view)["total"]
        assert (total["requests"], total["cache_hits"], total["saved_nanousd"],
                total["cost_nanousd"]) == (3, 1, 100, 200)
        assert total["saved_usd"] == 100 / 1e9


def test_an_old_checkpoint_and_an_old_event_still_read() -> None:
    old = usage.UsageView(last_seq=5, rows={("acme", "2026-01-01", "m", "p"): [1, 1, 0, 0, 3,
                                                                             4, 9]})
    view = usage.load(msgspec.msgpack.encode(old))
    assert view.rows[("acme", "2026-01-01", "m", "p")] == [1, 1, 0, 0, 3, 4, 9, 0, 0]
    usage.apply(view, 6, _call(6, cache="hit", saved_nanousd=7))
    assert usage.query(view)["total"]["saved_nanousd"] == 7
    # An event written before the fields existed decodes with their defaults.
    raw = encode(_call(9)).replace(b',"cache":""', b"").replace(b',"saved_nanousd":0', b"")
    assert b"saved_nanousd" not in raw
    e = decode(raw)
    assert isinstance(e, CallCompleted) and e.cache == "" and e.saved_nanousd == 0
