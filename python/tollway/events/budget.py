"""Daily budgets shared by every gateway on one NATS: reserve, settle, release.

The budget guard reserves a call's maximum cost before dispatch and settles
the actual cost after it. ``reserve`` must be cheap -- it is on every call's
path -- and safe across processes, so budget is handed out in two levels:

1. **Leases.** A gateway takes a slice of a tenant's daily budget -- a few
   calls' worth, at most a quarter of what is left -- as a ``budget.reserved``
   event on ``tollway.budget.reserved.<tenant>``, published with
   ``Nats-Expected-Last-Subject-Sequence`` set to the last reservation of
   that tenant it has seen. JetStream stores it only if no other reservation
   for the tenant landed in between, so every lease is decided on a view that
   includes every earlier lease, whichever gateway took it. The loser of a
   race waits until its projection has folded the winner's lease and decides
   again.
2. **Grants.** A call is granted from one of the gateway's own leases in
   memory: no await, no I/O. ``settle`` returns the unused part to the lease;
   the call event names the lease (``reservation_id``) and carries the actual
   cost, and when it lands every view moves that amount from the lease to
   spend. A lease nobody uses for a while, or too small for the next call, is
   given back (``budget.released``, with the total its calls cost: the views
   keep holding what has not landed as call events yet).

What a lease decision counts, for the tenant's current UTC day: spend (call
events folded) + open holds (leases and call holds folded and not closed) +
this gateway's leases its projection has not folded yet. Near the limit a
lease is exactly one call's amount, so the last of a budget is decided call
by call. As long as every call costs at most what it reserved, spend + holds
never exceed the limit, in one process or across many.

When NATS is unreachable, ``fail_open`` (default) grants from a local lease
decided on this process's view only (counted by
``tollway_budget_local_reservations_total``); other processes cannot see it
until its events arrive from the outbox. With ``fail_open=False``,
``reserve`` raises :class:`BudgetUnavailable`. A local lease goes through the
outbox like any event -- ``budget.reserved``, its calls, ``budget.released``
-- and counts here until the view has folded its ``budget.reserved``; from
then on the view counts it, as it does a published lease. (Forgotten when it
was given back, a local lease would let the calls of a long outage spend the
budget over and over: nothing of them is in the view until NATS returns.)

The pipeline records a call right after settling it, with no await in
between, so a lease given back by the maintenance task is published after the
events of its calls; the released total covers the case where it is not
(events of a batch in flight when NATS failed, resent from the outbox later).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js.errors import APIError

from tollway.events.metrics import EventMetrics
from tollway.events.projections import Projection
from tollway.events.projections import budget as fold
from tollway.events.projections.runner import ProjectionRunner
from tollway.events.publisher import EventIds, Publisher
from tollway.events.schema import (
    BudgetReleased,
    BudgetReserved,
    Event,
    day_of,
    encode,
    subject_token,
)

log = logging.getLogger("tollway.events")

_WRONG_LAST = re.compile(r"wrong last sequence: (\d+)")


class BudgetUnavailable(RuntimeError):
    """NATS is unreachable and the view is configured to fail closed."""


class _NotPublished(Exception):
    """The lease could not be published (NATS failed under us)."""


class Reservation(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One call's grant, carved from a lease. Hand it back to ``settle`` or ``release``."""

    lease_id: str  # the hold in the stream it is carved from; "" when nothing was held
    tenant: str
    day: str
    amount_nanousd: int
    request_id: str = ""
    seq: int = 0  # stream sequence of the lease; 0 = a local lease (NATS was down)

    @property
    def hold_id(self) -> str:
        """The lease the call's event names (a local lease reaches the stream too, through
        the outbox ahead of its calls)."""
        return self.lease_id


class _Lease:
    __slots__ = ("day", "expires_at", "free", "last_used", "lease_id", "outstanding", "seq",
                 "size", "tenant", "use_until")

    def __init__(self, lease_id: str, tenant: str, day: str, size: int, seq: int,
                 now: float, ttl_s: float) -> None:
        self.lease_id = lease_id
        self.tenant = tenant
        self.day = day
        self.size = size
        self.free = size
        self.outstanding = 0
        self.seq = seq
        self.expires_at = now + ttl_s
        # Grants stop at half the TTL, so a granted call ends long before its lease lapses.
        self.use_until = now + ttl_s / 2
        self.last_used = now


class BudgetView:
    def __init__(
        self,
        projection: Projection[fold.BudgetState],
        *,
        nc: NatsClient | None = None,
        runner: ProjectionRunner | None = None,
        publisher: Publisher | None = None,
        instance: str = "",
        ttl_s: float = 900.0,
        fail_open: bool = True,
        publish_timeout_s: float = 2.0,
        max_attempts: int = 50,
        lease_calls: int = 8,
        lease_share: int = 100,
        lease_idle_s: float = 2.0,
        metrics: EventMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.projection = projection
        self.nc = nc
        self.runner = runner
        self.publisher = publisher
        self.instance = instance
        self.ttl_s = ttl_s
        self.fail_open = fail_open
        self.publish_timeout_s = publish_timeout_s
        self.max_attempts = max_attempts
        self.lease_calls = lease_calls  # a lease covers this many calls of the asking size ...
        self.lease_share = lease_share  # ... or 1/lease_share of the daily limit, if more
        self.lease_idle_s = lease_idle_s  # unused this long: given back
        self.metrics = metrics
        self.clock = clock
        self.new_id = EventIds()
        self._leases: dict[str, list[_Lease]] = {}  # tenant -> our leases in use
        self._by_id: dict[str, _Lease] = {}
        self._retiring: dict[str, tuple[_Lease, int]] = {}  # given back, not yet folded
        self._locks: dict[str, asyncio.Lock] = {}
        self._server_says: dict[str, int] = {}  # token -> last reservation seq, after a reset

    @property
    def state(self) -> fold.BudgetState:
        return self.projection.view

    # ---- reading -----------------------------------------------------------------------------
    def spent_today(self, tenant: str, now: float | None = None) -> int:
        """Nano-USD of call events folded for the tenant's current UTC day."""
        return fold.spent(self.state, tenant, day_of(self.clock() if now is None else now))

    def reserved_today(self, tenant: str, now: float | None = None) -> int:
        """Nano-USD held today by every gateway's leases and holds (ours not yet folded too)."""
        now = self.clock() if now is None else now
        day = day_of(now)
        return self._committed(tenant, day, now) - fold.spent(self.state, tenant, day)

    def committed_today(self, tenant: str, now: float | None = None) -> int:
        """Spend + holds: what a new lease is measured against."""
        now = self.clock() if now is None else now
        return self._committed(tenant, day_of(now), now)

    def granted_today(self, tenant: str, now: float | None = None) -> int:
        """Nano-USD this gateway has granted from its leases and not settled yet."""
        day = day_of(self.clock() if now is None else now)
        return sum(lease.size - lease.free for lease in self._leases.get(tenant, ())
                   if lease.day == day)

    def _committed(self, tenant: str, day: str, now: float) -> int:
        state = self.state
        total = fold.spent(state, tenant, day) + fold.held(state, tenant, day, now)
        for lease in self._leases.get(tenant, ()):
            if lease.day == day and lease.expires_at >= now and not self._folded(lease):
                total += lease.size  # not in the view yet
        for lid, (lease, free) in list(self._retiring.items()):
            if lease.tenant != tenant:
                continue
            if lease.expires_at < now:
                del self._retiring[lid]  # lapsed for every reader
                continue
            if not self._folded(lease):
                total += lease.size - free if lease.day == day else 0
                continue
            hold = state.holds.get(lid)
            if hold is None or hold.released:
                del self._retiring[lid]  # the view has folded the release
            elif lease.day == day:
                total -= free  # given back; the view counts it until it folds the release
        return total

    def _folded(self, lease: _Lease) -> bool:
        """Whether the view has folded the lease's ``budget.reserved`` (a local lease's went
        through the outbox: its stream sequence is not known here)."""
        if lease.seq:
            return lease.seq <= self.state.last_seq
        return self.state.seen.has(lease.lease_id)

    def open_reservations(self, tenant: str, now: float | None = None) -> list[dict[str, Any]]:
        now = self.clock() if now is None else now
        day = day_of(now)
        out = [{"reservation_id": rid, "kind": "call" if h.request_id else "lease",
                "amount_nanousd": h.amount, "expires_at": h.expires_at,
                "request_id": h.request_id}
               for rid, h in fold.open_holds(self.state, tenant, day, now)]
        out += [{"reservation_id": lease.lease_id, "kind": "lease",
                 "amount_nanousd": lease.size, "expires_at": lease.expires_at,
                 "request_id": ""}
                for lease in self._leases.get(tenant, ())
                if lease.day == day and not self._folded(lease)]
        return out

    # ---- reserving ---------------------------------------------------------------------------
    async def reserve(
        self,
        tenant: str,
        amount_nanousd: int,
        limit_nanousd: int,
        *,
        request_id: str = "",
        now: float | None = None,
    ) -> Reservation | None:
        """Hold ``amount`` against today's budget, or None when it would exceed ``limit``.

        Usually answered from memory; it awaits NATS only to take a new lease. Pass the
        call's ``request_id``: its call event is what turns the cost into spend.
        """
        t = self.clock() if now is None else now
        day = day_of(t)
        if amount_nanousd <= 0:
            return Reservation(lease_id="", tenant=tenant, day=day, amount_nanousd=0,
                               request_id=request_id)
        res = self._grant(tenant, day, amount_nanousd, request_id, t)
        if res is not None:
            return res
        lock = self._locks.get(tenant)
        if lock is None:
            lock = self._locks[tenant] = asyncio.Lock()
        async with lock:
            for _ in range(self.max_attempts):
                t = self.clock() if now is None else now
                res = self._grant(tenant, day, amount_nanousd, request_id, t)
                if res is not None:
                    return res  # a lease taken while we waited for the lock
                self._retire_idle(tenant)  # too small for this call: give them back
                remaining = limit_nanousd - self._committed(tenant, day, t)
                if amount_nanousd > remaining:
                    return None
                size = self._lease_size(amount_nanousd, limit_nanousd, remaining)
                nc = self.nc
                lease: _Lease | None
                if nc is None or not nc.is_connected:
                    lease = self._local_lease(tenant, day, size, limit_nanousd, t)
                else:
                    try:
                        lease = await self._publish_lease(nc, tenant, day, size,
                                                          limit_nanousd, t)
                    except _NotPublished:
                        lease = self._local_lease(tenant, day, size, limit_nanousd, t)
                if lease is not None:
                    self._leases.setdefault(tenant, []).append(lease)
                    self._by_id[lease.lease_id] = lease
            log.warning("budget: no decision for %s after %d attempts", tenant,
                        self.max_attempts)
            raise BudgetUnavailable(f"budget for {tenant!r} too contended to decide")

    def grantable_today(self, tenant: str, now: float | None = None) -> int:
        """The largest call :meth:`try_grant` can grant now from one of this gateway's
        leases: room :meth:`reserved_today` counts as held already."""
        t = self.clock() if now is None else now
        day = day_of(t)
        return max((lease.free for lease in self._leases.get(tenant, ())
                    if lease.day == day and t < lease.use_until), default=0)

    def try_grant(self, tenant: str, amount_nanousd: int, *, request_id: str = "",
                  now: float | None = None) -> Reservation | None:
        """:meth:`reserve`'s answer when one of this gateway's leases has room (no await);
        None when it takes :meth:`reserve` to decide (a new lease, or a refusal)."""
        if amount_nanousd <= 0:
            return None
        t = self.clock() if now is None else now
        return self._grant(tenant, day_of(t), amount_nanousd, request_id, t)

    def _grant(self, tenant: str, day: str, amount: int, request_id: str,
               now: float) -> Reservation | None:
        for lease in self._leases.get(tenant, ()):
            if lease.free >= amount and lease.day == day and now < lease.use_until:
                lease.free -= amount
                lease.outstanding += 1
                lease.last_used = now
                return Reservation(lease_id=lease.lease_id, tenant=tenant, day=day,
                                   amount_nanousd=amount, request_id=request_id,
                                   seq=lease.seq)
        return None

    def _lease_size(self, amount: int, limit: int, remaining: int) -> int:
        target = max(amount * self.lease_calls, limit // self.lease_share)
        size = min(target, remaining // 4)  # leave most of what is left to the others
        size -= size % amount  # whole calls of this size: no slack stuck in a lease
        return max(size, amount)

    async def _publish_lease(self, nc: NatsClient, tenant: str, day: str, size: int,
                             limit: int, now: float) -> _Lease | None:
        """The new lease; None when another reservation landed first (decide again)."""
        token = subject_token(tenant)
        expected = self._server_says.pop(token, None)
        if expected is None:
            expected = self.state.reserved_seq.get(token, 0)
            for lease in [*self._by_id.values(), *(lz for lz, _ in self._retiring.values())]:
                if lease.seq > expected and subject_token(lease.tenant) == token:
                    expected = lease.seq
        lease_id = self.new_id()
        event = BudgetReserved(
            event_id=lease_id, occurred_at=now, tenant=tenant, instance=self.instance,
            reservation_id=lease_id, day=day, amount_nanousd=size, limit_nanousd=limit,
            expires_at=now + self.ttl_s)
        try:
            ack = await nc.jetstream().publish(
                event.subject(), encode(event), timeout=self.publish_timeout_s,
                headers={"Nats-Msg-Id": event.event_id,
                         "Nats-Expected-Last-Subject-Sequence": str(expected)})
        except APIError as exc:
            m = _WRONG_LAST.search(exc.description or "")
            if exc.err_code in (10071, 10164) or m:
                last = int(m.group(1)) if m else expected + 1
                if last < expected:
                    # Our marks are ahead of the stream: it was recreated. Trust the server.
                    self._server_says[token] = last
                if self.runner is not None and not await self.runner.wait_for(
                        last, self.publish_timeout_s):
                    raise _NotPublished("projection behind the stream") from exc
                return None
            log.warning("budget: lease refused by JetStream: %s", exc)
            raise _NotPublished(str(exc)) from exc
        except Exception as exc:  # timeout, connection lost
            log.warning("budget: lease not published (%s)", type(exc).__name__)
            raise _NotPublished(type(exc).__name__) from exc
        if self.metrics is not None:
            self.metrics.budget_leases.inc()
        return _Lease(lease_id, tenant, day, size, ack.seq, now, self.ttl_s)

    def _local_lease(self, tenant: str, day: str, size: int, limit: int,
                     now: float) -> _Lease:
        if not self.fail_open:
            raise BudgetUnavailable("NATS unreachable: budget reservations are not shared")
        if self.metrics is not None:
            self.metrics.budget_degraded.inc()
        log.warning("budget: NATS unreachable, lease for %s granted from the local view",
                    tenant)
        lease = _Lease(self.new_id(), tenant, day, size, 0, now, self.ttl_s)
        self._submit(BudgetReserved(
            event_id=lease.lease_id, occurred_at=now, tenant=tenant, instance=self.instance,
            reservation_id=lease.lease_id, day=day, amount_nanousd=size, limit_nanousd=limit,
            expires_at=lease.expires_at))  # ahead of its calls' events, in the outbox
        return lease

    # ---- settling ----------------------------------------------------------------------------
    def settle(self, reservation: Reservation, actual_nanousd: int) -> None:
        """The call's actual cost: the rest returns to the lease. Never blocks.

        Nothing is published: the call event names the lease (``reservation_id``) and carries
        the cost, which is all the views need.
        """
        if not reservation.lease_id:
            return
        lease = self._by_id.get(reservation.lease_id)
        if lease is not None:
            lease.free += reservation.amount_nanousd - actual_nanousd
            lease.outstanding -= 1
            lease.last_used = self.clock()

    def release(self, reservation: Reservation) -> None:
        """The call never reached a provider: all of it returns to the lease."""
        lease = self._by_id.get(reservation.lease_id) if reservation.lease_id else None
        if lease is not None:
            lease.free += reservation.amount_nanousd
            lease.outstanding -= 1
            lease.last_used = self.clock()

    def maintain(self, now: float | None = None) -> None:
        """Give back leases unused for ``lease_idle_s``, past their use, or of another day."""
        now = self.clock() if now is None else now
        today = day_of(now)
        for leases in list(self._leases.values()):
            for lease in list(leases):
                if lease.outstanding <= 0 and (now - lease.last_used >= self.lease_idle_s
                                               or now >= lease.use_until
                                               or lease.day != today):
                    self._retire(lease)

    def close(self) -> None:
        """Give back every lease with nothing outstanding (before the publisher stops)."""
        for tenant in list(self._leases):
            self._retire_idle(tenant)

    def _retire_idle(self, tenant: str) -> None:
        for lease in list(self._leases.get(tenant, ())):
            if lease.outstanding <= 0:
                self._retire(lease)

    def _retire(self, lease: _Lease) -> None:
        leases = self._leases.get(lease.tenant)
        if leases is not None:
            if lease in leases:
                leases.remove(lease)
            if not leases:
                del self._leases[lease.tenant]
        self._by_id.pop(lease.lease_id, None)
        self._retiring[lease.lease_id] = (lease, lease.free)
        self._submit(BudgetReleased(
            event_id=self.new_id(), occurred_at=self.clock(), tenant=lease.tenant,
            instance=self.instance, reservation_id=lease.lease_id, day=lease.day,
            settled_nanousd=lease.size - lease.free))  # nothing outstanding: all settled

    def _submit(self, event: Event) -> None:
        if self.publisher is not None:
            self.publisher.submit(event)

    def summary(self, tenant: str, limit_nanousd: int,
                now: float | None = None) -> dict[str, Any]:
        """What ``GET /api/ai/budget`` shows (amounts in nano-USD)."""
        now = self.clock() if now is None else now
        spent = self.spent_today(tenant, now)
        reserved = self.reserved_today(tenant, now)
        return {
            "day": day_of(now),
            "spent_nanousd": spent,
            "reserved_nanousd": reserved,
            "in_flight_nanousd": self.granted_today(tenant, now),
            "limit_nanousd": limit_nanousd,
            "remaining_nanousd": max(0, limit_nanousd - spent - reserved),
            "open_reservations": self.open_reservations(tenant, now),
        }
