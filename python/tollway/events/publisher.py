"""The publisher: a bounded in-memory queue drained into JetStream by one task.

``submit`` is all the response path ever pays: an ``O(1)`` append to a deque
(no encoding, no I/O). The task turns queued items into events, encodes them,
writes a batch of publishes to the connection at once (pipelined, each with
``Nats-Msg-Id = event_id``) and then waits for their acks. What cannot be
published -- NATS unreachable, acks not back in time, the queue full -- goes
to the :class:`~tollway.events.outbox.Outbox` in order, and the outbox is sent
first when NATS is back, so events keep their order except that a batch in
flight when NATS fails may land after events recorded during the outage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tollway.events.metrics import EventMetrics
from tollway.events.outbox import Outbox, OutboxEntry
from tollway.events.schema import Event, encode, event_from_record
from tollway.record import CallRecord

log = logging.getLogger("tollway.events")

Item = CallRecord | Event

_OK, _DUP, _RETRY, _FATAL = 0, 1, 2, 3


class EventIds:
    """Unique, cheap event ids: a random 80-bit prefix per process plus a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._n = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._n):012x}"


class _RateLimitedLog:
    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = collections.Counter()

    def __call__(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every_s:
            self._suppressed[key] += 1
            return
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        log.log(level, msg + (f" ({n} similar suppressed)" if n else ""), *args)


class Publisher:
    """Queue + publisher task + outbox. One per gateway process."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        metrics: EventMetrics | None = None,
        instance: str = "",
        queue_size: int = 10_000,
        batch_size: int = 256,
        publish_timeout_s: float = 2.0,
        linger_s: float = 0.002,
        on_no_stream: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.outbox = outbox
        self.metrics = metrics or EventMetrics()
        self.instance = instance
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.publish_timeout_s = publish_timeout_s
        self.linger_s = linger_s
        self.on_no_stream = on_no_stream
        self.new_id = EventIds()
        self._q: collections.deque[Item] = collections.deque()
        self._nc: NatsClient | None = None
        self._prefix = ""
        self._sub: Any = None
        self._tokens = itertools.count(1)
        self._inflight: dict[int, int] = {}  # reply token -> index in the batch in flight
        self._results: list[int] = []
        self._outstanding = 0
        self._acked = asyncio.Event()
        self._wake = asyncio.Event()
        self._idle = False
        self._stopping = False
        self._stopped = False
        self._no_stream = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._log = _RateLimitedLog()
        self._drained = asyncio.Event()
        self.metrics.queue_depth.set_function(lambda: len(self._q))
        self.metrics.outbox_depth.set_function(lambda: self.outbox.pending)

    # ---- the response path -------------------------------------------------------------------
    def submit(self, item: Item) -> None:
        """Queue one record or event. Never blocks, never raises."""
        try:
            if self._loop_thread and threading.get_ident() != self._loop_thread:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self.submit, item)
                return
            if self._stopped:  # a call settling after shutdown began: straight to the outbox
                self._spill([self._entry(item)], "shutdown")
                self.outbox.flush()
                return
            q = self._q
            if len(q) < self.queue_size:
                q.append(item)
                if self._idle:
                    self._idle = False
                    self._wake.set()
            else:
                self._overflow(item)
        except Exception as exc:  # the pipeline must never see an events failure
            self.metrics.dropped.labels("internal").inc()
            self._log(logging.ERROR, "submit", "events: could not queue an event (%r); "
                      "dropped", exc)

    def _overflow(self, item: Item) -> None:
        # The queue keeps its order: everything queued goes to the outbox before this one.
        n = len(self._q) + 1
        self._spill_queue("queue_full")
        self._spill([self._entry(item)], "queue_full")
        self._log(logging.WARNING, "overflow",
                  "events queue full (%d): %d events moved to the outbox", self.queue_size, n)
        if self._idle:
            self._idle = False
            self._wake.set()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, nc: NatsClient | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if nc is not None:
            await self.attach(nc)
        self._task = asyncio.create_task(self._run(), name="tollway-events-publisher")

    async def attach(self, nc: NatsClient) -> None:
        """Use this connection (also after a late first connect)."""
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_ack)
        self.kick()

    def kick(self) -> None:
        """Wake the task (NATS is back, or something was queued from outside)."""
        self._idle = False
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def queued(self) -> int:
        return len(self._q)

    async def flush(self, timeout: float = 10.0, *, outbox: bool = True) -> bool:
        """Wait until the queue (and the outbox) are empty; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._q and not self._outstanding and (not outbox or not self.outbox.pending):
                return True
            self._drained.clear()
            self.kick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.05, max(0.0, deadline - time.monotonic()))):
                    await self._drained.wait()
        return not self._q and (not outbox or not self.outbox.pending)

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish what is queued (up to ``timeout``) and outbox the rest (the caller closes it)."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self.kick()
            try:
                async with asyncio.timeout(timeout):
                    await task
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._stopped = True
        self._spill_queue("shutdown")
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        self.outbox.flush(force_sync=True)
        if self.outbox.pending:
            log.warning("events: %d events left in the outbox at shutdown; they are sent "
                        "at the next start", self.outbox.pending)

    # ---- the task ----------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                if self._stopping:
                    if self.connected and (self._q or self.outbox.pending):
                        await self._cycle()  # one last round; stop() bounds how long
                    return
                if backoff:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff):
                            await self._wake.wait()
                    self._wake.clear()
                elif not self._q and not (self.outbox.pending and self.connected):
                    self._drained.set()
                    self._idle = True
                    if self.outbox.needs_sync:
                        self.outbox.flush()
                        if self.outbox.needs_sync:  # the fsync interval has not passed yet
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(self.outbox.fsync_interval_s):
                                    await self._wake.wait()
                            self._wake.clear()
                            continue
                    await self._wake.wait()
                    self._wake.clear()
                    if self.linger_s and not self._stopping:
                        await asyncio.sleep(self.linger_s)  # let a few more events join the batch
                ok = await self._cycle()
                backoff = 0.0 if ok else min(max(backoff * 2, 0.1), 2.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log(logging.ERROR, "cycle", "events publisher cycle failed")
                log.debug("publisher cycle", exc_info=True)
                backoff = 1.0

    async def _cycle(self) -> bool:
        """One round: outbox first, then the queue. False when NATS is failing."""
        if not self.connected:
            self._spill_queue("nats_down")
            self.outbox.flush()
            return False
        if self._no_stream and self.on_no_stream is not None:
            await self.on_no_stream()
            self._no_stream = False
        while self.outbox.pending:
            entries, end = self.outbox.read_batch(self.batch_size)
            if not entries:
                break
            results = await self._publish(entries)
            if any(r == _RETRY for r in results):
                self._spill_queue("nats_failing")  # keep order behind the outbox
                self.outbox.flush()
                return False
            self._count(entries, results)
            self.outbox.commit(end, len(entries))
        while self._q:
            batch = [self._entry(self._q.popleft())
                     for _ in range(min(len(self._q), self.batch_size))]
            try:
                results = await self._publish(batch)
            except asyncio.CancelledError:
                self._spill(batch, "shutdown")  # popped from the queue: not lost on cancel
                raise
            failed = [e for e, r in zip(batch, results, strict=True) if r == _RETRY]
            self._count(batch, results)
            if failed:
                self._spill(failed, "publish_failed")
                self._spill_queue("nats_failing")
                self.outbox.flush()
                return False
            await asyncio.sleep(0)  # a long drain must not starve the requests being served
        return True

    def _count(self, entries: list[OutboxEntry], results: list[int]) -> None:
        ok = dup = fatal = 0
        for r in results:
            if r == _OK:
                ok += 1
            elif r == _DUP:
                dup += 1
            elif r == _FATAL:
                fatal += 1
        if ok or dup:
            self.metrics.published.inc(ok + dup)
        if dup:
            self.metrics.duplicates.inc(dup)
        if fatal:
            self.metrics.dropped.labels("rejected_by_stream").inc(fatal)
            ids = [e.event_id for e, r in zip(entries, results, strict=True) if r == _FATAL]
            self._log(logging.ERROR, "fatal", "events: JetStream refused %d events (first %s); "
                      "dropped", fatal, ids[0])

    def _entry(self, item: Item) -> OutboxEntry:
        if isinstance(item, CallRecord):
            event: Event = event_from_record(item, self.new_id(), self.instance)
        else:
            event = item
        return OutboxEntry(event.subject(), event.event_id, encode(event))

    def _spill_queue(self, reason: str) -> None:
        if self._q:
            items = list(self._q)
            self._q.clear()
            self._spill([self._entry(i) for i in items], reason)

    def _spill(self, entries: list[OutboxEntry], reason: str) -> None:
        done = 0
        try:
            for e in entries:
                self.outbox.append(e.subject, e.event_id, e.payload)
                done += 1
        except (OSError, AssertionError) as exc:
            lost = len(entries) - done
            self.metrics.dropped.labels("outbox_unwritable").inc(lost)
            self._log(logging.ERROR, "outbox", "events: outbox not writable (%s); %d events "
                      "dropped", exc, lost)
        if done:
            self.metrics.spilled.labels(reason).inc(done)

    # ---- publishing --------------------------------------------------------------------------
    async def _publish(self, entries: list[OutboxEntry]) -> list[int]:
        """Publish a batch pipelined; one result per entry (acked, duplicate, retry, fatal)."""
        nc = self._nc
        assert nc is not None
        n = len(entries)
        self._results = results = [_RETRY] * n
        inflight = self._inflight
        inflight.clear()
        self._outstanding = n
        self._acked.clear()
        prefix = self._prefix
        fast = hasattr(nc, "_send_command") and hasattr(nc, "_flush_pending")
        try:
            for i, e in enumerate(entries):
                tok = next(self._tokens)
                inflight[tok] = i
                reply = f"{prefix}{tok}"
                if fast:
                    # nats-py's publish() costs ~4x this per message (validation, header
                    # dict walk, a flush request each); these are our own subjects and ids.
                    hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % e.event_id.encode()
                    await nc._send_command(
                        b"HPUB %s %s %d %d\r\n%s%s\r\n"
                        % (e.subject.encode(), reply.encode(), len(hdr),
                           len(hdr) + len(e.payload), hdr, e.payload)
                    )
                else:
                    await nc.publish(e.subject, e.payload, reply=reply,
                                     headers={"Nats-Msg-Id": e.event_id})
            if fast:
                await nc._flush_pending()
            async with asyncio.timeout(self.publish_timeout_s):
                await self._acked.wait()
        except TimeoutError:
            self._log(logging.WARNING, "timeout", "events: %d of %d acks not back after %.1fs; "
                      "the batch goes to the outbox", self._outstanding, n,
                      self.publish_timeout_s)
        except Exception as exc:  # connection closed / draining / buffer full
            self._log(logging.WARNING, "publish", "events: publish failed (%s)", exc)
        finally:
            inflight.clear()
            self._outstanding = 0
        return results

    async def _on_ack(self, msg: Msg) -> None:
        try:
            tok = int(msg.subject[len(self._prefix):])
        except ValueError:
            return
        i = self._inflight.pop(tok, None)
        if i is None:
            return  # a late ack for a batch already given up on (resent; deduplicated)
        data = msg.data
        if not data:
            status = (msg.headers or {}).get("Status", "")
            if status == "503":  # no responders: no stream listens on the subject
                self._no_stream = True
                self._log(logging.ERROR, "nostream", "events: no JetStream stream for %s",
                          msg.subject)
            self._results[i] = _RETRY
        elif b'"error"' in data:
            # 5xx-ish (stream offline, leader election) is worth retrying; 4xx is about the
            # message itself and would fail forever.
            self._results[i] = _RETRY if b'"code":503' in data or b'"code":500' in data \
                else _FATAL
        else:
            self._results[i] = _DUP if b'"duplicate":true' in data else _OK
        self._outstanding -= 1
        if self._outstanding <= 0:
            self._acked.set()
