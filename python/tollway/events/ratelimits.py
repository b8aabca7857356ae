"""Rate limits shared by every gateway process on one NATS: allotments from one bucket.

Each tenant has ONE token bucket per tier for the whole fleet (per minute,
hour, day, expensive per hour, tokens per minute), kept in the NATS KV bucket
``[events] rate_limit_bucket`` under ``limits.<tenant>``: the amount used per
tier and when it was written; it refills continuously at ``limit / period``,
as the Rust limiter's buckets do. A process never asks NATS about a call:

1. **Allotments.** It takes a few requests (and expensive requests, and
   tokens) ahead from the fleet bucket with a compare-and-set on the key's
   revision (``Nats-Expected-Last-Subject-Sequence``, the mechanism the budget
   leases use): read, refill, take, write back only if nobody wrote between.
   An allotment is taken only from what the bucket has left, so the bucket
   hands out no more than one token bucket would admit. It is sized to half
   its lifetime (``rate_allotment_s``) at the process's observed rate, at most
   ``1 / (2 x live processes)`` of what is left, and near the end one call's
   worth, so the last requests of a window are decided call by call.
   **Overshoot:** a unit is served at most ``rate_allotment_s`` after it was
   taken (then what is left of the allotment goes back), so over any stretch
   of time the fleet serves at most the limit plus the refill of that stretch
   and of one lifetime more (``limit x rate_allotment_s / period``); from a
   full bucket with nothing held (a burst's first call), not even that.
2. **Calls** consume from the process's allotment in memory: a few float
   comparisons, no await. When it runs low a background task takes the next
   one before it runs out; a call that finds it empty awaits one
   compare-and-set, unless the bucket is known to be empty (every write is
   seen through a subscription on the bucket's subjects), then it is refused
   at once with the wait until the bucket has room.
3. **Giving back.** An allotment unused for ``idle_s``, or past its lifetime,
   goes back to the bucket: the part the bucket has not refilled since it was
   taken (all of it would count that refill twice). Under-use is bounded: at
   most the unused allotments of the other processes, each at most a
   half-share of what was left when taken, for at most its lifetime.

Processes announce themselves: a heartbeat every ``heartbeat_s`` on
``members.<instance>``. When NATS becomes unreachable each process switches
to its **share**: a local bucket with the limits divided by the live
processes it last saw (a heartbeat within three periods), starting with its
share of what the fleet bucket had used; its unused allotment is dropped
(the fleet bucket counts it as used). The shares add up to the fleet bucket
at the moment of the outage, so when every process loses NATS together the
fleet does not exceed the limit; a process cut off alone (the others still
on the bucket) serves its share on top of what they admit. Before it has seen
the fleet, a process divides by the processes it knows of (``expected``: a
worker of ``tollway serve --workers N``, N), else by 1. A bucket that fails
while the connection is up (operations time out or are refused, 50
compare-and-sets lost in a row) is treated as an outage: an allotment waits at
most ``2 x op_timeout_s``, then the process takes its shares, and the ticker
tries the bucket again with a back-off. When NATS returns, a process whose
shares admitted calls waits ``2 x heartbeat_s`` (so the others are back too),
adds to the fleet bucket what it served beyond its share of the old usage, and
takes allotments again; what it serves while that write is in flight is
charged to its next allotment. If that write fails, the shares stay and the
ticker tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter, Gauge

from tollway.aio import cancel_and_wait
from tollway.events.schema import subject_token
from tollway.ratelimit import TIERS, Limits, format_reset

__all__ = ["FleetDecision", "FleetLimits", "FleetState", "worker_total"]

log = logging.getLogger("tollway.ratelimits")

PERIODS = (60.0, 3600.0, 86400.0, 3600.0, 60.0)  # seconds, in TIERS order
REQUESTS, EXPENSIVE, TOKENS = 0, 1, 2  # what an allotment holds
KIND_TIERS = ((0, 1, 2), (3,), (4,))  # the tiers each kind is taken from
TOLERANCE = 1e-9  # of a limit: float rounding never refuses a whole unit that is there
INF = math.inf
ENV_WORKER_COUNT = "TOLLWAY_WORKER_COUNT"  # set by ``tollway serve --workers N`` for its workers
MAX_RETRY_S = 30.0  # the longest back-off between tries to get back on the fleet's bucket


def worker_total() -> int:
    """N under ``tollway serve --workers N``, else 1: until it has seen the fleet's
    heartbeats, a worker enforces 1/N of each shared rate limit, not all of it."""
    value = os.environ.get(ENV_WORKER_COUNT)
    return max(1, int(value)) if value and value.isdigit() else 1


class FleetState(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """The KV value of one tenant's fleet bucket."""

    v: int  # +1 on every write (compare-and-set makes writes a sequence)
    at: float  # unix seconds of the write: ``used`` is as of then
    used: tuple[float, float, float, float, float]  # per tier, TIERS order


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(FleetState).decode
_EMPTY = FleetState(v=0, at=0.0, used=(0.0, 0.0, 0.0, 0.0, 0.0))


def refilled(used: tuple[float, ...] | list[float], at: float, rates: tuple[float, ...],
             now: float) -> list[float]:
    dt = now - at
    if dt <= 0:
        return list(used)
    return [max(0.0, u - dt * r) for u, r in zip(used, rates, strict=True)]


def _adding(caps: tuple[float, ...], served: list[float]
            ) -> Callable[[list[float]], list[float]]:
    def add(used: list[float]) -> list[float]:
        return [min(cap, u + x) if cap > 0 else 0.0
                for cap, u, x in zip(caps, used, served, strict=True)]
    return add


class FleetDecision:
    """One check's answer: allowed, or refused with the wait; and the response headers."""

    __slots__ = ("allowed", "denied_by", "headers", "retry_after")

    def __init__(self, allowed: bool, headers: list[tuple[bytes, bytes]],
                 retry_after: float = 0.0, denied_by: tuple[str, ...] = ()) -> None:
        self.allowed = allowed
        self.headers = headers
        self.retry_after = retry_after
        self.denied_by = denied_by


class _Share:
    """This process's part of a tenant's bucket while NATS is unreachable."""

    __slots__ = ("admitted", "at", "base", "caps", "n", "rates", "since", "used")

    def __init__(self, caps: tuple[float, ...], rates: tuple[float, ...],
                 fleet_used: list[float], n: int, now: float) -> None:
        self.n = n
        self.caps = tuple(c / n for c in caps)
        self.rates = tuple(r / n for r in rates)
        self.base = [u / n for u in fleet_used]  # our part of the fleet's usage at the outage
        self.used = list(self.base)
        self.admitted = [0.0] * len(caps)  # per tier, through this share
        self.at = now
        self.since = now

    def refill(self, now: float) -> None:
        self.used = refilled(self.used, self.at, self.rates, now)
        self.at = max(self.at, now)

    def served_beyond_base(self, now: float) -> list[float]:
        """Per tier, what was admitted through this share and is still in the bucket."""
        self.refill(now)
        base = refilled(self.base, self.since, self.rates, now)
        return [max(0.0, u - b) for u, b in zip(self.used, base, strict=True)]


class _Tenant:
    __slots__ = (
        "back",
        "back_at",
        "caps",
        "expires",
        "free",
        "key",
        "landed",
        "last_used",
        "low",
        "name",
        "nxt",
        "nxt_expires",
        "nxt_taken_at",
        "on",
        "rate",
        "rates",
        "request_tiers",
        "returning",
        "share",
        "taken",
        "taken_at",
        "task",
        "waiting",
    )

    def __init__(self, name: str, limits: Limits, now: float) -> None:
        self.name = name
        self.key = f"limits.{subject_token(name)}"
        # Held, already taken from the fleet bucket; a kind with no limit is infinite.
        # Negative: served while a write-back was in flight, owed by the next allotment.
        self.free: list[float] = []
        self.set_limits(limits)
        self.expires = INF  # ``free`` is not used from then on (allotment_s after its take)
        self.nxt: list[float] | None = None  # an allotment taken while ``free`` lasts
        self.nxt_expires = INF
        self.back = [0.0, 0.0, 0.0]  # expired, to give back to the fleet bucket
        # When each was taken from the bucket (the earliest, when merged): what goes back
        # is what the bucket has not refilled since (see _give_back).
        self.taken_at = self.nxt_taken_at = self.back_at = INF
        self.landed = 0  # allotments landed so far
        self.taken = [0.0, 0.0, 0.0]  # consumed since the last rate sample
        self.rate = [0.0, 0.0, 0.0]  # observed units/s, smoothed
        self.low = [0.0, 0.0, 0.0]  # below this, the next allotment is taken in background
        self.last_used = now
        self.task: asyncio.Task[None] | None = None  # the one CAS in flight for this tenant
        self.returning: asyncio.Task[None] | None = None  # expired units going back
        self.waiting = 0  # calls awaiting an allotment
        self.share: _Share | None = None

    def set_limits(self, limits: Limits) -> None:
        """Take (new) limits: the caps change at once; what is held stays held, and a kind
        whose limit comes or goes starts from nothing held or unlimited."""
        caps = (limits.per_minute, limits.per_hour, limits.per_day,
                limits.expensive_per_hour, limits.tokens_per_minute)
        self.caps = tuple(float(c or 0) for c in caps)
        self.rates = tuple(c / p for c, p in zip(self.caps, PERIODS, strict=True))
        was = self.free
        self.on = tuple(any(self.caps[i] > 0 for i in tiers) for tiers in KIND_TIERS)
        self.request_tiers = tuple((i, self.caps[i], self.rates[i]) for i in KIND_TIERS[0]
                                   if self.caps[i] > 0)
        self.free = [(was[k] if was and was[k] != INF else 0.0) if on else INF
                     for k, on in enumerate(self.on)]


class FleetLimits:
    """The fleet-wide limiter of one gateway process (see the module doc)."""

    def __init__(self, limits_of: Callable[[str], Limits], *, instance: str,
                 bucket: str = "tollway_ratelimits", replicas: int = 1,
                 allotment_s: float = 0.5, heartbeat_s: float = 1.0, idle_s: float = 1.0,
                 op_timeout_s: float = 2.0, max_attempts: int = 50, expected: int = 1,
                 clock: Callable[[], float] = time.time,
                 registry: CollectorRegistry | None = None) -> None:
        self.limits_of = limits_of
        self.instance = instance
        self.bucket = bucket
        self.replicas = replicas
        self.allotment_s = allotment_s
        self.heartbeat_s = heartbeat_s
        self.idle_s = idle_s
        self.op_timeout_s = op_timeout_s
        self.max_attempts = max_attempts
        self.clock = clock
        self.nc: NatsClient | None = None
        self.kv: KeyValue | None = None
        self._sub: Subscription | None = None
        self._tenants: dict[str, _Tenant] = {}
        self._snaps: dict[str, FleetState] = {}  # KV key -> newest state seen
        self._revs: dict[str, tuple[int, int]] = {}  # KV key -> (v, revision) we know
        # Other instances -> when their heartbeat was last seen; pruned by tick().
        self.members: dict[str, float] = {}
        self.degraded = True  # until connected: shares of what was last seen
        # Live processes when NATS went: the divisor of new shares. Before any contact, the
        # processes this one knows of (``tollway serve --workers N``: N), else itself alone.
        self._outage_live = max(1, expected)
        self._switch: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._opened_on: NatsClient | None = None  # the connection ``kv`` belongs to
        self._retry_s = heartbeat_s  # after a failed switch back, the ticker's next try in
        self._retry_at = 0.0  # time.monotonic()
        self._last_tick = clock()
        reg = registry if registry is not None else CollectorRegistry()
        Gauge("tollway_ratelimit_shares",
              "1 while this process enforces its share of every tenant's limits (NATS "
              "unreachable), 0 while it takes allotments from the fleet's bucket.",
              registry=reg).set_function(lambda: 1.0 if self.degraded else 0.0)
        Gauge("tollway_ratelimit_live_processes",
              "Gateway processes on this NATS whose heartbeat was seen lately (this one too).",
              registry=reg).set_function(lambda: float(self.live()))
        self._writes = Counter(
            "tollway_ratelimit_writes_total",
            "Compare-and-sets on the fleet's rate-limit buckets that landed (allotments "
            "taken, given back, outage usage written back).", registry=reg)
        self._conflicts = Counter(
            "tollway_ratelimit_conflicts_total",
            "Compare-and-sets another process won (read again and retried).", registry=reg)

    @property
    def writes(self) -> int:
        """Compare-and-sets that landed (allotments, give-backs, reconciles): the counter's."""
        return int(self._writes._value.get())

    @property
    def conflicts(self) -> int:
        """Compare-and-sets another process won: the counter's."""
        return int(self._conflicts._value.get())

    # ---- lifecycle ---------------------------------------------------------------------------
    async def attach(self, nc: NatsClient) -> None:
        """Connected (first time or again after the service reconnected from scratch):
        the bucket opened, a first heartbeat, then allotments. If that fails, the ticker
        tries again (with a back-off) for as long as the connection is up."""
        self.nc = nc
        await self._open(nc)
        self.connected()

    async def _open(self, nc: NatsClient) -> None:
        """The bucket (made if missing), the subscription and a first heartbeat; ``kv`` is
        set only once the heartbeat has landed: until then the process keeps its shares."""
        async with self._opening:
            if self.kv is not None and self._opened_on is nc:
                return  # opened meanwhile (attach and the ticker's retry at once)
            js = nc.jetstream()
            try:
                kv = await js.key_value(self.bucket)
            except NotFoundError:
                # One day after its last write a bucket has refilled on every tier: an
                # entry that old says nothing, and expires.
                kv = await js.create_key_value(KeyValueConfig(
                    bucket=self.bucket, description="tollway fleet-wide rate limits",
                    history=1, ttl=2 * 86400.0, storage=StorageType.FILE,
                    replicas=self.replicas))
            if self._sub is None:
                # Core NATS: resubscribed by the client after every reconnect.
                self._sub = await nc.subscribe(f"$KV.{self.bucket}.>", cb=self._on_msg)
            await self._beat(kv)
            self.kv, self._opened_on = kv, nc

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever(), name="tollway-fleet-limits")

    async def stop(self) -> None:
        """Give back what is held and leave the fleet (before the connection closes)."""
        await cancel_and_wait((self._ticker, self._switch),
                              what="the fleet rate limits' ticker")
        self._ticker = self._switch = None
        if not self.degraded and self._usable():
            async def give_back(t: _Tenant) -> None:
                if t.task is not None:
                    await asyncio.wait((t.task,))
                await self._give_back(t)

            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.op_timeout_s):
                    await asyncio.gather(*(give_back(t) for t in self._tenants.values()),
                                         return_exceptions=True)
        # What is still in flight (a give-back NATS did not answer in time): cancelled and
        # awaited here, not left pending when the connection closes.
        pending = [task for t in self._tenants.values() for task in (t.task, t.returning)
                   if task is not None and not task.done()]
        # bounded: stopping never hangs on NATS
        await cancel_and_wait(pending, within=self.op_timeout_s,
                              what="a give-back of the fleet rate limits")
        for t in self._tenants.values():
            t.task = t.returning = None
        kv = self.kv
        if kv is not None and self._usable():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.op_timeout_s):
                    await kv.delete(self._member_key())
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def _usable(self) -> bool:
        return self.nc is not None and self.nc.is_connected and self.kv is not None

    def _fail(self, why: str) -> None:
        """The fleet's bucket failed while the connection is up: to the shares, as if NATS
        had gone (never a refusal the limits did not make); the ticker tries again."""
        self._retry_at = time.monotonic() + self._retry_s
        self.disconnected(f"the fleet's bucket failed ({why})")

    def disconnected(self, why: str = "NATS unreachable") -> None:
        """NATS unreachable: every tenant to its share of what the fleet bucket last had."""
        if self._switch is not None:
            self._switch.cancel()  # a tenant it switched already gets a share again below
            self._switch = None
        now = self.clock()
        was = self.degraded
        if not was:  # heartbeats stop with NATS: the count as it was when NATS went
            self._outage_live = self.live(now)
        n = self._outage_live
        self.degraded = True
        for t in self._tenants.values():
            if t.share is None:
                self._to_share(t, n, now)
        if was:
            return
        log.warning("rate limits: %s; each tenant's limits divided by the %d live "
                    "process(es) last seen", why, n)

    def connected(self) -> None:
        """NATS back: switch to allotments once the others are back too."""
        if not self.degraded or self._switch is not None:
            return
        self._retry_at = time.monotonic() + self._retry_s  # the ticker's next try, if needed
        self._switch = asyncio.create_task(self._reconcile(), name="tollway-fleet-reconcile")

    def _to_share(self, t: _Tenant, n: int, now: float) -> None:
        for task in (t.task, t.returning):  # compare-and-sets NATS may never answer
            if task is not None:
                task.cancel()
        t.task = t.returning = None
        snap = self._snaps.get(t.key, _EMPTY)
        fleet = refilled(snap.used, snap.at, t.rates, now)
        t.share = _Share(t.caps, t.rates, fleet, n, now)
        # Held and expired allotments are dropped: the fleet counts them as used.
        t.free = [0.0 if on else INF for on in t.on]
        t.nxt, t.nxt_expires, t.expires = None, INF, INF
        t.back = [0.0, 0.0, 0.0]
        t.taken_at = t.nxt_taken_at = t.back_at = INF

    def live(self, now: float | None = None) -> int:
        """Processes whose heartbeat was seen within three periods, this one included."""
        now = self.clock() if now is None else now
        ttl = 3 * self.heartbeat_s
        # A copy first: the metrics thread calls this while the loop adds members.
        others = sum(1 for inst, seen in list(self.members.items())
                     if inst != self.instance and now - seen <= ttl)
        return others + 1

    # ---- the common path ---------------------------------------------------------------------
    def tenant(self, name: str, now: float) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant(name, self.limits_of(name), now)
            if self.degraded:
                self._to_share(t, self._outage_live, now)
        return t

    def set_limits(self, name: str) -> None:
        """The tenant's limits changed (an admin change): read them again."""
        t = self._tenants.get(name)
        if t is not None:
            t.set_limits(self.limits_of(name))

    def try_take(self, name: str, expensive: bool, tokens: int,
                 with_tokens: bool) -> FleetDecision | None:
        """Consume from what this process holds: the decision, or None when it takes
        :meth:`take` (an await) to decide."""
        now = self.clock()
        t = self._tenants.get(name) or self.tenant(name, now)
        if t.share is not None:
            return self._share_take(t, expensive, tokens, now, with_tokens)
        free = t.free
        if now >= t.expires or not (free[0] >= 1 and (not expensive or free[1] >= 1)
                                    and free[2] >= tokens):
            if now < t.expires and t.nxt is None:
                return None
            self._roll(t, now)  # stale or short: the next allotment, if any, takes over
            free = t.free
            if not (free[0] >= 1 and (not expensive or free[1] >= 1) and free[2] >= tokens):
                return None
        free[0] -= 1
        t.taken[0] += 1
        if expensive:
            free[1] -= 1
            t.taken[1] += 1
        if tokens:
            free[2] -= tokens
            t.taken[2] += tokens
        t.last_used = now
        if t.task is None and t.nxt is None and (
                free[0] < t.low[0] or free[1] < t.low[1] or free[2] < t.low[2]
                or now >= t.expires - self.allotment_s / 2):
            self._refill(t, now)
        return FleetDecision(True, self._headers(t, now, with_tokens))

    def _roll(self, t: _Tenant, now: float) -> None:
        """The next allotment takes over: added to the current one while that is fresh and
        has requests (it lacked another kind; the earlier expiry holds for both), else what
        is left of the current one goes back. (A debt, negative, stays for the next.)"""
        nxt = t.nxt
        if nxt is not None and now < t.expires and t.free[0] >= 1:
            t.free = [f + x for f, x in zip(t.free, nxt, strict=True)]
            t.expires = min(t.expires, t.nxt_expires)
            t.taken_at = min(t.taken_at, t.nxt_taken_at)
            t.nxt, t.nxt_expires, t.nxt_taken_at = None, INF, INF
            return
        for k in range(3):
            if not t.on[k]:
                continue
            rest = t.free[k]
            if rest > 0:
                t.back[k] += rest
                t.back_at = min(t.back_at, t.taken_at)
                rest = 0.0
            t.free[k] = rest + (nxt[k] if nxt is not None else 0.0)
        t.expires = t.nxt_expires if nxt is not None else INF
        t.taken_at = t.nxt_taken_at if nxt is not None else INF
        t.nxt, t.nxt_expires, t.nxt_taken_at = None, INF, INF
        if t.returning is None and any(t.back) and self._usable() and not self.degraded:
            t.returning = asyncio.create_task(self._give_back_task(t, everything=False))

    async def take(self, name: str, expensive: bool, tokens: int,
                   with_tokens: bool) -> FleetDecision:
        """The uncommon path: what is held does not cover the call."""
        now = self.clock()
        t = self.tenant(name, now)
        t.waiting += 1
        try:
            return await self._take(t, name, expensive, tokens, with_tokens, now)
        finally:
            t.waiting -= 1

    async def _take(self, t: _Tenant, name: str, expensive: bool, tokens: int,
                    with_tokens: bool, now: float) -> FleetDecision:
        # Each round an allotment lands (some waiting calls are served, the bucket has
        # less) or the bucket is seen empty (the call is refused). An allotment that
        # fails (NATS failing, every race lost) puts the process on its shares, which
        # decide; rounds where nothing lands and nothing fails (others took what the
        # bucket had first) are bounded.
        fruitless = 0
        while fruitless < 3:
            decided = self.try_take(name, expensive, tokens, with_tokens)
            if decided is not None:
                return decided
            if not self._usable():
                self.disconnected()  # before the client's callback says so: to the shares
                continue
            need = self._deficit(t, expensive, tokens)
            wait, _ = self._wait(t, need, now)
            if wait > 0:
                break  # the bucket is known to be empty: no round trip
            if t.task is None:
                t.task = asyncio.create_task(self._acquire(t, need))
            landed = t.landed
            # Not cancelled with this call (others wait on it too); its failure or its
            # cancellation (NATS gone) is not this call's: it decides again.
            await asyncio.wait((t.task,))
            if t.landed == landed:
                fruitless += 1
            now = self.clock()
        return self._refusal(t, expensive, tokens, now, with_tokens)

    def _deficit(self, t: _Tenant, expensive: bool, tokens: int) -> list[float]:
        free = t.free
        return [max(0.0, 1 - free[0]), max(0.0, 1 - free[1]) if expensive else 0.0,
                max(0.0, tokens - free[2])]

    def _available(self, t: _Tenant, used: list[float]) -> list[float]:
        """Per kind, whole units the fleet bucket has left (INF: no limit on that kind)."""
        out = []
        for kind, tiers in enumerate(KIND_TIERS):
            if not t.on[kind]:
                out.append(INF)
                continue
            out.append(min(math.floor(t.caps[i] - used[i] + t.caps[i] * TOLERANCE)
                           for i in tiers if t.caps[i] > 0))
        return out

    def _wait(self, t: _Tenant, need: list[float], now: float) -> tuple[float, tuple[str, ...]]:
        """Seconds until the fleet bucket (as last seen) has ``need``; the tiers short."""
        snap = self._snaps.get(t.key, _EMPTY)
        used = refilled(snap.used, snap.at, t.rates, now)
        return self._wait_on(t.caps, t.rates, used, need)

    @staticmethod
    def _wait_on(caps: tuple[float, ...], rates: tuple[float, ...], used: list[float],
                 need: list[float]) -> tuple[float, tuple[str, ...]]:
        wait = 0.0
        short: list[str] = []
        for kind, tiers in enumerate(KIND_TIERS):
            amount = need[kind]
            if amount <= 0:
                continue
            for i in tiers:
                cap = caps[i]
                if cap <= 0:
                    continue
                excess = used[i] + amount - cap
                if excess > cap * TOLERANCE:
                    short.append(TIERS[i])
                    wait = max(wait, INF if amount > cap else excess / rates[i])
        return wait, tuple(short)

    def _refusal(self, t: _Tenant, expensive: bool, tokens: int, now: float,
                 with_tokens: bool) -> FleetDecision:
        share = t.share
        if share is not None:
            share.refill(now)
            wait, short = self._wait_on(share.caps, share.rates, share.used,
                                        [1.0, 1.0 if expensive else 0.0, float(tokens)])
        else:
            wait, short = self._wait(t, self._deficit(t, expensive, tokens), now)
        if not short:  # the bucket had room, others kept taking it first
            short = tuple(TIERS[i] for i, _, _ in t.request_tiers[:1]) or (TIERS[0],)
            wait = 1.0
        return FleetDecision(False, self._refused_headers(t, now, with_tokens, short, tokens),
                             max(wait, 1e-3), short)

    def _share_take(self, t: _Tenant, expensive: bool, tokens: int, now: float,
                    with_tokens: bool) -> FleetDecision:
        share = t.share
        assert share is not None
        share.refill(now)
        need = [1.0, 1.0 if expensive else 0.0, float(tokens)]
        wait, short = self._wait_on(share.caps, share.rates, share.used, need)
        if short:
            return FleetDecision(False, self._refused_headers(t, now, with_tokens, short, tokens),
                                 wait, short)
        used = share.used
        for kind, tiers in enumerate(KIND_TIERS):
            for i in tiers:
                if share.caps[i] > 0:
                    used[i] += need[kind]
                    share.admitted[i] += need[kind]
        t.last_used = now
        return FleetDecision(True, self._headers(t, now, with_tokens))

    def _refused_headers(self, t: _Tenant, now: float, with_tokens: bool,
                         short: tuple[str, ...], tokens: int) -> list[tuple[bytes, bytes]]:
        """A refusal's headers never show room for the call just refused: this process's
        view of the fleet bucket can lag the other processes' takes, so the tier that
        refused reads as less than the call needed."""
        out = self._headers(t, now, with_tokens)
        requests = any(name in short for name in TIERS[:3])
        for k, (name, value) in enumerate(out):
            if requests and name == b"x-ratelimit-remaining-requests":
                out[k] = (name, b"0")
            elif TIERS[4] in short and name == b"x-ratelimit-remaining-tokens":
                out[k] = (name, b"%d" % min(int(value), max(0, tokens - 1)))
        return out

    def _headers(self, t: _Tenant, now: float, with_tokens: bool) -> list[tuple[bytes, bytes]]:
        """``x-ratelimit-*``: the fleet's limit; remaining and reset as this process sees
        the fleet bucket (what it holds counts as remaining; in a share, the share scaled
        up to the fleet). Runs on every call: kept to a few float operations."""
        share = t.share
        used: tuple[float, ...] | list[float]
        if share is None:
            snap = self._snaps.get(t.key, _EMPTY)
            used, dt, scale = snap.used, now - snap.at, 1
            held, held_tokens = t.free[0], t.free[2]
        else:
            used, dt, scale = share.used, now - share.at, share.n
            held = held_tokens = 0.0
        if dt < 0:
            dt = 0.0
        if held < 0:
            held = 0.0
        out: list[tuple[bytes, bytes]] = []
        best_left = INF
        best_cap = best_u = best_rate = 0.0
        for i, cap, rate in t.request_tiers:
            u = (used[i] - dt * rate / scale - held) * scale
            if u < 0:
                u = 0.0
            if cap - u < best_left:
                best_left, best_cap, best_u, best_rate = cap - u, cap, u, rate
        if best_cap:
            out += [(b"x-ratelimit-limit-requests", b"%d" % best_cap),
                    (b"x-ratelimit-remaining-requests",
                     b"%d" % max(0, math.floor(best_left + best_cap * TOLERANCE))),
                    (b"x-ratelimit-reset-requests", format_reset(best_u / best_rate).encode())]
        cap = t.caps[4]
        if with_tokens and cap > 0:
            rate = t.rates[4]
            u = (used[4] - dt * rate / scale - (held_tokens if held_tokens > 0 else 0.0)) * scale
            if u < 0:
                u = 0.0
            out += [(b"x-ratelimit-limit-tokens", b"%d" % cap),
                    (b"x-ratelimit-remaining-tokens",
                     b"%d" % max(0, math.floor(cap - u + cap * TOLERANCE))),
                    (b"x-ratelimit-reset-tokens", format_reset(u / rate).encode())]
        return out

    # ---- allotments --------------------------------------------------------------------------
    def _refill(self, t: _Tenant, now: float) -> None:
        """Take the next allotment in background, unless the bucket is known to be empty."""
        if not self._usable():
            return
        need = [1.0 if t.free[k] < t.low[k] else 0.0 for k in range(3)]
        if self._wait(t, need, now)[0] > 0:
            return
        t.task = asyncio.create_task(self._acquire(t, [0.0, 0.0, 0.0]))

    async def _acquire(self, t: _Tenant, need: list[float]) -> None:
        granted: list[float] = []

        def take(used: list[float]) -> list[float] | None:
            grant = self._grant(t, used, need)
            if grant is None:
                return None
            granted[:] = grant
            return self._moved(t, used, grant, 1.0)

        try:
            # Bounded: a bucket that does not answer (no leader, quorum lost) or is too
            # contended is a failure, and calls are decided by the shares meanwhile.
            async with asyncio.timeout(2 * self.op_timeout_s):
                at = await self._write(t, take)
            if at is not None:
                self._landed(t, granted, at, self.clock())
        except Exception as exc:  # NATS failed under us: the shares decide without it
            if t.task is asyncio.current_task():
                t.task = None
            self._fail(f"allotment for {t.name!r} not taken: {exc or type(exc).__name__}")
        finally:
            if t.task is asyncio.current_task():
                t.task = None

    def _landed(self, t: _Tenant, granted: list[float], at: float, now: float) -> None:
        """An allotment taken at ``at``: served until ``at + allotment_s`` at most."""
        t.landed += 1
        grant = [g if on else 0.0 for g, on in zip(granted, t.on, strict=True)]
        expires = at + self.allotment_s
        if t.nxt is not None:
            t.nxt = [a + b for a, b in zip(t.nxt, grant, strict=True)]
            t.nxt_expires = min(t.nxt_expires, expires)  # no token outlives its own take
            t.nxt_taken_at = min(t.nxt_taken_at, at)
            return
        t.nxt, t.nxt_expires, t.nxt_taken_at = grant, expires, at
        if now >= t.expires or t.free[0] < 1:
            self._roll(t, now)  # the current one is spent or stale: this one is current

    def _grant(self, t: _Tenant, used: list[float], need: list[float]) -> list[float] | None:
        """How much of each kind to take from a bucket at ``used``; None: nothing."""
        avail = self._available(t, used)
        n = self.live()
        # The current allotment is past half its life: the next one, before it lapses.
        renew = t.free[0] > 0 and self.clock() >= t.expires - self.allotment_s / 2
        grant = [0.0, 0.0, 0.0]
        for kind in range(3):
            if not t.on[kind]:
                continue
            owed = max(0.0, -t.free[kind])  # served during a write-back: covered first
            must = need[kind] + owed
            if must > avail[kind]:
                if need[kind] > 0:
                    return None  # the call this is for cannot be admitted: take nothing
                continue
            if must <= 0 and t.free[kind] >= t.low[kind] and not renew:
                continue  # enough of this kind held, for long enough
            # Half an allotment's lifetime at the observed rate (refilled at a quarter).
            sized = max(math.ceil(t.rate[kind] * self.allotment_s / 2), t.waiting,
                        math.ceil(min(t.caps[i] for i in KIND_TIERS[kind] if t.caps[i] > 0)
                                  / (16 * n)))
            fair = math.floor(avail[kind] / (2 * n))  # leave most of what is left to others
            grant[kind] = min(max(must, min(sized + owed, fair)), avail[kind])
        return grant if any(g > 0 for g in grant) else None

    @staticmethod
    def _moved(t: _Tenant, used: list[float], amounts: list[float],
               sign: float) -> list[float]:
        """``used`` with ``amounts`` (per kind) taken (``sign`` 1) or given back (-1)."""
        out = list(used)
        for kind, tiers in enumerate(KIND_TIERS):
            for i in tiers:
                if t.caps[i] > 0:
                    out[i] = min(t.caps[i], max(0.0, out[i] + sign * amounts[kind]))
        return out

    async def _write(self, t: _Tenant, change: Callable[[list[float]], list[float] | None]
                     ) -> float | None:
        """Read the tenant's bucket, refill it to now, write ``change``'s new usage back if
        nobody wrote in between (else read again): the time written; None when ``change``
        says no."""
        kv = self.kv
        if kv is None:
            raise ConnectionError("no KV bucket")
        key = t.key
        for _ in range(self.max_attempts):
            snap, rev = await self._current(kv, key)
            at = max(self.clock(), snap.at)  # a peer's clock ahead: time never runs back
            new_used = change(refilled(snap.used, snap.at, t.rates, at))
            if new_used is None:
                return None
            new = FleetState(v=snap.v + 1, at=at, used=(
                new_used[0], new_used[1], new_used[2], new_used[3], new_used[4]))
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    revision = await kv.update(key, _encode(new), last=rev)
            except KeyWrongLastSequenceError:
                self._conflicts.inc()
                self._revs.pop(key, None)
                continue
            self._writes.inc()
            self._revs[key] = (new.v, revision)
            self._keep(key, new)
            return at
        raise RuntimeError(f"rate limits of {t.name!r} too contended")

    async def _current(self, kv: KeyValue, key: str) -> tuple[FleetState, int]:
        snap = self._snaps.get(key)
        known = self._revs.get(key)
        if snap is not None and known is not None and known[0] == snap.v:
            return snap, known[1]  # nobody wrote after our own last write
        try:
            async with asyncio.timeout(self.op_timeout_s):
                entry = await kv.get(key)
        except KeyNotFoundError:
            return _EMPTY, 0
        revision = entry.revision or 0
        if entry.value is None:
            return _EMPTY, revision
        state = _decode(entry.value)
        self._keep(key, state)
        self._revs[key] = (state.v, revision)
        return state, revision

    def _keep(self, key: str, state: FleetState) -> None:
        old = self._snaps.get(key)
        if old is None or state.v > old.v:
            self._snaps[key] = state

    async def _give_back(self, t: _Tenant, everything: bool = True) -> None:
        """Return what expired unused and, with ``everything``, what is held (moved out
        first: calls meanwhile take a new allotment)."""
        if everything:
            for k in range(3):
                if t.on[k]:
                    t.back[k] += max(t.free[k], 0.0) + (t.nxt[k] if t.nxt is not None else 0.0)
                    t.free[k] = min(t.free[k], 0.0)
            t.back_at = min(t.back_at, t.taken_at, t.nxt_taken_at)
            t.nxt, t.nxt_expires, t.nxt_taken_at = None, INF, INF
            t.expires = t.taken_at = INF
        back = [b if on else 0.0 for b, on in zip(t.back, t.on, strict=True)]
        since = t.back_at
        if not any(back):
            return
        t.back, t.back_at = [0.0, 0.0, 0.0], INF

        def returned(used: list[float]) -> list[float]:
            # Taken at ``since``, the units have been refilling since then as if used: a
            # tier that refilled r x age of them since gets only the rest back (all of it
            # back would count the refill twice once the bucket had refilled in between).
            age = max(0.0, self.clock() - since)
            out = list(used)
            for kind, tiers in enumerate(KIND_TIERS):
                for i in tiers:
                    if t.caps[i] > 0:
                        out[i] = max(0.0, out[i] - max(0.0, back[kind] - t.rates[i] * age))
            return out

        done: float | None = None
        try:
            done = await self._write(t, returned)
        finally:
            if done is None and t.share is None:  # not given back: next time
                t.back = [a + b for a, b in zip(t.back, back, strict=True)]
                t.back_at = min(t.back_at, since)

    # ---- NATS back -----------------------------------------------------------------------------
    async def _reconcile(self) -> None:
        """After an outage: add what each share served to the fleet bucket, then allotments."""
        try:
            if self.kv is None:  # the bucket not opened yet (a first attach failed)
                if self.nc is None:
                    raise ConnectionError("no NATS connection")
                await self._open(self.nc)
            if any(t.share is not None and any(t.share.admitted)
                   for t in self._tenants.values()):
                await asyncio.sleep(2 * self.heartbeat_s)  # the others reconnect meanwhile
            # Tenants first seen while this runs get a share too: until none is left.
            while pending := [t for t in self._tenants.values() if t.share is not None]:
                t = pending[0]
                share = t.share
                assert share is not None
                served = share.served_beyond_base(self.clock())
                marks = list(share.admitted)
                if any(marks):
                    await self._write(t, _adding(t.caps, served))
                # Served through the share while the write was in flight: owed.
                after = [a - m for a, m in zip(share.admitted, marks, strict=True)]
                t.share = None
                t.expires = t.taken_at = INF
                for kind, tiers in enumerate(KIND_TIERS):
                    if t.on[kind]:
                        t.free[kind] = -max(after[i] for i in tiers)
            self.degraded = False
            self._retry_s = self.heartbeat_s
            log.info("rate limits: shared across the fleet (%d live process(es))", self.live())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The ticker tries again while NATS is connected, less often each time.
            (log.warning if self._retry_s <= self.heartbeat_s else log.debug)(
                "rate limits: not back on the fleet's bucket (%s); shares stay, retried in "
                "%.1fs", exc, self._retry_s)
            self._retry_s = min(2 * self._retry_s, MAX_RETRY_S)
        finally:
            if self._switch is asyncio.current_task():
                self._switch = None

    # ---- background ----------------------------------------------------------------------------
    def _member_key(self) -> str:
        return f"members.{subject_token(self.instance)}"

    async def _beat(self, kv: KeyValue | None = None) -> None:
        kv = kv or self.kv
        if kv is None or self.nc is None or not self.nc.is_connected:
            return
        now = self.clock()
        async with asyncio.timeout(self.op_timeout_s):
            await kv.put(self._member_key(), msgspec.json.encode(
                {"instance": self.instance, "at": now}))

    async def _on_msg(self, msg: Msg) -> None:
        key = msg.subject[len(self.bucket) + 5:]  # after "$KV.<bucket>."
        deleted = bool(msg.headers) and (msg.headers or {}).get("KV-Operation") in (
            "DEL", "PURGE")
        try:
            if key.startswith("members."):
                who = msgspec.json.decode(msg.data)["instance"] if not deleted else None
                token = key[len("members."):]
                if deleted:
                    for inst in [i for i in self.members if subject_token(i) == token]:
                        del self.members[inst]
                elif isinstance(who, str):
                    self.members[who] = self.clock()
            elif key.startswith("limits.") and not deleted:
                self._keep(key, _decode(msg.data))
        except (msgspec.DecodeError, KeyError, TypeError) as exc:
            log.warning("rate limits: undecodable entry %s: %s", key, exc)

    async def _tick_forever(self) -> None:
        next_beat = 0.0
        while True:
            await asyncio.sleep(min(0.25, self.heartbeat_s / 2))
            now = self.clock()
            try:
                # On the monotonic clock: the gateway's may stand still or jump back.
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    if self._usable():
                        await self._beat()
                self.tick(now)
                # Shares while NATS is connected (a first attach, a write-back or a KV
                # operation failed): back to the fleet's bucket, retried with a back-off.
                if (self.degraded and self._switch is None and self.nc is not None
                        and self.nc.is_connected and time.monotonic() >= self._retry_at):
                    self.connected()
            except Exception as exc:
                log.debug("rate limits: background step failed: %s", exc)

    def tick(self, now: float | None = None) -> None:
        """Sample the observed rates; give back allotments idle for ``idle_s``."""
        now = self.clock() if now is None else now
        dt = now - self._last_tick
        if dt <= 0:
            return
        self._last_tick = now
        ttl = 3 * self.heartbeat_s  # what live() no longer counts (a restarted worker's
        for inst in [i for i, seen in self.members.items() if now - seen > ttl]:  # old pid)
            del self.members[inst]
        usable = self._usable() and not self.degraded
        for t in self._tenants.values():
            for k in range(3):
                sample = t.taken[k] / dt
                t.rate[k] = sample if t.rate[k] == 0 else 0.5 * t.rate[k] + 0.5 * sample
                t.taken[k] = 0.0
                t.low[k] = t.rate[k] * self.allotment_s / 4 if t.on[k] else 0.0
            if not usable:
                continue
            if t.returning is None and any(t.back):
                t.returning = asyncio.create_task(self._give_back_task(t, everything=False))
            if t.task is None and now - t.last_used >= self.idle_s and self._held(t) > 0:
                t.task = asyncio.create_task(self._give_back_task(t, everything=True))

    @staticmethod
    def _held(t: _Tenant) -> float:
        """Requests held (current, next and expired not yet given back)."""
        if not t.on[0]:
            return 0.0
        return max(t.free[0], 0.0) + (t.nxt[0] if t.nxt is not None else 0.0) + t.back[0]

    async def _give_back_task(self, t: _Tenant, everything: bool) -> None:
        try:
            await self._give_back(t, everything)
        except Exception as exc:
            log.debug("rate limits: give-back for %s failed: %s", t.name, exc)
        finally:
            if t.task is asyncio.current_task():
                t.task = None
            if t.returning is asyncio.current_task():
                t.returning = None

    def snapshot(self, tenant: str) -> FleetState:
        """The tenant's fleet bucket as this process last saw it."""
        return self._snaps.get(f"limits.{subject_token(tenant)}", _EMPTY)

    def summary(self) -> dict[str, Any]:
        return {"degraded": self.degraded, "live": self.live(), "writes": self.writes,
                "conflicts": self.conflicts,
                "held": {t.name: [
                    max(f, 0.0) + (t.nxt[k] if t.nxt is not None else 0.0) + t.back[k]
                    for k, f in enumerate(t.free)] for t in self._tenants.values()}}
