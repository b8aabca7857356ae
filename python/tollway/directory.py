"""Tenants and keys at run time: what the admin API writes and every gateway reads.

The record is the event stream: each change is an admin event
(``tollway.admin.<kind>.<id>``, :mod:`tollway.events.schema`) naming the admin key
that made it, and each gateway folds them into its ``directory`` view
(:mod:`tollway.events.projections.directory`) as they arrive, within milliseconds on
every gateway of the NATS. :class:`Directory` is the gateway's side: it writes
changes (publish, wait for the stream's ack, then for its own view to fold it, so a
read after a write sees it) and derives from the view what authentication needs on
every call: key hash -> :class:`~tollway.auth.Principal`, rebuilt only when the view
changes.

Config-file tenants and keys keep working and win: a tenant id the config defines
cannot be created or changed through the API (it is the config's), and its config
keys stay valid. The API can add keys to a config tenant; such keys live in the
directory and can be revoked there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tollway.auth import KEY_PREFIX, Principal, hash_key
from tollway.config import Config, TenantConfig, TenantLimits
from tollway.errors import (
    AuthenticationFailed,
    Conflict,
    NotFound,
    NotReady,
    PermissionDenied,
)
from tollway.events.projections.directory import (
    DirectoryView,
    KeyEntry,
    flag_json,
    key_json,
    tenant_json,
)
from tollway.events.schema import (
    AdminEvent,
    FlagChanged,
    FlagSettings,
    KeyCreated,
    KeyRevoked,
    KeyRotated,
    TenantChanged,
    TenantCreated,
    TenantLimitSettings,
    TenantSettings,
    ToolChanged,
    ToolRemoved,
    encode,
)

if TYPE_CHECKING:
    from tollway.events.projections import Projection
    from tollway.events.service import EventsService
    from tollway.pipeline.plan import Catalog, Deployment
    from tollway.tools.registry import ToolRegistry

log = logging.getLogger("tollway.directory")

PREFIX_CHARS = 8  # of a key shown in lists: "tw-" and 5 more
WRITE_TIMEOUT_S = 5.0  # the stream's ack and this gateway's fold of a change

TenantListener = Callable[[TenantConfig], None]
LimitsListener = Callable[[str, TenantLimits], None]  # a key's own limits, by limiter identity
BudgetListener = Callable[[str, float], None]  # a key's own daily budget, by account


def rollout_bucket(flag: str, tenant: str) -> float:
    """Where a tenant falls in a flag's rollout, in [0, 100): the same for a flag and a
    tenant on every gateway and after every restart, and independent between flags."""
    digest = hashlib.sha256(f"{flag}\0{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class Rollout:
    """One enabled route flag, ready for the calls: who is in, and where they go."""

    __slots__ = ("candidates", "cap", "members", "name", "percent", "tenants")

    def __init__(self, name: str, settings: FlagSettings,
                 candidates: tuple[Deployment, ...]) -> None:
        self.name = name
        self.candidates = candidates
        self.percent = settings.percent
        self.tenants = frozenset(settings.tenants)
        # A guard flag's per-call cap, nano-USD.
        self.cap = round((settings.max_call_usd or 0.0) * 1_000_000_000)
        self.members: dict[str, bool] = {}  # tenant -> in (a cache of rollout_bucket)

    def includes(self, tenant: str) -> bool:
        hit = self.members.get(tenant)
        if hit is None:
            if len(self.members) > 100_000:
                self.members.clear()
            hit = self.members[tenant] = (tenant in self.tenants
                                          or rollout_bucket(self.name, tenant) < self.percent)
        return hit

def _limits(lim: TenantLimitSettings) -> TenantLimits:
    return TenantLimits(per_minute=lim.per_minute, per_hour=lim.per_hour, per_day=lim.per_day,
                        expensive_per_hour=lim.expensive_per_hour,
                        tokens_per_minute=lim.tokens_per_minute)


def _tenant_config(tenant_id: str, s: TenantSettings) -> TenantConfig:
    return TenantConfig(
        id=tenant_id, tier=s.tier, limits=_limits(s.limits),
        daily_usd=s.daily_usd, models=list(s.models) if s.models is not None else None,
        max_sensitivity=s.max_sensitivity)  # type: ignore[arg-type]

def _key_tenant(tenant: TenantConfig, key: KeyEntry) -> TenantConfig:
    """The tenant as a key restricted to some models sees it."""
    if key.models is None:
        return tenant
    allowed = [m for m in key.models if tenant.models is None or m in tenant.models]
    return TenantConfig(id=tenant.id, tier=tenant.tier, limits=tenant.limits,
                        daily_usd=tenant.daily_usd, models=allowed,
                        max_sensitivity=tenant.max_sensitivity)

def _budget_account(view: DirectoryView, key_id: str, key: KeyEntry) -> str:
    """A key's own budget account, "<tenant>/<key id>": the id of the first key of its
    rotations, so rotating a key does not give it a fresh day of budget."""
    for _ in range(1000):  # a chain of rotations; a cycle cannot be made, but stop anyway
        first = view.keys.get(key.rotated_from) if key.rotated_from else None
        if first is None:
            break
        key_id, key = key.rotated_from, first
    return f"{key.tenant}/{key_id}"


class Directory:
    """The gateway's run-time tenants and keys (see the module doc)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.config_tenants: dict[str, TenantConfig] = {t.id: t for t in config.tenants}
        self.projection: Projection[DirectoryView] | None = None
        self.events: EventsService | None = None
        self.listeners: list[TenantListener] = []
        self.limits_listeners: list[LimitsListener] = []
        self.budget_listeners: list[BudgetListener] = []
        self._key_limits: dict[str, TenantLimits] = {}
        self._key_budgets: dict[str, float] = {}
        self._version = -1
        self._view: DirectoryView | None = None
        self._principals: dict[str, tuple[str, Principal]] = {}
        self._tenants: dict[str, TenantConfig] = {}
        self.last_used: dict[str, float] = {}  # key id -> unix time, this process's calls
        self.catalog: Catalog | None = None  # set by the gateway: flags name deployments
        self._rollouts: dict[str, list[Rollout]] = {}  # route -> its enabled flags
        self._shadows: dict[str, list[Rollout]] = {}  # shadow route -> its enabled flags
        self._guards: dict[str, list[Rollout]] = {}  # route or "*" -> guard flags
        self.tools: ToolRegistry | None = None  # set by the gateway: reads this view too

    # ---- attached by the events layer ------------------------------------------------------
    def attach(self, events: EventsService) -> None:
        self.events = events
        self.projection = events.projection("directory")
        if self.tools is not None:
            self.tools.projection = self.projection

    def detach(self) -> None:
        self.events = None
        self.projection = None
        if self.tools is not None:
            self.tools.projection = None

    # ---- reading: every call -----------------------------------------------------------
    def _current(self) -> DirectoryView | None:
        p = self.projection
        if p is None:
            return None
        view = p.view
        if view is not self._view or view.version != self._version:
            self._rebuild(view)
        return view

    def _rebuild(self, view: DirectoryView) -> None:
        old = self._tenants
        tenants: dict[str, TenantConfig] = {}
        disabled: set[str] = set()
        for tid, entry in view.tenants.items():
            if tid in self.config_tenants:
                continue  # the config's: an event cannot change it
            tenants[tid] = _tenant_config(tid, entry.settings)
            if entry.settings.disabled:
                disabled.add(tid)
        principals: dict[str, tuple[str, Principal]] = {}
        key_limits: dict[str, TenantLimits] = {}
        key_budgets: dict[str, float] = {}
        for key_id, key in view.keys.items():
            tenant = self.config_tenants.get(key.tenant) or tenants.get(key.tenant)
            if tenant is None:
                continue
            p = Principal(_key_tenant(tenant, key), key_id=key_id, expires_at=key.expires_at)
            if key.limits is not None:
                p.limit_scope = f"{key.tenant}/{key_id}"
                key_limits[p.limit_scope] = _limits(key.limits)
            if key.daily_usd is not None:
                p.budget_scope = _budget_account(view, key_id, key)
                key_budgets[p.budget_scope] = key.daily_usd
            if key.revoked_at is not None:
                p.refusal = AuthenticationFailed("this API key was revoked",
                                                 code="revoked_api_key")
            elif key.tenant in disabled:
                p.refusal = PermissionDenied(f"tenant {key.tenant!r} is disabled",
                                             code="tenant_disabled")
            principals[key.key_sha256] = (key.key_sha256, p)
        self._principals = principals
        self._tenants = tenants
        rollouts: dict[str, list[Rollout]] = {}
        shadows: dict[str, list[Rollout]] = {}
        guards: dict[str, list[Rollout]] = {}
        catalog = self.catalog
        for name, flag in sorted(view.flags.items()):
            s = flag.settings
            if not s.enabled or catalog is None:
                continue
            if s.kind == "shadow":
                shadows.setdefault(s.route, []).append(Rollout(name, s, ()))
                continue
            if s.kind == "guard":
                if s.max_call_usd is not None:
                    guards.setdefault(s.route, []).append(Rollout(name, s, ()))
                continue
            deps = tuple(catalog.models[m] for m in s.candidates if m in catalog.models)
            if deps:
                rollouts.setdefault(s.route, []).append(Rollout(name, s, deps))
        self._rollouts = rollouts
        self._shadows = shadows
        self._guards = guards
        self._view, self._version = view, view.version
        for tid, t in tenants.items():
            if old.get(tid) != t:
                for listener in self.listeners:
                    try:
                        listener(t)
                    except Exception:
                        log.exception("directory: applying tenant %s failed", tid)
        old_limits, self._key_limits = self._key_limits, key_limits
        for scope, limits in key_limits.items():
            if old_limits.get(scope) != limits:
                for on_limits in self.limits_listeners:
                    try:
                        on_limits(scope, limits)
                    except Exception:
                        log.exception("directory: applying the limits of %s failed", scope)
        old_budgets, self._key_budgets = self._key_budgets, key_budgets
        for scope, usd in key_budgets.items():
            if old_budgets.get(scope) != usd:
                for on_budget in self.budget_listeners:
                    try:
                        on_budget(scope, usd)
                    except Exception:
                        log.exception("directory: applying the budget of %s failed", scope)

    def resolve(self, digest: str) -> tuple[str, Principal] | None:
        """(stored digest, principal) of a key by its SHA-256, from the directory."""
        if self.projection is None:
            return None
        self._current()
        hit = self._principals.get(digest)
        if hit is not None:
            p = hit[1]
            now = self.clock()
            if p.expires_at is not None and now >= p.expires_at and p.refusal is None:
                return hit[0], _expired(p)
            if p.key_id:
                self.last_used[p.key_id] = now
        return hit

    def rollout(self, route: str, tenant: str) -> tuple[str, tuple[Deployment, ...]] | None:
        """(flag, candidates) when a flag moves this tenant's calls to ``route``, else None
        (the first flag by name, when several cover the route)."""
        if self.projection is None:
            return None
        self._current()
        for r in self._rollouts.get(route, ()):
            if r.includes(tenant):
                return r.name, r.candidates
        return None

    def call_cap(self, route: str, tenant: str) -> tuple[str, int] | None:
        """(flag, nano-USD) when a guard flag sets this tenant's per-call cost cap for
        ``route``, else None (its tier's cap holds)."""
        if self.projection is None:
            return None
        self._current()
        if not self._guards:
            return None
        for key in (route, "*"):
            for r in self._guards.get(key, ()):
                if r.includes(tenant):
                    return r.name, r.cap
        return None

    def shadow_gate(self, route: str, tenant: str) -> bool | None:
        """Whether shadow mode samples this tenant's calls to a ``[[shadow]]`` route: None
        when no shadow flag covers the route (every tenant's calls are sampled), else
        whether a flag has the tenant in."""
        if self.projection is None:
            return None
        self._current()
        flags = self._shadows.get(route)
        if not flags:
            return None
        return any(r.includes(tenant) for r in flags)

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        """A tenant of the config or the directory (disabled ones too)."""
        t = self.config_tenants.get(tenant_id)
        if t is not None:
            return t
        self._current()
        return self._tenants.get(tenant_id)

    # ---- the admin API ----------------------------------------------------------------------
    def _view_or_unavailable(self) -> DirectoryView:
        view = self._current()
        if view is None or self.events is None:
            raise NotReady("the directory needs the event stream ([nats] enabled, "
                                     "NATS reachable)", code="directory_unavailable")
        return view

    def list_tenants(self) -> list[dict[str, Any]]:
        view = self._current()
        out = [_config_tenant_json(t) for t in self.config.tenants]
        if view is not None:
            out += [tenant_json(tid, e) for tid, e in sorted(view.tenants.items())
                    if tid not in self.config_tenants]
        return out

    def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        t = self.config_tenants.get(tenant_id)
        if t is not None:
            return _config_tenant_json(t)
        view = self._current()
        entry = view.tenants.get(tenant_id) if view is not None else None
        if entry is None:
            raise NotFound(f"no tenant {tenant_id!r}", code="tenant_not_found")
        return tenant_json(tenant_id, entry)

    def _own_tenant(self, tenant_id: str) -> None:
        if tenant_id in self.config_tenants:
            raise Conflict(f"tenant {tenant_id!r} is defined in the config file, which wins: "
                           "change it there", code="tenant_in_config")

    async def create_tenant(self, tenant_id: str, settings: TenantSettings, admin: str
                            ) -> dict[str, Any]:
        self._own_tenant(tenant_id)
        view = self._view_or_unavailable()
        if tenant_id in view.tenants:
            raise Conflict(f"tenant {tenant_id!r} exists", code="tenant_exists")
        await self._write(TenantCreated(
            event_id=event_id(), occurred_at=self.clock(), tenant=tenant_id, admin=admin,
            settings=settings), first_on_subject=True)
        return self.get_tenant(tenant_id)

    async def change_tenant(self, tenant_id: str, change: Callable[[TenantSettings],
                            TenantSettings], admin: str) -> dict[str, Any]:
        self._own_tenant(tenant_id)
        view = self._view_or_unavailable()
        entry = view.tenants.get(tenant_id)
        if entry is None:
            raise NotFound(f"no tenant {tenant_id!r}", code="tenant_not_found")
        settings = change(entry.settings)
        if settings != entry.settings:
            await self._write(TenantChanged(
                event_id=event_id(), occurred_at=self.clock(), tenant=tenant_id, admin=admin,
                settings=settings))
        return self.get_tenant(tenant_id)

    def list_keys(self, tenant_id: str | None) -> list[dict[str, Any]]:
        view = self._current()
        if view is None:
            return []
        now = self.clock()
        return [key_json(kid, k, now, self._last_use(view, kid))
                for kid, k in sorted(view.keys.items(), key=lambda kv: kv[1].created_at)
                if tenant_id is None or k.tenant == tenant_id]

    def _last_use(self, view: DirectoryView, key_id: str) -> float | None:
        """The fleet's last call with the key (the view, a few ms behind), or this
        process's own later one."""
        mine, fleet = self.last_used.get(key_id), view.last_used.get(key_id)
        if mine is None or fleet is None:
            return fleet if mine is None else mine
        return max(mine, fleet)

    async def create_key(self, tenant_id: str, admin: str, *, name: str = "",
                         expires_at: float | None = None,
                         models: tuple[str, ...] | None = None,
                         limits: TenantLimitSettings | None = None,
                         daily_usd: float | None = None,
                         rotated_from: str = "") -> dict[str, Any]:
        """A new key for the tenant: the answer holds the key, the only time it is shown."""
        self._view_or_unavailable()
        if self.tenant(tenant_id) is None:
            raise NotFound(f"no tenant {tenant_id!r}", code="tenant_not_found",
                           param="tenant")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        await self._write(KeyCreated(
            event_id=event_id(), occurred_at=self.clock(), tenant=tenant_id, admin=admin,
            key_id=key_id, key_sha256=hash_key(key), prefix=key[:PREFIX_CHARS], name=name,
            expires_at=expires_at, models=models, rotated_from=rotated_from, limits=limits,
            daily_usd=daily_usd),
            first_on_subject=True)
        out = self.get_key(key_id)
        out["key"] = key
        return out

    def _key(self, key_id: str) -> KeyEntry:
        view = self._current()
        key = view.keys.get(key_id) if view is not None else None
        if key is None:
            raise NotFound(f"no key {key_id!r}", code="key_not_found")
        return key

    def key_budget(self, key_id: str) -> tuple[str, str, float] | None:
        """(tenant, budget account, USD a day) of a key with a daily budget of its own."""
        view = self._current()
        key = view.keys.get(key_id) if view is not None else None
        if view is None or key is None or key.daily_usd is None:
            return None
        return key.tenant, _budget_account(view, key_id, key), key.daily_usd

    def get_key(self, key_id: str) -> dict[str, Any]:
        key = self._key(key_id)
        view = self._current()
        assert view is not None  # _key found it there
        return key_json(key_id, key, self.clock(), self._last_use(view, key_id))

    async def revoke_key(self, key_id: str, admin: str) -> dict[str, Any]:
        self._view_or_unavailable()
        key = self._key(key_id)
        if key.revoked_at is None:
            await self._write(KeyRevoked(event_id=event_id(), occurred_at=self.clock(),
                                         tenant=key.tenant, admin=admin, key_id=key_id))
        return self.get_key(key_id)

    async def rotate_key(self, key_id: str, overlap_s: float, admin: str) -> dict[str, Any]:
        """A new key with the old one's tenant, name, models, limits, budget (the same
        account: see :func:`_budget_account`) and expiry; the old one keeps working for
        ``overlap_s`` more seconds."""
        self._view_or_unavailable()
        key = self._key(key_id)
        now = self.clock()
        if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
            raise Conflict(f"key {key_id!r} is revoked or expired: create a new one",
                           code="key_not_active")
        new = await self.create_key(key.tenant, admin, name=key.name,
                                    expires_at=key.expires_at, models=key.models,
                                    limits=key.limits, daily_usd=key.daily_usd,
                                    rotated_from=key_id)
        await self._write(KeyRotated(event_id=event_id(), occurred_at=now,
                                     tenant=key.tenant, admin=admin, key_id=key_id,
                                     new_key_id=new["id"], expires_at=now + overlap_s))
        new["previous"] = self.get_key(key_id)
        return new

    def list_flags(self) -> list[dict[str, Any]]:
        view = self._current()
        return [flag_json(n, f) for n, f in sorted(view.flags.items())] if view else []

    def get_flag(self, name: str) -> dict[str, Any]:
        view = self._current()
        flag = view.flags.get(name) if view is not None else None
        if flag is None:
            raise NotFound(f"no flag {name!r}", code="flag_not_found")
        return flag_json(name, flag)

    async def put_flag(self, name: str, settings: FlagSettings, admin: str) -> dict[str, Any]:
        view = self._view_or_unavailable()
        flag = view.flags.get(name)
        if flag is None or flag.settings != settings:
            await self._write(FlagChanged(event_id=event_id(), occurred_at=self.clock(),
                                          admin=admin, flag=name, settings=settings))
        return self.get_flag(name)

    async def change_tool(self, event: ToolChanged | ToolRemoved) -> None:
        """Publish a registry tool's change (tollway.routes.tools made and checked it)."""
        self._view_or_unavailable()
        await self._write(event)

    # ---- writing --------------------------------------------------------------------------
    async def _write(self, event: AdminEvent, *, first_on_subject: bool = False) -> None:
        """Publish the change to the stream and wait until this gateway has folded it."""
        svc = self.events
        nc = svc.nc if svc is not None else None
        if svc is None or nc is None or not nc.is_connected or self.projection is None:
            raise NotReady("NATS is not reachable: admin changes need the event "
                                     "stream", code="directory_unavailable")
        headers = {"Nats-Msg-Id": event.event_id}
        if first_on_subject:
            headers["Nats-Expected-Last-Subject-Sequence"] = "0"
        try:
            ack = await nc.jetstream().publish(event.subject(), encode(event),
                                               stream=svc.config.stream,
                                               timeout=WRITE_TIMEOUT_S, headers=headers)
        except Exception as exc:
            if "wrong last sequence" in str(exc).lower():
                raise Conflict("that tenant or key exists already (made through another "
                               "gateway)", code="exists") from None
            log.warning("directory: publishing %s failed: %s", event.subject(), exc)
            raise NotReady("the event stream did not take the change; try again",
                                     code="directory_unavailable") from None
        log.info("admin: %s", event.subject(), extra={"admin_change": event.subject(),
                                                      "admin": event.admin})
        projection = self.projection
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        while projection.view.last_seq < ack.seq:
            if time.monotonic() > deadline:
                raise NotReady("the change is stored but this gateway has not "
                                         "read it back yet", code="directory_lagging")
            await asyncio.sleep(0.002)

def _expired(p: Principal) -> Principal:
    out = Principal(p.tenant, key_id=p.key_id, expires_at=p.expires_at)
    out.refusal = AuthenticationFailed("this API key has expired", code="expired_api_key")
    return out

def event_id() -> str:
    return "adm-" + secrets.token_hex(12)

def _config_tenant_json(t: TenantConfig) -> dict[str, Any]:
    return {"id": t.id, "source": "config", "tier": t.tier,
            "limits": {"per_minute": t.limits.per_minute, "per_hour": t.limits.per_hour,
                       "per_day": t.limits.per_day,
                       "expensive_per_hour": t.limits.expensive_per_hour,
                       "tokens_per_minute": t.limits.tokens_per_minute},
            "daily_usd": t.daily_usd, "models": t.models,
            "max_sensitivity": t.max_sensitivity, "disabled": False}
