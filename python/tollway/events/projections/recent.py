"""The latest events, as the dashboard's live tail shows them.

A fold like the others that keeps the last :data:`KEEP` events it folded with their
stream sequences, newest last. It is a view of the stream, so every gateway of a fleet
shows the fleet's events, not only its own calls. Every process folds every event,
so the fold only keeps a reference; what a line shows is built when it is read.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tollway.events.schema import AdminEvent, AnyEvent, CallEvent, Event
from tollway.events.seen import RETENTION_DAYS, Seen

KEEP = 200


class RecentView(msgspec.Struct):
    last_seq: int = 0
    entries: list[tuple[int, AnyEvent]] = msgspec.field(default_factory=list)
    seen: Seen = msgspec.field(default_factory=lambda: Seen(RETENTION_DAYS))


def new(keep_days: int = RETENTION_DAYS) -> RecentView:
    return RecentView(seen=Seen(keep_days))


def _summary(event: Event) -> dict[str, Any]:
    """What a line of the tail shows: never a key or its hash."""
    if isinstance(event, CallEvent):
        return {"model": event.model, "provider": event.provider, "status": event.status,
                "cost_nanousd": event.actual_cost_nanousd, "latency_s": round(event.latency_s, 4),
                "code": event.error_code}
    if isinstance(event, AdminEvent):
        out = {"admin": event.admin}
        for name in ("key_id", "flag"):
            value = getattr(event, name, None)
            if value:
                out[name] = value
        return out
    fields = ("provider", "state", "day", "amount_nanousd", "candidate_model", "agreement")
    return {f: getattr(event, f) for f in fields if getattr(event, f, None) not in (None, "")}


def apply(view: RecentView, seq: int, event: Event) -> RecentView:
    if seq <= view.last_seq:
        return view
    view.last_seq = seq
    entries = view.entries
    entries.append((seq, event))  # type: ignore[arg-type]  # every event is of AnyEvent
    if len(entries) > KEEP:
        del entries[0]
    return view


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(RecentView)


def dump(view: RecentView) -> bytes:
    return _enc.encode(view)


def load(data: bytes) -> RecentView:
    return _dec.decode(data)


def query(view: RecentView, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` events after sequence ``after``, oldest first."""
    rows = [(seq, e) for seq, e in view.entries if seq > after][-limit:]
    return [{"seq": seq, "type": type(e).__struct_config__.tag, "occurred_at": e.occurred_at,
             "tenant": e.tenant, **_summary(e)} for seq, e in rows]
