"""The ledger's tables: which events go where, and each event as a row of typed values.

One table per kind of event (the migrations create them): ``calls``, ``budget_events``,
``breaker_events``, ``shadow_events``, ``route_events``, ``admin_events``, and
``other_events`` for what this version cannot read. A table's columns are the fields of its
event structs under the same names, plus a few derived ones (the stream sequence, the UTC
day, the type); so a field added to an event needs a column (a migration), which
``tests/sink`` checks. Both the PostgreSQL sink and the Parquet export write these rows."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import msgspec

from tollway.events.schema import (
    AdminEvent,
    BreakerChanged,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    CallCompleted,
    CallEvent,
    CallFailed,
    CallRejected,
    Event,
    FlagChanged,
    KeyCreated,
    KeyRevoked,
    KeyRotated,
    RouteLearned,
    ShadowCompared,
    TenantChanged,
    TenantCreated,
    ToolChanged,
    ToolRemoved,
    day_of,
)

ENVELOPE = tuple(f.name for f in msgspec.structs.fields(Event))


def _fields(*classes: type[Event]) -> list[str]:
    """Field names of ``classes`` in declaration order, each once."""
    out: list[str] = []
    for cls in classes:
        for f in msgspec.structs.fields(cls):
            if f.name not in out:
                out.append(f.name)
    return out


def timestamp(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


_DAY_CACHE: dict[str, date] = {}


def day(t: float) -> date:
    s = day_of(t)
    d = _DAY_CACHE.get(s)
    if d is None:
        d = _DAY_CACHE[s] = date.fromisoformat(s)
    return d


Row = tuple[Any, ...]


@dataclass
class Table:
    """A table: its columns, and how an event (with its stream sequence) becomes a row."""

    name: str
    columns: tuple[str, ...]
    row: Callable[[int, Any], Row]
    events: tuple[type[Event], ...] = ()


# ---- calls: the hot table, built with one attrgetter per row ---------------------------------
_CALL_FIELDS = [n for n in _fields(CallCompleted) if n not in ("event_id", "occurred_at",
                                                                   "outcome")]
CALL_COLUMNS = ("event_id", "seq", "occurred_at", "day", "outcome", *_CALL_FIELDS)
_call_values = operator.attrgetter(*_CALL_FIELDS)
_FALLBACKS = CALL_COLUMNS.index("fallbacks")
_FLAGS = CALL_COLUMNS.index("flags")


def call_row(seq: int, e: CallEvent) -> Row:
    t = e.occurred_at
    row = [e.event_id, seq, timestamp(t), day(t), e.outcome, *_call_values(e)]  # type: ignore[attr-defined]
    row[_FALLBACKS] = list(row[_FALLBACKS])
    row[_FLAGS] = list(row[_FLAGS])
    return tuple(row)


# ---- the others: low volume, one getattr per column ------------------------------------------
def _generic(columns: tuple[str, ...], derived: dict[str, Callable[[int, Any], Any]]
             ) -> Callable[[int, Any], Row]:
    def row(seq: int, e: Any) -> Row:
        out = []
        for c in columns:
            fn = derived.get(c)
            if fn is not None:
                out.append(fn(seq, e))
            else:
                v = getattr(e, c, None)
                out.append(list(v) if isinstance(v, tuple) else v)
        return tuple(out)
    return row


def _tag(_seq: int, e: Any) -> str:
    return str(type(e).__struct_config__.tag)


def _seq(seq: int, _e: Any) -> int:
    return seq


def _at(_seq: int, e: Any) -> datetime:
    return timestamp(e.occurred_at)


def _day_field(_seq: int, e: Any) -> date | None:
    v = getattr(e, "day", None)
    return date.fromisoformat(v) if v else None


def _expires(_seq: int, e: Any) -> datetime | None:
    v = getattr(e, "expires_at", None)
    return timestamp(v) if v else None


_BUDGET = (BudgetReserved, BudgetSettled, BudgetReleased)
BUDGET_COLUMNS = ("event_id", "seq", "occurred_at", "type",
                  *[n for n in _fields(*_BUDGET) if n not in ("event_id", "occurred_at")])
BREAKER_COLUMNS = ("event_id", "seq", "occurred_at",
                   *[n for n in _fields(BreakerChanged) if n not in ("event_id", "occurred_at")])
ROUTE_COLUMNS = ("event_id", "seq", "occurred_at",
                 *[n for n in _fields(RouteLearned) if n not in ("event_id", "occurred_at")])
SHADOW_COLUMNS = ("event_id", "seq", "occurred_at", "day",
                  *[n for n in _fields(ShadowCompared) if n not in ("event_id", "occurred_at")])
_ADMIN = (TenantCreated, TenantChanged, KeyCreated, KeyRevoked, KeyRotated, FlagChanged,
          ToolChanged, ToolRemoved)
ADMIN_COLUMNS = ("event_id", "seq", "occurred_at", "type",
                 *[n for n in _fields(AdminEvent) if n not in ("event_id", "occurred_at")],
                 "subject_id", "details")
_ADMIN_OMIT = {*ENVELOPE, "admin", "key_sha256"}  # the hash of a key stays out of analytics


def _subject_id(_seq: int, e: Any) -> str:
    return str(getattr(e, "key_id", None) or getattr(e, "flag", None)
               or getattr(e, "tool", None) or "")


def _details(_seq: int, e: Any) -> str:
    """The event's own fields as a JSON object (text: a jsonb column, a Parquet string)."""
    d: dict[str, Any] = msgspec.to_builtins(e)
    return msgspec.json.encode({k: v for k, v in d.items()
                                if k not in _ADMIN_OMIT and k != "type"}).decode()


TABLES: dict[str, Table] = {}


def _add(t: Table) -> None:
    TABLES[t.name] = t


_add(Table("calls", CALL_COLUMNS, call_row, (CallCompleted, CallFailed, CallRejected)))
_add(Table("budget_events", BUDGET_COLUMNS, _generic(BUDGET_COLUMNS, {
    "seq": _seq, "occurred_at": _at, "type": _tag, "day": _day_field,
    "expires_at": _expires}), _BUDGET))
_add(Table("breaker_events", BREAKER_COLUMNS, _generic(BREAKER_COLUMNS, {
    "seq": _seq, "occurred_at": _at}), (BreakerChanged,)))
_add(Table("shadow_events", SHADOW_COLUMNS, _generic(SHADOW_COLUMNS, {
    "seq": _seq, "occurred_at": _at, "day": lambda _s, e: day(e.occurred_at)}),
    (ShadowCompared,)))
_add(Table("route_events", ROUTE_COLUMNS, _generic(ROUTE_COLUMNS, {
    "seq": _seq, "occurred_at": _at}), (RouteLearned,)))
_add(Table("admin_events", ADMIN_COLUMNS, _generic(ADMIN_COLUMNS, {
    "seq": _seq, "occurred_at": _at, "type": _tag, "subject_id": _subject_id,
    "details": _details}), _ADMIN))

OTHER_COLUMNS = ("event_id", "seq", "type", "schema_version", "body")

TABLE_OF: dict[type[Event], Table] = {cls: t for t in TABLES.values() for cls in t.events}


class _Envelope(msgspec.Struct):
    type: str = ""
    event_id: str = ""
    schema_version: int = 0


_envelope = msgspec.json.Decoder(_Envelope)


def other_row(seq: int, data: bytes) -> Row:
    """A message this version cannot read, kept whole."""
    try:
        env = _envelope.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        env = _Envelope()
    def text(v: str) -> str:  # PostgreSQL's text holds no NUL
        return v.replace("\x00", "\ufffd")

    body = text(data.decode("utf-8", errors="replace"))
    version = env.schema_version if -(2**31) <= env.schema_version < 2**31 else 0
    return (text(env.event_id) or f"~seq-{seq}", seq, text(env.type), version, body)


class Rows(msgspec.Struct):
    """A batch of messages as rows, by table; ``other`` for what could not be read."""

    by_table: dict[str, list[Row]] = msgspec.field(default_factory=dict)
    other: list[Row] = msgspec.field(default_factory=list)
    count: int = 0


def to_rows(messages: Iterable[tuple[int, bytes]], decode: Callable[[bytes], Event | None],
            rows: Rows | None = None) -> Rows:
    """``(seq, payload)`` messages as rows (appended to ``rows`` if given)."""
    out = rows if rows is not None else Rows()
    tables = out.by_table
    for seq, data in messages:
        out.count += 1
        try:
            e = decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            e = None
        t = TABLE_OF.get(type(e)) if e is not None else None
        if t is None:
            out.other.append(other_row(seq, data))
            continue
        try:
            row = t.row(seq, e)
        except (ValueError, OverflowError, OSError):  # a time no datetime can hold
            out.other.append(other_row(seq, data))
            continue
        lst = tables.get(t.name)
        if lst is None:
            lst = tables[t.name] = []
        lst.append(row)
    return out
