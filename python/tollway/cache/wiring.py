"""The response cache inside the app: its layer, the responder (hits) and the finisher
(stores).

One of the app's optional layers (``tollway.app.LAYERS``), after the events layer:
with ``[cache]`` naming routes or tenants (or a tenant with ``cache = true``),
:func:`cache_lifespan` adds :class:`CacheHook` to the pipeline's responders and
finishers, and shares entries through the events layer's NATS connection once it has
one (memory only until then, or without NATS).

A hit is answered after the guards (it counts against the rate limits like any call,
and its budget hold is released at cost 0), without dispatch: headers
``X-Tollway-Cache: hit``, ``X-Tollway-Cost-USD: 0``, ``Age``, the model and provider
that made the answer; a plain body as the provider sent it, a stream as SSE
(:func:`tollway.cache.entry.as_sse`). Its call event has ``cache = "hit"``, cost 0,
no tokens (none were consumed) and ``saved_nanousd``. A miss is dispatched as usual
(``X-Tollway-Cache: miss``; a stream's relayed bytes are kept on the side) and, once
it ended whole, stored under the model that answered it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from tollway.aio import cancel_and_wait
from tollway.asgi import Message, Send, send_bytes
from tollway.cache.entry import Entry, as_sse, from_stream, storable
from tollway.cache.key import cache_control, cache_key
from tollway.cache.store import ResponseCache
from tollway.config import CacheConfig, TenantConfig
from tollway.pipeline.call import CHAT, Call
from tollway.pipeline.dispatch import SSE_HEADERS, served_headers
from tollway.pipeline.plan import Catalog

if TYPE_CHECKING:
    from tollway.gateway import Gateway

__all__ = ["CacheHook", "Lookup", "cache_lifespan"]

log = logging.getLogger("tollway.cache")

HIT = [(b"x-tollway-cache", b"hit"), (b"x-tollway-cost-usd", b"0.000000000")]
MISS = (b"x-tollway-cache", b"miss")
BYPASS = (b"x-tollway-cache", b"bypass")


class Lookup:
    """The cache's state for one call (``Call.cache``)."""

    __slots__ = ("kept", "key", "model", "state", "store")

    def __init__(self) -> None:
        self.state = "bypass"
        self.key = ""
        self.model = ""  # the model the key was made for
        self.store = False  # a miss to store once it ended whole
        self.kept: list[bytes] | None = None  # a stream's relayed bytes


class CacheHook:
    def __init__(self, cfg: CacheConfig, store: ResponseCache, catalog: Catalog) -> None:
        self.cfg = cfg
        self.store = store
        self.catalog = catalog
        self.routes = frozenset(cfg.routes)
        self.tenants = frozenset(cfg.tenants)
        self.all_routes = "*" in self.routes
        self.all_tenants = "*" in self.tenants
        self.max_temperature = cfg.max_temperature

    def opted_in(self, tenant: TenantConfig, call: Call) -> bool:
        if tenant.cache is not None:
            return tenant.cache
        if self.all_tenants or self.all_routes or tenant.id in self.tenants:
            return True
        plan = call.plan
        return (call.request.model in self.routes
                or (plan is not None and plan.route in self.routes))

    # ---- the responder: before dispatch -------------------------------------------------
    async def __call__(self, call: Call, send: Send) -> Send | None:
        """A hit: answered here (None). Otherwise the send for dispatch."""
        if call.endpoint != CHAT or not self.opted_in(call.tenant, call):
            return send
        plan = call.plan
        if plan is None or not plan.candidates:
            return send
        lk = call.cache = Lookup()
        no_cache = no_store = False
        if call.cache_control:
            no_cache, no_store = cache_control(call.cache_control)
        temperature = call.request.temperature
        if no_store or (1.0 if temperature is None else temperature) > self.max_temperature:
            call.headers.append(BYPASS)
            return send
        model = plan.candidates[0].model
        lk.key, lk.model = cache_key(call.tenant.id, model, call.body), model
        if not no_cache:
            e = self.store.get(lk.key, call.tenant.id)
            if e is not None:
                await self._answer(call, lk, e, send)
                return None
        lk.state = "miss"
        lk.store = True
        call.headers.append(MISS)
        if not call.stream:
            return send
        kept = lk.kept = []
        # The SSE framing of an answer is larger than its JSON: past twice the entry cap
        # the answer could not be kept anyway, so the relay stops keeping its bytes.
        room = [self.cfg.max_entry_bytes * 2]

        async def keeping(message: Message) -> None:
            if message["type"] == "http.response.body" and lk.store:
                body = message.get("body", b"")
                if body:
                    kept.append(body)
                    room[0] -= len(body)
                    if room[0] < 0:
                        lk.store = False
                        kept.clear()
            await send(message)

        return keeping

    async def _answer(self, call: Call, lk: Lookup, e: Entry, send: Send) -> None:
        lk.state = "hit"
        call.deployment = self.catalog.models.get(e.model) or (
            call.plan.candidates[0] if call.plan is not None else None)
        call.settled = True
        call.cost_nanousd = 0
        call.saved_nanousd = e.cost_nanousd
        age = max(0, int(self.store.clock() - e.created_at))
        headers = [*served_headers(call), *HIT, (b"age", b"%d" % age), *call.headers]
        call.response_started = True
        if call.stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*SSE_HEADERS, *headers]})
            await send({"type": "http.response.body",
                        "body": as_sse(e.body, call.include_usage), "more_body": False})
        else:
            await send_bytes(send, 200, e.body, headers)

    # ---- the finisher: after settle ------------------------------------------------------
    def finish(self, call: Call) -> None:
        lk = call.cache
        if lk is None or not lk.store or call.error is not None or call.client_cancelled:
            return
        dep = call.deployment
        if dep is None:
            return
        # An answer the gateway's own bound cut (not the request's) is not what it asks.
        bounded = bool(call.output_bound)
        if call.stream:
            tap = call.tap
            if tap is None or not tap.done or tap.cut or tap.error or not lk.kept:
                return
            body = from_stream(b"".join(lk.kept), call.prompt_tokens, call.completion_tokens)
            lk.kept = None
            if body is None or not storable(body, bounded):
                return
        else:
            reply = call.reply
            if reply is None or not storable(reply.body, bounded):
                return
            body = reply.body
        key = lk.key if dep.model == lk.model else cache_key(call.tenant.id, dep.model,
                                                            call.body)
        self.store.put(key, Entry(call.tenant.id, dep.model, dep.provider, body,
                                  call.occurred_at, call.cost_nanousd, call.prompt_tokens,
                                  call.completion_tokens))


def wanted(gateway: Gateway) -> bool:
    """Whether any route or tenant of the config opted in (else the layer stays out)."""
    cfg = gateway.config.cache
    return cfg.enabled and bool(cfg.routes or cfg.tenants or any(
        t.cache for t in gateway.config.tenants))


@asynccontextmanager
async def cache_lifespan(gateway: Gateway) -> AsyncIterator[None]:
    cfg = gateway.config.cache
    if not wanted(gateway):
        yield
        return
    store = ResponseCache(ttl_s=cfg.ttl_s, max_bytes=cfg.max_bytes,
                          max_entry_bytes=cfg.max_entry_bytes, clock=gateway.clock.time,
                          bucket=cfg.bucket, replicas=gateway.config.events.replicas)
    hook = CacheHook(cfg, store, gateway.catalog)
    pipeline = gateway.pipeline
    pipeline.responders.append(hook)
    pipeline.finishers.append(hook.finish)
    gateway.cache = store
    attaching = asyncio.create_task(_attach(gateway, store), name="tollway-cache-attach")
    try:
        yield
    finally:
        await cancel_and_wait(attaching, what="the response cache's attach")
        pipeline.responders.remove(hook)
        pipeline.finishers.remove(hook.finish)
        await store.stop()
        gateway.cache = None


async def _attach(gateway: Gateway, store: ResponseCache) -> None:
    """Share entries through the events layer's connection once it has one."""
    delay = 0.05
    while True:
        events = gateway.events
        nc = events.nc if events is not None else None
        if nc is not None and nc.is_connected:
            try:
                await store.attach(nc)
                return
            except Exception as exc:  # NATS without JetStream, a bucket refused, ...
                log.warning("cache: cannot open the bucket, entries stay in memory",
                            extra={"error": str(exc)})
        if events is None and not gateway.config.nats.enabled:
            return
        await asyncio.sleep(delay)
        delay = min(2.0, delay * 2)
