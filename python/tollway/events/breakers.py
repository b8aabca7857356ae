"""Breakers across the fleet: one provider's breaker state shared by every gateway process
on the same NATS.

Each process still decides with its own breaker (the Rust state machine; a call to a
closed breaker costs no network round trip). What this adds, per process:

- It listens to ``tollway.breaker.changed.>`` (plain NATS delivery of what the
  publishers send to the stream, so within milliseconds) and applies the other
  processes' changes to its own breaker: an ``open`` opens it for what is left of
  that open's cool-down (``recovery_s`` in the event), a ``closed`` after a probe
  succeeded (or an operator's reset) closes it. Its own events are skipped (the
  ``instance`` field), and a change applied from a peer has reason ``peer``, which
  the gateway does not publish again: no echo loop.
- One probe for the fleet: shortly before an open breaker's cool-down ends, each
  process tries to take the provider's probe lease, a key created in the KV bucket
  ``tollway_breakers`` (create succeeds for one writer only; the bucket's TTL ends a
  lease whose holder died). The winner lets its breaker go half-open as usual and
  sends the probe; the others hold theirs open for the lease's length, until the
  probe's outcome event arrives and closes or re-opens them with it. The winner
  gives the lease back when its probe ends. Without NATS each process probes for
  itself, as a lone gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from tollway.breaker import BreakerTransition
from tollway.events.schema import BREAKER_CHANGED, STREAM, BreakerChanged, decode, subject_token

if TYPE_CHECKING:
    from tollway.resilience import Breakers

log = logging.getLogger("tollway.events")

PROBE_BUCKET = "tollway_breakers"
_KEY_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def probe_key(provider: str) -> str:
    """The provider's lease key: the name itself when it is safe in a key, else ``=`` and
    its UTF-8 in hex (``=`` never starts a safe name, so two names never share a key)."""
    if provider and all(c in _KEY_SAFE for c in provider):
        return f"probe.{provider}"
    return f"probe.={provider.encode().hex()}"


async def ensure_probe_bucket(nc: NatsClient, lease_s: float, replicas: int = 1) -> KeyValue:
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        return await js.key_value(PROBE_BUCKET)
    return await js.create_key_value(KeyValueConfig(
        bucket=PROBE_BUCKET, description="tollway: who sends a breaker's half-open probe",
        history=1, ttl=lease_s, storage=StorageType.FILE, replicas=replicas))


class FleetBreakers:
    """Applies the other processes' ``breaker.changed`` events to ``breakers`` and elects one
    prober per provider when a cool-down ends (see the module docstring)."""

    def __init__(self, breakers: Breakers, instance: str, *, lease_s: float = 30.0,
                 replicas: int = 1, stream: str = STREAM) -> None:
        self.breakers = breakers
        self.stream = stream
        self.instance = instance
        self.lease_s = lease_s
        self.replicas = replicas
        self.nc: NatsClient | None = None
        self.kv: KeyValue | None = None
        self._sub: Subscription | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._held: dict[str, int] = {}  # provider -> revision of the lease this process holds
        self._tasks: set[asyncio.Task[None]] = set()
        self.applied = 0  # peer events applied (a metric for tests and the log)

    async def start(self, nc: NatsClient) -> None:
        self._loop = asyncio.get_running_loop()
        self.nc = nc
        try:
            self.kv = await ensure_probe_bucket(nc, self.lease_s, self.replicas)
        except Exception as exc:
            # Without the bucket every process probes for itself; the opens are still shared.
            log.warning("breakers: no probe lease bucket (%s); each process probes alone", exc)
        self._sub = await nc.subscribe(f"{BREAKER_CHANGED}.>", cb=self._on_msg)
        self.breakers.hooks.append(self._changed)
        # A process that starts while a provider's breaker is open elsewhere opens its own:
        # the last change of each provider is in the stream.
        js = nc.jetstream()
        for name in list(self.breakers.breakers):
            try:
                raw = await js.get_last_msg(self.stream,
                                            f"{BREAKER_CHANGED}.{subject_token(name)}")
                event = decode(raw.data or b"")
            except Exception:  # none yet (the common case), or not readable: nothing to do
                continue
            if isinstance(event, BreakerChanged):
                self.apply(event)
        # Breakers already open (the process started after they opened) get their timer too.
        for name, breaker in self.breakers.breakers.items():
            if breaker.state(self.breakers.clock.monotonic()) == "open":
                self._schedule(name)

    async def stop(self) -> None:
        if self._changed in self.breakers.hooks:
            self.breakers.hooks.remove(self._changed)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for name in list(self._held):
            await self._release(name)
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    # ---- peers' changes ------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = decode(msg.data)
        except Exception:
            log.debug("breakers: undecodable message on %s", msg.subject)
            return
        if isinstance(event, BreakerChanged):
            self.apply(event)

    def apply(self, event: BreakerChanged) -> None:
        """Apply another process's breaker change to this process's breaker."""
        breaker = self.breakers.breakers.get(event.provider)
        if breaker is None or event.reason == "peer" or event.instance == self.instance:
            # A provider this gateway does not have; a change applied from a peer (never
            # published, but an old version might); this process's own.
            return
        clock = self.breakers.clock
        now = clock.monotonic()
        if event.state == "open":
            # The cool-down counts from when it opened there; clocks of one fleet agree well
            # enough, and an age below 0 (skew) counts as none.
            age = max(0.0, clock.time() - event.occurred_at)
            left = event.recovery_s - age
            if left <= 0:
                return  # an old event (e.g. sent late from an outbox): that open is over
            breaker.force_open(left, now)
            self._schedule(event.provider)
        elif event.state == "closed" and event.reason in ("probe_succeeded", "reset"):
            breaker.force_close(now)
            self._cancel(event.provider)
        else:
            return  # half_open: each process's own clock does that part
        self.applied += 1
        log.info("breaker %s: %s from %s (%s)", event.provider, event.state, event.instance,
                 event.reason, extra={"provider": event.provider, "breaker_to": event.state,
                                      "peer": event.instance, "breaker_reason": "peer"})

    # ---- this process's changes ----------------------------------------------------------
    def _changed(self, t: BreakerTransition, failures: int) -> None:
        loop = self._loop
        if loop is None:
            return
        # Breakers call their hooks on the thread that caused the change.
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._on_change(t)
        else:
            loop.call_soon_threadsafe(self._on_change, t)

    def _on_change(self, t: BreakerTransition) -> None:
        name = t.breaker
        if t.to_state == "open":
            self._schedule(name)
        elif t.to_state == "closed":
            self._cancel(name)
        if t.from_state == "half_open" and name in self._held:
            self._spawn(self._release(name))  # our probe is over, either way

    # ---- the probe lease -----------------------------------------------------------------
    def _lead(self, name: str) -> float:
        # Ask ahead of the cool-down's end, so the answer is in before a call half-opens it.
        recovery = self.breakers[name].options.get("recovery_s", 30.0) or 30.0
        return min(0.5, recovery / 4)

    def _schedule(self, name: str) -> None:
        loop = self._loop
        if loop is None:
            return
        self._cancel(name)
        wait = self.breakers[name].retry_after(self.breakers.clock.monotonic())
        delay = max(0.0, wait - self._lead(name))
        self._timers[name] = loop.call_later(delay, self._due, name)

    def _cancel(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _due(self, name: str) -> None:
        self._timers.pop(name, None)
        self._spawn(self._claim(name))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, name: str) -> None:
        breaker = self.breakers[name]
        clock = self.breakers.clock
        if breaker.state(clock.monotonic()) == "closed" or self.kv is None:
            return
        key = probe_key(name)
        try:
            revision = await self.kv.create(key, self.instance.encode())
        except KeyWrongLastSequenceError:
            revision = 0
        except Exception as exc:
            log.warning("breakers: probe lease for %s not reachable (%s); probing alone", name,
                        exc)
            return
        if revision:
            self._held[name] = revision
            log.info("breaker %s: this process sends the fleet's probe", name,
                     extra={"provider": name})
            return
        # Another process probes: stay open until its outcome arrives, or its lease ends.
        now = clock.monotonic()
        if breaker.state(now) == "closed":
            return  # the outcome arrived while we asked
        breaker.force_open(breaker.retry_after(now) + self.lease_s, now)
        self._schedule(name)
        log.info("breaker %s: another process sends the probe; held open", name,
                 extra={"provider": name})

    async def _release(self, name: str) -> None:
        revision = self._held.pop(name, None)
        if revision is None or self.kv is None:
            return
        try:
            await self.kv.delete(probe_key(name), last=revision)
        except Exception as exc:  # taken over or gone: its TTL ends it anyway
            log.debug("breakers: releasing the probe lease of %s: %s", name, exc)
