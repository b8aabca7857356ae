"""Usage: tenant x day x model x provider -> requests, tokens, cost, errors, cache savings.

A response-cache hit (``cache = "hit"``) counts as a completed request with no tokens
and no cost; what its answer cost when it was made adds to ``saved_nanousd``.

A pure fold: :func:`apply` reads nothing but its arguments (no clock, no I/O)
and skips any stream sequence it has already applied, so feeding it the same
message twice, or replaying the stream over a checkpoint, changes nothing. It
updates the view in place (a fold over a million events must not copy) and
returns it.

Rows are daily rollups. Which events reach the fold -- each event id once,
only of days the view keeps -- its ``seen`` decides, through the
:class:`~tollway.events.projections.Projection`; :func:`prune` drops the days
it no longer keeps (``[events] retention_days``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import msgspec

from tollway.events.schema import (
    DAY_OF_NUMBER,
    CallCompleted,
    CallEvent,
    CallFailed,
    CallRejected,
    Event,
    day_of,
)
from tollway.events.seen import RETENTION_DAYS, Seen

# Row layout (a list, not a struct: the fold touches it per event).
REQUESTS, COMPLETED, FAILED, REJECTED, PROMPT, COMPLETION, COST, CACHE_HITS, SAVED = range(9)
COLUMNS = ("requests", "completed", "failed", "rejected", "prompt_tokens",
           "completion_tokens", "cost_nanousd", "cache_hits", "saved_nanousd")
_WIDTH = len(COLUMNS)

Key = tuple[str, str, str, str]  # tenant, day, model, provider
ToolKey = tuple[str, str, str]  # tenant, day, registry tool
TOOL_CALLS, TOOL_INVALID = range(2)


class UsageView(msgspec.Struct):
    last_seq: int = 0
    rows: dict[Key, list[int]] = msgspec.field(default_factory=dict)
    # Calls the replies made to registry tools, and how many had invalid arguments.
    tools: dict[ToolKey, list[int]] = msgspec.field(default_factory=dict)
    seen: Seen = msgspec.field(default_factory=lambda: Seen(RETENTION_DAYS))


def new(keep_days: int = RETENTION_DAYS) -> UsageView:
    return UsageView(seen=Seen(keep_days))


def prune(view: UsageView) -> None:
    """Drop the rows of days the view no longer keeps."""
    oldest = view.seen.oldest
    for key in [k for k in view.rows if k[1] < oldest]:
        del view.rows[key]
    for tkey in [k for k in view.tools if k[1] < oldest]:
        del view.tools[tkey]


def _count_tools(view: UsageView, tenant: str, day: str, event: CallEvent) -> None:
    tools = view.tools
    for name in event.tool_calls:
        row = tools.get((tenant, day, name))
        if row is None:
            row = tools[(tenant, day, name)] = [0, 0]
        row[TOOL_CALLS] += 1
    for name in event.tool_calls_invalid:
        row = tools.get((tenant, day, name))
        if row is None:
            row = tools[(tenant, day, name)] = [0, 0]
        row[TOOL_INVALID] += 1


def apply(view: UsageView, seq: int, event: Event) -> UsageView:
    if seq <= view.last_seq:
        return view
    view.last_seq = seq
    if not isinstance(event, CallEvent):
        return view
    key = (event.tenant, day_of(event.occurred_at), event.model, event.provider)
    row = view.rows.get(key)
    if row is None:
        row = view.rows[key] = [0] * _WIDTH
    row[REQUESTS] += 1
    if event.cache == "hit":
        row[CACHE_HITS] += 1
        row[SAVED] += event.saved_nanousd
    cls = type(event)
    if cls is CallCompleted:
        row[COMPLETED] += 1
    elif cls is CallFailed:
        row[FAILED] += 1
    else:
        row[REJECTED] += 1
    row[PROMPT] += event.prompt_tokens
    row[COMPLETION] += event.completion_tokens
    row[COST] += event.actual_cost_nanousd
    if event.tool_calls:
        _count_tools(view, key[0], key[1], event)
    return view


_COLUMN_OF = {CallCompleted: COMPLETED, CallFailed: FAILED, CallRejected: REJECTED}


def apply_batch(view: UsageView, seqs: Sequence[int], events: Sequence[Event]) -> UsageView:
    """:func:`apply` over events with ascending sequences, in one loop (replays, the live
    tail): no call per event, the lookups bound once."""
    last = view.last_seq
    rows = view.rows
    get = rows.get
    column_of = _COLUMN_OF.get
    days = DAY_OF_NUMBER
    for seq, e in zip(seqs, events, strict=True):
        if seq <= last:
            continue
        last = seq
        column = column_of(type(e))
        if column is None:
            continue
        call = cast(CallEvent, e)
        t = call.occurred_at
        key = (call.tenant, days.get(int(t // 86400)) or day_of(t), call.model, call.provider)
        row = get(key)
        if row is None:
            row = rows[key] = [0] * _WIDTH
        row[REQUESTS] += 1
        row[column] += 1
        if call.cache == "hit":
            row[CACHE_HITS] += 1
            row[SAVED] += call.saved_nanousd
        row[PROMPT] += call.prompt_tokens
        row[COMPLETION] += call.completion_tokens
        row[COST] += call.actual_cost_nanousd
        if call.tool_calls:
            _count_tools(view, key[0], key[1], call)
    view.last_seq = last
    return view


# ---- checkpoint ------------------------------------------------------------------------------
# The view as it is (tuple keys and all): msgspec encodes it in C, several times faster than
# any copy made in Python, so the checkpoint's snapshot on the event loop is this encoding.
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(UsageView)


def dump(view: UsageView) -> bytes:
    return _enc.encode(view)


def load(data: bytes) -> UsageView:
    view = _dec.decode(data)
    for row in view.rows.values():  # a checkpoint from before the cache columns
        if len(row) < _WIDTH:
            row.extend([0] * (_WIDTH - len(row)))
    return view


# ---- queries ---------------------------------------------------------------------------------
def query(
    view: UsageView,
    *,
    tenant: str | None = None,
    since: str = "",
    until: str = "9999-12-31",
) -> dict[str, Any]:
    """Totals plus breakdowns by day, model and provider for ``since <= day <= until``.

    ``tenant=None`` is every tenant (admin).
    """
    total = [0] * len(COLUMNS)
    by_day: dict[str, list[int]] = {}
    by_model: dict[str, list[int]] = {}
    by_provider: dict[str, list[int]] = {}
    rows = []
    for (t, d, m, p), v in view.rows.items():
        if (tenant is not None and t != tenant) or not since <= d <= until:
            continue
        for bucket, k in ((by_day, d), (by_model, m), (by_provider, p)):
            acc = bucket.setdefault(k, [0] * len(COLUMNS))
            for i, x in enumerate(v):
                acc[i] += x
        for i, x in enumerate(v):
            total[i] += x
        rows.append({"tenant": t, "day": d, "model": m, "provider": p, **_named(v)})
    rows.sort(key=lambda r: (r["day"], r["tenant"], r["model"], r["provider"]))

    def named(bucket: dict[str, list[int]]) -> list[dict[str, Any]]:
        return [{"key": k, **_named(v)} for k, v in sorted(bucket.items())]

    by_tool: dict[str, list[int]] = {}
    for (t, d, name), v in view.tools.items():
        if (tenant is None or t == tenant) and since <= d <= until:
            acc = by_tool.setdefault(name, [0, 0])
            acc[TOOL_CALLS] += v[TOOL_CALLS]
            acc[TOOL_INVALID] += v[TOOL_INVALID]
    return {
        "total": _named(total),
        "by_day": named(by_day),
        "by_model": named(by_model),
        "by_provider": named(by_provider),
        "by_tool": [{"key": k, "calls": v[TOOL_CALLS], "invalid": v[TOOL_INVALID]}
                    for k, v in sorted(by_tool.items())],
        "rows": rows,
    }


def _named(v: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = dict(zip(COLUMNS, v, strict=True))
    out["cost_usd"] = v[COST] / 1e9
    out["saved_usd"] = v[SAVED] / 1e9
    return out
