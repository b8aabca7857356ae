"""Cache entries: in this process's memory, shared through a NATS KV bucket.

Every lookup is a dict lookup in memory (:meth:`ResponseCache.get`): no network
round trip on the call's path. An answer stored here goes into memory at once and to
the bucket in the background (:meth:`ResponseCache.put`); every gateway on the same
NATS subscribes to the bucket's subject and copies what any of them stores into its
own memory, so the fleet serves one another's entries. A gateway that starts (or
reconnects) reads the bucket's current entries once, in the background.

Caps: entries live ``ttl_s`` (the bucket's max age, and checked on read); memory holds
at most ``max_bytes`` of entries, least recently used first out; the bucket holds at
most ``max_bytes`` too (when full, NATS refuses new entries until old ones expire: a
refused store is counted, never an error for the caller); an answer larger than
``max_entry_bytes`` is not kept. A lookup that misses memory does not ask the bucket:
memory mirrors it, so a miss here is a miss there, except for entries this process
evicted to stay within its cap (they are answered by the provider again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import NotFoundError

from tollway.aio import cancel_and_wait
from tollway.cache.entry import Entry, decode_entry, encode_entry

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.kv import KeyValue

__all__ = ["ResponseCache"]

log = logging.getLogger("tollway.cache")

_OVERHEAD = 200  # bytes an entry costs beside its body (struct, key, dict slot)


class ResponseCache:
    def __init__(self, *, ttl_s: float, max_bytes: int, max_entry_bytes: int,
                 clock: Callable[[], float], bucket: str = "tollway_cache",
                 replicas: int = 1) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.clock = clock
        self.bucket = bucket
        self.replicas = replicas
        self._mem: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self.kv: KeyValue | None = None
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"hits": 0, "misses": 0, "stored": 0, "shared_in": 0,
                      "store_failed": 0, "evicted": 0, "expired": 0}

    # ---- memory ---------------------------------------------------------------------
    def get(self, key: str, tenant: str) -> Entry | None:
        e = self._mem.get(key)
        if e is None:
            self.stats["misses"] += 1
            return None
        if e.created_at + self.ttl_s < self.clock() or e.tenant != tenant:
            if e.tenant == tenant:
                self._drop(key)
                self.stats["expired"] += 1
            self.stats["misses"] += 1
            return None
        self._mem.move_to_end(key)
        self.stats["hits"] += 1
        return e

    def _keep(self, key: str, e: Entry) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body) + _OVERHEAD
        self._mem[key] = e
        self._bytes += len(e.body) + _OVERHEAD
        while self._bytes > self.max_bytes and self._mem:
            _, out = self._mem.popitem(last=False)
            self._bytes -= len(out.body) + _OVERHEAD
            self.stats["evicted"] += 1

    def _drop(self, key: str) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body) + _OVERHEAD

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def put(self, key: str, e: Entry) -> bool:
        """Keep ``e`` here and, in the background, in the bucket; False when too large."""
        if len(e.body) > self.max_entry_bytes:
            return False
        self._keep(key, e)
        self.stats["stored"] += 1
        if self.kv is not None:
            self._spawn(self._publish(self.kv, key, encode_entry(e)))
        return True

    async def _publish(self, kv: KeyValue, key: str, data: bytes) -> None:
        try:
            await kv.put(key, data)
        except (NatsError, OSError, TimeoutError) as exc:
            self.stats["store_failed"] += 1
            log.debug("cache: entry not shared", extra={"error": str(exc)})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the bucket -----------------------------------------------------------------
    async def attach(self, nc: NatsClient) -> None:
        """Open (or make) the bucket, follow what the fleet stores, read what is there."""
        js = nc.jetstream()
        try:
            kv = await js.key_value(self.bucket)
        except NotFoundError:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=self.bucket, description="tollway response cache", history=1,
                ttl=self.ttl_s, max_bytes=self.max_bytes, storage=StorageType.FILE,
                replicas=self.replicas))
        if self._sub is None:
            # Core NATS: every put of any gateway, resubscribed by the client on reconnect.
            self._sub = await nc.subscribe(f"$KV.{self.bucket}.>", cb=self._on_msg)
        self.kv = kv
        self._spawn(self._load(kv))

    async def _load(self, kv: KeyValue) -> None:
        watcher = await kv.watchall()
        try:
            while True:
                try:
                    e = await watcher.updates(timeout=5.0)  # type: ignore[no-untyped-call]
                except Exception:  # a timeout or a lost connection: what came is kept
                    return
                if e is None:
                    return
                if e.value and not e.operation:
                    self._take(e.key, e.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _on_msg(self, msg: Msg) -> None:
        key = msg.subject[len(self.bucket) + 5:]  # "$KV.<bucket>.<key>"
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            self._drop(key)
            return
        if msg.data:
            self._take(key, msg.data)

    def _take(self, key: str, data: bytes) -> None:
        if key in self._mem:
            return  # our own put coming back, or one we already read
        try:
            e = decode_entry(data)
        except msgspec.MsgspecError:
            return
        if e.created_at + self.ttl_s < self.clock():
            return
        self._keep(key, e)
        self.stats["shared_in"] += 1

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        tasks = list(self._tasks)
        if tasks:
            # Puts under way get a moment to land; the watcher is cancelled.
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            await cancel_and_wait(pending, what="the response cache's tasks")
        self.kv = None
