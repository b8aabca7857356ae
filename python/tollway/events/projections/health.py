"""Provider health: calls, errors, recent error rate and latency EWMAs per provider.

A pure fold like the others (see usage.py). A completed call is a success of
its provider, and a failure of every provider it failed over from
(``fallbacks``); a failed call is a failure of its last provider and of its
fallbacks. Rejected calls never reached a provider and are not counted.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tollway.events.schema import BreakerChanged, CallCompleted, CallFailed, Event
from tollway.events.seen import RETENTION_DAYS, Seen

ERROR_ALPHA = 0.1  # weight of the newest outcome in the recent error rate (~ last 10 calls)
LATENCY_ALPHA = 0.2


class ProviderHealth(msgspec.Struct):
    calls: int = 0
    errors: int = 0
    error_rate: float = 0.0  # EWMA of 1 (error) / 0 (success)
    latency_ewma_s: float = 0.0  # completed calls, as the gateway saw them
    ttft_ewma_s: float = 0.0  # streams only
    breaker: str = "closed"
    last_seen: float = 0.0


class HealthView(msgspec.Struct):
    last_seq: int = 0
    providers: dict[str, ProviderHealth] = msgspec.field(default_factory=dict)
    seen: Seen = msgspec.field(default_factory=lambda: Seen(RETENTION_DAYS))


def new(keep_days: int = RETENTION_DAYS) -> HealthView:
    return HealthView(seen=Seen(keep_days))


def _get(view: HealthView, name: str) -> ProviderHealth:
    p = view.providers.get(name)
    if p is None:
        p = view.providers[name] = ProviderHealth()
    return p


def _failure(view: HealthView, name: str, at: float) -> None:
    p = _get(view, name)
    p.calls += 1
    p.errors += 1
    p.error_rate += ERROR_ALPHA * (1.0 - p.error_rate)
    p.last_seen = at


def apply(view: HealthView, seq: int, event: Event) -> HealthView:
    if seq <= view.last_seq:
        return view
    view.last_seq = seq
    if isinstance(event, CallCompleted):
        for name in event.fallbacks:
            _failure(view, name, event.occurred_at)
        if event.provider:
            p = _get(view, event.provider)
            p.calls += 1
            p.error_rate -= ERROR_ALPHA * p.error_rate
            if p.latency_ewma_s:
                p.latency_ewma_s += LATENCY_ALPHA * (event.latency_s - p.latency_ewma_s)
            else:
                p.latency_ewma_s = event.latency_s
            if event.ttft_s is not None:
                if p.ttft_ewma_s:
                    p.ttft_ewma_s += LATENCY_ALPHA * (event.ttft_s - p.ttft_ewma_s)
                else:
                    p.ttft_ewma_s = event.ttft_s
            p.last_seen = event.occurred_at
    elif isinstance(event, CallFailed):
        for name in event.fallbacks:
            _failure(view, name, event.occurred_at)
        if event.provider and event.provider not in event.fallbacks:
            _failure(view, event.provider, event.occurred_at)
    elif isinstance(event, BreakerChanged):
        _get(view, event.provider).breaker = event.state
    return view


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(HealthView)


def dump(view: HealthView) -> bytes:
    return _enc.encode(view)


def load(data: bytes) -> HealthView:
    return _dec.decode(data)


def query(view: HealthView) -> dict[str, Any]:
    return {name: msgspec.structs.asdict(p) for name, p in sorted(view.providers.items())}
