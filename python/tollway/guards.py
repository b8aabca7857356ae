"""Step 4, the guards: rate limits and the daily budget, in front of dispatch.

Each guard is a :data:`tollway.pipeline.hooks.Guard`: it refuses a call by raising
a :class:`~tollway.errors.TollwayError`, and otherwise lets it pass. They run
after the policy built the plan, which carries the call's token-exact cost
bound (the per-call cap was applied there, as a filter on the candidates).

- :class:`RateLimitGuard`: one Rust check per call consumes a request from
  every tier of the tenant (per minute, hour, day; the expensive-operations
  tier when the plan says the call is expensive; tokens per minute when
  enabled). Denied -> 429 ``rate_limit_exceeded`` with ``Retry-After``.
  Either way the call gets the ``x-ratelimit-*`` headers. While the events layer
  runs (``[events] shared_rate_limits``), the fleet's limits decide instead
  (:class:`SharedLimits`, ``tollway.events.ratelimits``): one set for every
  gateway process on the NATS, from allotments held in memory.
- :class:`BudgetGuard`: reserves the plan's largest candidate cost against the
  tenant's day (spend + open reservations) before dispatch, after bounding the
  output of candidates whose full cost what is left of the day cannot pay
  (:meth:`PolicyPlan.lower`; the provider is asked for no more); :meth:`finish`
  settles it to the actual cost after the call, or releases it when nothing
  was billed. No room -> 429 ``insufficient_quota``. As long as no call costs
  more than it reserved, concurrent calls cannot take the day's spend over
  the budget.

The budget lives behind :class:`BudgetBook`: the events layer's shared view
(``tollway.events.budget.BudgetView``, reservations shared by every gateway
on one NATS) when events are on, else :class:`LocalBudget`, this process's
own book. With both guards on, :class:`RateAndBudget` runs them as one
coroutine; the pipeline runs :meth:`BudgetGuard.finish` after settle, before
the call is recorded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from tollway.clock import Clock
from tollway.config import Config, TenantConfig, TenantLimits
from tollway.errors import NotReady, QuotaExceeded, RateLimited
from tollway.pipeline.plan import RoutePlan
from tollway.policy import PolicyPlan
from tollway.ratelimit import REQUEST_TIERS, Limits, RateDecision, RateLimiter, format_reset

if TYPE_CHECKING:
    from tollway.pipeline.call import Call
    from tollway.pipeline.hooks import Finisher, Guard

__all__ = [
    "BudgetBook",
    "BudgetGuard",
    "LocalBudget",
    "LocalReservation",
    "RateAndBudget",
    "RateLimitGuard",
    "SharedDecision",
    "SharedLimits",
    "build_guards",
    "limits_of",
    "rate_limit_headers",
]

log = logging.getLogger("tollway.guards")

NANO = 1_000_000_000
DAY_S = 86_400


# ---- rate limits --------------------------------------------------------------------------------

def limits_of(limits: TenantLimits) -> Limits:
    return Limits(per_minute=limits.per_minute, per_hour=limits.per_hour,
                  per_day=limits.per_day, expensive_per_hour=limits.expensive_per_hour,
                  tokens_per_minute=limits.tokens_per_minute)


def rate_limit_headers(decision: RateDecision, tokens: bool = True
                       ) -> list[tuple[bytes, bytes]]:
    """The ``x-ratelimit-*`` headers of a check, as ASGI header pairs.

    ``requests`` reports the request tier with the fewest requests left (on a
    tie the shorter period); ``tokens`` the tokens-per-minute tier when it is
    enabled (``tokens=True``). The same as :func:`tollway.ratelimit.rate_limit_headers`
    without ``retry-after`` (a refusal carries that itself), as ASGI pairs, and
    reading only the tiers it needs: this runs on every call.
    """
    tier = decision.tier
    best = tier("per_minute")
    for name in _LONGER_TIERS:
        status = tier(name)
        if status is not None and (best is None or status.remaining < best.remaining):
            best = status
    out: list[tuple[bytes, bytes]] = []
    if best is not None:
        out += [(b"x-ratelimit-limit-requests", b"%d" % best.limit),
                (b"x-ratelimit-remaining-requests", b"%d" % best.remaining),
                (b"x-ratelimit-reset-requests", format_reset(best.reset).encode())]
    if tokens:
        status = tier("tokens_per_minute")
        if status is not None:
            out += [(b"x-ratelimit-limit-tokens", b"%d" % status.limit),
                    (b"x-ratelimit-remaining-tokens", b"%d" % status.remaining),
                    (b"x-ratelimit-reset-tokens", format_reset(status.reset).encode())]
    return out


_LONGER_TIERS = REQUEST_TIERS[1:]


_TIER_TEXT = {
    "per_minute": "requests per minute",
    "per_hour": "requests per hour",
    "per_day": "requests per day",
    "expensive_per_hour": "expensive requests per hour",
    "tokens_per_minute": "tokens per minute",
}


class SharedDecision(Protocol):
    allowed: bool
    headers: list[tuple[bytes, bytes]]
    retry_after: float
    denied_by: tuple[str, ...]


class SharedLimits(Protocol):
    """Limits shared by every gateway process on one NATS (``tollway.events.ratelimits``):
    :meth:`try_take` decides from what this process holds, or returns None and
    :meth:`take` decides (it may await NATS)."""

    def try_take(self, name: str, expensive: bool, tokens: int,
                 with_tokens: bool) -> SharedDecision | None: ...

    async def take(self, name: str, expensive: bool, tokens: int,
                   with_tokens: bool) -> SharedDecision: ...

    def set_limits(self, name: str) -> None: ...


class RateLimitGuard:
    """Per-tenant limits on every tier, one Rust call per request; or, while the events
    layer runs with ``shared_rate_limits``, the fleet's limits (:attr:`shared`)."""

    __slots__ = ("clock", "limiter", "shared", "tpm")

    def __init__(self, tenants: list[TenantConfig], clock: Clock,
                 default: TenantLimits | None = None) -> None:
        self.clock = clock
        now = clock.monotonic()
        default = default or TenantLimits()
        self.limiter = RateLimiter(limits_of(default))
        # Tenants with a tokens-per-minute tier (None: every tenant has one, by default).
        self.tpm: frozenset[str] | None = None if default.tokens_per_minute else frozenset(
            t.id for t in tenants if t.limits.tokens_per_minute)
        for t in tenants:
            self.limiter.set_limits(t.id, limits_of(t.limits), now=now)
        # The fleet's limiter, attached by the events layer while it runs (None: this one).
        self.shared: SharedLimits | None = None

    def set_tenant(self, tenant: TenantConfig) -> None:
        """A run-time tenant was made or changed (``tollway.directory``): its limits from now."""
        self.set_limits(tenant.id, tenant.limits)

    def set_limits(self, name: str, limits: TenantLimits) -> None:
        """The limits of a tenant, or of a key with its own (``<tenant>/<key id>``)."""
        self.limiter.set_limits(name, limits_of(limits), now=self.clock.monotonic())
        if self.tpm is not None:
            has = limits.tokens_per_minute
            if has and name not in self.tpm:
                self.tpm = self.tpm | {name}
            elif not has and name in self.tpm:
                self.tpm = self.tpm - {name}
        if self.shared is not None:
            self.shared.set_limits(name)

    async def __call__(self, call: Call, plan: RoutePlan) -> None:
        pending = self.check(call, plan)
        if pending is not None:
            await pending

    def check(self, call: Call, plan: RoutePlan) -> Coroutine[Any, Any, None] | None:
        """Consume one request of the tenant's tiers, or raise :class:`RateLimited`; first
        of the key's own, when the key has limits (a directory key's ``limits``).

        With shared limits, a call the allotment this process holds does not cover
        returns a coroutine that decides it (to await); otherwise None: decided."""
        scope = call.limit_scope
        if not scope:
            return self._check(call, plan, call.tenant.id, True)
        pending = self._check(call, plan, scope, False)
        if pending is None:
            return self._check(call, plan, call.tenant.id, True)
        return self._then_tenant(pending, call, plan)

    async def _then_tenant(self, pending: Coroutine[Any, Any, None], call: Call,
                           plan: RoutePlan) -> None:
        await pending
        more = self._check(call, plan, call.tenant.id, True)
        if more is not None:
            await more

    def _check(self, call: Call, plan: RoutePlan, name: str, headers: bool
               ) -> Coroutine[Any, Any, None] | None:
        """One limiter identity: the tenant (its ``x-ratelimit-*`` headers go out) or a
        key's own limits (they refuse, but the headers stay the tenant's)."""
        tpm = self.tpm
        with_tokens = tpm is None or name in tpm
        tokens = 0
        expensive = False
        if isinstance(plan, PolicyPlan):
            if with_tokens:
                tokens = plan.prompt_tokens + plan.max_output_tokens
            expensive = plan.expensive
        shared = self.shared
        if shared is not None:
            answer = shared.try_take(name, expensive, tokens, with_tokens)
            if answer is None:
                return self._take(call, shared, name, headers, expensive, tokens, with_tokens)
            if headers:
                call.headers += answer.headers
            if not answer.allowed:
                self._refuse(call, name, answer.denied_by, answer.retry_after)
            return None
        decision = self.limiter.check(name, 1, expensive=expensive, tokens=tokens,
                                      now=self.clock.monotonic())
        if headers:
            call.headers += rate_limit_headers(decision, with_tokens)
        if decision.allowed:
            return None
        self._refuse(call, name, decision.denied_by, decision.retry_after)

    async def _take(self, call: Call, shared: SharedLimits, name: str, headers: bool,
                    expensive: bool, tokens: int, with_tokens: bool) -> None:
        answer = await shared.take(name, expensive, tokens, with_tokens)
        if headers:
            call.headers += answer.headers
        if not answer.allowed:
            self._refuse(call, name, answer.denied_by, answer.retry_after)

    def _refuse(self, call: Call, name: str, denied: tuple[str, ...], wait: float) -> NoReturn:
        limits = self.limiter.limits(name).as_dict()
        text = ", ".join(f"{limits[n]} {_TIER_TEXT.get(n, n)}" for n in denied)
        call.reason = f"{call.reason}; refused: rate limit ({', '.join(denied)})"
        extra: dict[str, str] = {}
        if math.isfinite(wait):
            extra["Retry-After"] = str(max(1, math.ceil(wait)))
            text += f"; retry in {extra['Retry-After']} s"
        whose = (f"tenant {name!r}" if name == call.tenant.id
                 else f"this key ({name.partition('/')[2]})")
        raise RateLimited(f"rate limit reached for {whose}: {text}", headers=extra)


# ---- budget -------------------------------------------------------------------------------------

class BudgetBook(Protocol):
    """Today's spend per tenant and the holds on it (the events layer's BudgetView API)."""

    def spent_today(self, tenant: str, now: float | None = None) -> int: ...

    def reserved_today(self, tenant: str, now: float | None = None) -> int: ...

    async def reserve(self, tenant: str, amount_nanousd: int, limit_nanousd: int, *,
                      request_id: str = "", now: float | None = None) -> Any: ...

    def settle(self, reservation: Any, actual_nanousd: int) -> None: ...

    def release(self, reservation: Any) -> None: ...


class LocalReservation:
    __slots__ = ("amount_nanousd", "day", "open", "request_id", "tenant")

    def __init__(self, tenant: str, day: int, amount: int, request_id: str) -> None:
        self.tenant = tenant
        self.day = day
        self.amount_nanousd = amount
        self.request_id = request_id
        self.open = True


class LocalBudget:
    """One process's budget book: per tenant and UTC day, spend and held amounts.

    Every operation is O(1) and synchronous (``reserve`` is a coroutine only to
    share :class:`BudgetBook`'s signature); decisions are atomic because they
    never await. Spend of calls made yesterday and settled today counts for
    yesterday, the day it was reserved against.
    """

    __slots__ = ("_days", "clock")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._days: dict[tuple[str, int], list[int]] = {}  # (tenant, day) -> [spent, held]

    def _book(self, tenant: str, day: int) -> list[int]:
        book = self._days.get((tenant, day))
        if book is None:
            book = self._days[(tenant, day)] = [0, 0]
            if len(self._days) > 4096:  # drop days long gone, now and then
                for key in [k for k in self._days if k[1] < day - 1]:
                    del self._days[key]
        return book

    def _day(self, now: float | None) -> int:
        return int((self.clock.time() if now is None else now) // DAY_S)

    def spent_today(self, tenant: str, now: float | None = None) -> int:
        book = self._days.get((tenant, self._day(now)))
        return book[0] if book is not None else 0

    def reserved_today(self, tenant: str, now: float | None = None) -> int:
        book = self._days.get((tenant, self._day(now)))
        return book[1] if book is not None else 0

    def try_reserve(self, tenant: str, amount_nanousd: int, limit_nanousd: int, *,
                    request_id: str = "", now: float | None = None) -> LocalReservation | None:
        day = self._day(now)
        book = self._book(tenant, day)
        if book[0] + book[1] + amount_nanousd > limit_nanousd:
            return None
        book[1] += amount_nanousd
        return LocalReservation(tenant, day, amount_nanousd, request_id)

    async def reserve(self, tenant: str, amount_nanousd: int, limit_nanousd: int, *,
                      request_id: str = "", now: float | None = None) -> LocalReservation | None:
        return self.try_reserve(tenant, amount_nanousd, limit_nanousd, request_id=request_id,
                                now=now)

    def settle(self, reservation: LocalReservation, actual_nanousd: int) -> None:
        if not reservation.open:
            return
        reservation.open = False
        book = self._book(reservation.tenant, reservation.day)
        book[1] -= reservation.amount_nanousd
        book[0] += actual_nanousd

    def release(self, reservation: LocalReservation) -> None:
        self.settle(reservation, 0)


class BudgetGuard:
    """Reserve before dispatch; :meth:`finish` settles or releases after the call.

    The day reserved against is the call's own (:attr:`Call.occurred_at`, read once from
    the gateway's clock), the day its event carries.
    """

    __slots__ = ("book_of", "daily", "default_daily", "tiers")

    def __init__(self, config: Config, book_of: Callable[[], BudgetBook]) -> None:
        self.book_of = book_of  # resolved per call: the events view appears at startup
        self.tiers = config.tiers
        self.daily: dict[str, int] = {}
        for t in config.tenants:
            self.set_tenant(t)
        self.default_daily = 0  # a tenant this config does not know gets nothing

    def set_tenant(self, tenant: TenantConfig) -> None:
        """A tenant's daily budget: its own, else its tier's (also for run-time tenants)."""
        usd = tenant.daily_usd if tenant.daily_usd is not None else (
            self.tiers[tenant.tier].daily_usd)
        self.daily[tenant.id] = round(usd * NANO)

    def set_scope(self, scope: str, usd: float) -> None:
        """A key's own daily budget (``tollway.directory``): its account ``scope``,
        "<tenant>/<key id>", is held like a tenant's, beside the tenant's."""
        self.daily[scope] = round(usd * NANO)

    async def __call__(self, call: Call, plan: RoutePlan) -> None:
        book = self.book_of()
        if type(book) is LocalBudget:
            self.hold_local(call, plan, book)
        else:
            await self.hold(call, plan, book)

    def _amount(self, call: Call, plan: RoutePlan, book: BudgetBook, account: str,
                limit: int) -> int:
        """What to hold: the plan's cost bound, once its output is bounded to what is left
        of the account's day (spend and every open hold taken off); refuses the call when
        not even a minimal reply fits."""
        if not isinstance(plan, PolicyPlan):
            return 0
        now = call.occurred_at
        left = limit - book.spent_today(account, now) - book.reserved_today(account, now)
        # A shared book counts this gateway's leases as held; what one of them has free
        # is granted to a call that fits in it.
        grantable = getattr(book, "grantable_today", None)
        if grantable is not None:
            left = max(left, grantable(account, now))
        n = call.budget_replies
        if not plan.lower(max(left, 0) // n):
            least = min((fit.least() for fit in plan.fits), default=plan.max_cost_nanousd)
            self._refuse(call, book, account, limit,
                         f"a minimal reply costs {least / NANO:.6f} USD")
        call.estimated_cost_nanousd = plan.max_cost_nanousd * n
        return plan.max_cost_nanousd * n

    def hold_local(self, call: Call, plan: RoutePlan, book: LocalBudget) -> None:
        """:meth:`hold` for this process's own book, which decides without awaiting."""
        call.reservation = (book, self._hold_local(call, plan, book, call.tenant.id))
        if call.budget_scope:
            call.key_reservation = (book, self._hold_local(call, plan, book,
                                                           call.budget_scope))

    def _hold_local(self, call: Call, plan: RoutePlan, book: LocalBudget,
                    account: str) -> LocalReservation:
        limit = self.daily.get(account, self.default_daily)
        request_id, now = call.info.request_id, call.occurred_at
        if isinstance(plan, PolicyPlan):
            # Tried first: most calls fit whole in what is left, and then what _amount
            # reads of the book to bound the output would lower nothing.
            whole = plan.max_cost_nanousd * call.budget_replies
            hold = book.try_reserve(account, whole, limit, request_id=request_id, now=now)
            if hold is not None:
                call.estimated_cost_nanousd = whole
                return hold
        amount = self._amount(call, plan, book, account, limit)
        hold = book.try_reserve(account, amount, limit, request_id=request_id, now=now)
        if hold is None:
            self._refuse(call, book, account, limit,
                         f"this call may cost up to {amount / NANO:.6f} USD")
        return hold

    async def hold(self, call: Call, plan: RoutePlan, book: BudgetBook) -> None:
        call.reservation = (book, await self._hold(call, plan, book, call.tenant.id))
        if call.budget_scope:
            # The key's account after the tenant's: a call its key cannot pay gives the
            # tenant's hold back when it ends (finish), like any refused call.
            call.key_reservation = (book, await self._hold(call, plan, book,
                                                           call.budget_scope))

    async def _hold(self, call: Call, plan: RoutePlan, book: BudgetBook, account: str) -> Any:
        limit = self.daily.get(account, self.default_daily)
        now = call.occurred_at  # the call's day, which its event will carry too
        grant = getattr(book, "try_grant", None)
        if grant is not None and isinstance(plan, PolicyPlan):
            whole = plan.max_cost_nanousd * call.budget_replies
            hold = grant(account, whole, request_id=call.info.request_id, now=now)
            if hold is not None:
                call.estimated_cost_nanousd = whole
                return hold
        # Holds taken while this one awaits a lease (other calls, other gateways) can leave
        # it no room: the lease is measured against the limit and refused, and the call
        # looks once more at what is left, which may pay a lower output bound.
        for _ in range(2):
            amount = self._amount(call, plan, book, account, limit)
            # Most calls fit in a lease this gateway holds: answered without a coroutine.
            hold = (grant(account, amount, request_id=call.info.request_id, now=now)
                    if grant else None)
            if hold is None:
                try:
                    hold = await book.reserve(account, amount, limit,
                                              request_id=call.info.request_id, now=now)
                except Exception as exc:  # the shared book cannot decide (NATS down, closed)
                    log.warning("budget: cannot reserve for %s: %s", account, exc)
                    call.reason = f"{call.reason}; refused: budget unavailable"
                    raise NotReady("the budget cannot be checked right now; retry shortly",
                                   headers={"Retry-After": "1"}) from None
            if hold is not None:
                return hold
        self._refuse(call, book, account, limit,
                     f"this call may cost up to {amount / NANO:.6f} USD")

    def hold_amount(self, call: Call, amount_nanousd: int) -> Coroutine[Any, Any, None] | None:
        """Hold a fixed amount against the tenant's day: a call whose cost its caller
        names (a host app's own route behind ``tollway.GuardMiddleware``), not a plan's.

        None when decided at once (one of this gateway's leases had room), else a
        coroutine that decides it (to await), as :meth:`RateLimitGuard.check` does."""
        book = self.book_of()
        call.estimated_cost_nanousd = amount_nanousd
        if type(book) is LocalBudget:  # this process's own book decides without awaiting
            tenant = call.tenant.id
            limit = self.daily.get(tenant, self.default_daily)
            self._held(call, book, limit, amount_nanousd, book.try_reserve(
                tenant, amount_nanousd, limit, request_id=call.info.request_id,
                now=call.occurred_at))
            return None
        grant = getattr(book, "try_grant", None)
        if grant is not None:
            hold = grant(call.tenant.id, amount_nanousd, request_id=call.info.request_id,
                         now=call.occurred_at)
            if hold is not None:
                call.reservation = (book, hold)
                return None
        return self._reserve_amount(call, book, amount_nanousd)

    async def _reserve_amount(self, call: Call, book: BudgetBook, amount_nanousd: int) -> None:
        tenant = call.tenant.id
        limit = self.daily.get(tenant, self.default_daily)
        try:
            hold = await book.reserve(tenant, amount_nanousd, limit,
                                      request_id=call.info.request_id, now=call.occurred_at)
        except Exception as exc:  # the shared book cannot decide (NATS down, closed)
            log.warning("budget: cannot reserve for %s: %s", tenant, exc)
            call.reason = f"{call.reason}; refused: budget unavailable"
            raise NotReady("the budget cannot be checked right now; retry shortly",
                           headers={"Retry-After": "1"}) from None
        self._held(call, book, limit, amount_nanousd, hold)

    def _held(self, call: Call, book: BudgetBook, limit: int, amount_nanousd: int,
              hold: Any) -> None:
        """The book's answer to a fixed amount: the call's reservation, or its refusal."""
        if hold is None:
            self._refuse(call, book, call.tenant.id, limit,
                         f"this call may cost up to {amount_nanousd / NANO:.6f} USD")
        call.reservation = (book, hold)

    def _refuse(self, call: Call, book: BudgetBook, account: str, limit: int,
                need: str) -> NoReturn:
        tenant = call.tenant.id
        whose = (f"tenant {tenant!r}" if account == tenant
                 else f"this key ({account.partition('/')[2]})")
        call.reason = (f"{call.reason}; refused: daily budget" if account == tenant
                       else f"{call.reason}; refused: key's daily budget")
        spent = book.spent_today(account, call.occurred_at)
        raise QuotaExceeded(
            f"daily budget of {limit / NANO:g} USD reached for {whose} "
            f"(spent {spent / NANO:.6f} USD, plus calls in flight; {need})")

    def finish(self, call: Call) -> None:
        """After settle: replace each hold (the tenant's, the key's) by the actual cost, or
        drop it if nothing was billed.

        Never raises (it runs in the pipeline's ``finally``).
        """
        held = call.reservation
        if held is not None:
            call.reservation = None
            # The call event names the shared budget's lease, so views move its cost from
            # the lease to spend when it lands (a local reservation has no hold_id).
            call.hold_id = self._settle(call, *held)
        held = call.key_reservation
        if held is not None:
            call.key_reservation = None
            call.key_hold_id = self._settle(call, *held)

    @staticmethod
    def _settle(call: Call, book: BudgetBook, hold: Any) -> str:
        try:
            if call.cost_nanousd > 0:
                book.settle(hold, call.cost_nanousd)
            else:
                book.release(hold)
        except Exception:
            log.exception("budget: settling a reservation failed")
        return getattr(hold, "hold_id", "")


class RateAndBudget:
    """Both guards as one :data:`Guard`: one coroutine per call instead of two, and no
    await at all while the budget is this process's own book."""

    __slots__ = ("budget", "rate")

    def __init__(self, rate: RateLimitGuard, budget: BudgetGuard) -> None:
        self.rate = rate
        self.budget = budget

    async def __call__(self, call: Call, plan: RoutePlan) -> None:
        pending = self.rate.check(call, plan)
        if pending is not None:
            await pending
        budget = self.budget
        book = budget.book_of()
        if type(book) is LocalBudget:
            budget.hold_local(call, plan, book)
        else:
            await budget.hold(call, plan, book)


def build_guards(config: Config, clock: Clock, book_of: Callable[[], BudgetBook]
                 ) -> tuple[list[Guard], list[Finisher], RateLimitGuard | None,
                            BudgetGuard | None]:
    """The guards ``[guards]`` turns on, in order, and what runs after each call."""
    gc = config.guards
    guards: list[Guard] = []
    finishers: list[Finisher] = []
    rate = budget = None
    if gc.enabled and gc.rate_limits:
        rate = RateLimitGuard(config.tenants, clock, gc.default_limits)
    if gc.enabled and gc.budget:
        budget = BudgetGuard(config, book_of)
        finishers.append(budget.finish)
    if rate is not None and budget is not None:
        guards.append(RateAndBudget(rate, budget))
    elif rate is not None:
        guards.append(rate)
    elif budget is not None:
        guards.append(budget)
    return guards, finishers, rate, budget
