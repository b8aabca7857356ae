"""The directory: run-time tenants and keys, folded from the admin events.

A pure fold like the other views (see usage.py). Every admin change is an event on
the stream (``tollway.admin.<kind>.<id>``); every gateway folds them in stream order,
so all of them authenticate against the same directory a few milliseconds after a
change. The fold is idempotent: an event folded twice (a resend, a replay of days
the view no longer remembers ids for) leaves the view as it was, so it also folds
what ``seen`` skips.

Rules:
- ``tenant.created`` for an id that exists already changes nothing (the admin API
  publishes it with "no earlier message on this subject", so only one is ever
  stored; a fold that meets a second anyway keeps the first).
- ``tenant.changed`` carries the tenant's settings whole; the last in the stream wins.
- ``key.created`` adds a key by its SHA-256; ``key.revoked`` marks it revoked for good;
  ``key.rotated`` sets the old key's expiry to the end of the overlap.
- ``flag.changed`` carries the flag's settings whole; the last in the stream wins.
- ``tool.changed`` carries a registry tool's settings whole (the last wins);
  ``tool.removed`` takes it out until a later ``tool.changed`` makes it again.
- A call event naming a key of the directory (``key_id``) moves that key's last use
  to the call's time, never back: every gateway on the stream shows the fleet's last
  use of a key, not only its own calls'. It changes no ``version`` (nothing derived
  from the directory depends on it).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tollway.events.schema import (
    CallEvent,
    Event,
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
    ToolSettings,
)
from tollway.events.seen import RETENTION_DAYS, Seen


class TenantEntry(msgspec.Struct):
    settings: TenantSettings
    created_at: float = 0.0
    changed_at: float = 0.0
    created_by: str = ""


class KeyEntry(msgspec.Struct):
    tenant: str
    key_sha256: str
    prefix: str = ""
    name: str = ""
    created_at: float = 0.0
    created_by: str = ""
    expires_at: float | None = None
    models: tuple[str, ...] | None = None
    revoked_at: float | None = None
    rotated_to: str = ""
    rotated_from: str = ""
    limits: TenantLimitSettings | None = None
    daily_usd: float | None = None


class FlagEntry(msgspec.Struct):
    settings: FlagSettings
    changed_at: float = 0.0
    changed_by: str = ""


class ToolEntry(msgspec.Struct):
    settings: ToolSettings
    changed_at: float = 0.0
    changed_by: str = ""
    removed: bool = False  # taken out (``tool.removed``), until a later ``tool.changed``


class DirectoryView(msgspec.Struct):
    last_seq: int = 0
    tenants: dict[str, TenantEntry] = msgspec.field(default_factory=dict)
    keys: dict[str, KeyEntry] = msgspec.field(default_factory=dict)  # key id -> entry
    by_hash: dict[str, str] = msgspec.field(default_factory=dict)  # sha256 -> key id
    flags: dict[str, FlagEntry] = msgspec.field(default_factory=dict)
    tools: dict[str, ToolEntry] = msgspec.field(default_factory=dict)  # the tool registry
    # Bumped by every change: the gateway rebuilds what it derives from the view when
    # this moves (tollway.directory).
    version: int = 0
    # Key id -> unix time of its latest call on any gateway (a checkpoint made before
    # this field loads with none: last uses count from the first call after it).
    last_used: dict[str, float] = msgspec.field(default_factory=dict)
    seen: Seen = msgspec.field(default_factory=lambda: Seen(RETENTION_DAYS))


def new(keep_days: int = RETENTION_DAYS) -> DirectoryView:
    return DirectoryView(seen=Seen(keep_days))


def apply(view: DirectoryView, seq: int, event: Event) -> DirectoryView:
    if seq <= view.last_seq:
        return view
    view.last_seq = seq
    _fold(view, event)
    return view


def skipped(view: DirectoryView, seq: int, event: Event) -> None:
    """An event ``seen`` skips (folded before, or older than the days it remembers ids
    for) still folds: folding it again changes nothing, and a tenant made a year ago
    must exist after a replay."""
    _fold(view, event)


def _fold(view: DirectoryView, event: Event) -> None:
    if isinstance(event, CallEvent):  # first: nearly every event is one
        key_id = event.key_id
        if key_id and key_id in view.keys and event.occurred_at > view.last_used.get(
                key_id, 0.0):
            view.last_used[key_id] = event.occurred_at
    elif isinstance(event, TenantCreated):
        if event.tenant not in view.tenants:
            view.tenants[event.tenant] = TenantEntry(
                event.settings, event.occurred_at, event.occurred_at, event.admin)
            view.version += 1
    elif isinstance(event, TenantChanged):
        entry = view.tenants.get(event.tenant)
        if entry is None:
            view.tenants[event.tenant] = TenantEntry(
                event.settings, event.occurred_at, event.occurred_at, event.admin)
        elif entry.settings != event.settings or entry.changed_at != event.occurred_at:
            entry.settings = event.settings
            entry.changed_at = event.occurred_at
        else:
            return
        view.version += 1
    elif isinstance(event, KeyCreated):
        if event.key_id in view.keys:
            return
        view.keys[event.key_id] = KeyEntry(
            event.tenant, event.key_sha256, event.prefix, event.name, event.occurred_at,
            event.admin, event.expires_at, event.models, rotated_from=event.rotated_from,
            limits=event.limits, daily_usd=event.daily_usd)
        view.by_hash.setdefault(event.key_sha256, event.key_id)
        view.version += 1
    elif isinstance(event, KeyRevoked):
        key = view.keys.get(event.key_id)
        if key is not None and key.revoked_at is None:
            key.revoked_at = event.occurred_at
            view.version += 1
    elif isinstance(event, FlagChanged):
        flag = view.flags.get(event.flag)
        if flag is not None and flag.settings == event.settings:
            return
        view.flags[event.flag] = FlagEntry(event.settings, event.occurred_at, event.admin)
        view.version += 1
    elif isinstance(event, ToolChanged | ToolRemoved):
        tool = view.tools.get(event.tool)
        if isinstance(event, ToolChanged):
            made = ToolEntry(event.settings, event.occurred_at, event.admin)
        elif tool is None or tool.removed:
            return
        else:
            made = ToolEntry(tool.settings, event.occurred_at, event.admin, removed=True)
        if made == tool:
            return
        view.tools[event.tool] = made
        view.version += 1
    elif isinstance(event, KeyRotated):
        key = view.keys.get(event.key_id)
        if key is not None:
            key.rotated_to = event.new_key_id
            if key.expires_at is None or event.expires_at < key.expires_at:
                key.expires_at = event.expires_at
            view.version += 1


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(DirectoryView)


def dump(view: DirectoryView) -> bytes:
    return _enc.encode(view)


def load(data: bytes) -> DirectoryView:
    return _dec.decode(data)


def tenant_json(tenant_id: str, entry: TenantEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"id": tenant_id, "source": "admin"}
    out.update(msgspec.to_builtins(entry.settings))
    out.update(created_at=entry.created_at, changed_at=entry.changed_at,
               created_by=entry.created_by)
    return out


def key_json(key_id: str, key: KeyEntry, now: float, last_used: float | None = None
             ) -> dict[str, Any]:
    """A key as the admin API lists it: never the key, never its hash."""
    if key.revoked_at is not None:
        state = "revoked"
    elif key.expires_at is not None and key.expires_at <= now:
        state = "expired"
    else:
        state = "active"
    return {"id": key_id, "object": "key", "tenant": key.tenant, "prefix": key.prefix,
            "name": key.name, "created_at": key.created_at, "created_by": key.created_by,
            "expires_at": key.expires_at, "models": key.models, "revoked_at": key.revoked_at,
            "rotated_to": key.rotated_to or None, "rotated_from": key.rotated_from or None,
            "limits": msgspec.to_builtins(key.limits) if key.limits is not None else None,
            "daily_usd": key.daily_usd,
            "last_used_at": last_used, "state": state}


def flag_json(name: str, flag: FlagEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "object": "flag"}
    out.update(msgspec.to_builtins(flag.settings))
    out.update(changed_at=flag.changed_at, changed_by=flag.changed_by)
    return out
