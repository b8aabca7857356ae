"""Budget: tenant x day -> spend (nano-USD), plus the holds (reservations) still open.

A pure fold like the others (see usage.py). Spend comes from call events
(``actual_cost_nanousd``). Holds come from ``budget.reserved`` events, of two
kinds:

- a **call hold** (``request_id`` set): one call's maximum cost. It shrinks to
  the actual cost on ``budget.settled`` and closes when the call event of the
  same tenant and request id lands (its cost is spend from then on).
- a **lease** (no ``request_id``): a slice of the budget one gateway grants
  calls from locally. A call event that names the lease (``reservation_id``)
  moves its cost from the lease to spend, so the call is counted exactly
  once -- in the lease until its event lands, as spend after.
  ``budget.released`` gives back what is left, except what the lease's calls
  cost (``settled_nanousd``) and their events have not brought yet.
  (Streams written before call events named their lease carry a
  ``budget.settled`` per call instead, linking it to the lease by request
  id; both forms fold to the same view.)

Any hold also closes when it expires. Expiry needs a clock, so the fold only
forgets holds that expired before the event being applied (the event time is
the fold's only clock) and readers filter by their own ``now``.

Each event id reaches the fold once (its ``seen``, through the Projection,
:mod:`~tollway.events.seen`): a call event resent after the duplicate window
adds no spend. The view keeps the retention's days of spend (:func:`prune`).

``reserved_seq`` keeps, per subject token, the stream sequence of the last
``budget.reserved`` message: the compare-and-set that makes reservations safe
across processes (see tollway.events.budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import msgspec

from tollway.events.schema import (
    DAY_OF_NUMBER,
    BudgetReleased,
    BudgetReserved,
    BudgetSettled,
    CallCompleted,
    CallEvent,
    CallFailed,
    CallRejected,
    Event,
    day_of,
    subject_token,
)
from tollway.events.seen import RETENTION_DAYS, Seen

_PRUNE_EVERY_S = 300.0


class Hold(msgspec.Struct, array_like=True):
    tenant: str
    day: str
    amount: int  # what it holds now
    expires_at: float
    request_id: str  # "" for a lease
    seq: int
    pending: int = 0  # lease: settled calls whose call events have not landed yet
    released: bool = False  # lease: given back; lives on only for ``pending``
    used: int = 0  # lease: cost of the call events that named it so far


class BudgetState(msgspec.Struct):
    last_seq: int = 0
    spend: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)  # tenant->day->n$
    holds: dict[str, Hold] = msgspec.field(default_factory=dict)  # reservation id -> hold
    by_request: dict[str, list[str]] = msgspec.field(default_factory=dict)  # request id -> ids
    links: dict[str, tuple[str, int]] = msgspec.field(default_factory=dict)  # req -> lease, $
    reserved_seq: dict[str, int] = msgspec.field(default_factory=dict)  # subject token -> seq
    pruned_at: float = 0.0  # event time of the last prune of holds
    seen: Seen = msgspec.field(default_factory=lambda: Seen(RETENTION_DAYS))


def new(keep_days: int = RETENTION_DAYS) -> BudgetState:
    return BudgetState(seen=Seen(keep_days))


def skipped(view: BudgetState, seq: int, event: Event) -> None:
    """An event not folded again (its id was): a reservation still moves the tenant's
    compare-and-set mark, which is by stream sequence."""
    if isinstance(event, BudgetReserved):
        token = subject_token(event.tenant)
        view.reserved_seq[token] = max(seq, view.reserved_seq.get(token, 0))


def _close(view: BudgetState, rid: str) -> Hold | None:
    hold = view.holds.pop(rid, None)
    if hold is not None and hold.request_id:
        ids = view.by_request.get(hold.request_id)
        if ids is not None:
            if rid in ids:
                ids.remove(rid)
            if not ids:
                del view.by_request[hold.request_id]
    return hold


def apply(view: BudgetState, seq: int, event: Event) -> BudgetState:
    if seq <= view.last_seq:
        return view
    view.last_seq = seq
    if isinstance(event, CallEvent):
        _spend(view, event, event.tenant, event.reservation_id)
        if event.budget_scope:  # a key with a budget of its own: its account spends too
            _spend(view, event, event.budget_scope, event.key_reservation_id)
        if event.reservation_id:
            return _maybe_expire(view, event)
        rid = event.request_id
        if rid:
            link = view.links.get(rid) if view.links else None  # (streams of old)
            if link is not None:
                lease = view.holds.get(link[0])
                if lease is None or lease.tenant == event.tenant:
                    del view.links[rid]
                    if lease is not None:
                        lease.amount -= link[1]
                        lease.pending -= link[1]
                        if lease.released and lease.pending <= 0:
                            _close(view, link[0])
    elif isinstance(event, BudgetReserved):
        view.reserved_seq[subject_token(event.tenant)] = seq
        if event.reservation_id not in view.holds:
            view.holds[event.reservation_id] = Hold(
                event.tenant, event.day, event.amount_nanousd, event.expires_at,
                event.request_id, seq)
            if event.request_id:
                view.by_request.setdefault(event.request_id, []).append(event.reservation_id)
    elif isinstance(event, BudgetSettled):
        hold = view.holds.get(event.reservation_id)
        if hold is not None:
            if hold.request_id:
                hold.amount = event.actual_nanousd
            elif event.request_id and event.request_id not in view.links:
                view.links[event.request_id] = (event.reservation_id, event.actual_nanousd)
                hold.pending += event.actual_nanousd
                if hold.released:
                    hold.amount += event.actual_nanousd
    elif isinstance(event, BudgetReleased):
        hold = view.holds.get(event.reservation_id)
        if hold is not None:
            owed = hold.pending + max(0, event.settled_nanousd - hold.used)
            if hold.request_id or owed <= 0:
                _close(view, event.reservation_id)
            else:
                hold.amount = hold.pending = owed
                hold.released = True
    return _maybe_expire(view, event)


_CALL_TYPES = frozenset((CallCompleted, CallFailed, CallRejected))


def apply_batch(view: BudgetState, seqs: Sequence[int], events: Sequence[Event]) -> BudgetState:
    """:func:`apply` over events with ascending sequences: the common event (a call granted
    from a lease) in one loop, everything else through :func:`apply`."""
    spend = view.spend
    days = DAY_OF_NUMBER
    for seq, e in zip(seqs, events, strict=True):
        if (type(e) not in _CALL_TYPES or seq <= view.last_seq
                or e.occurred_at - view.pruned_at >= _PRUNE_EVERY_S):
            view = apply(view, seq, e)
            continue
        call = cast(CallEvent, e)
        if not call.reservation_id or call.budget_scope:
            view = apply(view, seq, e)
            continue
        view.last_seq = seq
        cost = call.actual_cost_nanousd
        if cost:
            t = call.occurred_at
            day = days.get(int(t // 86400)) or day_of(t)
            by_day = spend.get(call.tenant)
            if by_day is None:
                by_day = spend[call.tenant] = {}
            by_day[day] = by_day.get(day, 0) + cost
        _spend_from_lease(view, call.reservation_id, call.tenant, cost)
    return view


def _spend(view: BudgetState, event: CallEvent, account: str, lease_id: str) -> None:
    """The call's cost as ``account``'s spend: out of the lease it names, else closing the
    account's hold of the same request id."""
    cost = event.actual_cost_nanousd
    if cost:
        days = view.spend.get(account)
        if days is None:
            days = view.spend[account] = {}
        day = day_of(event.occurred_at)
        days[day] = days.get(day, 0) + cost
    if lease_id:
        _spend_from_lease(view, lease_id, account, cost)
        return
    rid = event.request_id
    ids = view.by_request.get(rid) if rid else None
    if ids:
        # Request ids come from clients too: only the same account's hold is this call's.
        for hid in ids:
            if view.holds[hid].tenant == account:
                _close(view, hid)
                break


def _spend_from_lease(view: BudgetState, lease_id: str, tenant: str, cost: int) -> None:
    lease = view.holds.get(lease_id)
    if lease is None or lease.tenant != tenant or lease.request_id:
        return  # lapsed, or not a lease of this tenant: the cost is spend and nothing else
    lease.amount -= cost
    if lease.released:
        lease.pending -= cost
        if lease.pending <= 0:
            _close(view, lease_id)
    else:
        lease.used += cost


def _maybe_expire(view: BudgetState, event: Event) -> BudgetState:
    if event.occurred_at - view.pruned_at >= _PRUNE_EVERY_S:
        _expire(view, event.occurred_at)
    return view


def _expire(view: BudgetState, now: float) -> None:
    view.pruned_at = now
    if view.holds:
        for rid in [rid for rid, h in view.holds.items() if h.expires_at < now]:
            _close(view, rid)
    if view.links:
        for req in [r for r, (lid, _) in view.links.items() if lid not in view.holds]:
            del view.links[req]


def prune(view: BudgetState) -> None:
    """Drop the spend of days the view no longer keeps."""
    oldest = view.seen.oldest
    for tenant in list(view.spend):
        days = view.spend[tenant]
        for d in [d for d in days if d < oldest]:
            del days[d]
        if not days:
            del view.spend[tenant]


# ---- checkpoint ------------------------------------------------------------------------------
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(BudgetState)


def dump(view: BudgetState) -> bytes:
    return _enc.encode(view)


def load(data: bytes) -> BudgetState:
    return _dec.decode(data)


# ---- queries ---------------------------------------------------------------------------------
def spent(view: BudgetState, tenant: str, day: str) -> int:
    return view.spend.get(tenant, {}).get(day, 0)


def open_holds(view: BudgetState, tenant: str, day: str, now: float) -> list[tuple[str, Hold]]:
    return [(rid, h) for rid, h in view.holds.items()
            if h.tenant == tenant and h.day == day and h.expires_at >= now]


def held(view: BudgetState, tenant: str, day: str, now: float) -> int:
    return sum(h.amount for _, h in open_holds(view, tenant, day, now))
